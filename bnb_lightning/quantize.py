"""`quantize_model`: quantize a model that is already in memory, layer by layer, onto a device."""

from __future__ import annotations

import math
import os
import time
import warnings
from typing import Any

import torch
from torch import nn

from .backend import (
    as_device,
    check_device_supported,
    conv1d_class,
    is_bnb_linear,
    is_plain_linear,
    is_quantized_parameter,
    linear_shape,
    module_nbytes,
    require_bitsandbytes,
)
from .config import QuantizationConfig, as_quantization_config
from .replace import new_bnb_linear
from .report import ALREADY_QUANTIZED, CONVERTED, SKIPPED, ModuleReport, QuantizationReport
from .skip import (
    ADAPTER,
    KEEP_IN_FP32,
    NOT_TARGETED,
    USER_SKIP,
    adapter_module_names,
    default_skips,
    keep_in_fp32_patterns,
    matches_any,
)
from .transfer import HostToDevice, keep_rows_on_host

# Set on each layer this package creates, holding the config it was quantized with, so a second call
# knows the layer is its own and what it is.
_OWN_LAYER = "_bnb_lightning_quantized"
# What bitsandbytes quantizes; other weights (float64, integers) are refused before anything changes.
_QUANTIZABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Fields that decide what a quantized layer is. compute_dtype counts only where both configs set one
# (None means "the weight's dtype" or "the precision's"); which layers are selected may differ.
_LAYER_FIELDS = ("bits", "quant_type", "double_quant", "quant_storage", "threshold", "has_fp16_weights")


class QuantizationError(RuntimeError):
    """Quantizing one layer failed; the message says what state the model was left in."""


def plan(model: nn.Module, config: QuantizationConfig) -> dict[str, str | None]:
    """For every linear layer: ``None`` to convert it, or the reason to keep it in full precision."""
    skips: dict[str, str] = {} if config.replace_default_skips else default_skips(model)
    fp32_patterns = keep_in_fp32_patterns(model)
    adapters = adapter_module_names(model)
    decisions: dict[str, str | None] = {}
    for name, module in model.named_modules():
        if not name or not is_plain_linear(module):
            continue
        reason = ADAPTER if name in adapters else None
        if reason is None:
            reason = next((why for skipped, why in skips.items() if _selects(skipped, name)), None)
        if reason is None and matches_any(name, config.skip_modules):
            reason = USER_SKIP
        if reason is None and matches_any(name, fp32_patterns):
            reason = KEEP_IN_FP32
        if (
            reason is None
            and config.target_modules is not None
            and not matches_any(name, config.target_modules)
        ):
            reason = NOT_TARGETED
        decisions[name] = reason
    return decisions


def _selects(skipped_name: str, name: str) -> bool:
    return name == skipped_name or name.startswith(skipped_name + ".")


def _warn_unmatched_patterns(model: nn.Module, config: QuantizationConfig) -> None:
    names = [name for name, _ in model.named_modules() if name]
    for field_name, patterns in (
        ("skip_modules", config.skip_modules),
        ("target_modules", config.target_modules),
    ):
        for pattern in patterns or ():
            if not any(matches_any(name, [pattern]) for name in names):
                warnings.warn(
                    f"{field_name} pattern {pattern!r} matches no module of {type(model).__name__}; "
                    f"it has no effect. Module names look like {names[:3]}; check the spelling.",
                    stacklevel=3,
                )


def estimated_nbytes(module: nn.Module, config: QuantizationConfig) -> int:
    """Bytes ``module`` will take once quantized with ``config`` (weight, statistics, bias)."""
    in_features, out_features = linear_shape(module)
    count = in_features * out_features
    bias = module.bias.nbytes if getattr(module, "bias", None) is not None else 0
    if config.bits == 8:
        if config.has_fp16_weights:
            return module_nbytes(module)  # the weights stay as they are; LLM.int8 quantizes per forward
        return count + out_features * 4 + bias
    blocks = math.ceil(count / 64)
    quant_map = 16 * 4
    if config.double_quant:
        statistics = blocks + math.ceil(blocks / 256) * 4 + 256 * 4 + quant_map
    else:
        statistics = blocks * 4 + quant_map
    return (count + 1) // 2 + statistics + bias


def _quantized_weight(module: nn.Module, layer: nn.Module, config: QuantizationConfig, upload: HostToDevice):
    bnb = require_bitsandbytes()
    device = upload.device
    weight = upload(module.weight.detach())
    if type(module) is conv1d_class():
        weight = weight.T
    if config.bits == 4:
        return bnb.nn.Params4bit(
            weight,
            requires_grad=False,
            blocksize=layer.weight.blocksize,
            compress_statistics=config.double_quant,
            quant_type=config.quant_type,
            quant_storage=config.quant_storage,
            module=layer,
        ).to(device)
    if config.has_fp16_weights:
        return bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=True)
    # Int8Params.to() only quantizes weights coming from the CPU; _quantize is the same step for any device.
    return bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)._quantize(device)


def _convert(module: nn.Module, config: QuantizationConfig, upload: HostToDevice) -> nn.Module:
    """A bnb layer for ``module``, its weight quantized on ``upload.device``."""
    layer = new_bnb_linear(module, config)
    layer.weight = _quantized_weight(module, layer, config, upload)
    if module.bias is not None:
        layer.bias = nn.Parameter(upload(module.bias.detach()), requires_grad=False)
    setattr(layer, _OWN_LAYER, config)
    return layer


def check_keep_on_host(config: QuantizationConfig, keep_on_host: bool, mapped_weights: bool = False) -> None:
    """``keep_on_host`` is for 4-bit layers, which bitsandbytes moves to the CPU with their quant state;
    ``mapped_weights`` is a way of keeping them there."""
    if mapped_weights and not keep_on_host:
        raise ValueError(
            "mapped_weights=True keeps pre-quantized weights on the host as views of the checkpoint's files; "
            "it needs keep_on_host=True (and weights=...). Pass both, or mapped_weights=False."
        )
    if keep_on_host and config.bits != 4:
        raise ValueError(
            f"keep_on_host=True keeps 4-bit layers in CPU memory for FSDP2 to shard; got bits={config.bits}. "
            "Use bits=4, or keep_on_host=False to quantize onto the device."
        )


def check_host_shard(keep_on_host: bool, host_shard: Any) -> None:
    """``host_shard`` is ``(rank, world)`` with ``0 <= rank < world``, and a way of keeping on the host."""
    if host_shard is None:
        return
    valid = (
        isinstance(host_shard, tuple)
        and len(host_shard) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) for x in host_shard)
        and 0 <= host_shard[0] < host_shard[1]
    )
    if not valid:
        raise ValueError(f"host_shard must be (rank, world) with 0 <= rank < world, got {host_shard!r}.")
    if not keep_on_host:
        raise ValueError(
            "host_shard keeps each rank's FSDP2 rows of the layers in CPU memory; it needs keep_on_host=True. "
            "Pass both, or host_shard=None."
        )


def quantized_with(model: nn.Module) -> QuantizationConfig | None:
    """The config ``quantize_model`` quantized ``model``'s layers with, or ``None`` if it quantized none."""
    return next(
        (config for m in model.modules() if (config := getattr(m, _OWN_LAYER, None)) is not None), None
    )


def config_conflicts(existing: QuantizationConfig, requested: QuantizationConfig) -> list[str]:
    """``field: existing -> requested`` for each setting of the layers that ``requested`` would change."""
    if existing.bits != requested.bits:
        return [f"bits: {existing.bits} -> {requested.bits}"]
    names = [*_LAYER_FIELDS]
    if existing.compute_dtype is not None and requested.compute_dtype is not None:
        names.append("compute_dtype")
    return [
        f"{name}: {getattr(existing, name)!r} -> {getattr(requested, name)!r}"
        for name in names
        if getattr(existing, name) != getattr(requested, name)
    ]


def _check_same_quantization(model: nn.Module, requested: QuantizationConfig) -> None:
    existing = quantized_with(model)
    conflicts = [] if existing is None else config_conflicts(existing, requested)
    if conflicts:
        raise ValueError(
            f"{type(model).__name__} is already quantized by bnb_lightning with another config "
            f"({'; '.join(conflicts)}), and quantized layers are not quantized again (their full-precision "
            "weights are gone). Quantize with the config the model was quantized with, or rebuild the model "
            "from its full-precision weights and quantize that."
        )


def _check_quantizable_dtypes(layers: dict[str, nn.Module], decisions: dict[str, str | None]) -> None:
    wrong = {
        name: layers[name].weight.dtype
        for name, reason in decisions.items()
        if reason is None and layers[name].weight.dtype not in _QUANTIZABLE_DTYPES
    }
    if wrong:
        name, dtype = next(iter(wrong.items()))
        raise ValueError(
            f"{len(wrong)} linear layers have {dtype} weights (e.g. {name!r}); bitsandbytes quantizes float32, "
            "float16 and bfloat16 weights. Cast the model first, e.g. model.float() or model.to(torch.bfloat16)."
        )


def _move_rest(model: nn.Module, upload: HostToDevice) -> None:
    """Move parameters and buffers that stay in full precision, keeping their objects (ties survive)."""
    device = upload.device
    for parameter in model.parameters():
        if not is_quantized_parameter(parameter) and parameter.device != device:
            parameter.data = upload(parameter.data)
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.device != device:
                module._buffers[name] = upload(buffer)


def _model_device(model: nn.Module) -> torch.device:
    for parameter in model.parameters():
        if parameter.device.type != "meta":
            return parameter.device
    return torch.device("cpu")


def quantize_model(
    model: nn.Module,
    config: QuantizationConfig | Any = None,
    device: torch.device | str | int | None = None,
    *,
    dry_run: bool = False,
    weights: str | os.PathLike | None = None,
    keep_on_host: bool = False,
    mapped_weights: bool = False,
    host_shard: tuple[int, int] | None = None,
) -> QuantizationReport:
    """Quantize the linear layers of ``model`` in place, one layer at a time, onto ``device``.

    Each layer's full-precision weight is moved to ``device``, quantized there and dropped before
    the next layer, so the device never holds the full-precision model: its peak is the quantized
    model plus one layer. From the CPU to a CUDA device, weights travel through pinned staging
    buffers, so copying one layer overlaps with quantizing the previous one. Modules kept in full
    precision (tied weights, output embeddings, last module, ``skip_modules``) keep their very
    tensor objects, so ties survive. Quantized weights are frozen. A second call with the same config
    changes nothing; one with another config is refused (the layers cannot be quantized again).
    Everything is checked before the first layer changes. A model quantized by someone else (for
    example transformers' ``from_pretrained(quantization_config=...)``) is left alone, with a warning.

    Args:
        model: any ``nn.Module`` with its weights in memory (not on the meta device).
        config: a :class:`QuantizationConfig`, a transformers ``BitsAndBytesConfig``, or a dict
            of either. Default: NF4 with double quantization.
        device: where the quantized model lives; ``None`` keeps each weight on its current device.
        dry_run: only report what would happen; the model is not touched.
        keep_on_host: quantize each layer on ``device``, then keep it (and the rest of the model) in CPU
            memory, for a strategy that puts only each rank's shard on the device (FSDP2): the device
            then never holds more than one layer. 4-bit only.
        mapped_weights: with ``keep_on_host`` and a pre-quantized checkpoint in ``weights``, the packed
            weights stay views of the checkpoint's memory-mapped files instead of copies: the processes
            of one host (the ranks of a distributed run) then share one copy of them in memory, the
            file's pages, instead of one each. Only for a caller that moves them off the host before
            anything writes those files again (FSDP2's sharding copies each rank's shard).
        host_shard: with ``keep_on_host``, ``(rank, world)``: each quantized layer keeps in CPU memory
            only the rows of its packed weight that FSDP2 over ``world`` ranks gives ``rank``, so each
            rank holds about 1/world of them; the other rows are never written. Only for a caller that
            shards the model that way right after (the callback under FSDP2).
        weights: a checkpoint (transformers' layout: a directory with ``model.safetensors`` or sharded
            ``model-*.safetensors`` with their index, or one ``.safetensors`` file) to fill ``model``
            from, read tensor by tensor and quantized on the way; ``model`` may then be on the meta
            device. See :func:`bnb_lightning.io.loading.quantize_from_checkpoint`.

    Returns:
        A :class:`QuantizationReport`: each layer converted or skipped and why, bytes before and
        after, seconds.

    Raises:
        ValueError: the model cannot be quantized as asked (weights on the meta device or of a dtype
            bitsandbytes does not quantize, already quantized with another config); nothing changed.
        QuantizationError: a layer failed to quantize. If the original weights were not on the
            accelerator, the model is restored; otherwise the message lists the converted layers.
        CheckpointError: with ``weights``, a checkpoint that cannot be read or does not fit the model;
            the model is unchanged.

    Example::

        report = quantize_model(model, QuantizationConfig(bits=4, compute_dtype="bf16"), device="cuda")
        print(report)
    """
    config = as_quantization_config(config)
    if weights is not None:
        from .io.loading import quantize_from_checkpoint  # imported here: io.loading builds on this module

        return quantize_from_checkpoint(
            model,
            weights,
            config,
            device,
            dry_run=dry_run,
            keep_on_host=keep_on_host,
            mapped_weights=mapped_weights,
            host_shard=host_shard,
        )
    check_host_shard(keep_on_host, host_shard)
    if mapped_weights:
        raise ValueError(
            "mapped_weights=True keeps a checkpoint's pre-quantized weights as views of its files; without "
            "weights=... there is no file. Pass weights=PATH, or mapped_weights=False."
        )
    check_keep_on_host(config, keep_on_host)
    target = check_device_supported(_model_device(model) if device is None else as_device(device))
    report = QuantizationReport(
        bits=config.bits,
        quant_type=config.quant_type if config.bits == 4 else None,
        device=str(target),
        dry_run=dry_run,
    )
    layers = dict(model.named_modules())
    bnb_layers = {name: layer for name, layer in layers.items() if is_bnb_linear(layer)}
    foreign = [name for name, layer in bnb_layers.items() if not getattr(layer, _OWN_LAYER, False)]
    for name, layer in bnb_layers.items():
        size = module_nbytes(layer)
        report.modules.append(ModuleReport(name, type(layer).__name__, ALREADY_QUANTIZED, "", size, size))
    if foreign:
        warnings.warn(
            f"{type(model).__name__} is already quantized: it has {len(foreign)} bitsandbytes layers that "
            f"quantize_model did not create (e.g. {foreign[0]!r}), typically from "
            "from_pretrained(quantization_config=...) or replace_with_bnb_linear(). quantize_model leaves it "
            "as it is. To let quantize_model quantize it, load the model without quantization_config.",
            stacklevel=2,
        )
        return report

    _check_same_quantization(model, config)
    decisions = plan(model, config)
    _check_quantizable_dtypes(layers, decisions)
    _warn_unmatched_patterns(model, config)
    if not decisions and not bnb_layers:
        warnings.warn(
            f"{type(model).__name__} has no nn.Linear or Conv1D layer, so nothing was quantized. "
            "bnb_lightning quantizes linear layers only; check that the model is built before quantization.",
            stacklevel=2,
        )
    # Checked for every parameter, not only the layers to convert: a skipped module on the meta device
    # would fail when moved to `device`, after the other layers were already converted.
    on_meta = [name for name, parameter in model.named_parameters() if parameter.device.type == "meta"]
    if on_meta:
        raise ValueError(
            f"{len(on_meta)} parameters have no data yet (meta device), e.g. {on_meta[0]!r}. quantize_model needs "
            "the weights in memory: load them first, or pass the checkpoint to fill them from while quantizing, "
            "weights='path/to/model' (a save_pretrained() directory; quantize_model, prepare_model and "
            "BnbQuantization take it). The model was not changed."
        )

    start = time.perf_counter()
    upload = HostToDevice(target)
    replaced: list[tuple[str, nn.Module]] = []
    for name, reason in decisions.items():
        original = layers[name]
        before = module_nbytes(original)
        if reason is not None:
            report.modules.append(
                ModuleReport(name, type(original).__name__, SKIPPED, reason, before, before)
            )
            continue
        if dry_run:
            after = estimated_nbytes(original, config)
        else:
            try:
                layer = _convert(original, config, upload)
                if keep_on_host:
                    layer = keep_rows_on_host(layer, host_shard)
            except Exception as error:
                _rollback_or_explain(model, replaced, name, error, target)
            model.set_submodule(name, layer)
            # Keeping the original lets a failure restore the model; on the accelerator that would
            # hold the full-precision model there, so it is dropped and a failure says what changed.
            keep = original.weight.device.type == "cpu" or original.weight.device != target
            replaced.append((name, original if keep else None))
            after = module_nbytes(layer)
        report.modules.append(ModuleReport(name, type(original).__name__, CONVERTED, "", before, after))
    if not dry_run:
        if device is not None:
            _move_rest(model, HostToDevice(torch.device("cpu")) if keep_on_host else upload)
        if target.type == "cuda":
            torch.cuda.synchronize(target)  # the copies and kernels run ahead of the host
        report.seconds = time.perf_counter() - start
    return report


def _rollback_or_explain(
    model: nn.Module,
    replaced: list[tuple[str, nn.Module | None]],
    failed: str,
    error: Exception,
    device: torch.device,
) -> None:
    if all(original is not None for _, original in replaced):
        for name, original in reversed(replaced):
            model.set_submodule(name, original)
        raise QuantizationError(
            f"quantizing {failed!r} onto {device} failed: {error}. The model was restored to its original, "
            "unquantized state; fix the cause (see above) and call quantize_model again."
        ) from error
    converted = [name for name, _ in replaced]
    raise QuantizationError(
        f"quantizing {failed!r} onto {device} failed: {error}. {len(converted)} layers were already converted "
        f"and their full-precision weights freed: {converted}. Reload the model before trying again."
    ) from error
