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
  any data is read (:mod:`.load_plan`); new layers and tensors are built aside and swapped in once all are loaded. On an
  error the model object is unchanged (still on meta, if it was), and what was loaded is freed.
"""

from __future__ import annotations

import copy
import os
import time
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..backend import as_device, check_device_supported, is_bnb_linear, module_nbytes, require_bitsandbytes
from ..config import QuantizationConfig, as_quantization_config
from ..quantize import (
    _OWN_LAYER,
    QuantizationError,
    _convert,
    _warn_unmatched_patterns,
    check_host_shard,
    check_keep_on_host,
    estimated_nbytes,
)
from ..replace import new_bnb_linear
from ..report import ALREADY_QUANTIZED, CONVERTED, SKIPPED, ModuleReport, QuantizationReport
from ..transfer import HostToDevice, keep_rows_on_host
from .layer_state import prequantized_weight
from .load_plan import (
    UNCHANGED,
    LoadLayer,
    LoadPlan,
    initializer_of,
    meta_buffer_message,
    named_as_in,
    plan_loading,
    split_name,
)
from .shards import Checkpoint, CheckpointError, read_checkpoint

__all__ = ["CheckpointError", "quantize_from_checkpoint"]

# Above this many bytes to read, a progress bar is shown (if tqdm is installed) unless progress=False.
PROGRESS_BYTES = 2**30
PREQUANTIZED = "quantized in the checkpoint"


def quantize_from_checkpoint(
    model: nn.Module,
    weights: str | os.PathLike,
    config: QuantizationConfig | Any = None,
    device: torch.device | str | int | None = None,
    *,
    dry_run: bool = False,
    progress: bool | None = None,
    keep_on_host: bool = False,
    mapped_weights: bool = False,
    host_shard: tuple[int, int] | None = None,
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
        keep_on_host: quantize on ``device`` but keep the loaded model in CPU memory (for FSDP2, which then
            puts each rank's shard on the device), as :func:`~bnb_lightning.quantize_model`'s.
        mapped_weights: with ``keep_on_host``, pre-quantized weights stay views of the checkpoint's
            memory-mapped files instead of copies, as :func:`~bnb_lightning.quantize_model`'s.
        host_shard: with ``keep_on_host``, ``(rank, world)``: the layers quantized here keep only that
            rank's FSDP2 rows in CPU memory, as :func:`~bnb_lightning.quantize_model`'s.

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
    check_keep_on_host(config, keep_on_host, mapped_weights)
    check_host_shard(keep_on_host, host_shard)
    target = check_device_supported(torch.device("cpu") if device is None else as_device(device))
    if any(is_bnb_linear(module) for module in model.modules()):
        raise ValueError(
            f"{type(model).__name__} already has bitsandbytes layers; loading a checkpoint while quantizing "
            "fills a model as built. Build it again (on the meta device), then call quantize_model(..., weights=...)."
        )
    checkpoint = named_as_in(model, read_checkpoint(weights))
    load_plan = plan_loading(model, config, checkpoint)
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
        place = HostToDevice(torch.device("cpu")) if keep_on_host else upload  # where what is kept goes
        values = _buffers_aside(model, load_plan, place)
        built = _read_and_build(
            checkpoint, load_plan, config, upload, place, values, progress, mapped_weights, host_shard
        )
        _swap_in(model, load_plan, values, built)
        if target.type == "cuda":
            torch.cuda.synchronize(target)  # the copies and kernels run ahead of the host
        report.seconds = time.perf_counter() - start
    _fill_report(report, model, load_plan, checkpoint, config, built)
    return report


# Loading: one shard, one tensor at a time; everything built aside, then swapped in.


def _buffers_aside(model: nn.Module, load_plan: LoadPlan, place: HostToDevice) -> dict[str, torch.Tensor]:
    """The buffers no checkpoint holds, on the device: real ones moved, meta ones computed."""
    values = {name: place(model.get_buffer(name)) for name in load_plan.kept}
    for owner_name in load_plan.computed:
        owner = model.get_submodule(owner_name)
        # A shallow copy with buffers of its own, for _init_weights to write into: the model's module stays
        # as it is until everything is loaded. NaN shows a float buffer it did not write.
        stand_in = copy.copy(owner)
        stand_in._buffers = {
            name: torch.full_like(buffer, float("nan"), device=place.device)
            if buffer.is_floating_point()
            else torch.zeros_like(buffer, device=place.device)
            for name, buffer in owner._buffers.items()
            if buffer is not None
        }
        prefix = f"{owner_name}." if owner_name else ""
        initializer = initializer_of(model, owner_name)
        try:
            with torch.no_grad():
                initializer._init_weights(stand_in)
        except Exception as error:  # a model's own code: any failure means the same to the caller
            problem = (
                f"{type(initializer).__name__}._init_weights failed on its {type(owner).__name__}: {error}"
            )
            raise CheckpointError(
                meta_buffer_message(f"{prefix}{next(iter(stand_in._buffers))}", problem)
            ) from error
        for name in owner._non_persistent_buffers_set:
            value = stand_in._buffers.get(name)
            if value is not None and value.is_floating_point() and value.isnan().any():
                problem = f"{type(initializer).__name__}._init_weights does not compute it"
                raise CheckpointError(meta_buffer_message(f"{prefix}{name}", problem))
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
    load_plan: LoadPlan,
    config: QuantizationConfig,
    upload: HostToDevice,
    place: HostToDevice,
    values: dict[str, torch.Tensor],
    progress: bool | None,
    mapped_weights: bool = False,
    host_shard: tuple[int, int] | None = None,
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
                        layer = owners.get(key)
                        kept_as_read = key in load_plan.sources or layer.prequantized or key == layer.bias_key
                        mapped = (
                            mapped_weights
                            and layer is not None
                            and layer.prequantized
                            and key == layer.weight_key
                        )
                        if place.device.type == "cpu" and kept_as_read and not mapped:
                            # safetensors maps the file: a tensor read to the CPU is a view of it, which
                            # saving over the file later would change (or, cut short, crash on). A weight
                            # to quantize needs no copy: quantizing makes new tensors. `mapped_weights`
                            # keeps the packed weights as views, for a caller that moves them off the host.
                            tensor = tensor.clone()
                        if key in load_plan.sources:
                            values[load_plan.sources[key]] = place(tensor)
                        if layer is not None:
                            layer.received[key] = tensor
                            if len(layer.received) == len(layer.keys):
                                failing = layer.weight_key
                                built[layer.name] = _build(layer, config, upload, place, host_shard)
                                layer.received.clear()
                    except CheckpointError:
                        raise
                    except ValueError as error:
                        where = f"'{failing}' in '{checkpoint.file_of(failing)}'"
                        raise CheckpointError(f"{where}: {error} {UNCHANGED}") from error
                    except Exception as error:
                        raise QuantizationError(
                            f"loading '{failing}' from '{checkpoint.file_of(failing)}' onto {upload.device} failed: "
                            f"{error}. {UNCHANGED} What was loaded is freed; fix the cause and load again."
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


def _build(
    layer: LoadLayer,
    config: QuantizationConfig,
    upload: HostToDevice,
    place: HostToDevice,
    host_shard: tuple[int, int] | None = None,
) -> nn.Module:
    """The bnb layer where ``place`` puts it: quantized on ``upload``'s device from a full-precision weight, or
    the pre-quantized one as it is."""
    entries = layer.received
    bias = entries.get(layer.bias_key) if layer.bias_key else None
    if not layer.prequantized:
        # quantize_model's own step, on the checkpoint's tensors: the same layer, byte for byte.
        built = _convert(_stand_in(layer.original, entries[layer.weight_key], bias), config, upload)
        return built if place is upload else keep_rows_on_host(built, host_shard)
    statistics = {key: entries[key] for key in layer.statistics}
    shape = layer.original.weight.shape
    meta_weight = torch.empty(shape, dtype=_full_precision_dtype(layer, statistics), device="meta")
    built = new_bnb_linear(_stand_in(layer.original, meta_weight, layer.original.bias), config)
    built.weight = prequantized_weight(
        built, layer.weight_key, entries[layer.weight_key], statistics, place.device, upload=place
    )
    if bias is not None:
        built.bias = nn.Parameter(place(bias), requires_grad=False)
    setattr(built, _OWN_LAYER, config)
    return built


def _full_precision_dtype(layer: LoadLayer, statistics: dict[str, torch.Tensor]) -> torch.dtype:
    """The dtype a 4-bit weight had before quantization, as its quant state says: its compute dtype by default."""
    packed = next((value for key, value in statistics.items() if ".quant_state." in key), None)
    if packed is not None:
        name = require_bitsandbytes().utils.unpack_tensor_to_dict(packed).get("dtype")
        dtype = getattr(torch, str(name), None)
        if isinstance(dtype, torch.dtype):
            return dtype
    return layer.original.weight.dtype


def _swap_in(
    model: nn.Module, load_plan: LoadPlan, values: dict[str, torch.Tensor], built: dict[str, nn.Module]
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
    module_name, leaf = split_name(name)
    owner = model.get_submodule(module_name)
    if leaf in owner._parameters:
        owner._parameters[leaf] = value
    else:
        owner._buffers[leaf] = value


def _fill_report(
    report: QuantizationReport,
    model: nn.Module,
    load_plan: LoadPlan,
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
