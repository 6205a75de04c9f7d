"""The loading path: empty bnb layers in place of linears, then fill them tensor by tensor.

Same contract as the transformers functions these come from, so code written against
``replace_with_bnb_linear`` / ``set_module_quantized_tensor_to_device`` works unchanged.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .backend import conv1d_class, is_plain_linear, linear_shape, require_bitsandbytes
from .config import QuantizationConfig
from .skip import matches_any

_STATS_4BIT_REQUIRED = ("absmax", "quant_map")


def as_quantization_config(config: Any) -> QuantizationConfig:
    """Accept our config, a transformers ``BitsAndBytesConfig`` or its dict."""
    if config is None:
        return QuantizationConfig()
    if isinstance(config, QuantizationConfig):
        return config
    if isinstance(config, Mapping) and not ({"load_in_4bit", "load_in_8bit"} & set(config)):
        return QuantizationConfig(**config)
    return QuantizationConfig.from_bitsandbytes_config(config)


def new_bnb_linear(
    module: nn.Module, config: QuantizationConfig, compute_dtype: torch.dtype | None
) -> nn.Module:
    """An empty (meta) ``Linear4bit`` or ``Linear8bitLt`` shaped like ``module``, frozen."""
    bnb = require_bitsandbytes()
    in_features, out_features = linear_shape(module)
    has_bias = getattr(module, "bias", None) is not None
    with torch.device("meta"):
        if config.bits == 8:
            layer = bnb.nn.Linear8bitLt(
                in_features,
                out_features,
                has_bias,
                has_fp16_weights=config.has_fp16_weights,
                threshold=config.threshold,
            )
        else:
            layer = bnb.nn.Linear4bit(
                in_features,
                out_features,
                has_bias,
                compute_dtype=compute_dtype,
                compress_statistics=config.double_quant,
                quant_type=config.quant_type,
                quant_storage=config.quant_storage,
            )
    # Kept so a Conv1D weight (stored transposed) is transposed when loaded, as transformers does.
    layer.source_cls = type(module)
    layer.requires_grad_(False)
    return layer


def replace_with_bnb_linear(
    model: nn.Module,
    modules_to_not_convert: Sequence[str] | None = None,
    current_key_name: Sequence[str] | None = None,
    quantization_config: Any = None,
) -> nn.Module:
    """Swap every ``nn.Linear`` / ``Conv1D`` for an empty, frozen bnb layer, for loading a checkpoint.

    The new layers live on the meta device; fill them with
    :func:`set_module_quantized_tensor_to_device`. Weights are not quantized here: use
    :func:`bnb_lightning.quantize_model` for a model whose weights are already in memory.

    Args:
        model: any ``nn.Module``; changed in place and returned.
        modules_to_not_convert: module-name patterns to keep (default ``["lm_head"]``); see
            :func:`get_keys_to_not_convert` for the automatic choice.
        current_key_name: names of the modules above ``model`` when it is part of a larger model,
            so patterns are matched against full names.
        quantization_config: a :class:`QuantizationConfig`, a transformers ``BitsAndBytesConfig``
            or a dict of either.
    """
    config = as_quantization_config(quantization_config)
    skip = ["lm_head"] if modules_to_not_convert is None else list(modules_to_not_convert)
    prefix = ".".join(current_key_name or ())
    replaced = 0
    for name, module in list(model.named_modules()):
        full_name = f"{prefix}.{name}" if prefix and name else (prefix or name)
        if not name or not is_plain_linear(module) or matches_any(full_name, skip):
            continue
        if config.target_modules is not None and not matches_any(full_name, config.target_modules):
            continue
        model.set_submodule(name, new_bnb_linear(module, config, config.compute_dtype))
        replaced += 1
    if replaced == 0:
        warnings.warn(
            f"replace_with_bnb_linear found no nn.Linear or Conv1D layer to replace in {type(model).__name__} "
            f"(skipped: {skip}). Nothing will be quantized; check the model and modules_to_not_convert.",
            stacklevel=2,
        )
    return model


def _resolve(module: nn.Module, tensor_name: str) -> tuple[nn.Module, str]:
    *path, leaf = tensor_name.split(".")
    for depth, part in enumerate(path):
        child = getattr(module, part, None)
        if not isinstance(child, nn.Module):
            walked = ".".join(path[: depth + 1])
            raise ValueError(
                f"cannot set {tensor_name!r}: {type(module).__name__} has no submodule {part!r} (at {walked!r}). "
                "Check that the checkpoint belongs to this model."
            )
        module = child
    if leaf not in module._parameters and leaf not in module._buffers:
        raise ValueError(
            f"cannot set {tensor_name!r}: {type(module).__name__} has no parameter or buffer {leaf!r}; "
            f"it has {sorted([*module._parameters, *module._buffers])}."
        )
    return module, leaf


def _as_tensor(value: Any) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.tensor(value)


def _check_shape(tensor_name: str, got: torch.Size | tuple, expected: torch.Size | tuple) -> None:
    if tuple(got) != tuple(expected):
        raise ValueError(
            f"shape mismatch for {tensor_name!r}: the checkpoint has {tuple(got)}, the model expects "
            f"{tuple(expected)}. The checkpoint was probably saved from a different model configuration."
        )


def set_module_quantized_tensor_to_device(
    module: nn.Module,
    tensor_name: str,
    device: torch.device | str | int,
    value: Any = None,
    quantized_stats: Mapping[str, Any] | None = None,
) -> None:
    """Put one parameter or buffer, named by its dotted path from ``module``, on ``device``.

    Plain tensors are copied as they are. For bnb weights: a floating ``value`` is quantized on
    ``device``; an already quantized ``value`` (int8 with ``quantized_stats={"SCB": ...}``, or packed
    4-bit with the quant-state entries transformers' ``save_pretrained`` writes, e.g. ``absmax``,
    ``quant_map``, ``quant_state.bitsandbytes__nf4``, with or without the ``...weight.`` prefix) is
    loaded as is. A ``Conv1D`` weight is transposed before quantization, as transformers does.

    Raises:
        ValueError: unknown name, shape mismatch, a dtype that contradicts the quantization state,
            missing statistics.
    """
    bnb = require_bitsandbytes()
    device = torch.device(f"cuda:{device}" if isinstance(device, int) else device)
    owner, leaf = _resolve(module, tensor_name)
    is_buffer = leaf in owner._buffers
    old_value = getattr(owner, leaf)
    if value is None and old_value is not None and old_value.device.type == "meta" and device.type != "meta":
        raise ValueError(f"{tensor_name!r} is on the meta device; pass its `value` to put it on {device}.")

    is_4bit = not is_buffer and isinstance(old_value, bnb.nn.Params4bit)
    is_8bit = not is_buffer and isinstance(old_value, bnb.nn.Int8Params)
    if not (is_4bit or is_8bit):
        new_value = (old_value if value is None else _as_tensor(value)).to(device)
        if value is not None and old_value is not None:
            _check_shape(tensor_name, new_value.shape, old_value.shape)
        if is_buffer:
            owner._buffers[leaf] = new_value
        else:
            owner._parameters[leaf] = nn.Parameter(new_value, requires_grad=old_value.requires_grad)
        return

    new_value = old_value if value is None else _as_tensor(value)
    prequantized = quantized_stats is not None
    is_packed = new_value.dtype in (torch.int8, torch.uint8) or (
        is_4bit and prequantized and new_value.dtype == old_value.quant_storage
    )
    if prequantized != is_packed:
        expected = "quantized (int8/uint8 or quant_storage)" if prequantized else "floating point"
        raise ValueError(
            f"dtype {new_value.dtype} of {tensor_name!r} contradicts its quantization state: with "
            f"quantized_stats={'given' if prequantized else 'None'} the value must be {expected}. Pass the "
            "statistics saved next to a quantized weight, or a full-precision weight without statistics."
        )
    conv1d = conv1d_class()
    transpose = conv1d is not None and getattr(owner, "source_cls", None) is conv1d and not prequantized
    if transpose:
        new_value = new_value.T
    expected_shape = (owner.out_features, owner.in_features)

    if is_8bit:
        _check_shape(tensor_name, new_value.shape, expected_shape)
        param = bnb.nn.Int8Params(
            new_value.to("cpu"), requires_grad=False, has_fp16_weights=old_value.has_fp16_weights
        ).to(device)
        if prequantized:
            if "SCB" not in quantized_stats:
                raise ValueError(
                    f"missing statistics for the int8 weight {tensor_name!r}: expected 'SCB' in quantized_stats "
                    f"(saved as '{tensor_name.removesuffix('weight')}SCB'), got {sorted(quantized_stats)}."
                )
            scb = _as_tensor(quantized_stats["SCB"])
            _check_shape(f"{tensor_name.removesuffix('weight')}SCB", scb.shape, (expected_shape[0],))
            param.SCB = scb.to(device)
            param.CB = param.data
    elif prequantized:
        stats = {
            key.split("weight.", 1)[-1] if "weight." in key else key: v for key, v in quantized_stats.items()
        }
        missing = [k for k in _STATS_4BIT_REQUIRED if k not in stats]
        if not any(k.startswith("quant_state.bitsandbytes__") for k in stats):
            missing.append("quant_state.bitsandbytes__<nf4|fp4>")
        if missing:
            raise ValueError(
                f"missing statistics for the 4-bit weight {tensor_name!r}: {missing} not in quantized_stats "
                f"(got {sorted(stats)}). Pass every '{tensor_name}.*' entry of the checkpoint."
            )
        param = bnb.nn.Params4bit.from_prequantized(
            data=new_value, quantized_stats=stats, requires_grad=False, device=device, module=owner
        )
        _check_shape(tensor_name, param.quant_state.shape, expected_shape)
        if param.quant_state.quant_type != old_value.quant_type:
            raise ValueError(
                f"{tensor_name!r} was saved as {param.quant_state.quant_type} but the layer is configured for "
                f"{old_value.quant_type}; use a quantization config with quant_type={param.quant_state.quant_type!r}."
            )
    else:
        _check_shape(tensor_name, new_value.shape, expected_shape)
        param = bnb.nn.Params4bit(
            new_value,
            requires_grad=False,
            blocksize=old_value.blocksize,
            compress_statistics=old_value.compress_statistics,
            quant_type=old_value.quant_type,
            quant_storage=old_value.quant_storage,
            module=owner,
        ).to(device)
    owner._parameters[leaf] = param


def replace_8bit_linear(*args: Any, **kwargs: Any) -> nn.Module:
    """Deprecated name of :func:`replace_with_bnb_linear`."""
    warnings.warn(
        "replace_8bit_linear is deprecated and will be removed; use replace_with_bnb_linear instead.",
        FutureWarning,
        stacklevel=2,
    )
    return replace_with_bnb_linear(*args, **kwargs)


def set_module_8bit_tensor_to_device(*args: Any, **kwargs: Any) -> None:
    """Deprecated name of :func:`set_module_quantized_tensor_to_device`."""
    warnings.warn(
        "set_module_8bit_tensor_to_device is deprecated and will be removed; use "
        "set_module_quantized_tensor_to_device instead.",
        FutureWarning,
        stacklevel=2,
    )
    return set_module_quantized_tensor_to_device(*args, **kwargs)
