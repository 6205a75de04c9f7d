"""Training speed paths: faster forwards for quantized layers, the chunked loss, transformer blocks.

Each is a reversible change to a quantized model that keeps its parameters and state dict;
:func:`~bnb_lightning.prepare_model` applies them according to :class:`~bnb_lightning.TrainingOptions`.
"""

from .blocks import compile_blocks
from .int8 import remove_dequantized_int8, use_dequantized_int8
from .linear4bit import remove_fused_4bit_dequantize, use_fused_4bit_dequantize
from .loss import linear_cross_entropy, remove_chunked_loss, use_chunked_loss
from .offload import remove_activation_offload, use_activation_offload

__all__ = [
    "compile_blocks",
    "use_dequantized_int8",
    "remove_dequantized_int8",
    "use_fused_4bit_dequantize",
    "remove_fused_4bit_dequantize",
    "linear_cross_entropy",
    "use_chunked_loss",
    "remove_chunked_loss",
    "use_activation_offload",
    "remove_activation_offload",
]
