"""Training forwards given to bitsandbytes layers by changing their class, not their instances.

Changing a layer's class (not its instance ``forward``) keeps one ``torch.compile`` graph for every
block: the compiler guards on the class, but on the identity of a per-instance forward, so
per-instance forwards recompile for each block until its cache limit, then run eagerly. A swapped
layer keeps its parameters and state dict; swapping back restores bitsandbytes' class.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.utils.checkpoint
from torch import nn

from ..backend import require_bitsandbytes


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

    The class is named ``<mixin><base>`` in ``mixin``'s module, whose ``__getattr__`` (see
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
