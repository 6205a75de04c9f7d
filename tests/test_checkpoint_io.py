"""FileNamingCheckpointIO under a real Trainer: verified adapter-only resumes, atomic saves, clear refusals."""

from __future__ import annotations

import argparse
import errno
import fnmatch
import json
import os
import random
import re
import shutil
import struct
import subprocess
import tempfile
import zipfile

import lightning.pytorch as pl
import numpy
import pytest
import torch
from conftest import CausalLM, batches, lora, trainer
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from bnb_lightning import BnbQuantization, QuantizationConfig
from bnb_lightning.io.checkpoint import FileNamingCheckpointIO, quantization_record


def fit(tmp_path, callbacks, ckpt_path=None, max_steps=2) -> pl.Trainer:
    checkpointing = any(isinstance(callback, ModelCheckpoint) for callback in callbacks)
    run = trainer(tmp_path, callbacks, max_steps=max_steps, enable_checkpointing=checkpointing)
    run.fit(CausalLM(), batches(n=8), ckpt_path=ckpt_path)
    return run


def resume(tmp_path, ckpt_path) -> pl.Trainer:
    return fit(tmp_path / "resumed", [BnbQuantization(peft_config=lora())], ckpt_path=ckpt_path, max_steps=4)


@pytest.fixture
def adapter_checkpoint(tmp_path):
    run = fit(tmp_path / "run", [BnbQuantization(peft_config=lora())])
    path = tmp_path / "adapters.ckpt"
    run.save_checkpoint(path)
    return path


def tensor_data_ranges(path) -> list[tuple[str, int, int]]:
    """``(member, start, end)``: where the bytes of each tensor (``archive/data/<n>``) lie in the file.

    The data starts after the member's local header, whose extra field (torch's alignment padding)
    may differ in length from the central directory's copy: read it from the local header itself.
    """
    ranges = []
    with zipfile.ZipFile(path) as archive, open(path, "rb") as file:
        for member in archive.infolist():
            if not fnmatch.fnmatch(member.filename, "*/data/*") or member.file_size == 0:
                continue
            file.seek(member.header_offset)
            header = file.read(30)
            assert header[:4] == b"PK\x03\x04"
            name_length, extra_length = struct.unpack("<HH", header[26:30])
            start = member.header_offset + 30 + name_length + extra_length
            ranges.append((member.filename, start, start + member.file_size))
    return ranges


def flip_bits(path, count: int, seed: int = 0) -> list[tuple[str, int, int]]:
    """``count`` single-bit flips, each ``(member, byte offset in the file, bit)``, spread over the tensor data."""
    ranges = tensor_data_ranges(path)
    sizes = [end - start for _, start, end in ranges]
    generator = random.Random(seed)
    flips = []
    for member, start, end in generator.choices(ranges, weights=sizes, k=count):
        flips.append((member, generator.randrange(start, end), generator.randrange(8)))
    return flips


def test_a_flipped_bit_in_a_tensor_is_refused_on_resume(tmp_path, adapter_checkpoint):
    original = adapter_checkpoint.read_bytes()
    flips = flip_bits(adapter_checkpoint, count=4)
    assert len({member for member, _, _ in flips}) > 1
    for number, (member, offset, bit) in enumerate(flips):
        damaged = bytearray(original)
        damaged[offset] ^= 1 << bit
        path = tmp_path / f"flipped-{number}.ckpt"
        path.write_bytes(damaged)
        # torch.load reads it without complaint: the damage is in the values only.
        torch.load(path, weights_only=True)
        pattern = rf"flipped-{number}\.ckpt' is corrupt: its member '{member}'.*the previous one"
        with pytest.raises(ValueError, match=pattern):
            resume(tmp_path, path)

    intact = tmp_path / "intact.ckpt"
    shutil.copyfile(adapter_checkpoint, intact)
    assert resume(tmp_path, intact).global_step == 4


def adapter_only_checkpoint() -> dict:
    """A Lightning checkpoint's shape with an adapter-only quantization record: enough for the IO."""
    record = quantization_record(QuantizationConfig(), "0" * 16, adapter_only=True)
    return {"state_dict": {"lora_A.weight": torch.randn(4, 64)}, "callbacks": {"BnbQuantization": record}}


def test_an_archive_written_without_checksums_still_loads(tmp_path):
    """torch.save writes CRC 0 for every member under set_crc32_options(False): nothing to verify."""
    path = tmp_path / "no-crc.ckpt"
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(adapter_only_checkpoint(), path)
    finally:
        torch.serialization.set_crc32_options(True)
    assert {member.CRC for member in zipfile.ZipFile(path).infolist()} == {0}
    loaded = FileNamingCheckpointIO(TorchCheckpointIO()).load_checkpoint(path)
    assert torch.equal(loaded["state_dict"]["lora_A.weight"], torch.load(path)["state_dict"]["lora_A.weight"])


def test_a_safetensors_file_as_ckpt_path_says_what_it_is(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "adapter_model.safetensors"
    save_file({"lora_A.weight": torch.zeros(4, 64)}, path)
    with pytest.raises(
        ValueError, match=r"adapter_model\.safetensors' is a safetensors file .*not a Lightning"
    ) as error:
        resume(tmp_path, path)
    assert "weights_only" not in str(error.value)


@pytest.mark.parametrize(
    ("name", "write"),
    [
        ("trainer_state.json", lambda path: path.write_text(json.dumps({"global_step": 500}))),
        ("weights.npy", lambda path: numpy.save(path, numpy.zeros(3))),
    ],
)
def test_an_unreadable_file_is_described_without_torchs_weights_only_advice(tmp_path, name, write):
    path = tmp_path / name
    write(path)
    with pytest.raises(
        ValueError, match=rf"{name}' cannot be read \(UnpicklingError: Unsupported operand"
    ) as error:
        FileNamingCheckpointIO(TorchCheckpointIO()).load_checkpoint(path)
    assert "weights_only" not in str(error.value) and "\n" not in str(error.value)


def test_a_checkpoint_holding_objects_outside_torchs_allowlist_says_how_to_load_it(tmp_path):
    path = tmp_path / "hparams.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": argparse.Namespace(lr=0.1)}, path)
    io = FileNamingCheckpointIO(TorchCheckpointIO())
    with pytest.raises(
        ValueError, match=r"GLOBAL argparse\.Namespace .*add_safe_globals.*weights_only=False"
    ):
        io.load_checkpoint(path)
    assert io.load_checkpoint(path, weights_only=False)["hyper_parameters"].lr == 0.1


# Atomic saves


@pytest.fixture
def small_filesystem(tmp_path):
    """A 4 MiB tmpfs, mounted for the test: another filesystem than tmp_path's, quick to fill."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("filling a filesystem needs a small tmpfs; mounting one needs root and the mount command")
    mountpoint = tmp_path / "small_fs"
    mountpoint.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mountpoint)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs to fill ({mounted.stderr.strip()}): mounting is not permitted here"
        )
    try:
        yield mountpoint
    finally:
        if subprocess.run(["umount", str(mountpoint)]).returncode != 0:
            subprocess.run(["umount", "--lazy", str(mountpoint)], check=True)


def fill(directory) -> None:
    """Write zeros to ``directory/filler`` until its filesystem has no byte left."""
    with open(directory / "filler", "wb", buffering=0) as filler:
        for size in (2**16, 2**12, 1):
            try:
                while filler.write(bytes(size)):
                    pass
            except OSError as error:
                if error.errno != errno.ENOSPC:
                    raise


class FillBeforeSecondSave(pl.Callback):
    """At the second step, before ModelCheckpoint saves (it runs last), keeps the bytes of the first
    checkpoint, fills its filesystem and makes the checkpoints larger from then on: the second cannot
    fit, not even in the space of the first."""

    def __init__(self, path):
        self.path, self.before, self.padding = path, None, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 2:
            self.before = self.path.read_bytes()
            fill(self.path.parent)
            self.padding = 2**20

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if self.padding:
            checkpoint["padding"] = torch.zeros(self.padding, dtype=torch.uint8)


def saving_last(directory) -> ModelCheckpoint:
    return ModelCheckpoint(dirpath=directory, save_top_k=0, save_last=True, every_n_train_steps=1)


@pytest.fixture
def temp_dir_elsewhere(tmp_path, monkeypatch):
    """$TMPDIR on tmp_path's filesystem (tempfile reads it once: set its cached value as well)."""
    directory = tmp_path / "tmpdir"
    directory.mkdir()
    monkeypatch.setenv("TMPDIR", str(directory))
    monkeypatch.setattr(tempfile, "tempdir", str(directory))
    return directory


def test_a_save_that_does_not_fit_leaves_the_previous_checkpoint(
    tmp_path, small_filesystem, temp_dir_elsewhere
):
    path = small_filesystem / "last.ckpt"
    filler = FillBeforeSecondSave(path)
    callbacks = [BnbQuantization(peft_config=lora()), filler, saving_last(small_filesystem)]

    with pytest.raises(OSError) as error:
        fit(tmp_path / "run", callbacks, max_steps=3)

    assert error.value.errno == errno.ENOSPC
    assert path.read_bytes() == filler.before
    assert sorted(p.name for p in small_filesystem.iterdir()) == ["filler", "last.ckpt"]
    assert resume(tmp_path, path).global_step == 4
    assert re.search(
        r"No space left on device: checkpoint '.*last\.ckpt' could not be written", str(error.value)
    )


def test_saves_beside_the_checkpoint_when_tmpdir_is_gone(tmp_path, monkeypatch):
    missing = tmp_path / "missing"
    monkeypatch.setenv("TMPDIR", str(missing))
    monkeypatch.setattr(tempfile, "tempdir", str(missing))
    directory = tmp_path / "checkpoints"  # created, as Lightning does

    run = fit(tmp_path / "run", [BnbQuantization(peft_config=lora()), saving_last(directory)])
    # After fit too: the Trainer keeps the callback's checkpoint IO.
    run.save_checkpoint(directory / "after.ckpt")

    assert sorted(p.name for p in directory.iterdir()) == ["after.ckpt", "last.ckpt"]
    assert torch.load(directory / "last.ckpt", weights_only=True)["global_step"] == 2
    assert torch.load(directory / "after.ckpt", weights_only=True)["global_step"] == 2


class OwnSave(TorchCheckpointIO):
    """A user's IO with a save of its own."""

    def __init__(self):
        self.saved = []

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        self.saved.append(path)
        super().save_checkpoint(checkpoint, path, storage_options)


def test_other_ios_and_remote_paths_save_as_before(tmp_path):
    checkpoint = adapter_only_checkpoint()
    own = OwnSave()
    FileNamingCheckpointIO(own).save_checkpoint(checkpoint, tmp_path / "own.ckpt")
    assert own.saved == [tmp_path / "own.ckpt"]

    io = FileNamingCheckpointIO(TorchCheckpointIO())
    io.save_checkpoint(checkpoint, "memory://checkpoints/remote.ckpt")
    assert torch.equal(
        io.load_checkpoint("memory://checkpoints/remote.ckpt")["state_dict"]["lora_A.weight"],
        checkpoint["state_dict"]["lora_A.weight"],
    )
    io.remove_checkpoint("memory://checkpoints/remote.ckpt")
    with pytest.raises(TypeError, match="storage_options"):
        io.save_checkpoint(checkpoint, tmp_path / "options.ckpt", storage_options={"x": 1})
