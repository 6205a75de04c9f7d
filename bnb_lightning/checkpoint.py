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
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO
from torch import nn

from .backend import flat_bytes, is_bnb_linear
from .config import QuantizationConfig
from .distributed import is_fsdp_wrapped, unwrapped_name

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
    state = module.state_dict()
    keys = sorted(frozen_state_keys(module) if frozen_keys is None else frozen_keys)
    positions: dict[torch.device, torch.Tensor] = {}
    small: dict[torch.device, list[int]] = {}
    sums: list[torch.Tensor | None] = []
    for index, key in enumerate(keys):
        tensor = state[key]
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
    one_device = len({state[key].device for key in keys}) == 1
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


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``field: saved -> current`` for each config field that differs."""
    return [
        f"{name}: {saved.get(name)!r} -> {current.get(name)!r}"
        for name in sorted(set(saved) | set(current))
        if saved.get(name) != current.get(name)
    ]


def check_record(record: Mapping[str, Any], config: QuantizationConfig, fingerprint: str | None) -> None:
    """Refuse a checkpoint whose record shows another quantization config or another base."""
    if not record:
        return
    differences = config_differences(record.get("config", {}), config_record(config))
    if differences:
        raise ValueError(
            f"the checkpoint was trained with another quantization config ({'; '.join(differences)}). "
            "Resume with the config it was made with, or pass check_base_on_resume=False to load it anyway."
        )
    if record.get("base_fingerprint") not in (None, fingerprint):
        raise ValueError(
            "the checkpoint's frozen base differs from the model being trained (fingerprint "
            f"{record['base_fingerprint']} in the checkpoint, {fingerprint} now): it was trained on other base "
            "weights. Load the same base model, or pass check_base_on_resume=False."
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


class FileNamingCheckpointIO(CheckpointIO):
    """Lightning's checkpoint IO, with errors that name the file and say what is wrong with it.

    Wraps the strategy's own IO (saving and removing go straight through); a file that cannot be
    read, or is not a Lightning checkpoint, fails before anything is restored from it.
    """

    def __init__(self, inner: CheckpointIO) -> None:
        self.inner = inner

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        options = {} if map_location is None else {"map_location": map_location}
        try:
            checkpoint = self.inner.load_checkpoint(path, weights_only=weights_only, **options)
        except FileNotFoundError:
            raise
        except Exception as error:
            raise ValueError(
                f"checkpoint {os.fspath(path)!r} cannot be read ({type(error).__name__}: {error}); it is truncated "
                "or not a file written by torch.save. Resume from another checkpoint, or start without ckpt_path."
            ) from error
        if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
            raise ValueError(
                f"checkpoint {os.fspath(path)!r} is not a Lightning checkpoint (no 'state_dict' entry); resume from "
                "a file written by Trainer.save_checkpoint or ModelCheckpoint."
            )
        return checkpoint

    def remove_checkpoint(self, path: Any) -> None:
        self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        self.inner.teardown()
