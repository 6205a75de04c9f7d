"""The one place that imports bitsandbytes and knows its layer and parameter types."""

from __future__ import annotations

import functools
import importlib
import sys
from collections.abc import Callable
from types import ModuleType

import torch
import torch.utils.checkpoint
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


def is_plain_linear(module: nn.Module) -> bool:
    """``nn.Linear`` itself (not a subclass with its own forward) or transformers' ``Conv1D``."""
    conv1d = conv1d_class()
    return type(module) is nn.Linear or (conv1d is not None and type(module) is conv1d)


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
    if type(module) is not nn.Linear and module.__class__.__name__ == "Conv1D":
        in_features, out_features = module.weight.shape
        return in_features, out_features
    return module.in_features, module.out_features


def module_nbytes(module: nn.Module) -> int:
    """Bytes a linear layer holds: weight and bias, plus the quantization statistics of a bnb layer."""
    total = sum(t.data.nbytes for t in (module.weight, getattr(module, "bias", None)) if t is not None)
    quant_state = getattr(module.weight, "quant_state", None)
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


def recomputed_weight(dequantize: Callable[..., torch.Tensor], *args: object) -> torch.Tensor:
    """``dequantize(*args)`` in compiled code, recomputed in the backward pass instead of saved.

    The backward of ``F.linear`` needs the weight, and a compiled graph saves whatever its backward
    needs from the forward: every dequantized weight of a block (2 bytes a parameter, 0.36 GiB for a
    Llama-3-8B block) would then stay alive from the block's recomputation to its backward. Inside
    a checkpoint region the compiler recomputes the weight from the packed one instead, in one
    extra fused kernel.
    """
    return torch.utils.checkpoint.checkpoint(dequantize, *args, use_reentrant=False)


@functools.cache
def layer_subclass(mixin: type, base: type) -> type:
    """``base`` with ``mixin``'s methods in front, e.g. another training forward for a bitsandbytes layer.

    Changing a layer's class (not its instance ``forward``) keeps one ``torch.compile`` graph for every
    block: the compiler guards on the class, but on the identity of a per-instance forward, so
    per-instance forwards recompile for each block until its cache limit, then run eagerly. The
    class is named ``<mixin><base>`` in ``mixin``'s module, whose ``__getattr__`` (see
    :func:`find_layer_subclass`) makes it again when pickle asks for it.
    """
    return type(f"{mixin.__name__}{base.__name__}", (mixin, base), {"__module__": mixin.__module__})


def find_layer_subclass(mixin: type, name: str) -> type:
    """The :func:`layer_subclass` called ``name`` (``<mixin><a bitsandbytes.nn class>``)."""
    base = None
    if name.startswith(mixin.__name__):
        base = getattr(require_bitsandbytes().nn, name.removeprefix(mixin.__name__), None)
    if not (isinstance(base, type) and issubclass(base, nn.Module)):
        raise AttributeError(f"module {mixin.__module__!r} has no attribute {name!r}")
    return layer_subclass(mixin, base)


def use_layer_subclass(
    model: nn.Module, layer_type: type, mixin: type, accepts: Callable[[nn.Module], bool]
) -> int:
    """Give each ``layer_type`` module of ``model`` that ``accepts`` takes ``mixin``'s methods; returns how many.

    A module with a forward of its own on the instance (e.g. accelerate's hooks) is left alone.
    """
    changed = 0
    for module in model.modules():
        if not isinstance(module, layer_type) or not accepts(module) or "forward" in vars(module):
            continue
        if not isinstance(module, mixin):
            module.__class__ = layer_subclass(mixin, type(module))
        changed += 1
    return changed


def remove_layer_subclass(model: nn.Module, mixin: type) -> None:
    """Undo :func:`use_layer_subclass`: each module gets its bitsandbytes class back."""
    for module in model.modules():
        if isinstance(module, mixin):
            module.__class__ = type(module).__bases__[1]
