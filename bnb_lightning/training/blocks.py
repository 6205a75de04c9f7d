"""Transformer blocks: where they are, whether they checkpoint their activations, compiling them.

Checkpointing, compiling, FSDP wrapping and adapter injection all start from these lookups.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from ..config import check_block_count


class ActivationBlock(nn.Module):
    """Base class for the blocks of a plain ``nn.Module`` stack, so the activation planner can manage them.

    transformers' decoder layers are blocks already; a model of your own gets the same per-block
    keep / recompute / offload choice (:func:`bnb_lightning.plan_activations`) when its block class
    derives from this one instead of ``nn.Module``. Pass the hidden states as the first positional
    argument; like transformers' ``GradientCheckpointingLayer``, a checkpointed block's ``forward``
    runs through its ``_gradient_checkpointing_func``.
    """

    gradient_checkpointing = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "forward" not in vars(cls):
            return
        forward = cls.forward

        @functools.wraps(forward)
        def planned_forward(self: ActivationBlock, *args: Any, **kwargs: Any) -> Any:
            # Only the outermost wrapper (of a subclass's subclass) checkpoints.
            outermost = type(self).forward is planned_forward
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled() and outermost:
                return self._gradient_checkpointing_func(functools.partial(forward, self, **kwargs), *args)
            return forward(self, *args, **kwargs)

        cls.forward = planned_forward


def transformers_models(model: nn.Module) -> list[nn.Module]:
    """The outermost transformers ``PreTrainedModel`` instances inside ``model`` (or ``model`` itself)."""
    found: list[nn.Module] = []
    prefixes: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in prefixes):
            continue
        if hasattr(module, "gradient_checkpointing_enable") and hasattr(module, "enable_input_require_grads"):
            found.append(module)
            prefixes.append(f"{name}." if name else "")
    return found


def shares_parameter(model: nn.Module, parameter: nn.Parameter) -> bool:
    """Whether ``parameter`` is registered more than once in ``model`` (tied, e.g. embeddings and output
    layer sharing one weight)."""
    return sum(1 for _, p in model.named_parameters(remove_duplicate=False) if p is parameter) > 1


def block_class_names(model: nn.Module) -> set[str]:
    """Transformer block classes of the transformers models in ``model`` (their ``_no_split_modules``)."""
    names: set[str] = set()
    for hf_model in transformers_models(model):
        names.update(getattr(hf_model, "_no_split_modules", None) or ())
    return names


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` whose class is a transformer block class (:func:`block_class_names`)."""
    names = block_class_names(model)
    return [module for module in model.modules() if type(module).__name__ in names]


def checkpointable_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks in ``model`` that checkpoint themselves, in model order.

    These are transformers' ``GradientCheckpointingLayer`` instances (decoder layers since
    transformers 4.53; older versions checkpoint from the model's own loop and list none) and
    :class:`ActivationBlock` instances.
    """
    return [
        module
        for module in model.modules()
        if isinstance(module, ActivationBlock)
        or any(cls.__name__ == "GradientCheckpointingLayer" for cls in type(module).__mro__)
    ]


def checkpointing_enabled(hf_model: nn.Module) -> bool:
    # transformers 5.x renamed gradient checkpointing to activation checkpointing; the old names warn.
    for flag in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(hf_model), flag):
            return bool(getattr(hf_model, flag))
    return False


def set_checkpointing(hf_model: nn.Module, enabled: bool) -> None:
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


def wants_checkpointing(hf_model: nn.Module, gradient_checkpointing: bool | None) -> bool:
    return checkpointing_enabled(hf_model) if gradient_checkpointing is None else gradient_checkpointing


def will_checkpoint(model: nn.Module, gradient_checkpointing: bool | None) -> bool:
    """Whether :func:`prepare_for_kbit_training` would leave checkpointing on, without changing anything."""
    return any(
        wants_checkpointing(hf_model, gradient_checkpointing) for hf_model in transformers_models(model)
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


def check_gradient_checkpointing(
    model: nn.Module, gradient_checkpointing: bool | None, option: str = "gradient_checkpointing=True"
) -> None:
    """Refuse checkpointing (asked for by ``option``) for a model that has no checkpointing to turn on."""
    if gradient_checkpointing and not transformers_models(model):
        raise ValueError(
            f"{option} needs a transformers model inside {type(model).__name__} to turn checkpointing on; for "
            "other models, wrap your blocks in torch.utils.checkpoint.checkpoint(..., use_reentrant=False) and "
            "leave gradient_checkpointing and activation_memory at None."
        )


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
