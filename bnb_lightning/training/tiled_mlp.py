"""Sequence-tiled modules: a transformer block's MLP (or the final norm) run over tiles of tokens, each checkpointed.

At long contexts the MLP's intermediates, not the weights, set the peak: at 57k tokens a Llama-3-8B
block's MLP makes several (batch x sequence x 14,336) tensors (gate, up, activation, product, and
their gradients), 1.5 GiB each in bfloat16, during the block's recompute even when every block is
checkpointed. Run over tiles of ``tile_tokens`` tokens, each under non-reentrant
``torch.utils.checkpoint.checkpoint``, the forward saves only the tiles' inputs, and the backward
pass recomputes one tile at a time: only one tile's intermediates exist at once. The cost is one more
MLP forward per tile in the backward pass (inside a checkpointed block: a third MLP forward). The MLP
must treat each token on its own (a dense MLP does; a mixture of experts with a capacity limit or
auxiliary loss does not). Only training forwards with gradients are tiled; evaluation and no-grad
forwards run the MLP as it is.

The final norm of a causal LM is tiled the same way (:func:`tile_module`): it runs outside the
compiled blocks, in float32, and its eager backward pass makes about five float32 copies of the
hidden states at once (6 GiB at 82k tokens on an 8B shape); over tiles, one tile's.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from .blocks import transformer_blocks
from .swap import layer_subclass, remove_layer_subclass

# Names under which transformer blocks keep their MLP (Llama and most decoders: ``mlp``).
MLP_NAMES = ("mlp", "feed_forward", "ffn")


class Tiled:
    """Mixin for a block's MLP: in training forwards with gradients, run it over checkpointed sequence tiles."""

    tile_tokens: int | None = None  # tokens a tile; None: untiled

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        tile = self.tile_tokens
        # Extra arguments could be per token too; an MLP called with them runs untiled.
        if (
            not tile
            or args
            or kwargs
            or not (self.training and torch.is_grad_enabled())
            or x.shape[-2] <= tile
        ):
            return super().forward(x, *args, **kwargs)
        forward = super().forward  # bound here: ``super()`` without arguments fails inside a comprehension
        outputs = [
            torch.utils.checkpoint.checkpoint(forward, part, use_reentrant=False)
            for part in x.split(tile, dim=-2)
        ]
        return torch.cat(outputs, dim=-2)

    def __reduce_ex__(self, protocol: int) -> tuple:
        # Unpickled as ``Tiled`` over the base class pickle finds by its own name: the base is any MLP
        # class (e.g. transformers' LlamaMLP), so this module cannot make the subclass from a name alone.
        reduced = super().__reduce_ex__(protocol)
        return (_new_tiled, (type(self).__bases__[1],), *reduced[2:])


# Tiled classes made in this process, by name, for pickles of the classes themselves.
_MADE: dict[str, type] = {}


def _tiled_class(base: type) -> type:
    cls = layer_subclass(Tiled, base)
    _MADE.setdefault(cls.__name__, cls)
    return cls


def _new_tiled(base: type) -> nn.Module:
    """An empty ``Tiled`` ``base`` instance, for pickle to give its state to."""
    return object.__new__(_tiled_class(base))


def __getattr__(name: str) -> type:
    if name in _MADE:
        return _MADE[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _check_tile_tokens(tile_tokens: Any) -> None:
    if isinstance(tile_tokens, bool) or not isinstance(tile_tokens, int) or tile_tokens < 1:
        raise ValueError(
            f"tile_tokens must be an int >= 1 (the tokens of one MLP tile, e.g. 4096), got {tile_tokens!r} "
            f"({type(tile_tokens).__name__}). To stop tiling, call remove_tiled_mlp(model), or "
            "set_mlp_tile_tokens(model, None) to pause it."
        )


def block_mlp(block: nn.Module) -> nn.Module | None:
    """The MLP of a transformer block: its child named ``mlp``, ``feed_forward`` or ``ffn`` (``None``: none)."""
    children = dict(block.named_children())
    return next((children[name] for name in MLP_NAMES if name in children), None)


def tile_module(module: nn.Module, tile_tokens: int | None) -> bool:
    """Run ``module`` (which must treat each token on its own) over checkpointed sequence tiles.

    It becomes a ``Tiled<its class>`` (same children, parameters and state dict); ``None`` leaves it
    tiled but paused. A module with a forward of its own on the instance (e.g. accelerate's hooks) is
    left alone: returns whether ``module`` is tiled now.
    """
    if tile_tokens is not None:
        _check_tile_tokens(tile_tokens)
    if "forward" in vars(module):
        return False
    if not isinstance(module, Tiled):
        module.__class__ = _tiled_class(type(module))
    module.tile_tokens = tile_tokens
    return True


def _block_mlps(model: nn.Module) -> list[nn.Module]:
    return [mlp for mlp in map(block_mlp, transformer_blocks(model)) if mlp is not None]


def use_tiled_mlp(model: nn.Module, tile_tokens: int) -> int:
    """Run the MLP of every transformer block over checkpointed tiles of ``tile_tokens`` tokens; returns how many.

    Each MLP becomes a ``Tiled<its class>`` (a subclass: same children, parameters and state dict);
    blocks without an MLP, and MLPs with a forward of their own on the instance (e.g. accelerate's
    hooks), are left alone. Called again, it only changes the tile size. Undo with
    :func:`remove_tiled_mlp`.
    """
    _check_tile_tokens(tile_tokens)
    return sum(tile_module(mlp, tile_tokens) for mlp in _block_mlps(model))


def set_mlp_tile_tokens(model: nn.Module, tile_tokens: int | None) -> int:
    """Set the tile size of every tiled block MLP of ``model``, e.g. between steps; returns how many.

    ``None`` pauses tiling (the MLPs keep their tiled class and run untiled until a size is set again).
    """
    if tile_tokens is not None:
        _check_tile_tokens(tile_tokens)
    tiled = [mlp for mlp in _block_mlps(model) if isinstance(mlp, Tiled)]
    for mlp in tiled:
        mlp.tile_tokens = tile_tokens
    return len(tiled)


def remove_tiled_mlp(model: nn.Module) -> None:
    """Undo :func:`use_tiled_mlp` and :func:`tile_module`: each module gets its own class back and runs untiled."""
    for module in model.modules():
        if isinstance(module, Tiled):
            vars(module).pop("tile_tokens", None)
    remove_layer_subclass(model, Tiled)
