"""Adapter-only checkpoints: what to leave out, and how to tell that a base is the one trained on.

A QLoRA checkpoint needs the trainable parameters and the training state, not gigabytes of frozen
quantized weights that the run re-creates from the original model anyway. What it keeps instead is a
record: the quantization config and a fingerprint of the frozen base, so a resume against another
base or another config fails with a message instead of training on the wrong weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import struct
import zipfile
import zlib
from collections.abc import Iterable, Mapping
from typing import Any, BinaryIO

import torch
from fsspec.core import url_to_fs
from fsspec.utils import get_protocol
from lightning.fabric.plugins import CheckpointIO, TorchCheckpointIO
from torch import nn

from ..backend import flat_bytes, is_bnb_linear
from ..config import QuantizationConfig
from ..distributed import is_fsdp_wrapped, unwrapped_name
from ..transfer import PARTIAL_HOST_COPY
from .files import atomic_path

RECORD_VERSION = 1
# Fingerprints read the bytes as rows of _PERIOD, _CHUNK_ROWS rows at a time.
_PERIOD = 65521  # the largest prime below 2**16
_CHUNK_ROWS = 16  # rows of _PERIOD bytes per step: 4 MiB as float32
_SMALL_BATCH_BYTES = 2**18  # tensors under _PERIOD bytes are summed together, this many bytes at a time


def frozen_state_keys(module: nn.Module, keys: Iterable[str] | None = None) -> set[str]:
    """State-dict keys of the frozen base: frozen parameters and the quantization statistics with them.

    ``keys``: the state-dict keys to choose from (default: ``module.state_dict()``'s). Under FSDP, pass
    those of the state dict at hand: ``module.state_dict()`` would gather the whole sharded model.
    """
    keys = set(module.state_dict(keep_vars=True) if keys is None else keys)
    frozen_names = {
        unwrapped_name(name)
        for name, parameter in module.named_parameters(remove_duplicate=False)
        if not parameter.requires_grad
    }
    # A key belongs to a frozen parameter when it is its name or starts with it at a dot
    # ("...weight.absmax"): look its dotted prefixes up, once per key.
    frozen = {key for key in keys if any(prefix in frozen_names for prefix in _dotted_prefixes(key))}
    for name, layer in module.named_modules(remove_duplicate=False):
        if is_bnb_linear(layer) and not layer.weight.requires_grad:
            name = unwrapped_name(name)
            prefix = f"{name}." if name else ""
            frozen.update(key for key in (f"{prefix}SCB", f"{prefix}weight_format") if key in keys)
    return frozen


def adapter_state_dict(
    state_dict: Mapping[str, Any], module: nn.Module, frozen_keys: Iterable[str] | None = None
) -> dict[str, Any]:
    """``state_dict`` without the frozen base of ``module``: adapters, other trainables and buffers.

    ``frozen_keys``: the base's keys, taken before a strategy wrapped ``module`` (FSDP without
    ``use_orig_params`` hides the original parameters); default: found from ``module`` now.
    """
    frozen = set(frozen_keys) if frozen_keys is not None else frozen_state_keys(module, state_dict.keys())
    return {key: value for key, value in state_dict.items() if key not in frozen}


def _dotted_prefixes(key: str) -> list[str]:
    parts = key.split(".")
    return [".".join(parts[:end]) for end in range(1, len(parts) + 1)]


def _checksums(tensor: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
    """The byte sum and the sum of bytes weighted by (position mod 65521) + 1, exactly, on the device.

    Viewed as rows of 65521 bytes, the weights are the column numbers, so both sums come from the
    column sums, added up on the device. Each step casts a few MiB (a cast inside a reduction would
    copy the whole chunk to int64), so the fingerprint adds little to the setup peak. The result
    stays on the device (an int64 pair), so many tensors cost one transfer to the host.
    """
    data = flat_bytes(tensor)
    whole = data.numel() // _PERIOD * _PERIOD
    columns = torch.zeros(_PERIOD, dtype=torch.int64, device=data.device)
    for start in range(0, whole, _CHUNK_ROWS * _PERIOD):
        rows = data[start : min(start + _CHUNK_ROWS * _PERIOD, whole)].view(-1, _PERIOD)
        # float32 sums of at most _CHUNK_ROWS bytes are exact.
        columns += rows.to(torch.float32).sum(0).to(torch.int64)
    tail = data[whole:].to(torch.int64)
    columns[: tail.numel()] += tail
    if positions is None:
        positions = torch.arange(1, _PERIOD + 1, dtype=torch.int64, device=data.device)
    return torch.stack((columns.sum(), (columns * positions).sum()))


def _small_checksums(tensors: list[torch.Tensor]) -> torch.Tensor:
    """:func:`_checksums` of tensors under ``_PERIOD`` bytes each, on one device: a ``(len, 2)`` tensor.

    A model has hundreds of such tensors (norms, 4-bit statistics); summing them side by side takes
    a few kernels a batch instead of several a tensor, each launched from the host.
    """
    datas = [flat_bytes(t) for t in tensors]
    device = datas[0].device
    sums = torch.zeros(len(datas), 2, dtype=torch.int64, device=device)
    start = 0
    while start < len(datas):
        end, size = start, 0
        while end < len(datas) and (end == start or size + datas[end].numel() <= _SMALL_BATCH_BYTES):
            size += datas[end].numel()
            end += 1
        sizes = torch.tensor([d.numel() for d in datas[start:end]], device=device)
        data = torch.cat(datas[start:end]).to(torch.int64)
        owner = torch.repeat_interleave(torch.arange(start, end, device=device), sizes, output_size=size)
        # Each tensor is shorter than _PERIOD, so its byte positions (1-based) are the weights.
        firsts = torch.cumsum(sizes, 0) - sizes
        positions = torch.arange(1, size + 1, device=device) - firsts[owner - start]
        sums[:, 0].index_add_(0, owner, data)
        sums[:, 1].index_add_(0, owner, data * positions)
        start = end
    return sums


def base_fingerprint(module: nn.Module, frozen_keys: Iterable[str] | None = None) -> str:
    """A short hash of the frozen base (quantized bytes, statistics, frozen full-precision weights).

    Computed where the tensors live, a chunk at a time, with one transfer of the sums at the end.
    Take it right after quantization: on CPUs with AVX512-BF16, bitsandbytes rewrites 4-bit
    statistics on the first eval-mode forward. ``frozen_keys``: the base's keys if already known
    (:func:`frozen_state_keys`).
    """
    state = module.state_dict(keep_vars=True)
    keys = sorted(frozen_state_keys(module) if frozen_keys is None else frozen_keys)
    positions: dict[torch.device, torch.Tensor] = {}
    small: dict[torch.device, list[int]] = {}
    sums: list[torch.Tensor | None] = []
    for index, key in enumerate(keys):
        tensor = state[key]
        partial = getattr(tensor, PARTIAL_HOST_COPY, None)
        if partial is not None:  # only this rank's rows are here: the whole weight's sums, taken before
            sums.append(partial.checksums)
            continue
        tensor = state[key] = tensor.detach()
        device = tensor.device
        if tensor.numel() * tensor.element_size() < _PERIOD:
            small.setdefault(device, []).append(index)
            sums.append(None)
            continue
        if device not in positions:
            positions[device] = torch.arange(1, _PERIOD + 1, dtype=torch.int64, device=device)
        sums.append(_checksums(tensor, positions[device]))
    for indices in small.values():
        for index, pair in zip(indices, _small_checksums([state[keys[i]] for i in indices]), strict=True):
            sums[index] = pair
    # One transfer when every tensor is on one device.
    one_device = len({pair.device for pair in sums}) == 1
    values = torch.stack(sums).tolist() if one_device else [pair.tolist() for pair in sums]
    digest = hashlib.sha256()
    for key, (total, weighted) in zip(keys, values, strict=True):
        tensor = state[key]
        digest.update(f"{key}|{tuple(tensor.shape)}|{tensor.dtype}|{total}|{weighted};".encode())
    return digest.hexdigest()[:16]


def config_record(config: QuantizationConfig) -> dict[str, Any]:
    """The config as plain values (dtypes as names), for a checkpoint and for comparing."""
    record = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, torch.dtype):
            value = str(value).removeprefix("torch.")
        elif isinstance(value, tuple):
            value = list(value)
        record[field.name] = value
    return record


def quantization_record(config: QuantizationConfig, fingerprint: str, adapter_only: bool) -> dict[str, Any]:
    return {
        "version": RECORD_VERSION,
        "config": config_record(config),
        "base_fingerprint": fingerprint,
        "adapter_only": adapter_only,
    }


# The fields that decide which layers are quantized and how their weights are stored: a resume with
# other values would train the adapters on another base. compute_dtype and threshold only change the
# arithmetic (compute_dtype follows the Trainer's precision), so a resume may change them.
_BASE_FIELDS = {
    4: (
        "bits",
        "quant_type",
        "double_quant",
        "quant_storage",
        "skip_modules",
        "replace_default_skips",
        "target_modules",
    ),
    8: ("bits", "has_fp16_weights", "skip_modules", "replace_default_skips", "target_modules"),
}


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``field: saved -> current`` for each field that decides the quantized base and differs.

    Only the fields of the current bit width count (older records hold every field).
    """
    names = _BASE_FIELDS.get(current.get("bits"), tuple(current))
    return [
        f"{name}: {saved.get(name)!r} -> {current.get(name)!r}"
        for name in names
        if saved.get(name) != current.get(name)
    ]


def check_record_config(record: Mapping[str, Any], config: QuantizationConfig) -> None:
    """Refuse a checkpoint whose record shows another quantization of the base."""
    differences = config_differences(record.get("config", {}), config_record(config)) if record else []
    if differences:
        raise ValueError(
            f"the checkpoint was trained with another quantization config ({'; '.join(differences)}), which "
            "quantizes the base differently. Resume with the config it was made with, or pass "
            "check_base_on_resume=False to load it anyway."
        )


def check_record_base(record: Mapping[str, Any], fingerprint: str | None) -> None:
    """Refuse a checkpoint whose record shows other base weights."""
    if record and record.get("base_fingerprint") not in (None, fingerprint):
        raise ValueError(
            "the checkpoint's frozen base differs from the model being trained (fingerprint "
            f"{record['base_fingerprint']} in the checkpoint, {fingerprint} now): it was trained on other base "
            "weights. Load the same base model, or pass check_base_on_resume=False."
        )


def check_trainables(
    state_dict: Mapping[str, Any], module: nn.Module, frozen_keys: Iterable[str], strict: bool = True
) -> None:
    """Refuse a checkpoint whose trainable tensors are not the module's, naming the likely cause.

    Checked before the base: a checkpoint trained with adapters, resumed without them (or with another
    ``r`` or ``target_modules``), would otherwise be reported as another base, or fail in torch's
    loading with a list of every missing key. Without ``strict`` (a module with
    ``strict_loading=False``), only shapes are checked, as torch does.
    """
    frozen = set(frozen_keys)
    expected = {name: parameter for name, parameter in module.named_parameters() if parameter.requires_grad}
    known = set(module.state_dict(keep_vars=True))
    unexpected = sorted(key for key in state_dict if key not in known and key not in frozen)
    missing = sorted(name for name in expected if name not in state_dict)
    mismatched = [
        f"{name!r}: {tuple(state_dict[name].shape)} in the checkpoint, {tuple(parameter.shape)} in the model"
        for name, parameter in expected.items()
        if name in state_dict
        and hasattr(state_dict[name], "shape")
        and state_dict[name].shape != parameter.shape
    ]
    if not strict:
        unexpected = missing = []
    problems = []
    if unexpected:
        problems.append(f"it holds {len(unexpected)} tensors the model lacks (e.g. {unexpected[0]!r})")
    if missing:
        problems.append(f"it lacks {len(missing)} trainable tensors of the model (e.g. {missing[0]!r})")
    if mismatched:
        problems.append(f"{len(mismatched)} trainable tensors differ in shape ({mismatched[0]})")
    if problems:
        raise ValueError(
            f"the checkpoint's trainable parameters are not the model's: {'; '.join(problems)}. It was trained with "
            "other adapters: resume with the peft_config it was trained with (the same r, target_modules and "
            "adapter type; without a peft_config, the full-precision parameters train instead)."
        )


def add_frozen_base(state_dict: dict[str, Any], module: nn.Module) -> None:
    """Complete an adapter-only ``state_dict`` with ``module``'s own frozen base, so it loads strictly.

    Under FSDP there is nothing to complete: the strategy has already loaded the checkpoint into the
    sharded model (not strictly) before any hook sees it.
    """
    if is_fsdp_wrapped(module):
        return
    current = module.state_dict()
    for key in frozen_state_keys(module):
        state_dict.setdefault(key, current[key])


@dataclasses.dataclass(frozen=True)
class BaseRecord:
    """What the checkpoints of one prepared model record of its base, and check against it on resume.

    Args:
        config: the quantization config applied.
        fingerprint: :func:`base_fingerprint` of the frozen base.
        frozen_keys: the base's state-dict keys, taken before a strategy wrapped the model.
        adapter_only: whether checkpoints leave the frozen base out.
    """

    config: QuantizationConfig
    fingerprint: str
    frozen_keys: frozenset[str]
    adapter_only: bool

    def record(self) -> dict[str, Any]:
        """The record a checkpoint keeps (a callback's ``state_dict``)."""
        return quantization_record(self.config, self.fingerprint, self.adapter_only)

    def saved_state(self, state_dict: Mapping[str, Any], module: nn.Module) -> dict[str, Any]:
        """``state_dict`` as a checkpoint keeps it: without the frozen base if ``adapter_only``."""
        if not self.adapter_only:
            return dict(state_dict)
        return adapter_state_dict(state_dict, module, frozen_keys=self.frozen_keys)

    def restore(
        self, checkpoint: dict[str, Any], record: Mapping[str, Any], module: nn.Module, check_base: bool
    ) -> dict[str, torch.Tensor]:
        """Check ``checkpoint`` before it loads into ``module``; give an adapter-only one the base.

        ``record`` is the checkpoint's :meth:`record` (empty if it has none); ``check_base`` refuses
        another config or another base. Returns the checkpoint's trainable tensors, to copy in again
        after a precision plugin's cast (16-true would round float32 adapters to float16).
        """
        if check_base:
            check_record_config(record, self.config)
        if "state_dict" not in checkpoint or is_fsdp_wrapped(module):
            # The strategy loads the state itself: FSDP's `load_checkpoint` puts a full checkpoint's
            # state into its shards (not strictly) and removes it before any hook runs. The names of
            # the wrapped module's parameters are not the checkpoint's either, and 16-true, whose
            # rounding the copy would undo, is refused under FSDP.
            if check_base:
                check_record_base(record, self.fingerprint)
            return {}
        state = checkpoint["state_dict"]
        # Other adapters (or none) are said as such before they could look like another base.
        check_trainables(state, module, self.frozen_keys, strict=getattr(module, "strict_loading", True))
        if check_base:
            check_record_base(record, self.fingerprint)
        if record.get("adapter_only"):
            add_frozen_base(state, module)
        trainable = {name for name, parameter in module.named_parameters() if parameter.requires_grad}
        return {name: state[name] for name in trainable if name in state}


_VERIFY_CHUNK = 2**22  # bytes read at a time when checking an archive's CRCs
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # a zip member's local header: signature ... name, extra lengths
_RECORD_KEYS = frozenset({"version", "config", "base_fingerprint", "adapter_only"})  # quantization_record's
# torch.load's own pattern for an object its weights-only unpickler refuses.
_NOT_ALLOWED_GLOBAL = re.compile(r"GLOBAL (\S+) was not an allowed global by default")
# torch.load's advice on weights_only, which does not apply to files that are not checkpoints at all.
_WEIGHTS_ONLY_ADVICE = (
    re.compile(r"\x1b\[[0-9;]*m"),
    re.compile(r"Weights only load failed\.\s*"),
    re.compile(r"In PyTorch 2\.6, we changed the default value.*?trusted source\.\s*", re.DOTALL),
    re.compile(
        r"This file can still be loaded, to do so you have two options.*?WeightsUnpickler error:", re.DOTALL
    ),
    re.compile(r"Please file an issue with the following.*?WeightsUnpickler error:", re.DOTALL),
    re.compile(r"Check the documentation of torch\.load.*", re.DOTALL),
)


class FileNamingCheckpointIO(CheckpointIO):
    """Lightning's checkpoint IO: atomic local saves, verified adapter-only loads, errors that name the file.

    Wraps the strategy's own IO. Saving: with Lightning's ``TorchCheckpointIO`` (or a subclass that
    keeps its ``save_checkpoint``) and a local path, the checkpoint is written with ``torch.save`` to a
    temporary file beside the target, fsynced and renamed over it: Lightning's own save goes through
    a temporary file in ``$TMPDIR``, whose move onto another filesystem is a copy that can leave a
    truncated file under the final name. Other IOs (user plugins, ``AsyncCheckpointIO``) and remote
    URLs go straight through.

    Loading: a file that cannot be read, or is not a Lightning checkpoint, fails before anything is
    restored from it. An adapter-only checkpoint (small) is checked against the CRC-32 of each zip
    member, which ``torch.load`` does not check: a flipped bit in a tensor would otherwise resume
    with altered adapters or optimizer state. Full checkpoints (``save_base_weights=True``; large)
    are not checked, and neither are remote URLs, which would have to be downloaded a second time.
    """

    def __init__(self, inner: CheckpointIO) -> None:
        self.inner = inner

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        local = _local_path(path)
        # TorchCheckpointIO refuses storage_options with its own TypeError: let it say so.
        if local is None or storage_options is not None or not _saves_like_torch_io(self.inner):
            self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        _save_atomically(checkpoint, local)

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        options = {} if map_location is None else {"map_location": map_location}
        try:
            checkpoint = self.inner.load_checkpoint(path, weights_only=weights_only, **options)
        except FileNotFoundError:
            raise
        except Exception as error:
            raise _unreadable(path, error) from error
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
            raise ValueError(
                f"checkpoint {os.fspath(path)!r} is not a Lightning checkpoint (no 'state_dict' entry); resume from "
                "a file written by Trainer.save_checkpoint or ModelCheckpoint."
            )
        local = _local_path(path)
        if local is not None and _is_adapter_only(checkpoint):
            damage = _archive_damage(local)
            if damage is not None:
                raise _corrupt(path, damage)
        return checkpoint

    def remove_checkpoint(self, path: Any) -> None:
        self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        self.inner.teardown()


def corrupt_member(path: str | os.PathLike) -> str | None:
    """The first member of the zip archive ``path`` (``torch.save``'s format) whose bytes do not match
    the CRC-32 recorded for them, or None when all match or ``path`` is not a zip archive.

    ``torch.save`` stores members uncompressed, so their bytes in the file are their data. Members
    recorded with a CRC of 0 are not checked: ``torch.save`` writes 0 for every member under
    ``torch.serialization.set_crc32_options(False)``, and an empty member's CRC is 0 anyway.

    Raises:
        zipfile.BadZipFile: the archive's directory cannot be read.
    """
    if not zipfile.is_zipfile(path):
        return None  # torch.save's legacy format has no checksums
    buffer = memoryview(bytearray(_VERIFY_CHUNK))
    with zipfile.ZipFile(path) as archive, open(path, "rb") as file:
        for member in archive.infolist():
            if member.CRC != 0 and _stored_crc32(file, member, buffer) != member.CRC:
                return member.filename
    return None


def _stored_crc32(file: BinaryIO, member: zipfile.ZipInfo, buffer: memoryview) -> int | None:
    """The CRC-32 of ``member``'s bytes as stored in ``file``, or None if its local header is damaged
    or the file ends inside it."""
    file.seek(member.header_offset)
    header = file.read(_LOCAL_HEADER.size)
    if len(header) < _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
        return None
    # The data follows the header's name and extra field (torch's alignment padding), whose lengths
    # the local header holds: they may differ from the directory's copy.
    name_length, extra_length = _LOCAL_HEADER.unpack(header)[-2:]
    file.seek(member.header_offset + _LOCAL_HEADER.size + name_length + extra_length)
    crc, left = 0, member.compress_size
    while left:
        read = file.readinto(buffer[: min(left, len(buffer))])
        if not read:
            return None
        crc = zlib.crc32(buffer[:read], crc)
        left -= read
    return crc


def _archive_damage(path: str) -> str | None:
    """What is damaged in the zip archive ``path``, in words for an error message, or None."""
    try:
        member = corrupt_member(path)
    except zipfile.BadZipFile as error:
        # torch's reader is laxer than zipfile's (it ignores overlapping entries, say).
        return f"its zip directory is damaged ({error})"
    if member is None:
        return None
    return f"its member {member!r} does not match the CRC-32 recorded when it was written"


def _local_path(path: Any) -> str | None:
    """``path`` on the local filesystem (a plain path or a ``file://`` URL, resolved as Lightning
    does through fsspec), or None for a remote URL."""
    if get_protocol(str(path)) != "file":
        return None
    return url_to_fs(str(path))[1]


def _saves_like_torch_io(io: CheckpointIO) -> bool:
    """Whether ``io`` saves with Lightning's ``TorchCheckpointIO.save_checkpoint``, not a save of its own."""
    return isinstance(io, TorchCheckpointIO) and type(io).save_checkpoint is TorchCheckpointIO.save_checkpoint


def _save_atomically(checkpoint: dict[str, Any], path: str) -> None:
    """``torch.save`` into a temporary file beside ``path``, renamed over it once whole and on disk.

    Straight to the file, without Lightning's copy of the whole checkpoint in memory. Written through
    a Python file object so that a failed write surfaces as the ``OSError`` it is (torch's own file
    writer reports any failure as a ``RuntimeError`` about stream positions).
    """
    with atomic_path(path) as tmp:
        try:
            with open(tmp, "wb") as file:
                torch.save(checkpoint, file)
        except Exception as error:
            cause = _os_error_in(error)
            if cause is None:
                raise
            raise OSError(
                cause.errno,
                f"{cause.strerror}: checkpoint {path!r} could not be written; a previous file there is left as it "
                "was. Make room on its filesystem, or save checkpoints elsewhere (ModelCheckpoint(dirpath=...)).",
            ) from error


def _os_error_in(error: BaseException) -> OSError | None:
    """The ``OSError`` that ``error`` is, or that it was raised while handling, if any."""
    visited: set[int] = set()
    while error is not None and id(error) not in visited:
        if isinstance(error, OSError) and error.errno is not None:
            return error
        visited.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _is_adapter_only(checkpoint: Mapping[str, Any]) -> bool:
    """Whether a callbacks entry of ``checkpoint`` is a quantization record of an adapter-only checkpoint."""
    callbacks = checkpoint.get("callbacks")
    if not isinstance(callbacks, Mapping):
        return False
    return any(
        isinstance(state, Mapping) and _RECORD_KEYS <= state.keys() and state["adapter_only"] is True
        for state in callbacks.values()
    )


def _is_safetensors(path: str) -> bool:
    """Whether ``path`` starts as a safetensors file does: the header's length in 8 little-endian bytes,
    then the header, a JSON object."""
    try:
        with open(path, "rb") as file:
            head = file.read(9)
            size = os.fstat(file.fileno()).st_size
    except OSError:
        return False
    return len(head) == 9 and head[8:] == b"{" and int.from_bytes(head[:8], "little") <= size - 8


def _without_weights_only_advice(message: str) -> str:
    for advice in _WEIGHTS_ONLY_ADVICE:
        message = advice.sub(" ", message)
    return " ".join(message.split())


def _corrupt(path: Any, damage: str) -> ValueError:
    return ValueError(
        f"checkpoint {os.fspath(path)!r} is corrupt: {damage} (a byte changed on disk or in a copy). Nothing "
        "was restored from it. Resume from another checkpoint (the previous one, say), or start without "
        "ckpt_path."
    )


def _unreadable(path: Any, error: Exception) -> ValueError:
    """The error for a checkpoint ``torch.load`` failed on: what the file is, where that can be told."""
    local = _local_path(path)
    if local is not None and _is_safetensors(local):
        return ValueError(
            f"checkpoint {os.fspath(path)!r} is a safetensors file (weights only, e.g. from save_pretrained or "
            "save_state_dict_file), not a Lightning checkpoint: ckpt_path takes a .ckpt written by "
            "Trainer.save_checkpoint or ModelCheckpoint; load weights into the model before fit instead."
        )
    damage = _archive_damage(local) if local is not None else None
    if damage is not None:
        return _corrupt(path, damage)
    reason = f"{type(error).__name__}: {_without_weights_only_advice(str(error)) or 'no message'}"
    if _NOT_ALLOWED_GLOBAL.search(reason):
        # A torch.save file, maybe a checkpoint, holding objects torch.load does not unpickle by default.
        return ValueError(
            f"checkpoint {os.fspath(path)!r} holds objects that torch.load does not unpickle by default ({reason}). "
            "If you trust the file, allowlist them as said, or pass weights_only=False to fit."
        )
    return ValueError(
        f"checkpoint {os.fspath(path)!r} cannot be read ({reason}); it is truncated, corrupt or not a file written "
        "by torch.save. Resume from another checkpoint, or start without ckpt_path."
    )
