"""One bitsandbytes layer in a state dict: the statistics saved with its weight, checked and loaded back.

``Linear4bit.state_dict()`` writes the quantization state next to the packed weight
(``weight.absmax``, ``weight.quant_map``, ``weight.quant_state.bitsandbytes__nf4``, ...), but
bitsandbytes' ``load_state_dict`` rejects those entries (bitsandbytes#1946), and ``Linear8bitLt``
refuses its own ``SCB`` once a forward has run. :func:`register_layer_hooks` fixes both at the
boundary of each layer this package creates, with instance hooks, so a plain
``model.load_state_dict(model.state_dict(), strict=True)`` round-trips. The same checks serve the
transformers-style loading path in :mod:`bnb_lightning.replace`, and :func:`check_layer_entries` runs
them on a whole state dict before anything is loaded (torch runs the hooks while it copies, one module
after another).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..backend import is_quantized_parameter, require_bitsandbytes

# Entries saved next to a quantized weight: ``QuantState.as_dict(packed=True)`` for 4-bit, longest first so
# ``nested_absmax`` is not read as ``absmax``; the row scales and their layout for int8.
STATS_4BIT = ("nested_quant_map", "nested_absmax", "quant_map", "absmax", "quant_state.bitsandbytes__nf4",
              "quant_state.bitsandbytes__fp4")  # fmt: skip
STATS_8BIT = ("SCB", "weight_format")

# Attribute of a 4-bit QuantState holding its fields as quantization made them, while bitsandbytes' CPU
# kernels work on a repacked copy (see _remember_unpacked_state).
_UNPACKED_FIELDS = "_bnb_lightning_unpacked"
# Attribute of a Linear8bitLt while it loads: unexpected keys kept from bitsandbytes (see _set_aside_int8_keys).
_SET_ASIDE = "_bnb_lightning_set_aside"


def check_shape(tensor_name: str, got: torch.Size | tuple, expected: torch.Size | tuple) -> None:
    if tuple(got) != tuple(expected):
        raise ValueError(
            f"shape mismatch for {tensor_name!r}: the checkpoint has {tuple(got)}, the model expects "
            f"{tuple(expected)}. The checkpoint was probably saved from a different model configuration."
        )


def _stat_names(tensor_name: str, quantized_stats: Mapping[str, Any], known: Sequence[str]) -> dict[str, Any]:
    """``quantized_stats`` keyed by bare statistic name, whether given bare or as full checkpoint keys."""
    stats = {}
    for key, value in quantized_stats.items():
        name = next((n for n in known if key == n or key.endswith(f".{n}")), None)
        if name is None:
            raise ValueError(
                f"unexpected entry {key!r} in the quantized_stats of {tensor_name!r}; expected entries named "
                f"{sorted(known)} (bare or as full checkpoint keys). Pass only the statistics of this weight."
            )
        stats[name] = value
    return stats


def _check_missing(tensor_name: str, missing: list[str], stats: Mapping[str, Any], saved_as: str) -> None:
    if missing:
        raise ValueError(
            f"missing statistics for the quantized weight {tensor_name!r}: {missing} not given (got "
            f"{sorted(stats)}). Pass every entry the checkpoint saved for it ({saved_as})."
        )


def _as_tensor(value: Any) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.tensor(value)


def _check_weight_format(module_name: str, weight_format: Any) -> None:
    """bitsandbytes saves row-major int8 weights as ``weight_format=0``; its loading takes ``"row"`` too."""
    value = weight_format.item() if isinstance(weight_format, torch.Tensor) else weight_format
    if value not in (0, "row"):
        raise ValueError(
            f"{module_name}weight_format={value}: only row-major int8 weights (0) can be loaded."
        )


def int8_statistics(tensor_name: str, quantized_stats: Mapping[str, Any], rows: int) -> torch.Tensor:
    """The row scales (``SCB``) saved with an int8 weight, checked against its number of rows."""
    stats = _stat_names(tensor_name, quantized_stats, STATS_8BIT)
    module_name = tensor_name.removesuffix("weight")
    _check_missing(tensor_name, [k for k in ("SCB",) if k not in stats], stats, f"'{module_name}SCB'")
    _check_weight_format(module_name, stats.get("weight_format", 0))
    scb = _as_tensor(stats["SCB"])
    check_shape(f"{module_name}SCB", scb.shape, (rows,))
    return scb


def _4bit_statistics(
    tensor_name: str, quantized_stats: Mapping[str, Any], layer_quant_type: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The statistics (bare names) and the small entries packed in ``quant_state.bitsandbytes__*``."""
    bnb = require_bitsandbytes()
    stats = _stat_names(tensor_name, quantized_stats, STATS_4BIT)
    packed = [key for key in stats if key.startswith("quant_state.")]
    info = bnb.utils.unpack_tensor_to_dict(stats[packed[0]]) if packed else {}
    missing = [k for k in ("absmax", "quant_map") if k not in stats]
    if "nested_blocksize" in info:  # saved with double quantization: the scales are quantized too
        missing += [k for k in ("nested_absmax", "nested_quant_map") if k not in stats]
    if not packed:
        missing.append("quant_state.bitsandbytes__<nf4|fp4>")
    _check_missing(tensor_name, missing, stats, f"the '{tensor_name}.*' entries")
    if info["quant_type"] != layer_quant_type:
        raise ValueError(
            f"{tensor_name!r} was saved as {info['quant_type']} but the layer is configured for "
            f"{layer_quant_type}; use a quantization config with quant_type={info['quant_type']!r}."
        )
    return stats, info


def _check_blocks(tensor_name: str, stats: Mapping[str, Any], info: Mapping[str, Any]) -> None:
    """The scales must be as many as the blocks the saved shape and block size make."""
    rows, columns = info["shape"]
    counts = [("absmax", math.ceil(rows * columns / info["blocksize"]), info["blocksize"])]
    if "nested_blocksize" in info:
        counts.append(
            ("nested_absmax", math.ceil(counts[0][1] / info["nested_blocksize"]), info["nested_blocksize"])
        )
    for name, expected, blocksize in counts:
        got = _as_tensor(stats[name]).numel()
        if got != expected:
            raise ValueError(
                f"{tensor_name}.{name} holds {got} block scales, but {expected} blocks of {blocksize} make up the "
                f"saved {rows}x{columns} weight: these statistics do not belong to this weight, or the "
                "checkpoint is corrupt."
            )


def _on(tensor: Any, device: torch.device, copy: bool) -> Any:
    return tensor.to(device, copy=copy) if isinstance(tensor, torch.Tensor) else tensor


def check_prequantized_4bit(
    layer: nn.Module, tensor_name: str, data: torch.Tensor, quantized_stats: Mapping[str, Any]
) -> dict[str, Any]:
    """Check packed 4-bit ``data`` and its statistics against ``layer``; return the statistics by bare name.

    The quant type must be the layer's; dtype (``quant_storage``), shape, packed size and the number of
    block scales must fit. The block size and double quantization are the checkpoint's. Apart from
    :func:`prequantized_weight`, so a whole state dict can be checked before any layer is loaded.

    Raises:
        ValueError: naming ``tensor_name`` and what does not fit.
    """
    packed_dtype = layer.weight.quant_storage
    if data.dtype != packed_dtype:
        raise ValueError(
            f"dtype {data.dtype} of {tensor_name!r} does not fit this {type(layer).__name__}: it holds packed "
            f"4-bit weights in {packed_dtype}. Load a state dict saved from a model quantized with the same "
            "config (quant_storage included), or load full-precision weights before quantizing."
        )
    stats, info = _4bit_statistics(tensor_name, quantized_stats, layer.weight.quant_type)
    expected_shape = (layer.out_features, layer.in_features)
    check_shape(tensor_name, info["shape"], expected_shape)
    packed_numel = -(-((math.prod(expected_shape) + 1) // 2) // data.element_size())  # ceil
    check_shape(f"{tensor_name} (packed)", (data.numel(),), (packed_numel,))
    _check_blocks(tensor_name, stats, info)
    return stats


def check_prequantized_int8(
    layer: nn.Module, tensor_name: str, data: torch.Tensor, quantized_stats: Mapping[str, Any]
) -> torch.Tensor:
    """Check int8 rows and their statistics against ``layer``; return the row scales (``SCB``).

    Apart from :func:`prequantized_weight`, so a whole state dict can be checked before any layer is
    loaded.

    Raises:
        ValueError: naming ``tensor_name`` and what does not fit.
    """
    if data.dtype != torch.int8:
        raise ValueError(
            f"dtype {data.dtype} of {tensor_name!r} does not fit this {type(layer).__name__}: it holds int8 "
            "weights. Load a state dict saved from a model quantized to 8-bit, or load full-precision weights "
            "before quantizing."
        )
    check_shape(tensor_name, data.shape, (layer.out_features, layer.in_features))
    return int8_statistics(tensor_name, quantized_stats, layer.out_features)


def prequantized_weight(
    layer: nn.Module,
    tensor_name: str,
    data: torch.Tensor,
    quantized_stats: Mapping[str, Any],
    device: torch.device,
    *,
    copy: bool = False,
    upload: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> nn.Parameter:
    """The weight of a quantized ``layer`` from its packed data and the statistics saved with it, on ``device``.

    A ``Params4bit`` for a ``Linear4bit``, an ``Int8Params`` (int8 rows and their scales, ``SCB``) for a
    ``Linear8bitLt``; checked first by :func:`check_prequantized_4bit` or :func:`check_prequantized_int8`.
    ``copy=True`` never shares memory with ``data`` or the statistics. ``upload`` (a
    :class:`~bnb_lightning.transfer.HostToDevice` to ``device``) moves the tensors instead of ``.to``: a
    pageable ``.to("cuda")`` is a synchronous copy at a few GB/s. The packed quant-state description
    stays where it is: bitsandbytes reads it on the CPU.

    Raises:
        ValueError: naming ``tensor_name`` and what does not fit.
    """
    bnb = require_bitsandbytes()

    def move(tensor: Any, description: bool = False) -> Any:
        if upload is None or description or not isinstance(tensor, torch.Tensor):
            return _on(tensor, device, copy)
        return upload(tensor)

    if isinstance(layer, bnb.nn.Linear4bit):
        stats = check_prequantized_4bit(layer, tensor_name, data, quantized_stats)
        return bnb.nn.Params4bit.from_prequantized(
            data=move(data),
            quantized_stats={
                name: move(value, description=name.startswith("quant_state."))
                for name, value in stats.items()
            },
            requires_grad=False,
            device=device,
            module=layer,
        )
    scb = check_prequantized_int8(layer, tensor_name, data, quantized_stats)
    weight = bnb.nn.Int8Params(move(data), requires_grad=False, has_fp16_weights=False)
    weight.CB = weight.data
    weight.SCB = move(scb)
    return weight


def _is_own_weight(layer: nn.Module, data: Any) -> bool:
    weight = layer.weight
    return (
        isinstance(data, torch.Tensor)
        and data.device == weight.device
        and data.device.type != "meta"
        and data.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()
        and data.storage_offset() == weight.storage_offset()
        and data.shape == weight.shape
    )


def _target_device(layer: nn.Module, data: torch.Tensor) -> torch.device:
    # A layer with no data yet (an empty model from replace_with_bnb_linear) takes the checkpoint's device.
    return data.device if layer.weight.device.type == "meta" else layer.weight.device


def _statistics_in(state_dict: Mapping[str, Any], prefix: str, names: Sequence[str]) -> list[str]:
    """The keys ``prefix + name`` that ``state_dict`` holds."""
    return [f"{prefix}{name}" for name in names if f"{prefix}{name}" in state_dict]


def _rebuilds(layer: nn.Module, data: Any, stats: Mapping[str, Any], quantized: bool) -> bool:
    """Whether a load hook rebuilds the layer's weight from ``data`` and ``stats``, with the checks.

    Not for full-precision weights into a layer not quantized yet (bitsandbytes quantizes them on
    ``.to()``), nor for the layer's own weight loaded onto itself, as for an adapter-only checkpoint
    completed from memory.
    """
    return bool(stats) or (quantized and not _is_own_weight(layer, data))


def _int8_is_quantized(layer: nn.Module) -> bool:
    return layer.weight.dtype == torch.int8 and not layer.state.has_fp16_weights


def _check_loadable(layer: nn.Module, weight_key: str, data: Any) -> None:
    """What the load hooks check before the rules of the weight itself (``check_prequantized_*``)."""
    if isinstance(layer, require_bitsandbytes().nn.Linear8bitLt) and layer.state.has_fp16_weights:
        raise ValueError(
            f"cannot load the int8 weight {weight_key!r}: this Linear8bitLt keeps 16-bit weights "
            "(has_fp16_weights=True). Quantize with has_fp16_weights=False to load a quantized state dict."
        )
    if not isinstance(data, torch.Tensor):
        raise ValueError(f"{weight_key!r} is a {type(data).__name__}, not a tensor.")


def check_layer_entries(layer: nn.Module, prefix: str, state_dict: Mapping[str, Any]) -> None:
    """Raise the error the layer's load hooks would raise for ``state_dict``, changing nothing.

    torch runs load hooks while it copies, one module after another: a hook that refuses a layer's
    statistics comes after the layers before it were overwritten. Checking every bnb layer with this
    first makes loading all-or-nothing (:func:`bnb_lightning.io.state_dict.load_state_dict_file`).

    Raises:
        ValueError: as the hooks word it, naming the layer's weight and what does not fit.
    """
    bnb = require_bitsandbytes()
    weight_key = f"{prefix}weight"
    if weight_key not in state_dict:
        return  # the hooks leave such entries to torch, which reports them as missing or unexpected
    data = state_dict[weight_key]
    if isinstance(layer, bnb.nn.Linear4bit):
        stats = {key: state_dict[key] for key in _statistics_in(state_dict, f"{weight_key}.", STATS_4BIT)}
        if _rebuilds(layer, data, stats, is_quantized_parameter(layer.weight)):
            _check_loadable(layer, weight_key, data)
            check_prequantized_4bit(layer, weight_key, data, stats)
    elif isinstance(layer, bnb.nn.Linear8bitLt):
        # bitsandbytes' own pre-hook refuses other formats, by raising in the middle of loading.
        _check_weight_format(prefix, state_dict.get(f"{prefix}weight_format", 0))
        stats = {key: state_dict[key] for key in _statistics_in(state_dict, prefix, ("SCB",))}
        if _rebuilds(layer, data, stats, _int8_is_quantized(layer)):
            _check_loadable(layer, weight_key, data)
            check_prequantized_int8(layer, weight_key, data, stats)


def _load_prequantized_weight(
    layer: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: dict[str, Any],
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """Load-state-dict pre-hook of a quantized layer: rebuild its weight from the packed data and statistics.

    Consumes the statistics entries (torch would call them unexpected) and puts the rebuilt parameter
    in place of ``weight`` in ``state_dict``, so torch's own loading finds it already there. A weight
    that does not fit adds to ``error_msgs`` (torch raises them all together) and the layer keeps its own.
    """
    weight_key = f"{prefix}weight"
    is_4bit = isinstance(layer, require_bitsandbytes().nn.Linear4bit)
    if is_4bit:
        if weight_key not in state_dict:
            return  # nothing for this layer (e.g. adapter weights only); any statistics are reported unexpected
        stats = {key: state_dict.pop(key) for key in _statistics_in(state_dict, f"{weight_key}.", STATS_4BIT)}
        quantized = is_quantized_parameter(layer.weight)
    else:
        if not _set_aside_int8_keys(layer, state_dict, prefix, unexpected_keys):
            return
        # bitsandbytes' own pre-hook, registered first, has already checked and removed `weight_format`.
        stats = {key: state_dict.pop(key) for key in _statistics_in(state_dict, prefix, STATS_8BIT)}
        quantized = _int8_is_quantized(layer)
    data = state_dict[weight_key]
    if not _rebuilds(layer, data, stats, quantized):
        return
    copy_data = not local_metadata.get("assign_to_params_buffers", False)  # copied unless assign=True
    try:
        _check_loadable(layer, weight_key, data)
        layer.weight = prequantized_weight(
            layer, weight_key, data, stats, _target_device(layer, data), copy=copy_data
        )
        if not is_4bit:
            layer.state.CB = layer.state.SCB = None  # the next forward takes both from the new weight
    except ValueError as error:
        error_msgs.append(str(error))
    state_dict[weight_key] = layer.weight


# Its names in 0.1.0: pickled layers refer to their hooks by name.
_load_4bit_weight = _load_int8_weight = _load_prequantized_weight


def _set_aside_int8_keys(
    layer: nn.Module, state_dict: dict[str, Any], prefix: str, unexpected_keys: list[str]
) -> bool:
    """Keep keys from bitsandbytes' 8-bit loading that it would misread; whether the layer has a weight to load.

    bitsandbytes' loading, next, takes every unexpected key named "SCB" after len(prefix) characters for
    its own, failing with a KeyError on other layers' keys. Those, and this layer's statistics if they
    come without its weight (bitsandbytes would put them on the old weight), wait in _SET_ASIDE until
    _restore_set_aside_keys reports them unexpected, as torch reports strays.
    """
    weight_key = f"{prefix}weight"
    set_aside = [key for key in unexpected_keys if key[len(prefix) :] == "SCB" and not key.startswith(prefix)]
    for key in set_aside:
        unexpected_keys.remove(key)
    if weight_key not in state_dict:
        set_aside += [
            f"{prefix}{name}" for name in STATS_8BIT if state_dict.pop(f"{prefix}{name}", None) is not None
        ]
    setattr(layer, _SET_ASIDE, set_aside)
    return weight_key in state_dict


def _restore_set_aside_keys(layer: nn.Module, incompatible_keys: Any) -> None:
    """Load-state-dict post-hook: the unexpected keys :func:`_set_aside_int8_keys` kept from bitsandbytes."""
    incompatible_keys.unexpected_keys.extend(layer.__dict__.pop(_SET_ASIDE, ()))


def _remember_unpacked_state(layer: nn.Module, args: tuple) -> None:
    """Forward pre-hook: keep the quantization state as it is before bitsandbytes repacks it for CPU.

    On CPUs with AVX512-BF16, an eval forward without grad rewrites the weight into a CPU layout and
    turns the block scales into bfloat16, undoing double quantization; bitsandbytes' inverse on saving
    re-quantizes the scales (lossy) and, without double quantization, leaves them transposed
    (bitsandbytes 0.50), which changes the model. Keeping references to the original fields lets
    :func:`_restore_unpacked_weight` undo the repacking exactly. While packed, this holds the original
    scales: 1/8 of the packed weight bytes (1/32 with double quantization).
    """
    x = args[0] if args else None
    # bitsandbytes repacks only on this forward (its own test); anything else leaves the state alone,
    # so training forwards (compiled ones too) change nothing here.
    if not isinstance(x, torch.Tensor) or x.device.type != "cpu" or layer.training or x.requires_grad:
        return
    quant_state = getattr(layer.weight, "quant_state", None)
    if quant_state is not None and not getattr(quant_state, "packing_format_for_cpu", False):
        fields = ("absmax", "dtype", "nested", "offset", "state2")
        setattr(quant_state, _UNPACKED_FIELDS, {name: getattr(quant_state, name, None) for name in fields})


def _restore_unpacked_weight(layer: nn.Module, prefix: str, keep_vars: bool) -> None:
    """State-dict pre-hook: save the weight as quantization made it, not in the CPU layout.

    Runs before bitsandbytes' own conversion, which then has nothing to do.
    """
    weight = layer.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is None or not getattr(quant_state, "packing_format_for_cpu", False):
        return
    fields = getattr(quant_state, _UNPACKED_FIELDS, None)
    if fields is None:
        return  # packed before our hook saw it: bitsandbytes' own conversion applies
    functional = require_bitsandbytes().functional
    # The inverse only rearranges the packed bytes exactly; its scales (on a copy) are replaced by the originals.
    data, _ = functional._convert_weight_packed_for_cpu_inverse(weight.data, copy.copy(quant_state))
    for name, value in fields.items():
        setattr(quant_state, name, value)
    quant_state.packing_format_for_cpu = False
    weight.data = data


def register_layer_hooks(layer: nn.Module) -> None:
    """Make a bnb layer's ``state_dict()`` load back with ``load_state_dict(strict=True)``, exactly.

    Instance hooks, nothing patched in bitsandbytes: for ``Linear4bit`` a load pre-hook that rebuilds
    the weight from its statistics (:func:`prequantized_weight`), and, where bitsandbytes repacks
    weights for CPU inference, hooks that undo the repacking exactly before saving; for
    ``Linear8bitLt`` a load pre-hook that rebuilds the int8 weight and ``SCB``. A checkpoint that does
    not fit the layer (quant type, shape, dtype, missing statistics) makes ``load_state_dict`` raise
    with the layer's name; the layer keeps its weight.
    """
    bnb = require_bitsandbytes()
    if isinstance(layer, bnb.nn.Linear4bit):
        layer.register_load_state_dict_pre_hook(_load_prequantized_weight)
        if getattr(layer, "support_avx512bf16_for_cpu", False):
            layer.register_forward_pre_hook(_remember_unpacked_state)
            layer.register_state_dict_pre_hook(_restore_unpacked_weight)
    elif isinstance(layer, bnb.nn.Linear8bitLt):
        layer.register_load_state_dict_pre_hook(_load_prequantized_weight)
        layer.register_load_state_dict_post_hook(_restore_set_aside_keys)
