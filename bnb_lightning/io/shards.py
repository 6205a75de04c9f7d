"""A checkpoint in transformers' layout, known from its headers: each tensor's shard, shape and dtype, and how
it is quantized, if it is.

``model.safetensors``, or shards listed in ``model.safetensors.index.json``, with ``config.json``
beside them. Only the headers are read here (safetensors checks each against its file's length, so a
truncated shard is found now), so a checkpoint can be checked against a model before any data is read.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Container
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .layer_state import STATS_4BIT, STATS_8BIT

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"

# safetensors' dtype names (its header format) and the torch dtypes they load as.
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
_UNCHANGED = "The model was not changed."


class CheckpointError(ValueError):
    """The checkpoint cannot be read or does not fit the model; the message names the file and the tensor."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a checkpoint, as its shard's header describes it."""

    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint's tensors (by name, in file order), its files, and what its ``config.json`` declares."""

    source: Path  # the index of a sharded checkpoint, or its one file: what messages name
    files: list[Path]
    tensors: dict[str, TensorEntry]
    config_file: Path
    quantization: dict[str, Any] | None  # config.json's quantization_config
    architectures: list[str]
    prefix: str = ""  # what :meth:`under` put before each name in the files

    def file_of(self, key: str) -> Path:
        return self.tensors[key].file

    def under(self, prefix: str) -> Checkpoint:
        """The same checkpoint with each tensor named as in a module holding the saved model at ``prefix``.

        ``save_pretrained`` names tensors from the transformers model (``model.embed_tokens.weight``); a
        LightningModule holding it as ``self.model`` names them ``model.model.embed_tokens.weight``.
        """
        tensors = {f"{prefix}{key}": entry for key, entry in self.tensors.items()}
        return replace(self, tensors=tensors, prefix=prefix + self.prefix)

    def key_in_file(self, key: str) -> str:
        """The name ``key`` (a name of :attr:`tensors`) has in its file."""
        return key.removeprefix(self.prefix)

    def stored_quantization(self, layer_name: str) -> tuple[dict[str, Any], str] | None:
        """How the checkpoint stores a linear layer quantized, and the entry that says so; ``None``: unquantized.

        Read from names and dtypes: ``SCB`` for 8-bit; for 4-bit, the quant type in the name of the packed
        quant state, double quantization from ``nested_absmax``, the storage dtype from the packed weight.
        """
        statistics = statistics_keys(layer_name, self.tensors)
        if f"{layer_name}.SCB" in statistics:
            return {"bits": 8, "has_fp16_weights": False}, f"{layer_name}.SCB"
        packed = [key for key in statistics if ".quant_state.bitsandbytes__" in key]
        if not packed:
            return None
        weight = self.tensors.get(f"{layer_name}.weight")
        return {
            "bits": 4,
            "quant_type": packed[0].rpartition("__")[2],
            "double_quant": f"{layer_name}.weight.nested_absmax" in self.tensors,
            "quant_storage": None if weight is None else weight.dtype,
        }, packed[0]


def statistics_keys(layer_name: str, keys: Container[str]) -> list[str]:
    """The keys among ``keys`` saved with a quantized layer's weight: 4-bit quant state or 8-bit ``SCB``.

    Membership tests only, so a checkpoint's key dict is not walked once per layer."""
    candidates = [f"{layer_name}.weight.{stat}" for stat in STATS_4BIT]
    candidates += [f"{layer_name}.{stat}" for stat in STATS_8BIT]
    return sorted(key for key in candidates if key in keys)


def read_checkpoint(weights: str | os.PathLike) -> Checkpoint:
    """Read the headers of every file of the checkpoint at ``weights`` (a directory or one ``.safetensors``).

    Raises:
        FileNotFoundError: nothing to load at ``weights``, or a shard the index lists is absent.
        CheckpointError: a file that is truncated, corrupt or not safetensors; an index that does not
            match its shards; a tensor in two shards.
    """
    path = Path(weights)
    files, index, weight_map = _checkpoint_files(path)
    tensors: dict[str, TensorEntry] = {}
    for file in files:
        listed = [key for key, shard in weight_map.items() if shard == file.name]
        for key, entry in _read_header(file, listed).items():
            if key in tensors:
                raise CheckpointError(
                    f"'{key}' is in both '{tensors[key].file}' and '{file}': the directory mixes shards of "
                    f"different saves. Save or download the checkpoint again into an empty directory. {_UNCHANGED}"
                )
            tensors[key] = entry
    if index is not None:
        _check_index(index, weight_map, tensors)
    config_file = (path if path.is_dir() else path.parent) / CONFIG_FILE
    config = _read_config(config_file)
    return Checkpoint(
        source=index or files[0],
        files=files,
        tensors=tensors,
        config_file=config_file,
        quantization=config.get("quantization_config"),
        architectures=list(config.get("architectures") or ()),
    )


def check_weights(weights: Any) -> str | None:
    """``weights`` as a path string, once a checkpoint is there (its files are found, not read); ``None`` stays.

    For arguments checked before anything runs (``BnbQuantization(weights=...)``): a wrong path fails at once.
    """
    if weights is None:
        return None
    if not isinstance(weights, (str, os.PathLike)):
        raise TypeError(
            "weights must be a path to a checkpoint (a save_pretrained() directory or a .safetensors file) or "
            f"None, got {type(weights).__name__} {weights!r}."
        )
    path = Path(weights)
    if not path.exists():
        where = "" if path.is_absolute() else f" (relative to '{Path.cwd()}')"
        raise FileNotFoundError(
            f"weights='{os.fspath(weights)}' does not exist{where}. Pass the directory "
            f"save_pretrained() wrote ({SINGLE_FILE}, or shards with {INDEX_FILE}) or one .safetensors file."
        )
    _checkpoint_files(path)
    return os.fspath(weights)


def _checkpoint_files(path: Path) -> tuple[list[Path], Path | None, dict[str, str]]:
    """The files to read, in order; the index that lists them and its map (``None``, empty: a single file)."""
    if path.is_file():
        if path.suffix != ".safetensors":
            raise CheckpointError(
                f"'{path}' is not a safetensors file; loading while quantizing reads safetensors checkpoints "
                f"({SINGLE_FILE}, or shards with {INDEX_FILE}). Save the model with save_pretrained() "
                f"(safe_serialization is its default). {_UNCHANGED}"
            )
        return [path], None, {}
    if not path.is_dir():
        raise FileNotFoundError(
            f"no checkpoint at '{path}': it is neither a directory nor a file. {_UNCHANGED}"
        )
    # transformers' order: a single file first, then an index.
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE], None, {}
    index = path / INDEX_FILE
    if not index.is_file():
        found = sorted(p.name for p in path.iterdir())
        raise FileNotFoundError(
            f"'{path}' holds neither {SINGLE_FILE} nor {INDEX_FILE} (it has {found[:8]}). Pass a directory "
            "written by save_pretrained(), or a .safetensors file; convert a torch checkpoint (pytorch_model.bin) "
            f"by loading it and saving it with save_pretrained(). {_UNCHANGED}"
        )
    weight_map = _read_index(index)
    files = []
    for shard in sorted(set(weight_map.values())):
        file = path / shard
        if not file.is_file():
            first = next(key for key, name in weight_map.items() if name == shard)
            raise FileNotFoundError(
                f"'{file}', a shard '{index}' lists (it holds '{first}', ...), is absent: the download or copy "
                f"is incomplete. Fetch the missing shard. {_UNCHANGED}"
            )
        files.append(file)
    return files, index, weight_map


def _read_index(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise TypeError("weight_map must map tensor names to file names")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise CheckpointError(
            f"cannot read '{index}' as a safetensors index ({type(error).__name__}: {error}); it is probably "
            f"truncated or corrupt. Save or download the checkpoint again. {_UNCHANGED}"
        ) from error
    return weight_map


def _read_header(file: Path, listed: list[str]) -> dict[str, TensorEntry]:
    """The entries of one file, from its header; ``listed``: the tensors its index says it holds."""
    from safetensors import safe_open

    try:
        with safe_open(file, framework="pt", device="cpu") as handle:
            header = {key: handle.get_slice(key) for key in handle.keys()}
            header = {key: (part.get_dtype(), tuple(part.get_shape())) for key, part in header.items()}
    except Exception as error:  # safetensors raises its own error type, or OSError; all mean the same here
        holds = f" (it should hold {', '.join(repr(k) for k in listed[:3])}{', ...' * (len(listed) > 3)})"
        raise CheckpointError(
            f"cannot read '{file}'{holds if listed else ''} as a safetensors file: {error}. It is probably "
            f"truncated or corrupt (an interrupted download or copy?); download or save it again. {_UNCHANGED}"
        ) from error
    entries = {}
    for key, (dtype, shape) in header.items():
        if dtype not in _DTYPES:
            raise CheckpointError(
                f"'{key}' in '{file}' has dtype {dtype}, which torch {torch.__version__} cannot load. {_UNCHANGED}"
            )
        entries[key] = TensorEntry(file, shape, _DTYPES[dtype])
    return entries


def _check_index(index: Path, weight_map: dict[str, str], tensors: dict[str, TensorEntry]) -> None:
    for key, shard in weight_map.items():
        if key not in tensors or tensors[key].file.name != shard:
            where = f"it is in '{tensors[key].file.name}'" if key in tensors else "no shard holds it"
            raise CheckpointError(
                f"'{index}' lists '{key}' in '{shard}', but {where}: the index and the shards are from different "
                f"saves. Save or download the checkpoint again. {_UNCHANGED}"
            )


def _read_config(config_file: Path) -> dict[str, Any]:
    if not config_file.is_file():
        return {}
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(
            f"cannot read '{config_file}' as JSON: {error}. Save or download the checkpoint again. {_UNCHANGED}"
        ) from error
    return config if isinstance(config, dict) else {}
