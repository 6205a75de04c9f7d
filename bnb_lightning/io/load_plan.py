"""What a checkpoint fills in a model, decided from the files' headers alone (:func:`plan_loading`).

Every refusal of :func:`~bnb_lightning.io.loading.quantize_from_checkpoint` happens here, before any
data is read: names (another architecture, missing tensors), shapes, dtypes, quantization (a
pre-quantized checkpoint of other settings), buffers nothing can compute. The model is not touched.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import QuantizationConfig
from ..quantize import _QUANTIZABLE_DTYPES, plan
from ..training.blocks import transformers_models
from .layer_state import check_shape
from .shards import Checkpoint, CheckpointError, statistics_keys
from .state_dict import _some

UNCHANGED = "The model was not changed."


@dataclass
class LoadLayer:
    """A linear layer to build as a bnb layer: the checkpoint entries it takes, collected as they arrive."""

    name: str
    original: nn.Module
    weight_key: str  # its own name, or that of a weight tied to it
    bias_key: str | None
    statistics: list[str]  # entries saved with a pre-quantized weight; none for a full-precision one
    received: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def keys(self) -> list[str]:
        return [self.weight_key, *([self.bias_key] if self.bias_key else []), *self.statistics]

    @property
    def prequantized(self) -> bool:
        return bool(self.statistics)


@dataclass
class LoadPlan:
    """Where every tensor of the model comes from, decided from the files' headers alone."""

    decisions: dict[str, str | None]  # every linear layer -> None to convert, or why it is kept
    source_of: dict[str, str | None]  # every state-dict name -> the checkpoint key it is read from
    layers: dict[str, LoadLayer] = field(default_factory=dict)  # linear layers to become bnb layers
    sources: dict[str, str] = field(default_factory=dict)  # checkpoint key -> tie group (its first name)
    groups: dict[str, list[str]] = field(default_factory=dict)  # tie group -> names it fills outside layers
    originals: dict[str, torch.Tensor] = field(default_factory=dict)  # tie group -> the tensor it replaces
    kept: list[str] = field(default_factory=list)  # real buffers no checkpoint holds: moved as they are
    computed: list[str] = field(default_factory=list)  # modules whose meta buffers _init_weights computes


def named_as_in(model: nn.Module, checkpoint: Checkpoint) -> Checkpoint:
    """``checkpoint`` with ``model``'s names: under the name of the transformers model inside ``model`` (a
    LightningModule's ``self.model``), if that way more of ``model``'s tensors are found in it."""
    roots = transformers_models(model)
    if len(roots) != 1 or roots[0] is model:
        return checkpoint
    prefix = next(name for name, module in model.named_modules() if module is roots[0]) + "."
    names = list(model.state_dict(keep_vars=True))
    as_saved = sum(name in checkpoint.tensors for name in names)
    nested = sum(name.startswith(prefix) and name[len(prefix) :] in checkpoint.tensors for name in names)
    return checkpoint.under(prefix) if nested > as_saved else checkpoint


def _tie_groups(model: nn.Module) -> dict[str, list[str]]:
    """Each parameter and buffer name -> every name of the same tensor, in model order.

    Shared objects, and the ties the transformers models in ``model`` declare (``all_tied_weights_keys``):
    accelerate's ``init_empty_weights()`` gives each name of a tied weight its own meta parameter.
    """
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    by_tensor: dict[int, list[str]] = {}
    for name, tensor in named:
        by_tensor.setdefault(id(tensor), []).append(name)
    group_of = {name: names for names in by_tensor.values() for name in names}
    shapes = {name: tensor.shape for name, tensor in named}
    declared = [
        (f"{prefix}.{target}" if prefix else target, f"{prefix}.{source}" if prefix else source)
        for prefix, module in model.named_modules()
        if isinstance(ties := getattr(module, "all_tied_weights_keys", None), Mapping)
        for target, source in ties.items()
    ]
    for target, source in declared:
        into, other = group_of.get(source), group_of.get(target)
        if into is None or other is None or into is other or shapes[source] != shapes[target]:
            continue
        into += other
        group_of.update(dict.fromkeys(other, into))
    order = {name: index for index, (name, _) in enumerate(named)}
    for names in {id(names): names for names in group_of.values()}.values():
        names.sort(key=order.__getitem__)
    return group_of


def split_name(name: str) -> tuple[str, str]:
    """``"a.b.weight"`` -> ``("a.b", "weight")``: the owning module's name and the tensor's own."""
    module_name, _, leaf = name.rpartition(".")
    return module_name, leaf


def plan_loading(model: nn.Module, config: QuantizationConfig, checkpoint: Checkpoint) -> LoadPlan:
    """Where each of ``model``'s tensors comes from in ``checkpoint``, and which layers become bnb layers.

    Raises:
        CheckpointError: another architecture, missing tensors, other shapes or dtypes, another
            quantization, a meta buffer nothing can compute; ``model`` is untouched.
    """
    groups = _tie_groups(model)
    decisions = plan(model, config)
    expected = model.state_dict(keep_vars=True)
    source_of = {name: next((n for n in groups[name] if n in checkpoint.tensors), None) for name in expected}
    _check_architecture(model, checkpoint, source_of)
    _check_quantization(config, checkpoint, decisions)
    load_plan = LoadPlan(decisions, source_of)
    converted = dict.fromkeys(name for name, reason in decisions.items() if reason is None)  # ordered set
    modules = dict(model.named_modules())
    missing = []
    for name in converted:
        weight, bias = source_of.get(f"{name}.weight"), source_of.get(f"{name}.bias")
        missing += [n for n in (f"{name}.weight", f"{name}.bias") if n in expected and source_of[n] is None]
        if weight is not None:
            statistics = statistics_keys(name, checkpoint.tensors)
            load_plan.layers[name] = LoadLayer(name, modules[name], weight, bias, statistics)
    for name, source in source_of.items():
        if split_name(name)[0] in converted:
            continue
        if source is not None:
            group = groups[name][0]
            load_plan.sources[source] = group
            load_plan.groups.setdefault(group, []).append(name)
            load_plan.originals[group] = expected[name]
        else:
            missing.append(name)
    if missing:
        raise CheckpointError(
            f"'{checkpoint.source}' lacks {len(missing)} tensors {type(model).__name__} needs: "
            f"{_some(missing)} (a tied weight is read from the tensor it shares). The checkpoint is incomplete "
            f"or of another configuration; pass a complete checkpoint of this model. {UNCHANGED}"
        )
    _check_tensors(checkpoint, load_plan, expected)
    _plan_buffers(model, load_plan)
    # A name of the model is never unexpected: a tied weight's other names, which some checkpoints hold too.
    used = {*expected, *(key for layer in load_plan.layers.values() for key in layer.keys)}
    _warn_unexpected(model, checkpoint, [key for key in checkpoint.tensors if key not in used])
    return load_plan


def _check_architecture(model: nn.Module, checkpoint: Checkpoint, source_of: dict[str, str | None]) -> None:
    """Most names absent means another model's checkpoint: say that, rather than list every name."""
    found = sum(source is not None for source in source_of.values())
    if found * 2 >= len(source_of):
        return
    absent = [name for name, source in source_of.items() if source is None]
    strays = [key for key in checkpoint.tensors if key not in source_of]
    declared = f" (its config.json names {checkpoint.architectures})" if checkpoint.architectures else ""
    raise CheckpointError(
        f"'{checkpoint.source}' holds the weights of another model{declared}: only {found} of the "
        f"{len(source_of)} tensors {type(model).__name__} needs are in it. It lacks {_some(absent, 3)}, and "
        f"holds {_some(strays, 3)}, which the model does not have. Build the model from the checkpoint's "
        "config.json (AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))), or pass this "
        f"model's checkpoint. {UNCHANGED}"
    )


def _scheme(config: QuantizationConfig) -> dict[str, Any]:
    """What decides the stored bytes of a quantized layer (not how it computes)."""
    if config.bits == 8:
        return {"bits": 8, "has_fp16_weights": config.has_fp16_weights}
    return {"bits": 4, "quant_type": config.quant_type, "double_quant": config.double_quant,
            "quant_storage": config.quant_storage}  # fmt: skip


def _conflicts(stored: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    names = ["bits"] if stored["bits"] != wanted["bits"] else list(stored)
    return [
        f"{n}={stored[n]!r} in the checkpoint, {wanted[n]!r} in the config"
        for n in names
        if stored[n] != wanted[n]
    ]


def _check_quantization(
    config: QuantizationConfig, checkpoint: Checkpoint, decisions: dict[str, str | None]
) -> None:
    """A pre-quantized checkpoint loads as it is, so it must be quantized as the config says."""
    wanted = _scheme(config)
    fix = (
        "A pre-quantized checkpoint loads as it is (never dequantized and quantized again): pass a config with "
        f"the checkpoint's settings, or a full-precision checkpoint to quantize it another way. {UNCHANGED}"
    )
    for name, reason in decisions.items():
        stored = checkpoint.stored_quantization(name)
        if stored is None:
            continue
        scheme, key = stored
        where = f"'{key}' in '{checkpoint.file_of(key)}'"
        if reason is not None:
            raise CheckpointError(
                f"{where}: the checkpoint holds {name!r} quantized, but the config keeps it in full precision "
                f"({reason}), and it cannot be dequantized without loss. Quantize it too (the config's "
                f"skip_modules, target_modules), or pass a full-precision checkpoint. {UNCHANGED}"
            )
        conflicts = _conflicts(scheme, wanted)
        if conflicts:
            raise CheckpointError(
                f"{where}: {name!r} is quantized differently: {'; '.join(conflicts)}. {fix}"
            )
    declared = checkpoint.quantization
    if declared is None:
        return
    if declared.get("quant_method", "bitsandbytes") != "bitsandbytes":
        raise CheckpointError(
            f"'{checkpoint.config_file}' says the checkpoint is quantized with {declared['quant_method']!r}; "
            f"only bitsandbytes and full-precision checkpoints load here. {UNCHANGED}"
        )
    try:
        conflicts = _conflicts(_scheme(QuantizationConfig.from_bitsandbytes_config(declared)), wanted)
    except (TypeError, ValueError) as error:
        raise CheckpointError(
            f"'{checkpoint.config_file}': its quantization_config is invalid: {error}"
        ) from None
    if conflicts:
        raise CheckpointError(
            f"'{checkpoint.config_file}': its quantization_config differs from the config: "
            f"{'; '.join(conflicts)}. {fix}"
        )


def _check_tensors(checkpoint: Checkpoint, load_plan: LoadPlan, expected: dict[str, torch.Tensor]) -> None:
    """Weights to quantize must be floats bitsandbytes takes; every tensor read as it is must fit the model's."""
    checks = [(key, load_plan.groups[group][0]) for key, group in load_plan.sources.items()]
    for layer in load_plan.layers.values():
        entry = checkpoint.tensors[layer.weight_key]
        if not layer.prequantized and entry.dtype not in _QUANTIZABLE_DTYPES:
            why = (
                "; a pre-quantized weight comes with its statistics (.absmax, ... or .SCB), which the checkpoint "
                "lacks: it is incomplete, save or download it again"
                if not entry.dtype.is_floating_point
                else f"; cast the checkpoint, or keep {layer.name!r} in full precision with skip_modules"
            )
            raise CheckpointError(
                f"'{layer.weight_key}' in '{entry.file}' is {entry.dtype}: bitsandbytes quantizes float32, "
                f"float16 and bfloat16 weights{why}. {UNCHANGED}"
            )
        checks += [] if layer.prequantized else [(layer.weight_key, f"{layer.name}.weight")]
        checks += [(layer.bias_key, f"{layer.name}.bias")] if layer.bias_key else []
    for key, name in checks:
        entry, wanted = checkpoint.tensors[key], expected[name]
        try:
            check_shape(key, entry.shape, wanted.shape)
        except ValueError as error:
            raise CheckpointError(f"'{entry.file}': {error} {UNCHANGED}") from None
        if entry.dtype.is_floating_point != wanted.dtype.is_floating_point:
            raise CheckpointError(
                f"'{key}' in '{entry.file}' is {entry.dtype}, but the model's {name!r} is {wanted.dtype}: the "
                f"checkpoint belongs to another model. {UNCHANGED}"
            )


def _plan_buffers(model: nn.Module, load_plan: LoadPlan) -> None:
    """Non-persistent buffers: real ones are kept; meta ones computed by ``_init_weights`` where that is safe."""
    for owner_name, owner in model.named_modules():
        names = [n for n in owner._non_persistent_buffers_set if owner._buffers.get(n) is not None]
        prefix = f"{owner_name}." if owner_name else ""
        load_plan.kept += [f"{prefix}{n}" for n in names if owner._buffers[n].device.type != "meta"]
        on_meta = [f"{prefix}{n}" for n in names if owner._buffers[n].device.type == "meta"]
        if not on_meta:
            continue
        # _init_weights initializes a module's weights too (some models', its children's): only a module of
        # buffers alone, like a rotary embedding, can be handed to it without resetting loaded weights.
        problem = None
        if initializer_of(model, owner_name) is None:
            problem = f"{type(model).__name__} has no _init_weights (a transformers model's) to compute it"
        elif next(owner.parameters(), None) is not None or next(owner.children(), None) is not None:
            problem = f"its {type(owner).__name__} also holds weights, which _init_weights would reset"
        if problem:
            raise CheckpointError(meta_buffer_message(on_meta[0], problem))
        load_plan.computed.append(owner_name)


def initializer_of(model: nn.Module, owner_name: str) -> nn.Module | None:
    """The innermost module around ``owner_name`` (``model`` included) with ``_init_weights``: a transformers model."""
    found = None
    for name, module in model.named_modules():
        encloses = not name or owner_name == name or owner_name.startswith(f"{name}.")
        if encloses and callable(getattr(module, "_init_weights", None)):
            found = module
    return found


def meta_buffer_message(name: str, problem: str) -> str:
    return (
        f"buffer {name!r} is on the meta device and no checkpoint holds it (it is not persistent): {problem}. "
        "Build the model under accelerate's init_empty_weights(), which keeps buffers real, instead of "
        f"torch.device('meta'). {UNCHANGED}"
    )


def _warn_unexpected(model: nn.Module, checkpoint: Checkpoint, unexpected: list[str]) -> None:
    # Not reported, as by transformers: the model's own ignore patterns, and old copies of buffers now
    # non-persistent (rotary inv_freq, position_ids).
    patterns = list(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
    buffers = {name for name, _ in model.named_buffers(remove_duplicate=False)}
    shown = [key for key in unexpected if key not in buffers and not any(re.search(p, key) for p in patterns)]
    if shown:
        warnings.warn(
            f"'{checkpoint.source}' holds {len(shown)} tensors {type(model).__name__} has no place for; they were "
            f"not loaded: {_some(shown)}. transformers' from_pretrained also loads such a checkpoint and reports "
            "them as unexpected keys; if the model should have them, build it from the checkpoint's config.json.",
            stacklevel=5,
        )
