"""benchmarks/loss_bench.py on the CPU (--smoke --device cpu), as a user runs it: the chunked loss and
torch's reference are measured and agree; Liger and cut-cross-entropy, CUDA only, are recorded as
skipped with the reason; the Markdown table has a row per (impl, length)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "loss_bench.py"
IMPLS = ["bnb", "torch", "liger", "cce"]
TOKENS = [64, 128]


def test_smoke_run_on_cpu(tmp_path):
    out, table_path = tmp_path / "loss.jsonl", tmp_path / "loss.md"
    argv = ["--smoke", "--device", "cpu", "--out", str(out), "--markdown", str(table_path)]

    subprocess.run([sys.executable, str(SCRIPT), *argv], check=True, timeout=120, cwd=SCRIPT.parent.parent)

    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(row["impl"], row["tokens"]) for row in rows] == [(i, t) for t in TOKENS for i in IMPLS]
    by_key = {(row["impl"], row["tokens"]): row for row in rows}
    for tokens in TOKENS:
        bnb, reference = by_key["bnb", tokens], by_key["torch", tokens]
        for row in (bnb, reference):
            assert row["status"] == "ok", row
            assert row["ms"] > 0 and len(row["step_ms"]) == 2
            assert row["hidden_size"] == 64 and row["vocab_size"] == 512 and not row["train_head"]
            assert row["device"] == "cpu" and row["torch"] and "command" in row
        # Uniform predictions over 512 classes: a loss near log(512) = 6.24.
        assert 5.5 < bnb["loss"] < 7
        assert abs(bnb["loss"] - reference["loss"]) < 1e-5
        assert reference["loss_diff_bnb"] == bnb["loss_diff_torch"] < 1e-5
        assert bnb["grad_hidden_rel_diff_torch"] < 1e-2 and bnb["grad_hidden_diff_torch"] < 1e-4
        for impl in ("liger", "cce"):
            row = by_key[impl, tokens]
            assert row["status"] == "skipped" and "CUDA" in row["reason"], row
            assert "ms" not in row
            assert row["loss_diff_bnb"] is None

    table = table_path.read_text()
    assert "| tokens | impl | status | ms | ms ÷ bnb | peak MiB | peak ÷ bnb |" in table
    for tokens in TOKENS:
        for impl in IMPLS:
            assert sum(line.startswith(f"| {tokens} | {impl} |") for line in table.splitlines()) == 1
        assert f"| {tokens} | bnb | ok |" in table and f"| {tokens} | liger | skipped |" in table
    assert "liger at 64, 128 tokens, skipped: liger needs a CUDA device" in table


def test_lengths_and_steps_below_one_are_refused():
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--device", "cpu", "--tokens", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "--tokens and --steps must be at least 1" in done.stderr
