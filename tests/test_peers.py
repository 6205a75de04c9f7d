"""benchmarks/peers.py on the CPU (--dry-cpu): each recipe that installs here trains in its own child
process, climbs the long-context ladder until a length runs out of memory and stops there; the peers
that are not installed (or need a GPU) are recorded as skipped, not run."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
from conftest import markdown_rows

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "peers.py"
INSTALLED = ["bnb_lightning", "bnb_offload", "hf_noupcast"]
PEERS = ["unsloth", "liger"]
# A length whose batch of token ids alone (int64, 8 PiB) no machine can hold: the child asks torch for
# it and the CPU allocator refuses, a real out of memory at that length. The next length is longer.
TOO_LONG = 2**50
LENGTHS = [32, 64, TOO_LONG, 2 * TOO_LONG]
# What a recipe trains with (its adapters' dtype, the rest's, autocast's) under each --precision.
BF16_TRUE = {"adapters": "bfloat16", "frozen": "bfloat16", "autocast": None}
BF16_MIXED = {"adapters": "float32", "frozen": "bfloat16", "autocast": "bfloat16"}


@pytest.fixture(scope="module")
def peers():
    spec = importlib.util.spec_from_file_location("peers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("peers")


def run(peers, folder: Path, name: str, *argv: str) -> tuple[list[dict], Path, str]:
    """``peers.py --dry-cpu ARGV``, its model shared by the runs of this module: records, --out, table."""
    out, table = folder / f"{name}.jsonl", folder / f"{name}.md"
    model = ["--model-dir", str(folder / "model"), "--out", str(out), "--markdown", str(table)]
    records = peers.main(["--dry-cpu", *argv, *model])
    return records, out, table.read_text()


@pytest.fixture(scope="module")
def ladder(peers, folder):
    lengths = [str(n) for n in LENGTHS]
    return run(
        peers, folder, "ladder", "--long-context", "--recipes", *INSTALLED, *PEERS, "--lengths", *lengths
    )


def by_recipe(records: list[dict]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for record in records:
        grouped.setdefault(record["recipe"], []).append(record)
    return grouped


def test_ladder_trains_until_out_of_memory_then_stops(ladder):
    records, out, _ = ladder

    assert [json.loads(line) for line in out.read_text().splitlines()] == records
    grouped = by_recipe(records)
    assert list(grouped) == INSTALLED + PEERS
    for recipe in INSTALLED:
        rows = grouped[recipe]
        assert [(r["seq"], r["status"]) for r in rows] == [
            (32, "ok"),
            (64, "ok"),
            (TOO_LONG, "oom"),
            (2 * TOO_LONG, "skipped"),
        ], rows
        for row in rows[:2]:
            assert row["batch"] == 1 and row["mode"] == "long_context" and row["lora_r"] == 32
            assert row["tokens_per_s"] > 0 and len(row["step_s"]) == 1 and math.isfinite(row["final_loss"])
            assert row["gpu"] == "cpu" and row["versions"]["torch"] and row["versions"]["bitsandbytes"]
            assert "train_peak_bytes" in row  # None on the CPU
            # The default --precision: the bnb recipes in bfloat16 without autocast; PEFT's float32
            # adapters under bf16 autocast, as before the flag.
            assert row["precision"] == "bf16-true"
            assert row["numerics"] == (BF16_MIXED if recipe == "hf_noupcast" else BF16_TRUE), row
        assert "can't allocate memory" in rows[2]["reason"], rows[2]
        assert rows[3]["reason"] == f"not tried: seq {TOO_LONG} ended oom"


def test_a_recipe_stops_climbing_at_its_first_out_of_memory(ladder, folder):
    """The child itself stopped: its log has results for the lengths up to the failing one, none after."""
    logs = sorted((folder / "ladder_logs").glob("*_bnb_offload_0.log"))
    assert len(logs) == 1
    results = [
        json.loads(line[7:]) for line in logs[0].read_text().splitlines() if line.startswith("RESULT ")
    ]
    assert [r["seq"] for r in results] == [32, 64, TOO_LONG]


@pytest.mark.parametrize("recipe, module", [("unsloth", "unsloth"), ("liger", "liger_kernel")])
def test_peers_not_installed_are_skipped_not_run(ladder, folder, recipe, module):
    records, _, table = ladder
    expected = (
        "not installed: " + module if importlib.util.find_spec(module) is None else "needs a CUDA device"
    )

    rows = by_recipe(records)[recipe]
    assert [r["seq"] for r in rows] == LENGTHS
    assert all(r["status"] == "skipped" and expected in r["reason"] for r in rows), rows
    assert not list((folder / "ladder_logs").glob(f"*_{recipe}_*.log"))  # no child started
    assert f"| {recipe} | – | – | – | skipped: " in table


def test_ladder_table_gives_the_longest_length_and_each_length(ladder):
    _, _, table = ladder

    assert "long context, batch 1, no memory cap, LoRA r 32, 1 warm-up + 1 timed step per length" in table
    for recipe in INSTALLED:
        assert f"| {recipe} | 64 | " in table
        assert f"| {TOO_LONG:,}: out of memory |" in table
    assert "| seq | " + " | ".join(INSTALLED + PEERS) + " |" in table
    row_64 = next(line for line in table.splitlines() if line.startswith("| 64 |"))
    assert row_64.count(" tok/s, ") == len(INSTALLED)
    row_too_long = next(line for line in table.splitlines() if line.startswith(f"| {TOO_LONG:,} |"))
    assert row_too_long.count("out of memory") == len(INSTALLED)


def test_throughput_mode_measures_and_compares_under_bf16_mixed(peers, folder, ladder):
    """Also --precision bf16-mixed: the bnb recipes under Trainer(precision="bf16-mixed") (on the
    CPU, bf16 autocast is torch.autocast("cpu")) train float32 adapters on the bfloat16 base, as the
    transformers + PEFT recipe does under either flag (the ladder's hf_noupcast)."""
    trained = ["bnb_lightning", "bnb_offload"]
    records, _, table = run(
        peers, folder, "speed", "--precision", "bf16-mixed", "--recipes", *trained, "unsloth"
    )

    grouped = by_recipe(records)
    assert [r["recipe"] for r in records if r["recipe"] != "unsloth"] == trained
    assert {r["precision"] for r in records} == {"bf16-mixed"}
    for recipe in trained:
        (row,) = grouped[recipe]
        assert row["status"] == "ok" and row["mode"] == "throughput", row
        assert (row["seq"], row["batch"], row["repeat"]) == (32, 2, 0)
        assert row["tokens_per_s"] > 0 and math.isfinite(row["final_loss"]) and row["load_s"] > 0
        assert row["numerics"] == BF16_MIXED, row
    assert grouped["unsloth"][0]["status"] == "skipped"
    assert "| recipe | status | tok/s | train peak GiB | load s | tok/s ÷ bnb_lightning |" in table
    assert "| bnb_lightning | 1 of 1 ok | " in table and " | 1.00× |" in table
    assert "\n- precision: `bf16-mixed`\n" in table
    assert (
        "\n- trained with float32 adapters, bfloat16 rest of the base, bfloat16 autocast: "
        "bnb_lightning, bnb_offload\n"
    ) in table


def test_report_prints_the_tables_of_earlier_runs(peers, ladder, capsys):
    records, out, table = ladder
    capsys.readouterr()

    assert peers.main(["--report", str(out)]) == records
    assert capsys.readouterr().out.strip() == table.strip()


def test_report_reads_runs_made_before_the_precision_flag(peers, ladder, tmp_path, capsys):
    records, out, table = ladder
    old = tmp_path / "old.jsonl"
    old.write_text(
        "".join(
            json.dumps({k: v for k, v in r.items() if k not in ("precision", "numerics")}) + "\n"
            for r in records
        )
    )
    capsys.readouterr()

    peers.main(["--report", str(old)])

    printed = capsys.readouterr().out
    assert "\n- precision: not recorded (runs before `--precision`: `bf16-true`)\n" in printed
    assert "trained with" not in printed
    new_only = ("- precision: ", "- trained with ")
    assert [line for line in printed.strip().splitlines() if not line.startswith(new_only)] == [
        line for line in table.strip().splitlines() if not line.startswith(new_only)
    ]


def test_precision_defaults_to_bf16_true_and_takes_bf16_mixed(peers, capsys):
    assert peers.parse_args([]).precision == "bf16-true"
    assert peers.parse_args(["--precision", "bf16-mixed"]).precision == "bf16-mixed"
    with pytest.raises(SystemExit):
        peers.parse_args(["--precision", "16-mixed"])
    assert "invalid choice" in capsys.readouterr().err


def test_a_child_that_dies_mid_ladder_leaves_an_error_then_skips(peers):
    args = peers.parse_args(["--long-context", "--lengths", "8", "16", "32", "64"])
    results = [{"recipe": "unsloth", "seq": 8, "batch": 1, "outcome": "ok", "tokens_per_s": 1.0}]

    records = peers.ladder_records(args, "unsloth", results, "killed after 560 s")

    assert [(r["seq"], r["status"], r.get("reason")) for r in records] == [
        (8, "ok", None),
        (16, "error", "killed after 560 s"),
        (32, "skipped", "not tried: seq 16 ended error"),
        (64, "skipped", "not tried: seq 16 ended error"),
    ]


def test_readme_lists_the_recipes_of_the_code(peers):
    rows = markdown_rows(SCRIPT.parent / "README.md", "| peers.py recipe | what it is |")
    assert rows == list(peers.RECIPES.items())


def test_profile_writes_one_table_file_per_recipe_and_length(peers, folder):
    """--profile: 2 steps after the timed ones of each length, profiled; the timed steps stay apart."""
    profiles = folder / "profiles"
    records, _, _ = run(
        peers,
        folder,
        "profiled",
        "--long-context",
        "--recipes",
        "bnb_lightning",
        "--lengths",
        "32",
        "64",
        "--profile",
        str(profiles),
    )

    assert [(r["seq"], r["status"]) for r in records] == [(32, "ok"), (64, "ok")]
    assert all(len(r["step_s"]) == 1 for r in records)  # --lc-steps 1: the profiled steps are not timed
    assert sorted(p.name for p in profiles.iterdir() if p.suffix == ".txt") == [
        "bnb-4bit-r0-1x32.txt",
        "bnb-4bit-r0-1x64.txt",
    ]
    text = (profiles / "bnb-4bit-r0-1x64.txt").read_text()
    assert text.startswith("# bnb-4bit-r0-1x64: 2 training steps") and "## by self_cpu_time_total" in text


def test_a_budget_is_shared_among_the_runs_still_to_start(peers):
    """--budget-s: the first of three runs may take a third of what is left, not all of it; the last
    one what remains; --child-timeout-s still caps each; no budget, the timeout alone."""
    assert peers.child_seconds(300.0, 3, 900.0) == 100.0
    assert peers.child_seconds(250.0, 1, 900.0) == 250.0
    assert peers.child_seconds(300.0, 2, 60.0) == 60.0
    assert peers.child_seconds(None, 3, 900.0) == 900.0
    assert peers.child_seconds(40.0, 0, 900.0) == 40.0
