"""Training paths: faster forwards for quantized layers, the chunked loss, transformer blocks and their activations.

Each is a reversible change to a quantized model that keeps its parameters and state dict;
:func:`~bnb_lightning.prepare_model` applies them according to :class:`~bnb_lightning.TrainingOptions`.
"""

from .blocks import ActivationBlock, compile_blocks
from .int8 import remove_dequantized_int8, use_dequantized_int8
from .linear4bit import remove_fused_4bit_dequantize, use_fused_4bit_dequantize
from .loss import linear_cross_entropy, remove_chunked_loss, use_chunked_loss
from .plan import (
    ActivationPlan,
    ActivationPlanner,
    activation_planner,
    plan_activations,
    remove_activation_offload,
    remove_activation_plan,
    use_activation_offload,
)
from .tiled_mlp import remove_tiled_mlp, set_mlp_tile_tokens, use_tiled_mlp

__all__ = [
    "compile_blocks",
    "use_dequantized_int8",
    "remove_dequantized_int8",
    "use_fused_4bit_dequantize",
    "remove_fused_4bit_dequantize",
    "linear_cross_entropy",
    "use_chunked_loss",
    "remove_chunked_loss",
    "ActivationBlock",
    "ActivationPlan",
    "ActivationPlanner",
    "plan_activations",
    "activation_planner",
    "remove_activation_plan",
    "use_activation_offload",
    "remove_activation_offload",
    "use_tiled_mlp",
    "set_mlp_tile_tokens",
    "remove_tiled_mlp",
]
