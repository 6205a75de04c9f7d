"""Lean preparation of a quantized model for adapter training, and adapter injection.

Unlike PEFT's ``prepare_model_for_kbit_training``, nothing is upcast to float32 by default:
norms and embeddings stay in the model's dtype, which keeps training at half-precision speed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .backend import is_quantized_parameter
from .blocks import checkpointable_blocks, transformer_blocks, transformers_models


@dataclass(frozen=True)
class ParameterCount:
    trainable: int
    total: int

    def __str__(self) -> str:
        share = 100 * self.trainable / self.total if self.total else 0.0
        return f"trainable parameters: {self.trainable:,} of {self.total:,} ({share:.4f}%)"


def _logical_numel(parameter: torch.Tensor) -> int:
    # A packed 4-bit weight holds two values per byte; count the weights it stands for.
    quant_state = getattr(parameter, "quant_state", None)
    if quant_state is not None and getattr(quant_state, "shape", None) is not None:
        return math.prod(quant_state.shape)
    return parameter.numel()


def count_parameters(model: nn.Module) -> ParameterCount:
    """Trainable and total parameters, counting each quantized weight by its unpacked size."""
    parameters = list(model.parameters())
    return ParameterCount(
        trainable=sum(_logical_numel(p) for p in parameters if p.requires_grad),
        total=sum(_logical_numel(p) for p in parameters),
    )


def cast_to_float32(model: nn.Module, trainable_only: bool = False) -> None:
    """Cast half-precision parameters that are not quantized to float32, keeping the Parameter objects."""
    for parameter in model.parameters():
        if trainable_only and not parameter.requires_grad:
            continue
        if not is_quantized_parameter(parameter) and parameter.dtype in (torch.float16, torch.bfloat16):
            parameter.data = parameter.data.float()


def _checkpointing_enabled(hf_model: nn.Module) -> bool:
    # transformers 5.x renamed gradient checkpointing to activation checkpointing; the old names warn.
    for flag in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(hf_model), flag):
            return bool(getattr(hf_model, flag))
    return False


def _set_checkpointing(hf_model: nn.Module, enabled: bool) -> None:
    kwargs = {"use_reentrant": False}
    if hasattr(hf_model, "activation_checkpointing_enable"):
        if enabled:
            hf_model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            hf_model.activation_checkpointing_disable()
    elif enabled:
        hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        hf_model.gradient_checkpointing_disable()


def _wants_checkpointing(hf_model: nn.Module, gradient_checkpointing: bool | None) -> bool:
    return _checkpointing_enabled(hf_model) if gradient_checkpointing is None else gradient_checkpointing


def will_checkpoint(model: nn.Module, gradient_checkpointing: bool | None) -> bool:
    """Whether :func:`prepare_for_kbit_training` would leave checkpointing on, without changing anything."""
    return any(
        _wants_checkpointing(hf_model, gradient_checkpointing) for hf_model in transformers_models(model)
    )


def check_block_count(count: Any, checkpointing: bool) -> None:
    """Refuse a ``count`` that is no number of blocks, or that asks for blocks without checkpointing."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"uncheckpointed_blocks must be an int >= 0, got {count!r}.")
    if count and not checkpointing:
        raise ValueError(
            f"uncheckpointed_blocks={count} only applies with gradient checkpointing on; "
            "pass gradient_checkpointing=True, or uncheckpointed_blocks=0."
        )


def check_uncheckpointed_blocks(model: nn.Module, count: int, checkpointing: bool) -> None:
    """Refuse a ``count`` of blocks to leave out of checkpointing that ``model`` cannot honour."""
    check_block_count(count, checkpointing)
    if count == 0:
        return
    available = len(checkpointable_blocks(model))
    if count > available:
        found = (
            f"has {available}"
            if available
            else "has none (it needs a transformers model whose decoder layers checkpoint themselves, "
            "transformers >= 4.53)"
        )
        raise ValueError(
            f"uncheckpointed_blocks={count} asks to keep the activations of {count} transformer blocks, "
            f"but {type(model).__name__} {found}. Pass a number from 0 to {available}."
        )


def check_gradient_checkpointing(model: nn.Module, gradient_checkpointing: bool | None) -> None:
    """Refuse ``gradient_checkpointing=True`` for a model that has no checkpointing to turn on."""
    if gradient_checkpointing and not transformers_models(model):
        raise ValueError(
            f"gradient_checkpointing=True needs a transformers model inside {type(model).__name__} to turn it on; "
            "for other models, wrap your blocks in torch.utils.checkpoint.checkpoint(..., use_reentrant=False) "
            "and leave gradient_checkpointing=None."
        )


def prepare_for_kbit_training(
    model: nn.Module,
    gradient_checkpointing: bool | None = None,
    upcast_to_float32: bool = False,
    uncheckpointed_blocks: int = 0,
) -> bool:
    """Get a quantized model ready for adapter training, without the float32 upcast.

    Args:
        model: the quantized model (a LightningModule, a transformers model, any ``nn.Module``).
        gradient_checkpointing: ``True`` turns it on for the transformers models inside ``model``,
            ``False`` turns it off, ``None`` keeps the user's choice. When on, it is made
            non-reentrant, and the input embeddings' output requires grad so the frozen base
            still passes gradients to the adapters.
        upcast_to_float32: cast the full-precision half parameters (norms, embeddings) to float32,
            as PEFT's ``prepare_model_for_kbit_training`` does. Slower and larger; off by default.
        uncheckpointed_blocks: with checkpointing on, the last this many blocks keep their
            activations for the backward pass instead of recomputing their forward: faster, at the
            memory of those activations. 0 (default) checkpoints every block.

    Returns:
        Whether gradient checkpointing is on.
    """
    check_gradient_checkpointing(model, gradient_checkpointing)
    roots = transformers_models(model)
    wanted = {id(hf_model): _wants_checkpointing(hf_model, gradient_checkpointing) for hf_model in roots}
    checkpointing = any(wanted.values())
    # Checked before anything changes, so a refused call leaves the model as it was.
    check_uncheckpointed_blocks(model, uncheckpointed_blocks, checkpointing)
    if upcast_to_float32:
        cast_to_float32(model)
    for hf_model in roots:
        if wanted[id(hf_model)]:
            _set_checkpointing(hf_model, True)
            # The frozen base gives activations that need no grad; the adapters behind them do.
            hf_model.enable_input_require_grads()
        elif _checkpointing_enabled(hf_model):
            _set_checkpointing(hf_model, False)
    if uncheckpointed_blocks:
        for block in checkpointable_blocks(model)[-uncheckpointed_blocks:]:
            block.gradient_checkpointing = False
    return checkpointing


def compile_blocks(model: nn.Module) -> int:
    """``torch.compile`` each transformer block in place; returns how many were compiled.

    Blocks are the module classes transformers models list in ``_no_split_modules`` (e.g.
    ``LlamaDecoderLayer``). Compiling per block keeps graphs small and works with activation
    checkpointing, which wraps each block. State-dict keys do not change.
    """
    blocks = transformer_blocks(model)
    for block in blocks:
        block.compile()
    return len(blocks)
