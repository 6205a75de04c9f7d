"""benchmarks/multi_gpu.py --weights: DDP and FSDP2 on 2 CPU processes train a model built on the meta
device and filled from a make_checkpoint.py directory (bfloat16 and pre-quantized NF4) while quantizing."""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"
FORMATS = {"bf16": "16", "nf4": "4"}  # name -> make_checkpoint.py --bits
STEPS = 4


def clean_env() -> dict[str, str]:
    """This environment without a launched rank's settings (see test_distributed.clean_env)."""
    launch = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")
    return {k: v for k, v in os.environ.items() if k not in launch and not k.startswith("LOCAL_WORLD")}


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=clean_env(),
    )


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """The tiny shape in bfloat16 and in NF4, in shards of 30 kB (several files and an index), by the CLI."""
    root = tmp_path_factory.mktemp("checkpoints")
    for name, bits in FORMATS.items():
        options = ["--shape", "tiny", "--bits", bits, "--device", "cpu", "--max-shard-gb", "0.00003"]
        done = run("make_checkpoint.py", *options, "--out", str(root / name))
        assert done.returncode == 0, done.stderr[-4000:]
        assert (root / name / "model.safetensors.index.json").is_file()
    return {name: root / name for name in FORMATS}


@pytest.fixture(scope="module")
def rows(checkpoints, tmp_path_factory) -> dict[str, dict[str, dict]]:
    """format -> strategy -> its JSON line, from one run of the three strategies per checkpoint."""
    found = {}
    for name, directory in checkpoints.items():
        out = tmp_path_factory.mktemp("results") / "multi_gpu.jsonl"
        options = ["--accelerator", "cpu", "--devices", "2", "--strategies", "ddp", "fsdp", "fsdp2"]
        options += ["--weights", str(directory), "--repeat-batch", "--cap-gb", "24"]
        if name == "nf4":  # what the 70B run takes: FSDP2's shards and the blocks' inputs in CPU memory
            options += ["--offload-params", "--activation-memory", "offload"]
        done = run("multi_gpu.py", *options, "--steps", str(STEPS), "--warmup", "1", "--out", str(out))
        assert done.returncode == 0, done.stderr[-4000:]
        found[name] = {row["strategy"]: row for row in map(json.loads, out.read_text().splitlines())}
        # The same lines on stdout, one per strategy.
        assert [json.loads(line) for line in done.stdout.splitlines()] == list(found[name].values())
    return found


@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_trains_from_the_checkpoint_and_resumes(rows, checkpoints, name, strategy):
    row = rows[name][strategy]
    assert row["status"] == "measured", row
    assert row["weights"] == str(checkpoints[name])
    assert row["weights_format"] == {"bf16": "bf16", "nf4": "nf4-dq"}[name]
    assert row["shape"] == "tiny"  # from the checkpoint's config.json
    assert row["cap_gb"] == 24.0 and row["memory_fraction"] == [None, None]  # no cap on the CPU
    assert row["repeat_batch"] and row["steps"] == STEPS
    assert row["offload_params"] is (name == "nf4" and strategy == "fsdp2")
    assert row["activation_memory"] == ("offload" if name == "nf4" else None)

    # The same sequence on every step (each rank its own): every rank's loss falls, step after step.
    assert len(row["losses_per_rank"]) == 2 and row["losses"] == row["losses_per_rank"][0]
    for losses in row["losses_per_rank"]:
        assert len(losses) == STEPS and all(math.isfinite(x) for x in losses)
        assert all(later < earlier for earlier, later in zip(losses, losses[1:], strict=False)), losses
    assert row["losses_per_rank"][0] != row["losses_per_rank"][1]  # each rank its own sequence
    assert row["loss_falling"] is True

    # Resumed from the adapter-only checkpoint (base loaded from --weights again): training went on.
    assert row["resumed"] and row["checkpoint_written_once"] and row["adapters_equal"]
    assert row["resumed_loss_below_first"] is True
    for resumed, losses in zip(row["resumed_losses"], row["losses_per_rank"], strict=True):
        assert len(resumed) == 2 and resumed[0] < losses[-1]

    # Per-rank figures, gathered from both ranks.
    for key in ("host_peak_gib", "host_peak_fit_gib", "setup_s", "tokens_per_s_per_device"):
        assert len(row[key]) == 2 and all(value > 0 for value in row[key]), (key, row[key])
    assert all(
        fit <= whole < 64 for fit, whole in zip(row["host_peak_fit_gib"], row["host_peak_gib"], strict=True)
    )
    # The process's own memory: part of its RSS (which also counts mapped files' pages).
    assert all(
        0 < setup <= private <= whole
        for setup, private, whole in zip(
            row["host_private_setup_gib"], row["host_private_peak_gib"], row["host_peak_gib"], strict=True
        )
    )
    assert row["base_bytes_per_device"] == [row["base_bytes_expected"]] * 2


def test_the_formats_and_strategies_train_the_same_model(rows):
    """The NF4 checkpoint holds the quantization of the bf16 one (same seed): the same losses from
    either, under either strategy; weights left random (or on meta) could not give that."""
    reference = rows["bf16"]["ddp"]["losses_per_rank"]
    for name in FORMATS:
        for strategy in ("ddp", "fsdp2"):
            for got, expected in zip(rows[name][strategy]["losses_per_rank"], reference, strict=True):
                assert got == pytest.approx(expected, abs=1e-3), (name, strategy)
    assert rows["nf4"]["fsdp2"]["base_bytes_total"] == rows["bf16"]["ddp"]["base_bytes_total"]


def test_fsdp_is_skipped_with_the_reason(rows, checkpoints):
    # torch's FSDP keeps 4-bit weights as bfloat16; a pre-quantized (uint8) checkpoint is refused whatever the device.
    nf4 = rows["nf4"]["fsdp"]
    assert nf4["status"] == "skipped" and nf4["weights"] == str(checkpoints["nf4"])
    assert "pre-quantized checkpoint (uint8)" in nf4["reason"]
    assert rows["bf16"]["fsdp"] == {
        "strategy": "fsdp",
        "status": "skipped",
        "reason": "torch's FSDP needs a GPU",
    }


@pytest.fixture(scope="module")
def multi_gpu():
    spec = importlib.util.spec_from_file_location("multi_gpu_under_test", BENCHMARKS / "multi_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shape_comes_from_the_checkpoint(multi_gpu, checkpoints, capsys):
    args = multi_gpu.parse_args(["--weights", str(checkpoints["nf4"])])
    assert (args.shape, args.weights_format) == ("tiny", "nf4-dq")
    assert multi_gpu.parse_args(["--weights", str(checkpoints["bf16"]), "--shape", "tiny"]).shape == "tiny"
    assert multi_gpu.parse_args([]).shape == "1b"  # without --weights, as before
    with pytest.raises(SystemExit):
        multi_gpu.parse_args(["--weights", str(checkpoints["bf16"]), "--shape", "70b"])
    assert "--shape 70b but --weights" in capsys.readouterr().err


def test_refuses_a_checkpoint_it_cannot_train(multi_gpu, tmp_path):
    done = run(
        "make_checkpoint.py",
        "--shape",
        "tiny",
        "--bits",
        "8",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "int8"),
    )
    assert done.returncode == 0, done.stderr[-4000:]
    with pytest.raises(SystemExit, match="NF4 with double quantization"):
        multi_gpu.parse_args(["--weights", str(tmp_path / "int8")])


def test_a_missing_checkpoint_is_named_before_any_rank_starts(multi_gpu, tmp_path, capsys):
    with pytest.raises(SystemExit):
        multi_gpu.parse_args(["--weights", str(tmp_path / "missing")])
    error = capsys.readouterr().err
    assert "--weights: weights=" in error and "does not exist" in error


def test_a_failed_run_still_gives_its_row(checkpoints, tmp_path):
    """A checkpoint that does not fit the model fails on every rank: the row says so, with each rank's
    error and what it reached, and the command ends (no rank is left waiting for the others)."""
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(checkpoints["nf4"], broken)
    key = "model.layers.1.mlp.down_proj.weight"
    shard = broken / json.loads((broken / "model.safetensors.index.json").read_text())["weight_map"][key]
    tensors = load_file(shard)
    tensors[key] = tensors[key][: tensors[key].numel() // 2].clone()  # half the packed bytes
    save_file(tensors, shard, metadata={"format": "pt"})

    out = tmp_path / "multi_gpu.jsonl"
    options = ["--accelerator", "cpu", "--devices", "2", "--strategies", "ddp", "--weights", str(broken)]
    done = run("multi_gpu.py", *options, "--steps", "2", "--warmup", "1", "--out", str(out))
    assert done.returncode == 0, done.stderr[-4000:]
    (row,) = map(json.loads, out.read_text().splitlines())
    assert row["status"] == "failed" and row["returncode"] != 0
    assert len(row["rank_errors"]) == 2
    assert all(error.startswith("CheckpointError") and key in error for error in row["rank_errors"])
    assert all(peak > 0 for peak in row["host_peak_gib"]) and row["losses_per_rank"] == [None, None]
    assert not (row["resumed"] or row["adapters_equal"] or row["loss_falling"])


def test_profile_writes_each_ranks_tables_and_timeline(checkpoints, tmp_path):
    out, profiles = tmp_path / "multi_gpu.jsonl", tmp_path / "profiles"
    options = [
        "--accelerator",
        "cpu",
        "--devices",
        "2",
        "--strategies",
        "ddp",
        "--weights",
        str(checkpoints["bf16"]),
    ]
    options += ["--profile", str(profiles)]
    done = run("multi_gpu.py", *options, "--steps", "3", "--warmup", "1", "--out", str(out))
    assert done.returncode == 0, done.stderr[-4000:]
    (row,) = map(json.loads, out.read_text().splitlines())
    assert row["status"] == "measured"
    written = sorted(p.name for p in profiles.iterdir())
    assert len(written) == 4 and [name.rpartition("-")[2] for name in written] == [
        "rank0.json.gz",
        "rank0.txt",
        "rank1.json.gz",
        "rank1.txt",
    ]
    with gzip.open(profiles / written[0]) as trace:
        assert json.load(trace)["traceEvents"]
