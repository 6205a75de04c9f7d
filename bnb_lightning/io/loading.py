"""Fill an empty model from a checkpoint while quantizing it, tensor by tensor: ``quantize_model(weights=...)``.

The model is built on the meta device (``with torch.device("meta")`` or accelerate's
``init_empty_weights()``) and filled from a checkpoint in transformers' layout (:mod:`.shards`). The
full-precision model never exists: shards are opened one at a time and read one tensor at a time; a
linear layer is quantized on the device as soon as its weight and bias have arrived, and the
full-precision tensor is dropped. Host memory holds about one tensor (one layer's entries at most)
plus staging buffers; the device, the quantized model plus one layer.

Choices (transformers' ``from_pretrained`` makes the same unless said otherwise):

- Tensors kept in full precision (embeddings, norms, ``lm_head``, skipped layers) keep the **file's
  dtype** (transformers' ``dtype="auto"``), whatever the meta model's dtype: a float32 meta model does
  not double a bfloat16 checkpoint's embeddings. 4-bit layers compute in their weight's file dtype
  unless the config sets ``compute_dtype``, as :func:`quantize_model` does on a model in memory.
- Tied weights come out tied: the names of one shared parameter, and the ties a transformers model
  declares (``all_tied_weights_keys``, which ``init_empty_weights()`` leaves untied on meta), all get one
  new parameter, read from whichever of its names the checkpoint holds (``save_pretrained`` keeps one).
- Non-persistent buffers, which no checkpoint holds: real ones (``init_empty_weights()`` leaves buffers
  real) are moved as they are; meta ones (rotary ``inv_freq``) are computed by the model's
  ``_init_weights``, as transformers 5 fills them after loading, on a copy of their module. Where that
  is not possible, loading is refused, before any data is read.
- A pre-quantized checkpoint (``save_pretrained`` of a bitsandbytes model) loads as it is: the bytes
  and statistics on the device are the file's. Its quantization (bits, quant type, double quantization,
  storage dtype) must be the config's. A layer it holds in full precision that the config quantizes is
  quantized while loading; one it holds quantized that the config keeps is refused.
- Names are ``save_pretrained``'s, those of the transformers model. A module holding exactly one (a
  LightningModule's ``self.model``) reads them under its name (``model.`` + ``model.embed_tokens.weight``);
  every tensor of the module must still come from the checkpoint.
- Tensors the model has no place for are not loaded, with a warning naming a few (transformers reports
  them as unexpected keys). Missing tensors are an error.
- Nothing half-loaded: names, shapes, dtypes and quantization are checked on the files' headers before
  any data is read; new layers and tensors are built aside and swapped in once all are loaded. On an
  error the model object is unchanged (still on meta, if it was), and what was loaded is freed.
"""

from __future__ import annotations

import copy
import os
import re
import time
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..backend import as_device, check_device_supported, is_bnb_linear, module_nbytes, require_bitsandbytes
from ..config import QuantizationConfig, as_quantization_config
from ..quantize import (
    _OWN_LAYER,
    _QUANTIZABLE_DTYPES,
    QuantizationError,
    _convert,
    _warn_unmatched_patterns,
    estimated_nbytes,
    plan,
)
from ..replace import new_bnb_linear
from ..report import ALREADY_QUANTIZED, CONVERTED, SKIPPED, ModuleReport, QuantizationReport
from ..training.blocks import transformers_models
from ..transfer import HostToDevice
from .layer_state import check_shape, prequantized_weight
from .shards import Checkpoint, CheckpointError, read_checkpoint, statistics_keys
from .state_dict import _some

__all__ = ["CheckpointError", "quantize_from_checkpoint"]

# Above this many bytes to read, a progress bar is shown (if tqdm is installed) unless progress=False.
PROGRESS_BYTES = 2**30
PREQUANTIZED = "quantized in the checkpoint"
_UNCHANGED = "The model was not changed."


@dataclass
class _Layer:
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
class _Plan:
    """Where every tensor of the model comes from, decided from the files' headers alone."""

    decisions: dict[str, str | None]  # every linear layer -> None to convert, or why it is kept
    source_of: dict[str, str | None]  # every state-dict name -> the checkpoint key it is read from
    layers: dict[str, _Layer] = field(default_factory=dict)  # linear layers to become bnb layers
    sources: dict[str, str] = field(default_factory=dict)  # checkpoint key -> tie group (its first name)
    groups: dict[str, list[str]] = field(default_factory=dict)  # tie group -> names it fills outside layers
    originals: dict[str, torch.Tensor] = field(default_factory=dict)  # tie group -> the tensor it replaces
    kept: list[str] = field(default_factory=list)  # real buffers no checkpoint holds: moved as they are
    computed: list[str] = field(default_factory=list)  # modules whose meta buffers _init_weights computes


def quantize_from_checkpoint(
    model: nn.Module,
    weights: str | os.PathLike,
    config: QuantizationConfig | Any = None,
    device: torch.device | str | int | None = None,
    *,
    dry_run: bool = False,
    progress: bool | None = None,
) -> QuantizationReport:
    """Fill ``model`` (built on meta) from the checkpoint ``weights``, quantizing its linear layers on the way.

    What :func:`bnb_lightning.quantize_model` does when given ``weights``; the module's docstring says
    which dtypes, ties, buffers and failure state to expect.

    Args:
        model: built on the meta device (a model with weights works too: they are replaced).
        weights: a directory with ``model.safetensors`` or ``model.safetensors.index.json`` and its
            shards, or one ``.safetensors`` file.
        config: as for ``quantize_model``; a pre-quantized checkpoint must be quantized the same way.
        device: where the model goes; default the CPU.
        dry_run: check the checkpoint against the model on the files' headers, read no data, change
            nothing, and report estimated sizes.
        progress: a tqdm progress bar (bytes, shard); default only above 1 GiB to read, and in a distributed
            run only on rank zero.

    Returns:
        The :class:`QuantizationReport`; layers a pre-quantized checkpoint holds are "already quantized".

    Raises:
        FileNotFoundError: no checkpoint at ``weights``, or a shard its index lists is absent.
        CheckpointError: a file that cannot be read, missing tensors, another architecture, other
            shapes, another quantization; the model is unchanged.
        QuantizationError: a layer failed on the device (out of memory, ...); the model is unchanged.

    Example::

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
        report = quantize_model(model, QuantizationConfig(bits=4), "cuda", weights=path)
    """
    config = as_quantization_config(config)
    target = check_device_supported(torch.device("cpu") if device is None else as_device(device))
    if any(is_bnb_linear(module) for module in model.modules()):
        raise ValueError(
            f"{type(model).__name__} already has bitsandbytes layers; loading a checkpoint while quantizing "
            "fills a model as built. Build it again (on the meta device), then call quantize_model(..., weights=...)."
        )
    checkpoint = _named_as_in(model, read_checkpoint(weights))
    load_plan = _plan(model, config, checkpoint)
    _warn_unmatched_patterns(model, config)
    report = QuantizationReport(
        bits=config.bits,
        quant_type=config.quant_type if config.bits == 4 else None,
        device=str(target),
        dry_run=dry_run,
    )
    built: dict[str, nn.Module] = {}
    if not dry_run:
        start = time.perf_counter()
        upload = HostToDevice(target)
        values = _buffers_aside(model, load_plan, upload)
        built = _read_and_build(checkpoint, load_plan, config, upload, values, progress)
        _swap_in(model, load_plan, values, built)
        if target.type == "cuda":
            torch.cuda.synchronize(target)  # the copies and kernels run ahead of the host
        report.seconds = time.perf_counter() - start
    _fill_report(report, model, load_plan, checkpoint, config, built)
    return report


# Planning, on the headers: everything that can be refused is refused before any data is read.


def _named_as_in(model: nn.Module, checkpoint: Checkpoint) -> Checkpoint:
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


def _split(name: str) -> tuple[str, str]:
    module_name, _, leaf = name.rpartition(".")
    return module_name, leaf


def _plan(model: nn.Module, config: QuantizationConfig, checkpoint: Checkpoint) -> _Plan:
    groups = _tie_groups(model)
    decisions = plan(model, config)
    expected = model.state_dict(keep_vars=True)
    source_of = {name: next((n for n in groups[name] if n in checkpoint.tensors), None) for name in expected}
    _check_architecture(model, checkpoint, source_of)
    _check_quantization(config, checkpoint, decisions)
    load_plan = _Plan(decisions, source_of)
    converted = dict.fromkeys(name for name, reason in decisions.items() if reason is None)  # ordered set
    modules = dict(model.named_modules())
    missing = []
    for name in converted:
        weight, bias = source_of.get(f"{name}.weight"), source_of.get(f"{name}.bias")
        missing += [n for n in (f"{name}.weight", f"{name}.bias") if n in expected and source_of[n] is None]
        if weight is not None:
            statistics = statistics_keys(name, checkpoint.tensors)
            load_plan.layers[name] = _Layer(name, modules[name], weight, bias, statistics)
    for name, source in source_of.items():
        if _split(name)[0] in converted:
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
            f"or of another configuration; pass a complete checkpoint of this model. {_UNCHANGED}"
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
        f"model's checkpoint. {_UNCHANGED}"
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
        f"the checkpoint's settings, or a full-precision checkpoint to quantize it another way. {_UNCHANGED}"
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
                f"skip_modules, target_modules), or pass a full-precision checkpoint. {_UNCHANGED}"
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
            f"only bitsandbytes and full-precision checkpoints load here. {_UNCHANGED}"
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


def _check_tensors(checkpoint: Checkpoint, load_plan: _Plan, expected: dict[str, torch.Tensor]) -> None:
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
                f"float16 and bfloat16 weights{why}. {_UNCHANGED}"
            )
        checks += [] if layer.prequantized else [(layer.weight_key, f"{layer.name}.weight")]
        checks += [(layer.bias_key, f"{layer.name}.bias")] if layer.bias_key else []
    for key, name in checks:
        entry, wanted = checkpoint.tensors[key], expected[name]
        try:
            check_shape(key, entry.shape, wanted.shape)
        except ValueError as error:
            raise CheckpointError(f"'{entry.file}': {error} {_UNCHANGED}") from None
        if entry.dtype.is_floating_point != wanted.dtype.is_floating_point:
            raise CheckpointError(
                f"'{key}' in '{entry.file}' is {entry.dtype}, but the model's {name!r} is {wanted.dtype}: the "
                f"checkpoint belongs to another model. {_UNCHANGED}"
            )


def _plan_buffers(model: nn.Module, load_plan: _Plan) -> None:
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
        if _initializer(model, owner_name) is None:
            problem = f"{type(model).__name__} has no _init_weights (a transformers model's) to compute it"
        elif next(owner.parameters(), None) is not None or next(owner.children(), None) is not None:
            problem = f"its {type(owner).__name__} also holds weights, which _init_weights would reset"
        if problem:
            raise CheckpointError(_meta_buffer_message(on_meta[0], problem))
        load_plan.computed.append(owner_name)


def _initializer(model: nn.Module, owner_name: str) -> nn.Module | None:
    """The innermost module around ``owner_name`` (``model`` included) with ``_init_weights``: a transformers model."""
    found = None
    for name, module in model.named_modules():
        encloses = not name or owner_name == name or owner_name.startswith(f"{name}.")
        if encloses and callable(getattr(module, "_init_weights", None)):
            found = module
    return found


def _meta_buffer_message(name: str, problem: str) -> str:
    return (
        f"buffer {name!r} is on the meta device and no checkpoint holds it (it is not persistent): {problem}. "
        "Build the model under accelerate's init_empty_weights(), which keeps buffers real, instead of "
        f"torch.device('meta'). {_UNCHANGED}"
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


# Loading: one shard, one tensor at a time; everything built aside, then swapped in.


def _buffers_aside(model: nn.Module, load_plan: _Plan, upload: HostToDevice) -> dict[str, torch.Tensor]:
    """The buffers no checkpoint holds, on the device: real ones moved, meta ones computed."""
    values = {name: upload(model.get_buffer(name)) for name in load_plan.kept}
    for owner_name in load_plan.computed:
        owner = model.get_submodule(owner_name)
        # A shallow copy with buffers of its own, for _init_weights to write into: the model's module stays
        # as it is until everything is loaded. NaN shows a float buffer it did not write.
        stand_in = copy.copy(owner)
        stand_in._buffers = {
            name: torch.full_like(buffer, float("nan"), device=upload.device)
            if buffer.is_floating_point()
            else torch.zeros_like(buffer, device=upload.device)
            for name, buffer in owner._buffers.items()
            if buffer is not None
        }
        prefix = f"{owner_name}." if owner_name else ""
        initializer = _initializer(model, owner_name)
        try:
            with torch.no_grad():
                initializer._init_weights(stand_in)
        except Exception as error:  # a model's own code: any failure means the same to the caller
            problem = (
                f"{type(initializer).__name__}._init_weights failed on its {type(owner).__name__}: {error}"
            )
            raise CheckpointError(
                _meta_buffer_message(f"{prefix}{next(iter(stand_in._buffers))}", problem)
            ) from error
        for name in owner._non_persistent_buffers_set:
            value = stand_in._buffers.get(name)
            if value is not None and value.is_floating_point() and value.isnan().any():
                problem = f"{type(initializer).__name__}._init_weights does not compute it"
                raise CheckpointError(_meta_buffer_message(f"{prefix}{name}", problem))
            if value is not None:
                values[f"{prefix}{name}"] = value
    return values


def _other_rank() -> bool:
    """Whether this process is a distributed run's rank other than zero (whose bar alone is shown)."""
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_rank() != 0
    )


def _progress_bar(total: int, progress: bool | None, checkpoint: Checkpoint) -> Any:
    if progress is False or (progress is None and (total <= PROGRESS_BYTES or _other_rank())):
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        if progress:
            warnings.warn(
                "progress=True needs tqdm (pip install tqdm); loading without a progress bar.", stacklevel=5
            )
        return None
    name = checkpoint.source.parent.name
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"Loading {name}")


def _read_and_build(
    checkpoint: Checkpoint,
    load_plan: _Plan,
    config: QuantizationConfig,
    upload: HostToDevice,
    values: dict[str, torch.Tensor],
    progress: bool | None,
) -> dict[str, nn.Module]:
    """Read each needed tensor once: plain ones go to the device, a layer is built once its entries are in."""
    from safetensors import safe_open

    owners = {key: layer for layer in load_plan.layers.values() for key in layer.keys}
    wanted = [key for key in checkpoint.tensors if key in owners or key in load_plan.sources]
    bar = _progress_bar(sum(checkpoint.tensors[key].nbytes for key in wanted), progress, checkpoint)
    built: dict[str, nn.Module] = {}
    try:
        for file in checkpoint.files:
            if bar is not None:
                bar.set_postfix_str(file.name)
            with safe_open(file, framework="pt", device="cpu") as handle:
                for key in (key for key in wanted if checkpoint.file_of(key) == file):
                    failing = key
                    try:
                        tensor = handle.get_tensor(checkpoint.key_in_file(key))
                        if key in load_plan.sources:
                            values[load_plan.sources[key]] = upload(tensor)
                        layer = owners.get(key)
                        if layer is not None:
                            layer.received[key] = tensor
                            if len(layer.received) == len(layer.keys):
                                failing = layer.weight_key
                                built[layer.name] = _build(layer, config, upload)
                                layer.received.clear()
                    except CheckpointError:
                        raise
                    except ValueError as error:
                        where = f"'{failing}' in '{checkpoint.file_of(failing)}'"
                        raise CheckpointError(f"{where}: {error} {_UNCHANGED}") from error
                    except Exception as error:
                        raise QuantizationError(
                            f"loading '{failing}' from '{checkpoint.file_of(failing)}' onto {upload.device} failed: "
                            f"{error}. {_UNCHANGED} What was loaded is freed; fix the cause and load again."
                        ) from error
                    if bar is not None:
                        bar.update(checkpoint.tensors[key].nbytes)
    finally:
        if bar is not None:
            bar.close()
        for layer in load_plan.layers.values():
            layer.received.clear()
    return built


def _stand_in(original: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A copy of the (meta) linear layer holding the checkpoint's weight and bias, to build a bnb layer from."""
    stand_in = copy.copy(original)
    stand_in._parameters = {
        "weight": nn.Parameter(weight, requires_grad=False),
        "bias": None if bias is None else nn.Parameter(bias, requires_grad=False),
    }
    return stand_in


def _build(layer: _Layer, config: QuantizationConfig, upload: HostToDevice) -> nn.Module:
    """The bnb layer on the device: quantized from a full-precision weight, or the pre-quantized one as it is."""
    entries = layer.received
    bias = entries.get(layer.bias_key) if layer.bias_key else None
    if not layer.prequantized:
        # quantize_model's own step, on the checkpoint's tensors: the same layer, byte for byte.
        return _convert(_stand_in(layer.original, entries[layer.weight_key], bias), config, upload)
    statistics = {key: entries[key] for key in layer.statistics}
    shape = layer.original.weight.shape
    meta_weight = torch.empty(shape, dtype=_full_precision_dtype(layer, statistics), device="meta")
    built = new_bnb_linear(_stand_in(layer.original, meta_weight, layer.original.bias), config)
    built.weight = prequantized_weight(
        built, layer.weight_key, entries[layer.weight_key], statistics, upload.device
    )
    if bias is not None:
        built.bias = nn.Parameter(upload(bias), requires_grad=False)
    setattr(built, _OWN_LAYER, config)
    return built


def _full_precision_dtype(layer: _Layer, statistics: dict[str, torch.Tensor]) -> torch.dtype:
    """The dtype a 4-bit weight had before quantization, as its quant state says: its compute dtype by default."""
    packed = next((value for key, value in statistics.items() if ".quant_state." in key), None)
    if packed is not None:
        name = require_bitsandbytes().utils.unpack_tensor_to_dict(packed).get("dtype")
        dtype = getattr(torch, str(name), None)
        if isinstance(dtype, torch.dtype):
            return dtype
    return layer.original.weight.dtype


def _swap_in(
    model: nn.Module, load_plan: _Plan, values: dict[str, torch.Tensor], built: dict[str, nn.Module]
) -> None:
    """Put everything loaded into the model: one new parameter per tie group, so ties survive."""
    for group, names in load_plan.groups.items():
        value, original = values[group], load_plan.originals[group]
        if isinstance(original, nn.Parameter):
            value = nn.Parameter(value, requires_grad=original.requires_grad and value.is_floating_point())
        for name in names:
            _assign(model, name, value)
    for name, value in values.items():
        if name not in load_plan.groups:
            _assign(model, name, value)
    for name, layer in built.items():
        model.set_submodule(name, layer)


def _assign(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, leaf = _split(name)
    owner = model.get_submodule(module_name)
    if leaf in owner._parameters:
        owner._parameters[leaf] = value
    else:
        owner._buffers[leaf] = value


def _fill_report(
    report: QuantizationReport,
    model: nn.Module,
    load_plan: _Plan,
    checkpoint: Checkpoint,
    config: QuantizationConfig,
    built: dict[str, nn.Module],
) -> None:
    def file_bytes(keys: Iterable[str | None]) -> int:
        return sum(checkpoint.tensors[key].nbytes for key in keys if key is not None)

    for name, reason in load_plan.decisions.items():
        layer = load_plan.layers.get(name)
        layer_type = type(model.get_submodule(name) if layer is None else layer.original).__name__
        if layer is None:
            size = file_bytes(load_plan.source_of.get(f"{name}.{leaf}") for leaf in ("weight", "bias"))
            report.modules.append(ModuleReport(name, layer_type, SKIPPED, reason or "", size, size))
        elif layer.prequantized:
            size = module_nbytes(built[name]) if name in built else file_bytes(layer.keys)
            report.modules.append(ModuleReport(name, layer_type, ALREADY_QUANTIZED, PREQUANTIZED, size, size))
        else:
            before = file_bytes([layer.weight_key, layer.bias_key])
            after = module_nbytes(built[name]) if name in built else estimated_nbytes(layer.original, config)
            report.modules.append(ModuleReport(name, layer_type, CONVERTED, "", before, after))
