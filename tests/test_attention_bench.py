"""benchmarks/attention_bench.py on the CPU, as a user runs its smoke mode: both ways of calling
attention are timed and agree; a kernel the CPU does not have is recorded as unavailable, with why."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "attention_bench.py"
SMOKE = ["--device", "cpu", "--lengths", "32", "64", "--heads", "4", "--kv-heads", "2", "--dim", "16"]


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *argv],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=SCRIPT.parent.parent,
    )


def test_smoke_run_on_cpu(tmp_path):
    out = tmp_path / "attention.jsonl"

    done = run(*SMOKE, "--dtype", "float32", "--repeats", "2", "--out", str(out))

    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    ways = ["gqa_default", "expanded_default", "gqa_flash", "expanded_cudnn", "expanded_flash"]
    assert [(row["seq"], row["way"]) for row in rows] == [(seq, way) for seq in (32, 64) for way in ways]
    for row in rows:
        if row["way"] == "expanded_cudnn":  # cuDNN's kernel is CUDA only
            assert row["status"] == "unavailable" and "No viable backend" in row["reason"], row
            continue
        assert row["status"] == "ok" and row["ms"] > 0, row
        assert row["max_abs_diff"] < 1e-5, row  # every way computes the same attention and gradients
        assert any("scaled_dot_product" in name for name in row["kernels"]), row


def test_bad_head_counts_and_a_missing_gpu_are_named():
    uneven = run("--device", "cpu", "--heads", "5", "--kv-heads", "2")
    assert uneven.returncode == 2 and "--heads 5 must be a multiple of --kv-heads 2" in uneven.stderr
    if not torch.cuda.is_available():
        no_gpu = run("--lengths", "32")
        assert no_gpu.returncode == 2 and "pass --device cpu for a smoke run" in no_gpu.stderr
