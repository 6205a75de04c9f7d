"""Dequantize a quantized model and merge its LoRA adapters into a full-precision copy, and export it.

:func:`export_merged` writes into a temporary directory beside the target and swaps it in only once
every file is written: an interrupted or refused export leaves a previous export exactly as it was. It
writes on whatever process calls it; under DDP, call it on rank zero only.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters import adapter_root, adapter_target
from ..backend import conv1d_class, is_bnb_linear, is_conv1d, is_quantized_parameter, require_bitsandbytes
from ..config import parse_dtype
from .files import atomic_path, export_directory

# export_merged's default tolerance, as a share of the largest |logit| the quantized model gives on the
# sample. A correct merge differs only by how the quantized kernels round (bitsandbytes' bfloat16 CPU
# kernels, LLM.int8's int8 activations): 0.2-1.1% on the tests' tiny Llamas, float32 and bfloat16. A
# wrong one (a dequantization, transposition or scaling error) differs by the order of the logits.
DEFAULT_RELATIVE_TOLERANCE = 0.05
_EXPORT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class MergeToleranceError(ValueError):
    """The merged model's logits differ from the quantized model's by more than the tolerance."""

    def __init__(self, message: str, max_abs_diff: float, tolerance: float) -> None:
        super().__init__(message)
        self.max_abs_diff = max_abs_diff
        self.tolerance = tolerance


@dataclass(frozen=True)
class MergedExport:
    """What :func:`export_merged` wrote and how far its logits are from the quantized model's."""

    path: Path
    max_abs_diff: float
    dtype: torch.dtype
    tolerance: float


def _export_root(model: nn.Module) -> nn.Module:
    """The module a merged export copies: the one holding the adapters, else as inject_adapters chooses."""
    return adapter_root(model) or adapter_target(model)


def _quant_state_dtype(weight: torch.Tensor) -> torch.dtype:
    quant_state = weight.quant_state
    # bitsandbytes' CPU repacking overwrites the dtype with bfloat16 and keeps the original aside.
    if getattr(quant_state, "packing_format_for_cpu", False):
        return quant_state.original_dtype
    return quant_state.dtype


def base_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model's weights had before quantization: what a merged export is saved in.

    4-bit layers remember it; otherwise it is the dtype of the full-precision weights (embeddings,
    norms), adapters left out.
    """
    bnb = require_bitsandbytes()
    dtypes = {
        _quant_state_dtype(m.weight)
        for m in model.modules()
        if isinstance(m, bnb.nn.Linear4bit) and is_quantized_parameter(m.weight)
    }
    source = "4-bit layers were quantized from weights of"
    if not dtypes:
        dtypes = {
            p.dtype
            for name, p in model.named_parameters()
            if "lora_" not in name and p.is_floating_point() and not is_quantized_parameter(p)
        }
        source = "full-precision weights have"
    if len(dtypes) != 1:
        raise ValueError(
            f"cannot tell the base dtype of {type(model).__name__}: its {source} dtypes "
            f"{sorted(str(d) for d in dtypes)}; pass dtype=torch.bfloat16 (or the dtype you want)."
        )
    return dtypes.pop()


def _dequantized_4bit(weight: torch.Tensor) -> torch.Tensor:
    bnb = require_bitsandbytes()
    functional = bnb.functional
    quant_state = weight.quant_state
    if not getattr(quant_state, "packing_format_for_cpu", False):
        return functional.dequantize_4bit(weight.data, quant_state)
    # CPU-repacked weights (after an eval forward): unpack a copy of the state, keeping the absmax the
    # layer computes with now (bitsandbytes' own inverse would re-quantize it, and in place).
    state = copy.copy(quant_state)
    state.original_nested = False
    packed, _ = functional._convert_weight_packed_for_cpu_inverse(weight.data, state)
    absmax = quant_state.absmax.T.reshape(-1).float()  # repacking stores it transposed, in bfloat16
    unpacked_state = functional.QuantState(
        absmax=absmax,
        shape=quant_state.shape,
        code=quant_state.code,
        blocksize=quant_state.blocksize,
        quant_type=quant_state.quant_type,
        dtype=quant_state.original_dtype,
    )
    return functional.dequantize_4bit(packed, unpacked_state)


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The full-precision weight (out_features x in_features, float32) of a bitsandbytes linear layer."""
    bnb = require_bitsandbytes()
    weight = layer.weight
    if not is_quantized_parameter(weight):
        return weight.detach().float()
    if isinstance(layer, bnb.nn.Linear4bit):
        return _dequantized_4bit(weight).float()
    # LLM.int8 keeps its row scales on the weight until the first forward, on the layer's state after.
    scales = getattr(layer.state, "SCB", None)
    if scales is None:
        scales = weight.SCB
    return bnb.functional.int8_vectorwise_dequant(weight.data, scales).float()


def _lora_adapters_to_merge(name: str, layer: nn.Module) -> list[str]:
    """The adapters whose delta the layer adds in its forward now (as the LoRA forward decides)."""
    if layer.disable_adapters:
        return []
    adapters = [a for a in layer.active_adapters if a in layer.lora_A and a not in layer.merged_adapters]
    for adapter in adapters:
        if adapter in getattr(layer, "lora_variant", {}) or layer.use_dora.get(adapter, False):
            raise NotImplementedError(
                f"adapter {adapter!r} of {name!r} is a LoRA variant (e.g. DoRA) that export_merged does not "
                "merge; export it with export_adapters and merge with PEFT's merge_and_unload on the "
                "full-precision base."
            )
    return adapters


def _merged_layer(name: str, layer: nn.Module, dtype: torch.dtype, as_conv1d: bool) -> nn.Module:
    """A full-precision linear layer equal to ``layer`` (bitsandbytes or LoRA-wrapped) with adapters merged."""
    from peft.tuners.lora import LoraLayer

    base = layer.get_base_layer() if isinstance(layer, LoraLayer) else layer
    conv1d = is_conv1d(base)
    if is_bnb_linear(base):
        weight = dequantized_weight(base)
    elif isinstance(base, nn.Linear) or conv1d:
        weight = (base.weight.T if conv1d else base.weight).detach().float()
    else:
        raise NotImplementedError(
            f"export_merged merges LoRA on linear layers; {name!r} wraps a {type(base).__name__}."
        )
    weight = weight.clone()
    bias = None if base.bias is None else base.bias.detach().float().clone()
    if isinstance(layer, LoraLayer):
        for adapter in _lora_adapters_to_merge(name, layer):
            lora_a, lora_b = layer.lora_A[adapter], layer.lora_B[adapter]
            scaling = layer.scaling[adapter]
            # In float32, then one cast: merging in half precision would round the delta twice.
            weight += scaling * (lora_b.weight.float() @ lora_a.weight.float()).to(weight.device)
            if layer.lora_bias.get(adapter, False) and lora_b.bias is not None:
                extra = scaling * lora_b.bias.detach().float().to(weight.device)
                bias = extra if bias is None else bias + extra
    out_features, in_features = weight.shape
    if as_conv1d or conv1d:
        merged = (type(base) if conv1d else conv1d_class())(out_features, in_features)
        merged.weight = nn.Parameter(weight.T.contiguous().to(dtype), requires_grad=False)
        merged.bias = nn.Parameter(
            (bias if bias is not None else torch.zeros(out_features, device=weight.device)).to(dtype),
            requires_grad=False,
        )
        return merged
    merged = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    merged.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    if bias is not None:
        merged.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
    return merged


def _conv1d_names(root: nn.Module) -> set[str]:
    """Layers the transformers class builds as ``Conv1D`` (GPT-2): quantization made them bnb Linears."""
    if not hasattr(root, "config") or not hasattr(root, "save_pretrained"):
        return set()
    with torch.device("meta"):
        skeleton = type(root)(copy.deepcopy(root.config))  # building a model may write to its config
    return {name for name, module in skeleton.named_modules() if is_conv1d(module)}


def _shared_parameter_ids(root: nn.Module) -> set[int]:
    seen: dict[int, int] = {}
    for _, parameter in root.named_parameters(remove_duplicate=False):
        seen[id(parameter)] = seen.get(id(parameter), 0) + 1
    return {key for key, count in seen.items() if count > 1}


@torch.no_grad()
def merged_model(model: nn.Module, dtype: torch.dtype | str | None = None) -> nn.Module:
    """A full-precision copy of ``model`` with every bitsandbytes layer dequantized and LoRA merged.

    ``model`` is left as it is. Each 4-bit/8-bit weight is dequantized by bitsandbytes, the active
    LoRA deltas ``scaling * B @ A`` are added in float32, and the sum is cast to ``dtype`` once. All
    other floating parameters are cast to ``dtype`` too; tied parameters stay tied.

    Args:
        model: the quantized model (with or without adapters), or a LightningModule holding it.
        dtype: the dtype of the copy; by default :func:`base_dtype`, the dtype before quantization.
    """
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import AuxiliaryTrainingWrapper, ModulesToSaveWrapper

    root = _export_root(model)
    dtype = parse_dtype(dtype, "dtype", _EXPORT_DTYPES) or base_dtype(root)
    conv1d_names = _conv1d_names(root)
    shared = _shared_parameter_ids(root)
    memo: dict[int, Any] = {}
    for parameter in root.parameters():
        if parameter.is_floating_point() and not is_quantized_parameter(parameter):
            memo[id(parameter)] = nn.Parameter(parameter.detach().to(dtype), requires_grad=False)
    # deepcopy with a memo: each merged layer stands in for its quantized layer, which is never copied.
    wrappers: list[tuple[str, nn.Module]] = []
    covered: list[str] = []
    for name, module in root.named_modules():
        if any(name.startswith(prefix) for prefix in covered):
            continue
        if isinstance(module, AuxiliaryTrainingWrapper):
            wrappers.append((name, module))
            covered.append(f"{name}.")
        elif isinstance(module, BaseTunerLayer) or is_bnb_linear(module):
            if isinstance(module, BaseTunerLayer) and not isinstance(module, LoraLayer):
                raise NotImplementedError(
                    f"export_merged merges LoRA adapters; {name!r} is a {type(module).__name__}."
                )
            base = module.get_base_layer() if isinstance(module, LoraLayer) else module
            if (
                isinstance(module, LoraLayer)
                and id(base.weight) in shared
                and _lora_adapters_to_merge(name, module)
            ):
                raise ValueError(
                    f"cannot merge adapters into {name!r}: its weight is tied to another module's, and the "
                    "merge would untie them. Export the adapters with export_adapters instead."
                )
            memo[id(module)] = _merged_layer(name, module, dtype, name in conv1d_names)
            covered.append(f"{name}.")
    for name, wrapper in wrappers:
        if not isinstance(wrapper, ModulesToSaveWrapper):
            raise NotImplementedError(f"export_merged cannot merge {name!r}, a {type(wrapper).__name__}.")
        active = wrapper.active_adapters
        trained = wrapper.original_module
        if not wrapper.disable_adapters and active and active[0] in wrapper.modules_to_save:
            trained = wrapper.modules_to_save[active[0]]
        memo[id(wrapper)] = copy.deepcopy(trained, memo)
    merged = copy.deepcopy(root, memo)
    merged.requires_grad_(False)
    if "peft_config" in vars(merged):
        del merged.peft_config
    _unmark_quantized(merged, dtype)
    return merged.eval()


def _unmark_quantized(merged: nn.Module, dtype: torch.dtype) -> None:
    """Make a transformers model's config describe the full-precision copy, not the quantized original."""
    config = getattr(merged, "config", None)
    if config is None or not hasattr(merged, "save_pretrained"):
        return
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    for flag in ("hf_quantizer", "quantization_method"):
        if flag in vars(merged):
            delattr(merged, flag)
    for flag in ("is_quantized", "is_loaded_in_4bit", "is_loaded_in_8bit"):
        if flag in vars(merged):
            setattr(merged, flag, False)
    config.dtype = dtype


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {key: _to_device(item, device) for key, item in value.items()}
    return value


def _logits(module: nn.Module, sample_input: Any) -> torch.Tensor:
    """The module's output logits in eval mode, without grad; train/eval modes restored afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    device = next((p.device for p in module.parameters() if p.device.type != "meta"), torch.device("cpu"))
    sample_input = _to_device(sample_input, device)
    module.eval()
    try:
        with torch.no_grad():
            output = module(**sample_input) if isinstance(sample_input, Mapping) else module(sample_input)
    finally:
        for submodule, training in modes:
            submodule.training = training
    if hasattr(output, "logits"):
        output = output.logits
    elif isinstance(output, (tuple, list)):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise TypeError(
            f"{type(module).__name__} returned {type(output).__name__} for the sample input; export_merged "
            "compares logits: a tensor, a tuple starting with one, or an output with .logits."
        )
    return output.detach().float()


def export_merged(
    model: nn.Module,
    directory: str | os.PathLike,
    sample_input: Any,
    *,
    tolerance: float | None = None,
    dtype: torch.dtype | str | None = None,
) -> MergedExport:
    """Write a full-precision model with the adapters merged, if its logits match the quantized model's.

    Builds :func:`merged_model` (dequantize with bitsandbytes, merge LoRA in float32, cast to ``dtype``;
    ``model`` itself is not changed), runs both on ``sample_input`` in eval mode and writes the merged
    one only if the largest absolute logits difference is at most ``tolerance``. A transformers model
    is written with ``save_pretrained`` (safetensors, tied weights once; load it with
    ``AutoModelForCausalLM.from_pretrained(directory)``), another module as ``model.safetensors``
    (``safetensors.torch.load_model``), beside ``bnb_lightning_export.json``, the manifest listing the
    files written. Only files a previous bnb_lightning export wrote are replaced: those of a previous
    merged export that this one does not write again are removed, an adapter export there is kept, and
    a file of the same name that bnb_lightning did not write (a base model's ``config.json``) makes the
    export fail before anything is written (:func:`~bnb_lightning.io.files.export_directory`). The new
    files are swapped in only once all are written; other files (e.g. a tokenizer) are kept.

    Merging into the 4-bit weights themselves (re-quantizing) loses quality (transformers#31293,
    peft#1043); here the base is dequantized first and the difference is measured before writing.

    Args:
        model: the quantized model with adapters, or a LightningModule holding it.
        directory: the export directory.
        sample_input: a batch of input ids (passed as ``model(sample_input)``) or a dict of keyword
            arguments (``model(**sample_input)``); moved to the model's device.
        tolerance: the largest max |logits difference| accepted. By default 5% of the largest |logit|
            the quantized model gives on ``sample_input`` (``DEFAULT_RELATIVE_TOLERANCE``).
        dtype: the dtype to save in; by default the dtype the weights had before quantization.

    Raises:
        MergeToleranceError: the difference exceeds ``tolerance`` (nothing is written).
        FileExistsError: ``directory`` holds a file of a name the export writes that bnb_lightning did
            not write (nothing is written).

    Example::

        result = export_merged(lightning_module, "merged/", batch["input_ids"][:2])
        print(result.max_abs_diff)
    """
    if tolerance is not None and not tolerance >= 0:
        raise ValueError(f"tolerance={tolerance!r} must be a number >= 0.")
    root = _export_root(model)
    dtype = parse_dtype(dtype, "dtype", _EXPORT_DTYPES) or base_dtype(root)
    # The quantized model first: on CPU its first eval forward repacks the 4-bit weights, and the
    # merged copy is built from the weights as the model computes with them.
    reference = _logits(root, sample_input)
    if tolerance is None:
        tolerance = DEFAULT_RELATIVE_TOLERANCE * reference.abs().max().item()
    merged = merged_model(root, dtype)
    candidate = _logits(merged, sample_input)
    if candidate.shape != reference.shape:
        raise ValueError(
            f"the merged model's logits have shape {tuple(candidate.shape)}, the quantized model's "
            f"{tuple(reference.shape)}; nothing was written to {directory}."
        )
    max_abs_diff = (candidate - reference).abs().max().item()
    if not math.isfinite(max_abs_diff):
        raise MergeToleranceError(
            f"the logits of the {'merged' if reference.isfinite().all() else 'quantized'} model are not finite "
            f"on the sample input; nothing was written to {directory}.",
            max_abs_diff=max_abs_diff,
            tolerance=tolerance,
        )
    if max_abs_diff > tolerance:
        raise MergeToleranceError(
            f"the merged {dtype} model's logits differ from the quantized model's by up to {max_abs_diff:.6g} "
            f"on the sample input, more than tolerance={tolerance:g}; nothing was written to {directory}. "
            "If that difference is acceptable, pass a larger tolerance (e.g. "
            f"export_merged(..., tolerance={_round_up(max_abs_diff):g})).",
            max_abs_diff=max_abs_diff,
            tolerance=tolerance,
        )
    # A refusal (a file bnb_lightning did not write) comes before the weights are written.
    certain = ("config.json",) if hasattr(merged, "save_pretrained") else ("model.safetensors",)
    with export_directory(directory, "merged", writes=certain) as partial:
        _save(merged, partial)
    return MergedExport(path=Path(directory), max_abs_diff=max_abs_diff, dtype=dtype, tolerance=tolerance)


def _round_up(value: float) -> float:
    return float(f"{value * 1.5:.1g}")


def _save(merged: nn.Module, directory: Path) -> None:
    if hasattr(merged, "save_pretrained"):
        merged.save_pretrained(str(directory))
        return
    from safetensors.torch import save_model

    with atomic_path(directory / "model.safetensors") as path:
        save_model(merged, str(path))
