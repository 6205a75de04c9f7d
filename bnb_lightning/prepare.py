"""Lean preparation of a quantized model for adapter training, and adapter injection.

Unlike PEFT's ``prepare_model_for_kbit_training``, nothing is upcast to float32 by default:
norms and embeddings stay in the model's dtype, which keeps training at half-precision speed.
"""

from __future__ import annotations

import copy
import difflib
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .backend import is_quantized_parameter, require_bitsandbytes


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


def checkpointable_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks of the transformers models in ``model`` that checkpoint themselves, in model order.

    These are transformers' ``GradientCheckpointingLayer`` instances (decoder layers since
    transformers 4.53); older versions checkpoint from the model's own loop and list none.
    """
    return [
        module
        for module in model.modules()
        if any(cls.__name__ == "GradientCheckpointingLayer" for cls in type(module).__mro__)
    ]


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
    block_names: set[str] = set()
    for hf_model in transformers_models(model):
        block_names.update(getattr(hf_model, "_no_split_modules", None) or ())
    blocks = [module for module in model.modules() if type(module).__name__ in block_names]
    for block in blocks:
        block.compile()
    return len(blocks)


def adapter_target(model: nn.Module) -> nn.Module:
    """Where adapters go: the single transformers model inside ``model``, else ``model`` itself."""
    roots = transformers_models(model)
    return roots[0] if len(roots) == 1 else model


def _structural_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s module tree whose parameters and buffers live on the meta device (no memory)."""
    memo: dict[int, Any] = {}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        shape, dtype = tensor.shape, tensor.dtype
        if is_quantized_parameter(tensor):
            # As the weight it stands for, so PEFT sees the layer's shape (DoRA reads the weight's norm).
            quant_state = getattr(tensor, "quant_state", None)
            shape, dtype = (quant_state.shape if quant_state is not None else shape), torch.float32
        empty = torch.empty(shape, dtype=dtype, device="meta")
        memo[id(tensor)] = (
            nn.Parameter(empty, requires_grad=tensor.requires_grad)
            if isinstance(tensor, nn.Parameter)
            else empty
        )
    trainer = getattr(model, "_trainer", None)  # a LightningModule's Trainer is not part of the model
    if trainer is not None:
        memo[id(trainer)] = None
    return copy.deepcopy(model, memo)


def check_peft_config(model: nn.Module, peft_config: Any) -> None:
    """Refuse a PEFT config that :func:`inject_adapters` could not apply to ``model``, changing nothing.

    Catches what PEFT would only report while injecting, or not at all: prompt-learning configs
    (prefix, prompt, P-tuning), which add virtual tokens through ``PeftModel`` and have no layers to
    inject; an entry of a ``target_modules`` list that matches no module (PEFT drops it silently when
    another entry matches); and anything PEFT refuses, found by injecting into a copy of ``model``'s
    module tree on the meta device, so the check costs no memory.

    Raises:
        TypeError: ``peft_config`` is not a PEFT config.
        ValueError: what is wrong and how to fix it.
    """
    from peft import PeftConfig

    if not isinstance(peft_config, PeftConfig):
        raise TypeError(
            f"peft_config must be a PEFT config such as peft.LoraConfig(...), got {type(peft_config).__name__}."
        )
    if getattr(peft_config, "is_prompt_learning", False) or getattr(peft_config, "is_adaption_prompt", False):
        raise ValueError(
            f"{type(peft_config).__name__} learns virtual tokens or prompts, which PEFT adds through PeftModel's "
            "forward, not as layers inside the model: bnb_lightning can only inject adapter layers. Use an adapter "
            "config such as peft.LoraConfig(r=16, target_modules='all-linear')."
        )
    if adapters_in_place(model, peft_config):
        return
    root = adapter_target(model)
    names = [name for name, _ in root.named_modules() if name]
    leaf_names = sorted({name.rsplit(".", 1)[-1] for name in names} - {str(i) for i in range(len(names))})
    targets = getattr(peft_config, "target_modules", None)
    if isinstance(targets, (list, set, tuple)):
        for target in sorted(targets):
            if not any(name == target or name.endswith(f".{target}") for name in names):
                close = difflib.get_close_matches(target, leaf_names, n=3)
                hint = f" Did you mean {close}?" if close else f" Module names end in e.g. {leaf_names[:8]}."
                raise ValueError(
                    f"target_modules entry {target!r} matches no module of {type(root).__name__}, so it would add "
                    f"no adapter (PEFT ignores such an entry when another one matches).{hint}"
                )
    dry_run = _structural_copy(root)
    try:
        _inject(dry_run, peft_config, dry_run=True)
    except Exception as error:
        raise ValueError(
            f"PEFT cannot add the adapters of {type(peft_config).__name__} to {type(root).__name__}: {error} "
            f"Fix the peft_config (module names of the model end in e.g. {leaf_names[:8]})."
        ) from error
    if not any(p.requires_grad for p in dry_run.parameters()):
        raise ValueError(_no_trainable_message(root, peft_config))


# Set on the module adapters were injected into: the user's PEFT config (before PEFT rewrites it).
_INJECTED_CONFIG = "_bnb_lightning_peft_config"


def adapters_in_place(model: nn.Module, peft_config: Any) -> bool:
    """Whether ``model`` already has the adapters ``peft_config`` describes, injected by :func:`inject_adapters`.

    A second injection would give PEFT's ``default`` adapter new, untrained weights, so the model is
    reused as it is (a model prepared by an earlier ``fit``), or refused if its adapters are others.

    Raises:
        ValueError: ``model`` has other adapters, or adapters bnb_lightning did not inject.
    """
    root = adapter_target(model)
    if not (isinstance(getattr(root, "peft_config", None), dict) and root.peft_config):
        return False
    injected = getattr(root, _INJECTED_CONFIG, None)
    if injected is None:
        raise ValueError(
            f"{type(root).__name__} already has PEFT adapters {sorted(root.peft_config)}, not added by bnb_lightning; "
            "adding more would re-initialise PEFT's 'default' adapter. Pass peft_config=None to train the adapters "
            "it has, or build the model without them."
        )
    if injected.to_dict() != peft_config.to_dict():
        theirs, ours = injected.to_dict(), peft_config.to_dict()
        differences = [
            f"{key}: {theirs.get(key)!r} -> {ours.get(key)!r}"
            for key in sorted(set(theirs) | set(ours))
            if theirs.get(key) != ours.get(key)
        ]
        raise ValueError(
            f"{type(root).__name__} already has adapters from another peft_config ({'; '.join(differences[:4])}). "
            "Pass the peft_config they were made with (or peft_config=None) to keep training them, or rebuild "
            "the model to start with new adapters."
        )
    return True


def _no_trainable_message(root: nn.Module, peft_config: Any) -> str:
    return (
        f"the peft config added no trainable parameter to {type(root).__name__}: its target_modules "
        f"{getattr(peft_config, 'target_modules', None)!r} match no layer. Pass module names that exist, "
        "e.g. target_modules=['q_proj', 'v_proj'] or 'all-linear'."
    )


def _inject(root: nn.Module, peft_config: Any, dry_run: bool = False) -> nn.Module:
    from peft import inject_adapter_in_model

    # PEFT rewrites some fields (e.g. "all-linear" into layer names): keep the user's config intact.
    # A dry run creates the adapters without initialising them (DoRA's would read the weights).
    return inject_adapter_in_model(copy.deepcopy(peft_config), root, low_cpu_mem_usage=dry_run)


# Per-module dicts that hold a module's structure and hooks, restored in place by `restore_point`.
_MODULE_DICTS = (
    "_modules",
    "_parameters",
    "_buffers",
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def restore_point(model: nn.Module) -> Callable[[], None]:
    """A function that puts ``model`` back as it is now, for a preparation step that fails halfway.

    It restores every module's class (layer subclasses), attributes (an instance ``forward``, a
    compiled call, PEFT's ``peft_config``, checkpointing flags), children (PEFT's adapter wrappers),
    parameters, buffers and hooks, and every parameter's data and ``requires_grad`` (casts, freezing).
    Tensors are kept by reference, so taking a restore point copies no weights.
    """
    modules = list(model.modules())
    saved_modules = [
        (
            module,
            type(module),
            dict(vars(module)),
            {name: dict(getattr(module, name)) for name in _MODULE_DICTS if name in vars(module)},
        )
        for module in modules
    ]
    saved_parameters = [(p, p.data, p.requires_grad) for p in model.parameters()]

    def restore() -> None:
        for module, cls, attributes, dicts in saved_modules:
            module.__class__ = cls
            vars(module).clear()
            vars(module).update(attributes)
            for name, content in dicts.items():
                getattr(module, name).clear()
                getattr(module, name).update(content)
        for parameter, data, requires_grad in saved_parameters:
            if parameter.data.dtype != data.dtype or parameter.data.data_ptr() != data.data_ptr():
                parameter.data = data
            parameter.requires_grad_(requires_grad)

    return restore


def inject_adapters(model: nn.Module, peft_config: Any) -> nn.Module:
    """Add PEFT adapters (e.g. LoRA) to ``model`` in place; afterwards only adapters require grad.

    Adapters go into the transformers model inside ``model`` when there is exactly one (so
    ``target_modules="all-linear"`` and model-type defaults work), otherwise into ``model``.
    Parameters outside that root are frozen too. ``peft_config`` itself is not modified. A model that
    already has these adapters (from an earlier call) is left as it is. The config is checked first
    (:func:`check_peft_config`); should PEFT still fail, ``model`` is left as it was
    (:func:`restore_point`).

    Returns:
        The module the adapters were injected into.
    """
    check_peft_config(model, peft_config)
    return inject_checked_adapters(model, peft_config)


def inject_checked_adapters(model: nn.Module, peft_config: Any) -> nn.Module:
    """:func:`inject_adapters` for a ``peft_config`` already checked against ``model``'s module tree.

    The callback checks before quantizing, which leaves the module names and layer shapes as they
    were, so the dry run is not repeated.
    """
    root = adapter_target(model)
    if adapters_in_place(model, peft_config):
        return root
    # PEFT wraps bitsandbytes layers in its bitsandbytes-aware LoRA layers (dtype handling, merging)
    # only when the model says it is loaded in 4/8-bit, as transformers' quantized models do. Say so
    # on this instance while injecting, and take it back afterwards.
    bnb = require_bitsandbytes()
    layers = list(model.modules())
    flags = [
        flag
        for flag, layer_type in (
            ("is_loaded_in_4bit", bnb.nn.Linear4bit),
            ("is_loaded_in_8bit", bnb.nn.Linear8bitLt),
        )
        if any(isinstance(layer, layer_type) for layer in layers)
    ]
    previous = {flag: vars(root)[flag] for flag in flags if flag in vars(root)}
    restore = restore_point(model)
    for flag in flags:
        setattr(root, flag, True)
    try:
        _inject(root, peft_config)
        if not any(p.requires_grad for p in root.parameters()):
            raise ValueError(_no_trainable_message(root, peft_config))
        setattr(root, _INJECTED_CONFIG, copy.deepcopy(peft_config))
    except BaseException:
        restore()
        raise
    finally:
        for flag in flags:
            if flag in previous:
                setattr(root, flag, previous[flag])
            elif flag in vars(root):
                delattr(root, flag)
    in_root = {id(p) for p in root.parameters()}
    for parameter in model.parameters():
        if id(parameter) not in in_root:
            parameter.requires_grad_(False)
    return root
