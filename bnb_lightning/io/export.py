"""Export a quantized model's adapters in PEFT's format, and load them back into one.

Every export (adapters here, a merged model in :mod:`bnb_lightning.io.merge`) goes through
:func:`~bnb_lightning.io.files.export_directory`: the files are written into a temporary directory beside
the target, which is swapped in only once every file is written, so an interrupted or refused export
leaves the previous directory exactly as it was. The export also writes ``bnb_lightning_export.json``
listing the files it wrote; the next export into the same directory replaces or removes only those,
and refuses to overwrite any other file. For adapters, that manifest also records the quantized base
they were trained on, which :func:`load_adapters` checks. Exports write on whatever process calls
them; under DDP, call them on rank zero only.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters import adapter_root, inject_adapters
from ..backend import is_bnb_linear, is_quantized_parameter, require_bitsandbytes
from ..distributed import unwrapped_name
from ..restore import restore_point
from .checkpoint import base_fingerprint
from .files import MANIFEST, atomic_path, check_export_directory, export_directory, read_manifest
from .layer_state import _UNPACKED_FIELDS

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# PeftModel.save_pretrained writes keys relative to the PeftModel, whose base model sits at this path.
PEFT_PREFIX = "base_model.model."


# -- finding the adapters -----------------------------------------------------------------------------


def _require_adapter_root(model: nn.Module, adapter_name: str) -> nn.Module:
    root = adapter_root(model)
    if root is None:
        raise ValueError(
            f"{type(model).__name__} has no PEFT adapters to export; add them with "
            "bnb_lightning.inject_adapters(model, peft_config) or BnbQuantization(peft_config=...)."
        )
    if adapter_name not in root.peft_config:
        raise ValueError(
            f"adapter_name={adapter_name!r} is not an adapter of {type(root).__name__}; "
            f"it has {sorted(root.peft_config)}."
        )
    return root


def _tensor_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers by state-dict name, without calling ``state_dict()``.

    bitsandbytes' 4-bit ``state_dict()`` undoes its CPU repacking in place, re-quantizing the
    statistics: after an eval forward on CPU, calling it changes the model's logits (~1e-3).
    """
    return {
        **{name: p.detach() for name, p in module.named_parameters(remove_duplicate=False)},
        **{name: b.detach() for name, b in module.named_buffers(remove_duplicate=False)},
    }


def _adapter_state(
    root: nn.Module, adapter_name: str, save_embedding_layers: bool | str, state: Mapping[str, torch.Tensor]
) -> dict:
    """PEFT's adapter state dict of ``root`` from ``state`` (keys relative to ``root``), without the adapter name."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(
        root,
        state_dict=dict(state),
        adapter_name=adapter_name,
        save_embedding_layers=save_embedding_layers,
    )


# -- the quantized base an export was made from --------------------------------------------------------


def _base_layers(root: nn.Module) -> dict[str, nn.Module]:
    """The bitsandbytes layers under ``root``, named as in the model without adapters.

    PEFT moves each layer it wraps to ``<name>.base_layer``; leaving that part out names a layer the
    same in a model with adapters (at export) and without (before :func:`load_adapters` injects them).
    """
    layers = {}
    for name, module in root.named_modules():
        if is_bnb_linear(module):
            parts = [part for part in unwrapped_name(name).split(".") if part != "base_layer"]
            layers[".".join(parts)] = module
    return layers


def _state_reads_exactly(layer: nn.Module) -> bool:
    """Whether ``layer.state_dict()`` leaves the layer computing exactly as before.

    bitsandbytes' own ``state_dict()`` of a 4-bit weight that it repacked for the CPU re-quantizes the
    statistics, in place (lossy). Layers built by bnb_lightning undo the repacking exactly
    (:mod:`bnb_lightning.io.layer_state`), provided their hook saw the weight before it was repacked.
    """
    quant_state = getattr(layer.weight, "quant_state", None)
    if quant_state is None or not getattr(quant_state, "packing_format_for_cpu", False):
        return True
    return getattr(quant_state, _UNPACKED_FIELDS, None) is not None


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _full_precision_dtype(root: nn.Module) -> torch.dtype | None:
    """The one dtype of the parameters neither quantized nor adapters (embeddings, norms), else ``None``."""
    dtypes = {
        parameter.dtype
        for name, parameter in root.named_parameters()
        if parameter.is_floating_point()
        and not is_quantized_parameter(parameter)
        and "lora_" not in name
        and "modules_to_save" not in name
    }
    return dtypes.pop() if len(dtypes) == 1 else None


def _layer_quantization(layer: nn.Module, full_precision_dtype: torch.dtype | None) -> dict[str, Any]:
    """How a layer was quantized, read from its weight: what, with the base, decides its bytes.

    Read from the bitsandbytes weight rather than from a config: a layer quantized elsewhere (e.g. by
    transformers) has none, and what is recorded must be what the bytes came from.
    """
    weight = layer.weight
    if isinstance(weight, require_bitsandbytes().nn.Params4bit):
        quant_state = weight.quant_state
        # bitsandbytes' CPU repacking overwrites the dtype with bfloat16 and keeps the original aside.
        packed = getattr(quant_state, "packing_format_for_cpu", False)
        return {
            "bits": 4,
            "quant_type": weight.quant_type,
            "double_quant": bool(weight.compress_statistics),
            "blocksize": weight.blocksize,
            "quant_storage": _dtype_name(weight.quant_storage),
            "dtype": _dtype_name(quant_state.original_dtype if packed else quant_state.dtype),
        }
    has_fp16_weights = weight.dtype != torch.int8
    # An int8 weight does not say which dtype it was quantized from: the rest of the base does.
    return {
        "bits": 8,
        "has_fp16_weights": has_fp16_weights,
        "dtype": _dtype_name(weight.dtype if has_fp16_weights else full_precision_dtype),
    }


def base_record(model: nn.Module) -> dict[str, Any] | None:
    """How the quantized base of ``model`` was quantized, and a fingerprint of it; ``None`` if none can be taken.

    The fingerprint covers the state of the bitsandbytes layers under the module holding the adapters
    (quantized weights and their statistics; not the biases, which LoRA's ``bias="all"`` trains), keyed
    by their names without PEFT's ``.base_layer``: it does not depend on which parameters train, on
    whether adapters are injected, or on a LightningModule around the model. Two quantizations of one
    base (4-bit and 8-bit, NF4 and FP4, another blocksize or source dtype) have different bytes, so
    fingerprints are compared only under equal ``quantization`` records.

    ``None`` when the model has no bitsandbytes layers, or has 4-bit layers that bitsandbytes repacked
    for the CPU and that only bitsandbytes' lossy conversion can read (layers not built by bnb_lightning).
    """
    root = adapter_root(model) or model
    layers = _base_layers(root)
    if not layers or not all(_state_reads_exactly(layer) for layer in layers.values()):
        return None
    full_precision_dtype = _full_precision_dtype(root)
    digest = hashlib.sha256()
    quantization = set()
    for name in sorted(layers):
        layer = layers[name]
        keys = [key for key in layer.state_dict(keep_vars=True) if key != "bias"]
        digest.update(f"{name}|{base_fingerprint(layer, keys)};".encode())
        quantization.add(json.dumps(_layer_quantization(layer, full_precision_dtype), sort_keys=True))
    return {
        "quantization": [json.loads(record) for record in sorted(quantization)],
        "fingerprint": digest.hexdigest()[:16],
    }


# -- adapters in PEFT's format ----------------------------------------------------------------------------


def export_adapters(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    adapter_name: str = "default",
    base_model_name_or_path: str | None = None,
    save_embedding_layers: bool | str = "auto",
    gathered: Mapping[str, torch.Tensor] | None = None,
    base: dict[str, Any] | None = None,
) -> Path:
    """Write the model's adapters as ``PeftModel.save_pretrained`` does, atomically.

    ``directory`` gets ``adapter_config.json`` and ``adapter_model.safetensors``, loadable with
    ``PeftModel.from_pretrained(base, directory)`` on the original transformers model (quantized the
    same way, or in full precision) or with :func:`load_adapters`, and ``bnb_lightning_export.json``
    (:data:`~bnb_lightning.io.files.MANIFEST`): the files written, how the base was quantized and a
    fingerprint of it (:func:`base_record`), which :func:`load_adapters` checks.

    Only files that a previous bnb_lightning export wrote there are replaced
    (:func:`~bnb_lightning.io.files.export_directory`): a directory holding an ``adapter_config.json`` or
    ``adapter_model.safetensors`` that it did not write (e.g. from ``PeftModel.save_pretrained``) is
    refused before anything is written; other files (a tokenizer, a base model's ``config.json`` and
    weights, a merged export of ours) are kept as they are. The new files are swapped in only once all
    are written.

    Args:
        model: a model with adapters from :func:`~bnb_lightning.inject_adapters` or ``BnbQuantization``;
            a LightningModule holding it works too.
        directory: the export directory.
        adapter_name: which adapter to write.
        base_model_name_or_path: recorded in ``adapter_config.json`` so PEFT can find the base model;
            by default the transformers model's ``name_or_path``.
        save_embedding_layers: as in ``PeftModel.save_pretrained``.
        gathered: the trainable tensors, whole, by their names in ``model``, for a sharded model whose
            parameters are pieces (FSDP2: :func:`bnb_lightning.fsdp2.adapter_state_dict`, which every rank
            calls); default: read from ``model``.
        base: with ``gathered``, the record of the quantized base (:func:`base_record`) to write, taken
            before sharding (a sharded model can no longer give it); ignored without ``gathered``.

    Returns:
        The export directory.

    Raises:
        FileExistsError: ``directory`` holds an adapter file that bnb_lightning did not write.

    Example::

        export_adapters(lightning_module, "adapters/")
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), "adapters/")
    """
    root = _require_adapter_root(model, adapter_name)
    check_export_directory(directory, (ADAPTER_CONFIG, ADAPTER_WEIGHTS))
    if gathered is None:
        own = _tensor_state(root)
    else:
        prefix = next(f"{name}." if name else "" for name, module in model.named_modules() if module is root)
        own = {key[len(prefix) :]: value for key, value in gathered.items() if key.startswith(prefix)}
    state = _adapter_state(root, adapter_name, save_embedding_layers, own)
    if not state:
        raise ValueError(f"adapter {adapter_name!r} of {type(root).__name__} has no weights to export.")
    # Copies on the CPU: safetensors rejects tensors that share storage or are not contiguous.
    tensors = {PEFT_PREFIX + key: value.to("cpu", copy=True).contiguous() for key, value in state.items()}
    config = copy.deepcopy(root.peft_config[adapter_name])
    if base_model_name_or_path is not None:
        config.base_model_name_or_path = base_model_name_or_path
    elif config.base_model_name_or_path is None:
        config.base_model_name_or_path = getattr(root, "name_or_path", None) or None
    config.inference_mode = True
    # As PeftModel.save_pretrained: without a task type, the config says which class to load the base as.
    auto_mapping = (
        {"base_model_class": type(root).__name__, "parent_library": type(root).__module__}
        if config.task_type is None
        else None
    )
    from safetensors.torch import save_file

    record = {"base": base_record(root) if gathered is None else base}
    with export_directory(
        directory, "adapters", writes=(ADAPTER_CONFIG, ADAPTER_WEIGHTS), record=record
    ) as partial:
        config.save_pretrained(str(partial), auto_mapping_dict=auto_mapping)
        with atomic_path(partial / ADAPTER_WEIGHTS) as weights_path:
            save_file(tensors, str(weights_path), metadata={"format": "pt"})
    return Path(directory)


def _lossless_cast(source: torch.dtype, target: torch.dtype) -> bool:
    if source == target:
        return True
    wider = {torch.float16: 1, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}
    return source in wider and target in wider and wider[source] < wider[target]


def _read_adapter_file(directory: Path) -> tuple[Any, dict[str, torch.Tensor]]:
    from peft import PeftConfig
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from safetensors.torch import load_file

    if not directory.is_dir():
        raise FileNotFoundError(
            f"adapter directory {directory} does not exist; pass the directory export_adapters "
            "(or PeftModel.save_pretrained) wrote."
        )
    config_path, weights_path = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            found = sorted(entry.name for entry in directory.iterdir())
            hint = (
                " It holds adapter_model.bin (pickle): load it with PeftModel.from_pretrained and re-save it "
                "with safe_serialization=True."
                if path is weights_path and (directory / "adapter_model.bin").is_file()
                else ""
            )
            raise FileNotFoundError(
                f"{path} is missing: an adapter export holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} "
                f"(written by export_adapters or PeftModel.save_pretrained); {directory} holds {found}.{hint}"
            )
    try:
        peft_type = PeftConfig.from_pretrained(str(directory)).peft_type
        config = PEFT_TYPE_TO_CONFIG_MAPPING[peft_type].from_pretrained(str(directory))
    except Exception as error:
        raise ValueError(f"{config_path} is not a readable PEFT adapter config: {error}") from error
    try:
        tensors = load_file(str(weights_path))
    except Exception as error:
        raise ValueError(f"{weights_path} is not a readable safetensors file: {error}") from error
    return config, tensors


def _check_adapter_tensors(
    root: nn.Module, expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], weights_path: Path
) -> None:
    """Refuse a file whose adapter tensors differ from the model's in names, shapes or (lossless) dtypes."""
    missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(
            f"{weights_path} does not hold the adapters of {type(root).__name__}: missing {missing[:4]}"
            f"{' ...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}"
            f"{' ...' if len(unexpected) > 4 else ''}. The adapter was trained with other target_modules; "
            "inject adapters with the config in its adapter_config.json."
        )
    for key, target in expected.items():
        value = found[key]
        if value.shape != target.shape:
            raise ValueError(
                f"{weights_path}: {key!r} has shape {tuple(value.shape)}, the model's adapter "
                f"{tuple(target.shape)}: the adapter was trained with another r (or another base model)."
            )
        if not _lossless_cast(value.dtype, target.dtype):
            raise ValueError(
                f"{weights_path}: {key!r} is {value.dtype}, the model's adapter is {target.dtype}; loading "
                f"would round it. Cast the model's adapters to {value.dtype} first, e.g. with "
                "bnb_lightning.prepare.cast_to_float32(model, trainable_only=True)."
            )


def _take_file_dtype(root: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Give adapters just injected the file's dtype: its values replace theirs next.

    PEFT makes new adapters in the base's dtype (bfloat16 for a bfloat16 base), while adapters trained
    under ``bf16-mixed`` or ``32-true`` are saved in float32.
    """
    dtypes = {value.dtype for value in tensors.values() if value.is_floating_point()}
    if len(dtypes) != 1:
        return
    (dtype,) = dtypes
    for parameter in root.parameters():
        if parameter.requires_grad and parameter.is_floating_point() and parameter.dtype != dtype:
            parameter.data = parameter.data.to(dtype)


def _describe_quantization(records: list[dict[str, Any]]) -> str:
    return "; ".join(", ".join(f"{key}={value}" for key, value in record.items()) for record in records)


def _check_base(root: nn.Module, recorded: dict[str, Any], directory: Path) -> None:
    """Refuse adapters exported from another base quantized the same way as ``root``'s.

    Under another quantization the fingerprints differ for any base, so there is nothing to compare:
    adapters move between quantizations of one base (4-bit to 8-bit, NF4 to FP4) without the check.
    """
    current = base_record(root)
    if current is None or current["quantization"] != recorded.get("quantization"):
        return
    if current["fingerprint"] != recorded.get("fingerprint"):
        raise ValueError(
            f"the adapters in {directory} were trained on another base model: {MANIFEST} records the quantized "
            f"base they were exported from as fingerprint {recorded.get('fingerprint')}, and "
            f"{type(root).__name__}, quantized the same way ({_describe_quantization(current['quantization'])}), "
            f"has fingerprint {current['fingerprint']}. Load them into the base model they were trained on, or "
            "pass check_base=False to load them anyway."
        )


def load_adapters(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    adapter_name: str = "default",
    check_base: bool = True,
) -> nn.Module:
    """Load adapters exported in PEFT's format into a quantized model, checking every tensor first.

    A model without adapters gets them injected from ``adapter_config.json`` (as
    :func:`~bnb_lightning.inject_adapters` does, ready to train); a model that has them gets their
    weights replaced. Nothing is changed unless every tensor of the file fits: a refused load takes
    injected adapters back out, leaving the model's modules, ``requires_grad`` flags and attributes as
    they were.

    With ``check_base``, adapters that :func:`export_adapters` wrote from a base quantized the same way
    as ``model``'s (same bits, quant type, double quantization, blocksize, storage and source dtype) load
    only if the recorded fingerprint of that base (:func:`base_record`) equals ``model``'s. Adapters
    exported from another quantization, or without a bnb_lightning manifest (``PeftModel.save_pretrained``),
    load without this check.

    Raises:
        FileNotFoundError: the directory, ``adapter_config.json`` or ``adapter_model.safetensors`` is missing.
        ValueError: the file holds other adapter weights than the model (names or shapes: a different
            ``target_modules`` or ``r``), a dtype the model's adapters cannot hold without rounding, or
            adapters of another base model quantized the same way (``check_base=False`` loads them).

    Returns:
        The module holding the adapters.
    """
    directory = Path(directory)
    config, tensors = _read_adapter_file(directory)
    weights_path = directory / ADAPTER_WEIGHTS
    recorded = read_manifest(directory).get("adapters", {}).get("base") if check_base else None
    undo = None
    if adapter_root(model) is None:
        if adapter_name != "default":
            raise ValueError(
                f"{type(model).__name__} has no adapters yet; load_adapters injects them as 'default', "
                f"not {adapter_name!r}."
            )
        config = copy.deepcopy(config)
        config.inference_mode = False  # the export marks itself for inference; these adapters train
        undo = restore_point(model)
    try:
        if undo is not None:
            inject_adapters(model, config)
        root = _require_adapter_root(model, adapter_name)
        if undo is not None:
            _take_file_dtype(root, tensors)
        expected = _adapter_state(root, adapter_name, False, _tensor_state(root))
        found = {key.removeprefix(PEFT_PREFIX): value for key, value in tensors.items()}
        _check_adapter_tensors(root, expected, found, weights_path)
        if recorded:
            _check_base(root, recorded, directory)
    except BaseException:
        if undo is not None:
            undo()
        raise
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(found[key])
    return root
