"""PEFT adapters on a quantized model: check a config without touching the model, inject all or nothing.

Adapters go into the transformers model inside the module when there is exactly one, so
``target_modules="all-linear"`` and PEFT's model-type defaults work.
"""

from __future__ import annotations

import copy
import difflib
import itertools
from typing import Any

import torch
from torch import nn

from .backend import is_quantized_parameter, require_bitsandbytes
from .restore import restore_point
from .training.blocks import transformers_models


def adapter_target(model: nn.Module) -> nn.Module:
    """Where adapters go: the single transformers model inside ``model``, else ``model`` itself."""
    roots = transformers_models(model)
    return roots[0] if len(roots) == 1 else model


def adapter_root(model: nn.Module) -> nn.Module | None:
    """The outermost module holding PEFT's ``peft_config`` (where ``inject_adapters`` put the adapters)."""
    from peft import PeftModel

    for module in model.modules():
        if isinstance(module, PeftModel):
            return module.get_base_model()
        if isinstance(getattr(module, "peft_config", None), dict) and module.peft_config:
            return module
    return None


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


def require_peft_config(peft_config: Any) -> Any:
    """``peft_config``, once it is a PEFT config object; the error has the fix for LightningCLI's dict form."""
    from peft import PeftConfig

    if isinstance(peft_config, PeftConfig):
        return peft_config
    hint = (
        " A class_path/init_args dict is LightningCLI's YAML form; in Python, pass the object, e.g. "
        "peft.LoraConfig(**init_args)."
        if isinstance(peft_config, dict) and "class_path" in peft_config
        else ""
    )
    raise TypeError(
        f"peft_config must be a PEFT config such as peft.LoraConfig(...), got {type(peft_config).__name__}."
        + hint
    )


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
    require_peft_config(peft_config)
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
