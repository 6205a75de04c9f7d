"""QuantizationReport: what quantization did to each module, as figures, a summary line and tables."""

from __future__ import annotations

import re

import pytest
from conftest import TiedMLP, bnb_layer_names, tiny_llama
from torch import nn

from bnb_lightning.config import QuantizationConfig
from bnb_lightning.quantize import quantize_model
from bnb_lightning.report import ALREADY_QUANTIZED, CONVERTED, SKIPPED, ModuleReport, QuantizationReport
from bnb_lightning.skip import NOT_TARGETED, OUTPUT_EMBEDDINGS, TIED, USER_SKIP


def report_of(*modules: ModuleReport, bits: int = 4, dry_run: bool = False) -> QuantizationReport:
    quant_type = "nf4" if bits == 4 else None
    return QuantizationReport(bits, quant_type, "cpu", dry_run=dry_run, seconds=1.234, modules=list(modules))


UP = ModuleReport("up", "Linear", CONVERTED, "", 4096, 1088)
DOWN = ModuleReport("down", "Linear", CONVERTED, "", 4096, 1088)
HEAD = ModuleReport("head", "Linear", SKIPPED, TIED, 2048, 2048)
GATE = ModuleReport("gate", "Linear4bit", ALREADY_QUANTIZED, "", 1088, 1088)


def test_report_lists_conversions_and_reasons():
    model = tiny_llama(tie=False)
    config = QuantizationConfig(
        skip_modules=["model.layers.1.mlp"], target_modules=["q_proj", "v_proj", r"model\.layers\.\d+\.mlp"]
    )
    linear_bytes = sum(m.weight.nbytes for m in model.modules() if type(m) is nn.Linear)  # no biases
    report = quantize_model(model, config, device="cpu")

    assert report.converted == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.0.mlp.gate_proj",
        "model.layers.0.mlp.up_proj",
        "model.layers.0.mlp.down_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ]
    assert report.skipped == {
        "model.layers.0.self_attn.k_proj": NOT_TARGETED,
        "model.layers.0.self_attn.o_proj": NOT_TARGETED,
        "model.layers.1.self_attn.k_proj": NOT_TARGETED,
        "model.layers.1.self_attn.o_proj": NOT_TARGETED,
        "model.layers.1.mlp.gate_proj": USER_SKIP,
        "model.layers.1.mlp.up_proj": USER_SKIP,
        "model.layers.1.mlp.down_proj": USER_SKIP,
        "lm_head": OUTPUT_EMBEDDINGS,
    }
    assert bnb_layer_names(model) == sorted(report.converted)
    assert report.bytes_before == linear_bytes
    assert report.bytes_after < report.bytes_before

    table = str(report)
    lines = table.splitlines()
    assert lines[0].split() == ["module", "type", "action", "reason", "before", "after"]
    assert len(lines) == 2 + len(report.modules) + 1
    for module in report.modules:
        assert any(line.startswith(module.name + " ") and module.action in line for line in lines)
    assert any("lm_head" in line and OUTPUT_EMBEDDINGS in line for line in lines)
    assert lines[-1] == report.summary()
    assert lines[-1].startswith(
        "bnb_lightning: converted 7 linear layers to 4-bit nf4 on cpu, kept 8 in full precision; "
    )
    assert " KiB -> " in lines[-1]

    # compact(): one row per (action, reason, type), for logs of large models.
    compact = report.compact().splitlines()
    assert compact[0].split() == ["action", "reason", "type", "layers", "before", "after"]
    assert compact[-1] == report.summary()
    assert sorted(re.split(r"\s{2,}", row)[:4] for row in compact[2:-1]) == sorted(
        [
            ["converted", "Linear", "7", "144.00 KiB"],  # empty reason
            ["skipped", NOT_TARGETED, "Linear", "4"],
            ["skipped", USER_SKIP, "Linear", "3"],
            ["skipped", OUTPUT_EMBEDDINGS, "Linear", "1"],
        ]
    )


def test_figures_and_summary_of_a_report():
    report = report_of(UP, HEAD, DOWN, GATE)
    assert report.converted == ["up", "down"]
    assert report.skipped == {"head": TIED}
    assert report.already_quantized == ["gate"]
    assert (report.bytes_before, report.bytes_after) == (11328, 5312)
    assert report.summary() == (
        "bnb_lightning: converted 2 linear layers to 4-bit nf4 on cpu, kept 1 in full precision, "
        "1 already quantized; linear weights 11.06 KiB -> 5.19 KiB in 1.23 s"
    )


def test_a_dry_run_and_8bit_say_so_in_the_summary():
    summary = report_of(UP, HEAD, bits=8, dry_run=True).summary()
    assert summary == (
        "bnb_lightning: would convert 1 linear layers to 8-bit LLM.int8 on cpu, kept 1 in full precision; "
        "linear weights 6.00 KiB -> 3.06 KiB"
    )


@pytest.mark.parametrize(
    ("nbytes", "shown"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.00 KiB"),
        (3 * 2**20 // 2, "1.50 MiB"),
        (5 * 2**30, "5.00 GiB"),
        (3 * 2**40, "3072.00 GiB"),  # no larger unit
    ],
)
def test_sizes_in_binary_units(nbytes, shown):
    report = report_of(ModuleReport("layer", "Linear", CONVERTED, "", nbytes, 0))
    assert f"linear weights {shown} -> 0 B in" in report.summary()


def test_the_table_has_one_aligned_row_per_module():
    lines = str(report_of(UP, HEAD)).splitlines()
    assert lines == [
        "module  type    action     reason        before    after",
        "------  ------  ---------  ------------  --------  --------",
        "up      Linear  converted                4.00 KiB  1.06 KiB",
        "head    Linear  skipped    tied weights  2.00 KiB  2.00 KiB",
        report_of(UP, HEAD).summary(),
    ]


def test_the_compact_table_sums_each_action_reason_and_type():
    lines = report_of(UP, HEAD, DOWN, GATE).compact().splitlines()
    rows = [re.split(r"\s{2,}", line) for line in lines[2:-1]]
    assert rows == [
        ["converted", "Linear", "2", "8.00 KiB", "2.12 KiB"],
        ["skipped", TIED, "Linear", "1", "2.00 KiB", "2.00 KiB"],
        ["already quantized", "Linear4bit", "1", "1.06 KiB", "1.06 KiB"],
    ]


def test_a_report_from_quantize_model_adds_up_its_modules():
    model = TiedMLP()
    report = quantize_model(model, QuantizationConfig(bits=8), device="cpu")
    assert [(m.name, m.layer_type, m.action, m.reason) for m in report.modules] == [
        ("up", "Linear", CONVERTED, ""),
        ("down", "Linear", CONVERTED, ""),
        ("head", "Linear", SKIPPED, TIED),
    ]
    assert report.bytes_before == sum(m.bytes_before for m in report.modules)
    # int8 weights and a float32 scale per row, biases as they were; the tied head kept as it is.
    up, down, head = report.modules
    assert up.bytes_after == 256 * 64 + 256 * 4 + 256 * 4
    assert down.bytes_after == 64 * 256 + 64 * 4 + 64 * 4
    assert head.bytes_after == head.bytes_before == 256 * 64 * 4
    assert report.summary().startswith("bnb_lightning: converted 2 linear layers to 8-bit LLM.int8 on cpu")
