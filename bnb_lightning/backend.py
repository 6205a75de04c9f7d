"""The one place that imports bitsandbytes and knows its layer and parameter types."""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Any

import torch
from torch import nn

MIN_BITSANDBYTES = "0.45"


def require_bitsandbytes() -> ModuleType:
    """Import bitsandbytes, or say how to install it."""
    try:
        return importlib.import_module("bitsandbytes")
    except ImportError as error:
        raise ImportError(
            f"bnb_lightning needs bitsandbytes>={MIN_BITSANDBYTES} to quantize, but it could not be imported "
            f"({error}). Install it with `pip install 'bitsandbytes>={MIN_BITSANDBYTES}'`."
        ) from error


def as_device(device: torch.device | str | int) -> torch.device:
    """A ``torch.device``; a bare index means a CUDA device, as in ``model.to(0)``."""
    return torch.device(f"cuda:{device}" if isinstance(device, int) else device)


def check_device_supported(device: torch.device | str) -> torch.device:
    """Fail early when bitsandbytes has no kernels for ``device`` or PyTorch cannot use it here."""
    device = torch.device(device)
    bnb = require_bitsandbytes()
    supported = set(getattr(bnb, "supported_torch_devices", {"cpu", "cuda"}))
    if device.type == "meta":
        raise ValueError(
            "cannot quantize onto the meta device: quantization needs real weights. Pass device='cuda' or "
            "'cpu', or use replace_with_bnb_linear() to build empty layers for loading a checkpoint."
        )
    if device.type not in supported:
        raise RuntimeError(
            f"bitsandbytes {getattr(bnb, '__version__', '?')} has no backend for device '{device.type}'; "
            f"quantize on one of {sorted(supported)}, or install a bitsandbytes build with {device.type} support."
        )
    available = _torch_device_count(device)
    if available is not None and (available == 0 or (device.index or 0) >= available):
        raise RuntimeError(
            f"device '{device}' is not available to PyTorch {torch.__version__} on this machine "
            f"({available} '{device.type}' devices found); quantize on 'cpu' or on a device that exists, "
            f"or install a PyTorch build with {device.type} support."
        )
    return device


def _torch_device_count(device: torch.device) -> int | None:
    """How many devices of this type PyTorch can use, or ``None`` where it has no way to tell."""
    if device.type == "cpu":
        return None
    device_module = getattr(torch, device.type, None)
    is_available = getattr(device_module, "is_available", None)
    if not callable(is_available):
        return None
    if not is_available():
        return 0
    device_count = getattr(device_module, "device_count", None)
    return device_count() if callable(device_count) else None


def conv1d_class() -> type | None:
    """transformers' ``Conv1D`` if transformers is already loaded (a model using it implies it is)."""
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    return getattr(pytorch_utils, "Conv1D", None)


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (GPT-2's linear layer, its weight stored transposed)."""
    conv1d = conv1d_class()
    return conv1d is not None and type(module) is conv1d


def is_plain_linear(module: nn.Module) -> bool:
    """``nn.Linear`` itself (not a subclass with its own forward) or transformers' ``Conv1D``."""
    return type(module) is nn.Linear or is_conv1d(module)


def is_bnb_linear(module: nn.Module) -> bool:
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def is_quantized_parameter(parameter: torch.Tensor) -> bool:
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return False
    if isinstance(parameter, bnb.nn.Params4bit):
        return bool(parameter.bnb_quantized)
    return isinstance(parameter, bnb.nn.Int8Params) and parameter.dtype == torch.int8


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an ``nn.Linear`` or a ``Conv1D`` (whose weight is transposed)."""
    if is_conv1d(module):
        in_features, out_features = module.weight.shape
        return in_features, out_features
    return module.in_features, module.out_features


def module_nbytes(module: nn.Module) -> int:
    """Bytes a linear layer holds: weight and bias, plus the quantization statistics of a bnb layer."""
    weights = sum(t.data.nbytes for t in (module.weight, getattr(module, "bias", None)) if t is not None)
    return weights + statistics_nbytes(module)


def layer_quant_state(layer: nn.Module) -> Any:
    """A 4-bit layer's quant state: its weight's, else the copy bitsandbytes keeps on the layer for wrappers
    that replace the weight with a plain tensor (FSDP's views, FSDP2's DTensors); ``None`` if neither has one."""
    return getattr(layer.weight, "quant_state", None) or getattr(layer, "quant_state", None)


def statistics_nbytes(module: nn.Module) -> int:
    """Bytes of a bnb layer's quantization statistics, which live outside its parameters (0 for others)."""
    total = 0
    quant_state = layer_quant_state(module)
    if quant_state is not None:
        total += sum(
            v.nbytes for v in quant_state.as_dict(packed=False).values() if isinstance(v, torch.Tensor)
        )
    # LLM.int8 keeps its row scales on the weight until the first forward, on the layer's state after.
    scb = getattr(module.weight, "SCB", None)
    if scb is None and hasattr(module, "state"):
        scb = getattr(module.state, "SCB", None)
    if isinstance(scb, torch.Tensor):
        total += scb.nbytes
    return total


def flat_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The bytes of ``tensor`` as a flat ``uint8`` tensor (a view where it is contiguous)."""
    return tensor.detach().reshape(-1).view(torch.uint8)
