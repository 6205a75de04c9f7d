"""The README's code runs as written, so its examples cannot rot."""

from __future__ import annotations

import re
from pathlib import Path

import bitsandbytes as bnb
import yaml

README = (Path(__file__).parents[1] / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_functional_core_example_runs():
    (code,) = [block for block in blocks("python") if "quantize_model(model" in block]
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    model = namespace["model"]
    assert isinstance(model.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    assert namespace["report"].skipped == {"lm_head": "tied weights"}


def test_trainer_example_builds_the_trainer():
    (code,) = [block for block in blocks("python") if "Trainer(\n    precision=" in block]
    setup = code.split("trainer.fit(")[0]
    namespace: dict = {}
    exec(compile(setup, "README.md", "exec"), namespace)
    (callback,) = [c for c in namespace["trainer"].callbacks if type(c).__name__ == "BnbQuantization"]
    assert callback.config.bits == 4 and callback.peft_config.r == 16


def test_cli_snippet_matches_the_shipped_config():
    (snippet,) = [block for block in blocks("yaml") if "bnb_lightning.BnbQuantization" in block]
    shipped = yaml.safe_load((Path(__file__).parents[1] / "examples" / "cli_config.yaml").read_text())
    callbacks = shipped["trainer"]["callbacks"]
    assert yaml.safe_load(snippet)["trainer"]["callbacks"][0] in callbacks


def test_prepare_model_example_runs():
    (code,) = [block for block in blocks("python") if "prepare_model(\n" in block]
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    prepared = namespace["prepared"]
    assert len(prepared.report.converted) == 14 and prepared.checkpointing
    assert prepared.adapters is namespace["model"]
    assert namespace["optimizer"].param_groups[0]["params"]
