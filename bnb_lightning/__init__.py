"""Quantize a model to bitsandbytes 4-bit or 8-bit inside a Lightning Trainer, ready for LoRA.

The layers, from the bottom: the core (``config``, ``skip``, ``quantize``, ``replace``, ``prepare``
and their helpers) quantizes a model and prepares it for adapters; ``training`` holds the speed paths
``prepare_model`` applies; ``io`` saves, loads and exports; ``callback`` and ``distributed`` wire it
all into a Lightning Trainer.
"""

import sys as _sys

from . import io, training
from .adapters import inject_adapters
from .callback import BnbQuantization
from .config import QuantizationConfig, TrainingOptions
from .io import *  # noqa: F403  (its __all__, below)
from .prepare import PreparedModel, count_parameters, prepare_for_kbit_training, prepare_model
from .quantize import QuantizationError, quantize_model
from .replace import (
    load_quantized_state_dict,
    replace_8bit_linear,
    replace_with_bnb_linear,
    set_module_8bit_tensor_to_device,
    set_module_quantized_tensor_to_device,
)
from .report import ModuleReport, QuantizationReport
from .skip import get_keys_to_not_convert
from .training import *  # noqa: F403  (its __all__, below)

__version__ = "0.1.0"

__all__ = [
    # Core: configure, quantize, prepare for adapters.
    "QuantizationConfig",
    "TrainingOptions",
    "QuantizationError",
    "QuantizationReport",
    "ModuleReport",
    "get_keys_to_not_convert",
    "quantize_model",
    "replace_with_bnb_linear",
    "set_module_quantized_tensor_to_device",
    "load_quantized_state_dict",
    "replace_8bit_linear",
    "set_module_8bit_tensor_to_device",
    "inject_adapters",
    "prepare_for_kbit_training",
    "count_parameters",
    "prepare_model",
    "PreparedModel",
    # Training speed paths (bnb_lightning.training).
    *training.__all__,
    # Persistence (bnb_lightning.io).
    *io.__all__,
    # Lightning.
    "BnbQuantization",
]

# Modules of the flat layout of 0.1.0, kept under their old names: old imports and pickles of the
# training layer classes (``bnb_lightning.int8.DequantizedLinear8bitLt``) resolve to the new modules.
_OLD_NAMES = {
    "int8": training.int8,
    "linear4bit": training.linear4bit,
    "loss": training.loss,
    "blocks": training.blocks,
    "files": io.files,
    "state_dict": io.state_dict,
    "layer_state": io.layer_state,
    "checkpoint": io.checkpoint,
    "export": io.export,
    "merge": io.merge,
}
for _name, _module in _OLD_NAMES.items():
    _sys.modules.setdefault(f"{__name__}.{_name}", _module)
del _name, _module


def __getattr__(name: str):
    if name in _OLD_NAMES:
        return _OLD_NAMES[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
