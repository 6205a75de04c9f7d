"""benchmarks/qlora_bench.py: its --smoke run measures every recipe (or says why not) on CPU, and
benchmarks/README.md's recipe table lists the recipes of the code."""

from __future__ import annotations

import gzip
import importlib.util
import json
import sys
from pathlib import Path

import pytest
from conftest import markdown_rows

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "qlora_bench.py"
README = SCRIPT.parent / "README.md"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("qlora_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    # Its dataclasses look their module up in sys.modules while the class is built.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_smoke_run_measures_every_recipe(bench, tmp_path):
    out, table_path = tmp_path / "results.jsonl", tmp_path / "results.md"

    results = bench.main(["--smoke", "--out", str(out), "--markdown", str(table_path)])

    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[0]["type"] == "environment" and lines[0]["torch"]
    rows = [line for line in lines if line["type"] == "measurement"]
    assert len(rows) == len(results)
    configurations = {(row["recipe"], row["bits"]) for row in rows}
    for recipe in bench.RECIPES:
        for bits in (None,) if recipe == "bf16_lora" else (4, 8):
            assert (recipe, bits) in configurations
    for row in rows:
        assert row["status"] in ("measured", "skipped"), row
        if row["status"] == "skipped":
            assert row["reason"]
        elif row["recipe"] != "bnb_precision":
            assert row["tokens_per_s"] > 0 and len(row["step_s"]) == 2, row
    statuses = {row["recipe"]: row["status"] for row in rows}
    assert statuses["bnb"] == statuses["bf16_lora"] == statuses["hf_prepare"] == "measured"
    assert statuses["bnb_precision"] == "skipped"  # CUDA only; --smoke runs on CPU

    table = table_path.read_text()
    for recipe in bench.RECIPES:
        assert sum(line.startswith(f"| {recipe} ") for line in table.splitlines()) == 2  # 4-bit and 8-bit
    assert "tok/s ÷ hf_prepare" in table


def test_profile_covers_extra_steps_and_keeps_timing_apart(bench, tmp_path):
    profiles = tmp_path / "profiles"
    argv = ["--smoke", "--bits", "4", "--recipes", "bnb", "hf_noupcast", "--profile", str(profiles)]
    results = bench.main([*argv, "--out", str(tmp_path / "r.jsonl"), "--markdown", str(tmp_path / "r.md")])

    assert [r.status for r in results] == ["measured", "measured"]
    assert all(len(r.step_s) == 2 for r in results)  # the profiled steps are not timed
    written = sorted(p.name for p in profiles.iterdir())
    # One table and one timeline per recipe and batch shape.
    assert written == [
        "bnb-4bit-r0-2x32.json.gz",
        "bnb-4bit-r0-2x32.txt",
        "hf_noupcast-4bit-r0-2x32.json.gz",
        "hf_noupcast-4bit-r0-2x32.txt",
    ]
    with gzip.open(profiles / "bnb-4bit-r0-2x32.json.gz") as trace:
        assert any(event.get("name") == "aten::mm" for event in json.load(trace)["traceEvents"])
    text = (profiles / "bnb-4bit-r0-2x32.txt").read_text()
    assert "cpu_time_total" in text and "aten::" in text
    assert "## by self_cpu_time_total" in text
    # LoRA r=16 on the tiny model's linears: the adapters' matmuls are found by their rank.
    adapters = next(line for line in text.splitlines() if line.startswith("adapters: "))
    assert int(adapters.split(" in ")[1].split()[0]) > 0, adapters


def readme_recipes() -> list[tuple[str, str]]:
    """(name, description) per row of the recipe table in benchmarks/README.md."""
    return markdown_rows(README, "| recipe | what it is |")


def test_readme_lists_the_recipes_of_the_code(bench):
    assert readme_recipes() == list(bench.RECIPES.items())


def test_every_recipe_has_a_runner(bench):
    assert list(bench.RUNNERS) == list(bench.RECIPES)


def test_the_memory_trace_sums_what_is_alive_at_the_peak_by_the_code_that_allocated_it(bench):
    """The allocator history is replayed to its highest point; what was freed before it does not count."""
    trace = bench.memory_trace

    def frames(*sites: tuple[str, int, str]) -> list[dict]:
        return [
            {"filename": f"/site-packages/torch/{name}", "line": 1, "name": "inner"} for name in ("a.py",)
        ] + [{"filename": filename, "line": line, "name": name} for filename, line, name in sites]

    block = frames(("/repo/modeling_llama.py", 10, "forward"))
    loss = frames(("/repo/loss.py", 5, "loss_forward"))
    events = [
        {"action": "alloc", "addr": 1, "size": 3 << 30, "frames": block},
        {"action": "alloc", "addr": 2, "size": 1 << 30, "frames": loss},
        {"action": "free_completed", "addr": 2, "size": 1 << 30, "frames": loss},
        {"action": "alloc", "addr": 3, "size": 2 << 30, "frames": block},  # the peak: 5 GiB alive
        {"action": "free_completed", "addr": 1, "size": 3 << 30, "frames": block},
        {"action": "alloc", "addr": 4, "size": 1 << 30, "frames": loss},
    ]
    text = trace.peak_breakdown({"device_traces": [events]})
    lines = text.splitlines()
    assert lines[0].startswith("alive at the peak") and "5.00 GiB in 2 blocks" in lines[0]
    assert "5.000 GiB" in lines[1] and "modeling_llama.py:10 forward" in lines[1] and len(lines) == 2
    # An out-of-memory error ends the replay there, with the request that failed.
    oom = [*events[:4], {"action": "oom", "addr": 0, "size": 4 << 30, "frames": []}, *events[4:]]
    text = trace.peak_breakdown({"device_traces": [oom]})
    assert "out-of-memory error" in text and "the failed request: 4.00 GiB" in text


def test_the_loading_benchmark_measures_both_recipes_on_a_small_checkpoint(tmp_path):
    """benchmarks/loading.py on CPU: each recipe in its own process loads a sharded bf16 checkpoint to 4-bit."""
    import subprocess

    import torch
    from conftest import tiny_llama

    tiny_llama(dtype=torch.bfloat16).save_pretrained(tmp_path / "model", max_shard_size="40KB")
    script = SCRIPT.parent / "loading.py"
    out = tmp_path / "loading.jsonl"
    command = [
        sys.executable,
        str(script),
        "--model-dir",
        str(tmp_path / "model"),
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {row["recipe"]: row for row in map(json.loads, out.read_text().splitlines())}
    assert rows.keys() == {"bnb_lightning", "transformers"}
    for row in rows.values():
        assert row["seconds"] > 0 and row["quantized_layers"] == 14 and row["files"] > 1
        assert row["peak_rss_bytes"] >= row["rss_after_imports_bytes"] > 0
        assert row["warmed_up"]  # the process's first-use costs are paid before the timer starts
    assert "Time, bnb_lightning ÷ transformers" in result.stdout
