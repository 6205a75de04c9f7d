"""Export a quantized model's adapters in PEFT's format, and load them back into one.

:func:`export_adapters` writes into a temporary directory beside the target and swaps it in only once
every file is written: an interrupted or refused export leaves a previous export exactly as it was. It
writes on whatever process calls it; under DDP, call it on rank zero only. A merged full-precision
export is :mod:`bnb_lightning.merge`'s.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .files import atomic_directory, atomic_path
from .prepare import inject_adapters

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# PeftModel.save_pretrained writes keys relative to the PeftModel, whose base model sits at this path.
PEFT_PREFIX = "base_model.model."

# Files a previous export (of either kind) wrote: replaced by a new export. Anything else in the
# directory (a tokenizer saved there, a README) is carried over.
EXPORT_FILES = (
    ADAPTER_CONFIG,
    "adapter_model.bin",
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
)


# -- finding the adapters -----------------------------------------------------------------------------


def adapter_root(model: nn.Module) -> nn.Module | None:
    """The outermost module holding PEFT's ``peft_config`` (where ``inject_adapters`` put the adapters)."""
    from peft import PeftModel

    for module in model.modules():
        if isinstance(module, PeftModel):
            return module.get_base_model()
        if isinstance(getattr(module, "peft_config", None), dict) and module.peft_config:
            return module
    return None


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


def _adapter_state(root: nn.Module, adapter_name: str, save_embedding_layers: bool | str) -> dict:
    """PEFT's adapter state dict of ``root``: keys relative to ``root``, without the adapter name."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(
        root,
        state_dict=_tensor_state(root),
        adapter_name=adapter_name,
        save_embedding_layers=save_embedding_layers,
    )


# -- adapters in PEFT's format ----------------------------------------------------------------------------


def export_adapters(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    adapter_name: str = "default",
    base_model_name_or_path: str | None = None,
    save_embedding_layers: bool | str = "auto",
) -> Path:
    """Write the model's adapters as ``PeftModel.save_pretrained`` does, atomically.

    ``directory`` gets ``adapter_config.json`` and ``adapter_model.safetensors``, loadable with
    ``PeftModel.from_pretrained(base, directory)`` on the original transformers model (quantized the
    same way, or in full precision) or with :func:`load_adapters`. A previous export in ``directory``
    is replaced only once the new one is complete; other files there (e.g. a tokenizer) are kept.

    Args:
        model: a model with adapters from :func:`~bnb_lightning.inject_adapters` or ``BnbQuantization``;
            a LightningModule holding it works too.
        directory: the export directory.
        adapter_name: which adapter to write.
        base_model_name_or_path: recorded in ``adapter_config.json`` so PEFT can find the base model;
            by default the transformers model's ``name_or_path``.
        save_embedding_layers: as in ``PeftModel.save_pretrained``.

    Returns:
        The export directory.

    Example::

        export_adapters(lightning_module, "adapters/")
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), "adapters/")
    """
    root = _require_adapter_root(model, adapter_name)
    state = _adapter_state(root, adapter_name, save_embedding_layers)
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

    with atomic_directory(directory, replaced=EXPORT_FILES) as partial:
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


def load_adapters(
    model: nn.Module, directory: str | os.PathLike, *, adapter_name: str = "default"
) -> nn.Module:
    """Load adapters exported in PEFT's format into a quantized model, checking every tensor first.

    A model without adapters gets them injected from ``adapter_config.json`` (as
    :func:`~bnb_lightning.inject_adapters` does, ready to train); a model that has them gets their
    weights replaced. Nothing is loaded unless every tensor of the file fits.

    Raises:
        FileNotFoundError: the directory, ``adapter_config.json`` or ``adapter_model.safetensors`` is missing.
        ValueError: the file holds other adapter weights than the model (names or shapes: a different
            ``target_modules`` or ``r``), or a dtype the model's adapters cannot hold without rounding.

    Returns:
        The module holding the adapters.
    """
    directory = Path(directory)
    config, tensors = _read_adapter_file(directory)
    weights_path = directory / ADAPTER_WEIGHTS
    if adapter_root(model) is None:
        if adapter_name != "default":
            raise ValueError(
                f"{type(model).__name__} has no adapters yet; load_adapters injects them as 'default', "
                f"not {adapter_name!r}."
            )
        config = copy.deepcopy(config)
        config.inference_mode = False  # the export marks itself for inference; these adapters train
        inject_adapters(model, config)
    root = _require_adapter_root(model, adapter_name)
    expected = _adapter_state(root, adapter_name, save_embedding_layers=False)
    found = {key.removeprefix(PEFT_PREFIX): value for key, value in tensors.items()}
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
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(found[key])
    return root
