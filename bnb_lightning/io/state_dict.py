"""Whole quantized state dicts in files: save a model's ``state_dict()`` and load it back, strictly.

A quantized model's ``state_dict()`` holds the packed weights with their statistics (4-bit quant
state, 8-bit ``SCB``), and ``model.load_state_dict(state_dict, strict=True)`` takes it back into a
model quantized with the same config: every layer this package creates carries the hooks for that
(:mod:`bnb_lightning.io.layer_state`). These functions add files, in safetensors or torch format,
written atomically and read back with errors that name the file; a file is checked whole, statistics
included, before anything is loaded, so a file that does not fit leaves the model untouched.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..backend import require_bitsandbytes
from .files import atomic_path
from .layer_state import STATS_4BIT, STATS_8BIT, check_layer_entries

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# safetensors metadata entry mapping each tied name that was not stored to the name it was stored under.
TIED_METADATA_KEY = "bnb_lightning.tied"


def _format(path: Path) -> str:
    if path.suffix in SAFETENSORS_SUFFIXES:
        return "safetensors"
    if path.suffix in TORCH_SUFFIXES:
        return "torch"
    raise ValueError(
        f"cannot tell the file format of '{path}' from its suffix {path.suffix!r}; use one of "
        f"{[*SAFETENSORS_SUFFIXES, *TORCH_SUFFIXES]} (.safetensors for safetensors, the others for torch.save)."
    )


def _some(keys: Iterable[str], limit: int = 5) -> str:
    keys = list(keys)
    shown = ", ".join(repr(key) for key in keys[:limit])
    return f"{shown} and {len(keys) - limit} more" if len(keys) > limit else shown


def _untie(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors safetensors can store, and the tied names left out (name -> the name stored instead).

    safetensors refuses tensors that share memory. A tensor saved under several names (tied weights)
    is stored once and its other names recorded, so loading ties them again. Tensors that overlap in
    another way (a slice or a transposed view of another) are stored as copies, and non-contiguous
    ones contiguous: such ties are not restored.
    """
    stored: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    first_of_view: dict[tuple, str] = {}
    storages: set[tuple] = set()
    for key, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"state dict entry {key!r} is a {type(tensor).__name__}; safetensors stores tensors only. "
                f"Save to a torch file ({', '.join(TORCH_SUFFIXES)}) instead."
            )
        if tensor.numel() == 0 or tensor.device.type == "meta":
            stored[key] = tensor  # no memory to share; safetensors says what it cannot store
            continue
        storage = (tensor.device, tensor.untyped_storage().data_ptr())
        view = (*storage, tensor.storage_offset(), tuple(tensor.shape), tensor.stride(), tensor.dtype)
        if view in first_of_view:
            tied[key] = first_of_view[view]
            continue
        first_of_view[view] = key
        if storage in storages:  # overlaps a tensor already stored, without being the same view
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        elif not tensor.is_contiguous():
            tensor = tensor.contiguous()
        storages.add(storage)
        stored[key] = tensor
    return stored, tied


def save_state_dict_file(model: nn.Module | Mapping[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write ``model.state_dict()`` (quantization statistics included) to ``path``, atomically.

    The suffix picks the format: ``.safetensors`` for safetensors, ``.pt``, ``.pth``, ``.bin`` or
    ``.ckpt`` for ``torch.save`` (readable with ``torch.load(path, weights_only=True)``). Tied weights
    are stored once in safetensors files and tied again by :func:`load_state_dict_file` (torch files
    keep the sharing themselves). If writing fails, a previous file at ``path`` is left as it was.

    Args:
        model: the model, or a state dict to write as it is.
        path: the file to write; missing parent directories are created.

    Returns:
        ``path``, as a ``Path``.

    Example::

        save_state_dict_file(model, "model.safetensors")
        # later: the same architecture, quantized with the same config, from any weights
        quantize_model(other_model, config)
        load_state_dict_file(other_model, "model.safetensors")
    """
    path = Path(path)
    file_format = _format(path)
    state_dict = model.state_dict() if isinstance(model, nn.Module) else model
    if file_format == "safetensors":
        from safetensors.torch import save_file

        tensors, tied = _untie(state_dict)
        metadata = {"format": "pt", TIED_METADATA_KEY: json.dumps(tied, sort_keys=True)}
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata=metadata)
    else:
        with atomic_path(path) as tmp:
            torch.save(state_dict, tmp)
    return path


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(path, framework="pt", device="cpu") as file:
        metadata = file.metadata() or {}
        # Copies: safetensors maps the file, and a view of it would change, or crash, when it is saved over.
        state_dict = {key: file.get_tensor(key).clone() for key in file.keys()}
    return state_dict, json.loads(metadata.get(TIED_METADATA_KEY, "{}"))


def _retie(state_dict: dict[str, torch.Tensor], tied: Mapping[str, str]) -> str | None:
    """Put each tied name back, as the same tensor as the name it was stored under; or say what is wrong."""
    absent = sorted(name for name in tied.values() if name not in state_dict)
    if absent:
        return f"its metadata ties names to entries it does not hold: {_some(absent)}"
    for name, stored_as in tied.items():
        state_dict[name] = state_dict[stored_as]  # one tensor under both names, as model.state_dict() gives
    return None


def _not_a_state_dict(content: Any) -> str | None:
    if not isinstance(content, Mapping):
        return f"it holds a {type(content).__name__}"
    not_tensors = [key for key, value in content.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        hint = (
            " (a training checkpoint? load it and pass its 'state_dict' entry)"
            if "state_dict" in content
            else ""
        )
        return f"entries {_some(not_tensors)} are not tensors{hint}"
    return None


def read_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict in ``path`` (safetensors or torch format, by suffix), on the CPU, ties restored.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file cannot be read (truncated, corrupt, another format) or holds no state dict.
    """
    path = Path(path)
    file_format = _format(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no state dict file at '{path}'" + (" (it is a directory)" if path.is_dir() else "") + "."
        )
    try:
        if file_format == "safetensors":
            content, tied = _read_safetensors(path)
        else:
            content, tied = torch.load(path, map_location="cpu", weights_only=True), {}
    except Exception as error:  # each reader raises its own types; all mean the same to the caller
        raise ValueError(
            f"cannot read '{path}' as a {file_format} file: {error}. It is probably truncated or corrupt "
            "(an interrupted copy?) or in another format; save it again."
        ) from error
    problem = _not_a_state_dict(content) or _retie(content, tied)
    if problem:
        raise ValueError(f"'{path}' is not a state dict file of bnb_lightning or torch: {problem}.")
    return dict(content)


def _quant_state_keys(model: nn.Module, keys: Iterable[str]) -> set[str]:
    """The keys among ``keys`` that are 4-bit statistics of one of the model's ``Linear4bit`` layers.

    Their layer's load hook checks them against the layer and names it in its errors; double
    quantization and block size may differ from the model's, as the checkpoint's are taken.
    """
    bnb = require_bitsandbytes()
    prefixes = {
        f"{name}.weight." if name else "weight."
        for name, layer in model.named_modules(remove_duplicate=False)
        if isinstance(layer, bnb.nn.Linear4bit)
    }
    statistics = {f"{prefix}{stat}" for prefix in prefixes for stat in STATS_4BIT}
    return statistics.intersection(keys)


def _refused_layers(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], skip: set[str]
) -> dict[str, str]:
    """What the load hooks of the model's bnb layers would refuse, by layer name, changing nothing.

    torch runs those hooks as it reaches each layer, after the layers before it were overwritten; the
    same checks, run here on every layer first, keep a file that does not fit from half-loading. A layer
    with an entry in ``skip`` (already reported as a shape or dtype mismatch) is not reported again.
    """
    bnb = require_bitsandbytes()
    refused = {}
    for name, layer in model.named_modules(remove_duplicate=False):
        prefix = f"{name}." if name else ""
        own_keys = {f"{prefix}{entry}" for entry in ("weight", *STATS_8BIT)}
        if not isinstance(layer, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) or own_keys & skip:
            continue
        try:
            check_layer_entries(layer, prefix, state_dict)
        except ValueError as error:
            refused[name] = str(error).rstrip(".")
    return refused


def _layers_problem(refused: Mapping[str, str]) -> str:
    names, reasons = list(refused), list(refused.values())
    count = "1 quantized layer does not" if len(names) == 1 else f"{len(names)} quantized layers do not"
    more = f"; and {len(names) - 3} more layers ({_some(names[3:])})" if len(names) > 3 else ""
    return f"{count} fit: {'; '.join(reasons[:3])}{more}"


def _problems(model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool) -> list[str]:
    """What keeps ``state_dict`` from loading into ``model``: keys (if strict), shapes, dtypes, statistics."""
    expected = model.state_dict(keep_vars=True)
    statistics = _quant_state_keys(model, [*expected, *state_dict])
    missing = [key for key in expected if key not in state_dict and key not in statistics]
    unexpected = [key for key in state_dict if key not in expected and key not in statistics]
    problems = []
    if strict and missing:
        problems.append(f"missing {len(missing)} keys: {_some(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected {len(unexpected)} keys: {_some(unexpected)}")
    mismatched = {}
    for key, value in state_dict.items():
        if key not in expected or key in statistics:
            continue
        wanted = expected[key]
        # load_state_dict casts floating point values, as it always does; quantized (integer) data is not
        # cast: int8 rows or packed 4-bit bytes of another dtype mean another quantization.
        dtype_differs = value.dtype != wanted.dtype and not (
            value.is_floating_point() and wanted.is_floating_point()
        )
        if value.shape != wanted.shape or dtype_differs:
            mismatched[key] = (
                f"{key!r}: {tuple(value.shape)} {value.dtype} in the file, {tuple(wanted.shape)} {wanted.dtype} "
                "in the model"
            )
    if mismatched:
        shown = list(mismatched.values())[:5]
        problems.append(f"{len(mismatched)} shape or dtype mismatches: {'; '.join(shown)}")
        if len(mismatched) > 5:
            problems[-1] += f" and {len(mismatched) - 5} more"
    refused = _refused_layers(model, state_dict, set(mismatched))
    if refused:
        problems.append(_layers_problem(refused))
    return problems


def load_state_dict_file(
    model: nn.Module, path: str | os.PathLike, strict: bool = True
) -> torch.nn.modules.module._IncompatibleKeys:
    """Load a file written by :func:`save_state_dict_file` (or any state dict file) into ``model``.

    ``model`` is quantized with the same config as the model that was saved (e.g. by
    :func:`quantize_model`, from any weights): its quantized weights, statistics included, are replaced
    by the file's, on the device each layer is on. Keys, shapes, dtypes and each quantized layer's
    statistics (quant type, block scales, ``SCB``, as the layers' load hooks check them) are checked
    against the model before anything is loaded, so a file that does not fit leaves ``model`` untouched.

    Args:
        model: the model to load into, in place.
        path: a ``.safetensors`` file or a torch file (``.pt``, ``.pth``, ``.bin``, ``.ckpt``).
        strict: as for ``load_state_dict``: the file's keys must be the model's. With ``False``,
            missing and unexpected keys are returned instead.

    Returns:
        The missing and unexpected keys, as ``model.load_state_dict`` returns them.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file cannot be read (truncated, corrupt, not a state dict).
        RuntimeError: the file does not fit ``model`` (missing or unexpected keys, shapes, dtypes, a
            quantization that differs), naming the file and the entries.
    """
    state_dict = read_state_dict_file(path)
    problems = _problems(model, state_dict, strict)
    if problems:
        raise RuntimeError(
            f"'{os.fspath(path)}' does not fit {type(model).__name__}: {'; '.join(problems)}. It was saved from "
            "another model or quantization config; load it into a model built and quantized the same way."
        )
    try:
        return model.load_state_dict(state_dict, strict=strict)
    except RuntimeError as error:
        raise RuntimeError(
            f"loading '{os.fspath(path)}' into {type(model).__name__} failed: {error}. It passed the checks "
            "made before loading, so part of it may be loaded: rebuild the model before using it."
        ) from error
