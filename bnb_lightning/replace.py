"""The loading path: empty bnb layers in place of linears, then fill them tensor by tensor.

Same contract as the transformers functions these come from, so code written against
``replace_with_bnb_linear`` / ``set_module_quantized_tensor_to_device`` works unchanged. A model
called before its layers are filled says which layer is empty and how to fill it, instead of failing
inside bitsandbytes; the check leaves each layer once it holds weights, so training pays nothing for it.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .backend import (
    as_device,
    conv1d_class,
    is_plain_linear,
    is_quantized_parameter,
    layer_quant_state,
    linear_shape,
    require_bitsandbytes,
)
from .config import QuantizationConfig, as_patterns, as_quantization_config
from .io.layer_state import (
    STATS_8BIT,
    check_shape,
    prequantized_weight,
    register_layer_hooks,
)
from .skip import matches_any


def _compute_dtype(module: nn.Module, config: QuantizationConfig) -> torch.dtype | None:
    # Unset means the replaced weight's own dtype: never a silent float32 compute on a half model.
    weight_dtype = module.weight.dtype
    return config.compute_dtype or (weight_dtype if weight_dtype.is_floating_point else None)


# Output rows bitsandbytes' CPU inference layout packs together (its `block_n`).
_CPU_ROW_BLOCK = 32


def new_bnb_linear(module: nn.Module, config: QuantizationConfig) -> nn.Module:
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
                compute_dtype=_compute_dtype(module, config),
                compress_statistics=config.double_quant,
                quant_type=config.quant_type,
                quant_storage=config.quant_storage,
            )
    # Kept so a Conv1D weight (stored transposed) is transposed when loaded, as transformers does.
    layer.source_cls = type(module)
    layer.requires_grad_(False)
    # A new module starts in training mode. bitsandbytes picks its kernels by mode (on CPU, LLM.int8
    # dequantizes in training mode), so an eval model given training layers computes different outputs.
    layer.train(module.training)
    if getattr(layer, "support_avx512bf16_for_cpu", False) and (
        out_features % _CPU_ROW_BLOCK or in_features % layer.weight.blocksize
    ):
        # bitsandbytes' CPU inference layout packs whole blocks of rows and of quantization blocks; its
        # eval forward fails an assertion for other shapes, which run its generic CPU kernels instead.
        layer.support_avx512bf16_for_cpu = False
    # So that `model.load_state_dict(model.state_dict(), strict=True)` works; see layer_state.
    register_layer_hooks(layer)
    return layer


# Attribute of a layer replace_with_bnb_linear built empty: its name in the model, for _refuse_empty_forward.
_EMPTY_LAYER_NAME = "_bnb_lightning_empty_layer_name"


def _meta_parameters(layer: nn.Module) -> list[str]:
    return [
        name for name, parameter in layer.named_parameters(recurse=False) if parameter.device.type == "meta"
    ]


def _unquantized_4bit(layer: nn.Module) -> bool:
    # bitsandbytes' 4-bit forward needs a quant state, on the weight or on the layer (from which it restores
    # the one a wrapper dropped); its 8-bit forward quantizes a float weight itself.
    return isinstance(layer, require_bitsandbytes().nn.Linear4bit) and layer_quant_state(layer) is None


def _is_filled(layer: nn.Module) -> bool:
    return not _meta_parameters(layer) and not _unquantized_4bit(layer)


def _refuse_empty_forward(layer: nn.Module, args: tuple) -> None:
    """Forward pre-hook of the layers :func:`replace_with_bnb_linear` builds: an error that says what to do.

    Without it, calling the model before its weights are loaded ends in a bare ``AssertionError`` or a
    meta-tensor error from inside bitsandbytes. Loading removes it (:func:`_drop_empty_check_once_filled`),
    or else the first forward that finds the layer filled, so training runs without it. In code being
    compiled it does nothing: removing a hook there would make the compiler give up on the whole block.
    """
    if torch.compiler.is_compiling():
        return
    empty = _meta_parameters(layer)
    if not empty and not _unquantized_4bit(layer):
        _drop_empty_check(layer)
        return
    layer_name = f"{getattr(layer, _EMPTY_LAYER_NAME, 'a layer')} ({type(layer).__name__})"
    if empty:
        raise RuntimeError(
            f"{layer_name} has no weights yet ({' and '.join(empty)} on the meta device): "
            "replace_with_bnb_linear() built it empty. Load its weights with "
            "set_module_quantized_tensor_to_device(...) or load_quantized_state_dict(...) "
            "before calling the model."
        )
    raise RuntimeError(
        f"{layer_name} has a weight but no 4-bit quantization state: it was given a weight that is not "
        "quantized (load_state_dict(..., assign=True) of a full-precision state dict?). Load its weights with "
        "set_module_quantized_tensor_to_device(...) or load_quantized_state_dict(...), which quantize "
        "full-precision weights on the way, before calling the model."
    )


def _add_empty_check(layer: nn.Module, name: str) -> None:
    """Make ``layer`` (empty, on the meta device) refuse a forward with its ``name`` until it is filled.

    Module-level functions and a plain attribute, so the check survives ``copy.deepcopy`` and pickling.
    Only here: ``quantize_model`` builds the same layers and fills them at once, with no hook.
    """
    setattr(layer, _EMPTY_LAYER_NAME, name)
    layer.register_forward_pre_hook(_refuse_empty_forward, prepend=True)
    layer.register_load_state_dict_post_hook(_drop_empty_check_after_loading)


def _drop_empty_check(layer: nn.Module) -> None:
    """Remove the forward check :func:`_add_empty_check` added, also from within the check itself.

    torch runs a copy of the list of forward hooks, so the check may remove itself. The load post-hook
    stays, as a no-op: torch runs the live list of post-hooks, so it cannot remove itself, and it costs
    nothing outside ``load_state_dict``.
    """
    for hook_id in [i for i, hook in layer._forward_pre_hooks.items() if hook is _refuse_empty_forward]:
        del layer._forward_pre_hooks[hook_id]
        layer._forward_pre_hooks_with_kwargs.pop(hook_id, None)
    layer.__dict__.pop(_EMPTY_LAYER_NAME, None)


def _drop_empty_check_once_filled(layer: nn.Module) -> None:
    """Remove the empty-layer check once the layer is filled, before a forward or the compiler sees it."""
    if hasattr(layer, _EMPTY_LAYER_NAME) and _is_filled(layer):
        _drop_empty_check(layer)


def _drop_empty_check_after_loading(layer: nn.Module, incompatible_keys: Any) -> None:
    """Load-state-dict post-hook: ``model.load_state_dict(..., assign=True)`` fills empty layers too."""
    _drop_empty_check_once_filled(layer)


def replace_with_bnb_linear(
    model: nn.Module,
    modules_to_not_convert: Sequence[str] | None = None,
    current_key_name: Sequence[str] | None = None,
    quantization_config: Any = None,
) -> nn.Module:
    """Swap every ``nn.Linear`` / ``Conv1D`` for an empty, frozen bnb layer, for loading a checkpoint.

    The new layers live on the meta device; fill them with
    :func:`set_module_quantized_tensor_to_device` or :func:`load_quantized_state_dict`. Until then,
    calling the model raises a ``RuntimeError`` naming the first empty layer it reaches. Weights are
    not quantized here: use :func:`bnb_lightning.quantize_model` for a model already in memory.

    Args:
        model: any ``nn.Module``; changed in place and returned.
        modules_to_not_convert: module-name patterns to keep (default ``["lm_head"]``); see
            :func:`get_keys_to_not_convert` for the automatic choice. The config's ``skip_modules``
            are kept too, and only its ``target_modules`` (if set) are converted.
        current_key_name: names of the modules above ``model`` when it is part of a larger model,
            so patterns are matched against full names.
        quantization_config: a :class:`QuantizationConfig`, a transformers ``BitsAndBytesConfig``
            or a dict of either. Without a ``compute_dtype``, 4-bit layers compute in the dtype of
            the weight they replace.

    Example::

        with accelerate.init_empty_weights():
            model = AutoModelForCausalLM.from_config(config)
        replace_with_bnb_linear(model, get_keys_to_not_convert(model), quantization_config=bnb_config)
        load_quantized_state_dict(model, safetensors.torch.load_file("model.safetensors"), "cuda")
    """
    config = as_quantization_config(quantization_config)
    skip = _name_patterns(modules_to_not_convert)
    skip += [pattern for pattern in config.skip_modules if pattern not in skip]
    prefix = ".".join(current_key_name or ())
    replaced = 0
    for name, module in list(model.named_modules()):
        full_name = f"{prefix}.{name}" if prefix and name else (prefix or name)
        if not name or not is_plain_linear(module) or matches_any(full_name, skip):
            continue
        if config.target_modules is not None and not matches_any(full_name, config.target_modules):
            continue
        layer = new_bnb_linear(module, config)
        _add_empty_check(layer, full_name)
        model.set_submodule(name, layer)
        replaced += 1
    if replaced == 0:
        warnings.warn(
            f"replace_with_bnb_linear found no nn.Linear or Conv1D layer to replace in {type(model).__name__} "
            f"(skipped: {skip}). Nothing will be quantized; check the model and modules_to_not_convert.",
            stacklevel=2,
        )
    return model


def _name_patterns(modules_to_not_convert: Any) -> list[str]:
    if modules_to_not_convert is None:
        return ["lm_head"]
    if isinstance(modules_to_not_convert, (QuantizationConfig, Mapping)) or hasattr(
        modules_to_not_convert, "to_dict"
    ):
        raise TypeError(
            f"modules_to_not_convert got a {type(modules_to_not_convert).__name__}, which looks like a "
            "quantization config. Pass it by name: replace_with_bnb_linear(model, quantization_config=config), "
            "as in transformers' function of the same name."
        )
    # A single string is one pattern, not a list of its characters.
    return list(as_patterns(modules_to_not_convert, "modules_to_not_convert"))


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


def set_module_quantized_tensor_to_device(
    module: nn.Module,
    tensor_name: str,
    device: torch.device | str | int,
    value: Any = None,
    quantized_stats: Mapping[str, Any] | None = None,
) -> None:
    """Put one parameter or buffer, named by its dotted path from ``module``, on ``device``.

    Plain tensors are set as they are, keeping the ``requires_grad`` of the parameter they replace.
    For bnb weights: a floating ``value`` is quantized on ``device``; an already quantized ``value``
    (int8 with ``quantized_stats={"SCB": ...}``, or packed 4-bit with the quant-state entries
    transformers' ``save_pretrained`` writes, e.g. ``absmax``, ``quant_map``,
    ``quant_state.bitsandbytes__nf4``, bare or as full checkpoint keys) is loaded as is. A full-precision
    ``Conv1D`` weight is transposed before quantization, as transformers does. Without ``value``, the
    tensor is moved (an unquantized bnb weight is quantized on the way).

    Raises:
        ValueError: unknown name, shape mismatch, a dtype that contradicts the quantization state,
            missing statistics, a meta tensor without ``value``.
    """
    device = as_device(device)
    owner, leaf = _resolve(module, tensor_name)
    _set_tensor(owner, leaf, tensor_name, device, value, quantized_stats)
    _drop_empty_check_once_filled(owner)


def _set_tensor(
    owner: nn.Module,
    leaf: str,
    tensor_name: str,
    device: torch.device,
    value: Any,
    quantized_stats: Mapping[str, Any] | None,
) -> None:
    """:func:`set_module_quantized_tensor_to_device` for the tensor ``leaf`` of ``owner``."""
    bnb = require_bitsandbytes()
    is_buffer = leaf in owner._buffers
    old_value = getattr(owner, leaf)
    if old_value is None:
        if value is None:
            return
        raise ValueError(
            f"cannot set {tensor_name!r}: it is None in this {type(owner).__name__} (e.g. a layer built with "
            "bias=False), so the checkpoint belongs to a different model configuration."
        )
    if value is None and old_value.device.type == "meta" and device.type != "meta":
        raise ValueError(f"{tensor_name!r} is on the meta device; pass its `value` to put it on {device}.")

    is_4bit = not is_buffer and isinstance(old_value, bnb.nn.Params4bit)
    is_8bit = not is_buffer and isinstance(old_value, bnb.nn.Int8Params)
    if not (is_4bit or is_8bit):
        new_value = (old_value if value is None else _as_tensor(value)).to(device)
        check_shape(tensor_name, new_value.shape, old_value.shape)
        if is_buffer:
            owner._buffers[leaf] = new_value
        else:
            owner._parameters[leaf] = nn.Parameter(new_value, requires_grad=old_value.requires_grad)
        return
    if value is None and (is_quantized_parameter(old_value) or device.type == "meta"):
        owner._parameters[leaf] = old_value.to(device)  # a move: the quant state travels with the weight
        return

    new_value = old_value.data if value is None else _as_tensor(value)  # .data: no bnb type's .to() hooks
    prequantized = quantized_stats is not None
    packed_dtype = old_value.quant_storage if is_4bit else torch.int8
    if not (new_value.dtype == packed_dtype if prequantized else new_value.is_floating_point()):
        raise ValueError(
            f"dtype {new_value.dtype} of {tensor_name!r} contradicts its quantization state: this "
            f"{type(owner).__name__} takes a pre-quantized weight of dtype {packed_dtype} with its "
            "quantized_stats, or a floating point weight without them (quantized on loading). Pass "
            "quantized_stats={'SCB': ...} for int8, the '<name>.weight.*' entries for 4-bit, or check that "
            "the checkpoint matches the quantization config (bits, quant_storage)."
        )
    if value is not None and not prequantized and getattr(owner, "source_cls", None) is conv1d_class():
        new_value = new_value.T  # Conv1D stores (in, out); pre-quantized weights are saved as (out, in)
    expected_shape = (owner.out_features, owner.in_features)

    if prequantized:
        param = prequantized_weight(owner, tensor_name, new_value, quantized_stats, device)
    elif is_8bit:
        check_shape(tensor_name, new_value.shape, expected_shape)
        param = bnb.nn.Int8Params(
            new_value.to("cpu"), requires_grad=False, has_fp16_weights=old_value.has_fp16_weights
        ).to(device)
    else:
        check_shape(tensor_name, new_value.shape, expected_shape)
        settings = ("blocksize", "compress_statistics", "quant_type", "quant_storage")
        settings = {name: getattr(old_value, name) for name in settings}
        param = bnb.nn.Params4bit(new_value, requires_grad=False, module=owner, **settings).to(device)
    owner._parameters[leaf] = param


def load_quantized_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], device: torch.device | str | int
) -> list[str]:
    """Fill a model built by :func:`replace_with_bnb_linear` from a whole checkpoint, on ``device``.

    Works with a pre-quantized checkpoint (each bnb weight is passed with its own statistics:
    ``<layer>.weight.*`` for 4-bit, ``<layer>.SCB`` and ``<layer>.weight_format`` for 8-bit) and with a
    full-precision one (weights are quantized as they are loaded). Every entry goes through
    :func:`set_module_quantized_tensor_to_device`, so it raises the same errors.

    Returns:
        The names of parameters and buffers still on the meta device, e.g. an ``lm_head.weight`` tied
        to the input embeddings, which ``model.tie_weights()`` fills.
    """
    bnb = require_bitsandbytes()
    stats_of: dict[str, dict[str, torch.Tensor]] = {}
    for name, layer in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(layer, bnb.nn.Linear4bit):
            keys = [key for key in state_dict if key.startswith(f"{prefix}weight.")]
        elif isinstance(layer, bnb.nn.Linear8bitLt):
            keys = [f"{prefix}{stat}" for stat in STATS_8BIT if f"{prefix}{stat}" in state_dict]
        else:
            continue
        if keys:
            stats_of[f"{prefix}weight"] = {key: state_dict[key] for key in keys}
    statistics = {key for stats in stats_of.values() for key in stats}
    for key, value in state_dict.items():
        if key not in statistics:
            set_module_quantized_tensor_to_device(model, key, device, value, stats_of.get(key))
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return [name for name, tensor in tensors if tensor.device.type == "meta"]


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
