"""Quantize a model to bitsandbytes 4-bit or 8-bit inside a Lightning Trainer, ready for LoRA."""

from .adapters import inject_adapters
from .callback import BnbQuantization
from .config import QuantizationConfig, TrainingOptions
from .export import export_adapters, load_adapters
from .int8 import remove_dequantized_int8, use_dequantized_int8
from .linear4bit import remove_fused_4bit_dequantize, use_fused_4bit_dequantize
from .loss import linear_cross_entropy, remove_chunked_loss, use_chunked_loss
from .merge import MergedExport, MergeToleranceError, export_merged, merged_model
from .prepare import PreparedModel, compile_blocks, count_parameters, prepare_for_kbit_training, prepare_model
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
from .state_dict import load_state_dict_file, read_state_dict_file, save_state_dict_file

__version__ = "0.1.0"

__all__ = [
    "compile_blocks",
    "use_dequantized_int8",
    "remove_dequantized_int8",
    "use_fused_4bit_dequantize",
    "remove_fused_4bit_dequantize",
    "linear_cross_entropy",
    "use_chunked_loss",
    "remove_chunked_loss",
    "save_state_dict_file",
    "load_state_dict_file",
    "read_state_dict_file",
    "export_adapters",
    "export_merged",
    "load_adapters",
    "merged_model",
    "MergedExport",
    "MergeToleranceError",
    "BnbQuantization",
    "count_parameters",
    "inject_adapters",
    "prepare_for_kbit_training",
    "QuantizationConfig",
    "TrainingOptions",
    "prepare_model",
    "PreparedModel",
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
]
