"""The README's code runs as written, so its examples cannot rot.

Every ```python block runs, in order, in one namespace (the README reads top to bottom: later blocks
use the imports, the module and the callback of earlier ones), in a temporary directory, on the CPU.
The substitutions, each required to be found:

- ``"path/to/model"`` is a tiny random Llama saved with ``save_pretrained`` (hidden size 64, 2
  layers, 256-token vocabulary, tied lm_head): the README's blocks load it with ``from_pretrained``.
- ``"cuda"`` is ``"cpu"``: this suite runs without a GPU.
- ``max_steps=1000`` is ``max_steps=4`` (and 8 where the checkpoint block runs again, to resume).
- ``loader``, "batches of token ids" in the README, is given: a DataLoader of random token blocks.

The YAML blocks of the callback replace the callbacks of ``examples/cli_config.yaml`` and are parsed
by ``examples/cli.py``'s LightningCLI (without training); a block that is a bare list is the
``trainer.callbacks`` list. The README must stay under 220 lines: a guide, not a lab notebook.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
import yaml
from conftest import tiny_llama
from peft.tuners.lora import LoraLayer
from torch.utils.data import DataLoader

from bnb_lightning import BnbQuantization

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()
EXAMPLES = ROOT / "examples"


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def substituted(code: str, model_dir: Path, max_steps: int = 4) -> str:
    replacements = {
        '"path/to/model"': repr(str(model_dir)),
        '"cuda"': '"cpu"',
        "max_steps=1000": f"max_steps={max_steps}",
    }
    for old, new in replacements.items():
        code = code.replace(old, new)
    return code


def test_substitutions_apply_to_the_readme():
    code = "\n".join(blocks("python"))
    for text in ('"path/to/model"', '"cuda"', "max_steps=1000", "loader", 'ckpt_path="last"'):
        assert text in code, f"the README no longer contains {text!r}: update this test's substitutions"
    assert len(README.splitlines()) < 220


@pytest.fixture(scope="module")
def readme(tmp_path_factory):
    """Runs every Python block of the README in order; returns the namespace after each."""
    work = tmp_path_factory.mktemp("readme")
    model_dir = work / "tiny-llama"
    tiny_llama().save_pretrained(model_dir)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (16, 32), generator=generator)
    namespace: dict = {"__name__": "readme", "loader": DataLoader(tokens, batch_size=4)}
    after: list[dict] = []
    cwd = os.getcwd()
    os.chdir(work)
    try:
        for index, code in enumerate(blocks("python")):
            exec(compile(substituted(code, model_dir), f"README.md python block {index}", "exec"), namespace)
            after.append(dict(namespace))
        # The checkpoint block once more, as a later run would: it resumes from checkpoints/last.ckpt.
        (checkpoint_block,) = [code for code in blocks("python") if 'ckpt_path="last"' in code]
        resumed = dict(namespace)
        exec(compile(substituted(checkpoint_block, model_dir, max_steps=8), "README.md", "exec"), resumed)
    finally:
        os.chdir(cwd)
    return {"after": after, "dir": work, "resumed": resumed}


def adapters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for name, p in model.named_parameters() if "lora_" in name]


def test_every_python_block_runs(readme):
    assert len(readme["after"]) == len(blocks("python")) == 4


def test_trainer_quick_start_trains_the_adapters_on_a_4bit_base(readme):
    namespace = readme["after"][0]
    module, trainer = namespace["module"], namespace["trainer"]
    assert trainer.global_step == 4
    model = module.model
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert len(layers) == 14 and all(isinstance(m.get_base_layer(), bnb.nn.Linear4bit) for m in layers)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert {p.dtype for p in module.parameters() if p.requires_grad} == {torch.float32}  # bf16-mixed
    assert model.is_gradient_checkpointing


def test_fabric_quick_start_prepares_the_model(readme):
    namespace = readme["after"][1]
    prepared = namespace["prepared"]
    assert len(prepared.report.converted) == 14 and prepared.checkpointing
    assert namespace["optimizer"].param_groups[0]["params"]
    assert {p.dtype for p in adapters(namespace["model"])} == {torch.float32}


def test_checkpoints_are_adapter_only_and_resume(readme):
    first, resumed = readme["after"][2]["trainer"], readme["resumed"]["trainer"]
    assert first.global_step == 4 and first.ckpt_path is None  # nothing to resume from yet
    assert resumed.ckpt_path == str(readme["dir"] / "checkpoints" / "last.ckpt")
    assert resumed.global_step == 8
    checkpoint = torch.load(readme["dir"] / "checkpoints" / "last.ckpt", weights_only=False)
    assert checkpoint["global_step"] == 8
    assert checkpoint["state_dict"] and all("lora_" in key for key in checkpoint["state_dict"])
    assert checkpoint["callbacks"]["BnbQuantization"]["adapter_only"]


def test_exports_are_written(readme):
    namespace, work = readme["after"][3], readme["dir"]
    assert (work / "my-adapters" / "adapter_model.safetensors").is_file()
    assert (work / "merged" / "config.json").is_file()
    assert (work / "quantized.safetensors").is_file()
    assert namespace["result"].max_abs_diff < float("inf")
    reloaded = adapters(namespace["base"])
    assert reloaded and all(
        torch.equal(a, b) for a, b in zip(reloaded, adapters(namespace["module"].model), strict=True)
    )


@pytest.fixture
def cli(monkeypatch):
    pytest.importorskip("jsonargparse", reason="LightningCLI needs the 'cli' extra (jsonargparse)")
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.setattr(sys, "argv", ["cli.py"])
    import cli

    return cli


def _callback_from(cli, config: dict, path: Path) -> BnbQuantization:
    path.write_text(yaml.safe_dump(config))
    run = cli.QLoRACLI(cli.CausalLM, cli.TextDataModule, args=["--config", str(path)], run=False)
    (callback,) = [c for c in run.trainer.callbacks if isinstance(c, BnbQuantization)]
    return callback


def test_cli_snippets_build_the_callback_nested_and_flat(cli, tmp_path):
    """Each snippet replaces the callbacks of examples/cli_config.yaml; the nested one builds the
    same callback as that file."""
    snippets = [block for block in blocks("yaml") if "bnb_lightning.BnbQuantization" in block]
    assert len(snippets) == 2
    shipped = yaml.safe_load((EXAMPLES / "cli_config.yaml").read_text())
    shipped["trainer"]["default_root_dir"] = str(tmp_path)
    built = [_callback_from(cli, shipped, tmp_path / "shipped.yaml")]
    for index, snippet in enumerate(snippets):
        callbacks = yaml.safe_load(snippet)
        config = dict(shipped, trainer=dict(shipped["trainer"]))
        config["trainer"]["callbacks"] = (
            callbacks if isinstance(callbacks, list) else callbacks["trainer"]["callbacks"]
        )
        built.append(_callback_from(cli, config, tmp_path / f"readme-{index}.yaml"))
    reference, nested, flat = built
    assert nested.config == reference.config and nested.options == reference.options
    lora = ("r", "lora_alpha", "lora_dropout", "target_modules")
    assert [getattr(nested.peft_config, f) for f in lora] == [getattr(reference.peft_config, f) for f in lora]
    assert (nested.options.chunked_loss, nested.options.activation_memory) == (True, "auto")
    assert flat.config.bits == 4 and flat.peft_config is None
    assert (flat.options.chunked_loss, flat.options.activation_memory) == (True, 24 * 10**9)
