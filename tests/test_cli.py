"""examples/cli.py with examples/cli_config.yaml: jsonargparse builds the callback from YAML."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import bitsandbytes as bnb
import pytest
import yaml
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from torch import nn

from bnb_lightning import BnbQuantization

pytest.importorskip("jsonargparse", reason="LightningCLI needs the 'cli' extra (jsonargparse)")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CONFIG = EXAMPLES / "cli_config.yaml"


@pytest.fixture
def cli(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    # LightningCLI warns when it is given args while sys.argv holds pytest's own arguments.
    monkeypatch.setattr(sys, "argv", ["cli.py"])
    import cli

    return cli


def _callback_args(config: dict) -> dict:
    (callback,) = config["trainer"]["callbacks"]
    assert callback["class_path"] == "bnb_lightning.BnbQuantization"
    return callback["init_args"]


def test_yaml_config_builds_the_callback_and_quantizes(cli, tmp_path):
    expected = _callback_args(yaml.safe_load(CONFIG.read_text()))

    run = cli.main(
        ["fit", "--config", str(CONFIG), "--trainer.max_steps=3", f"--trainer.default_root_dir={tmp_path}"]
    )

    (callback,) = [c for c in run.trainer.callbacks if isinstance(c, BnbQuantization)]
    assert callback.config.bits == expected["config"]["bits"] == 4
    assert callback.config.quant_type == expected["config"]["quant_type"] == "nf4"
    assert isinstance(callback.peft_config, LoraConfig)
    assert callback.peft_config.r == expected["peft_config"]["init_args"]["r"]
    # PEFT rewrites target_modules="all-linear" in place into the layer names it chose, so the
    # YAML's choice is checked on the model: every quantized layer carries an adapter, the lm_head none.
    model = run.model.model
    adapted = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert len(adapted) == len(callback.report.converted) == 14
    assert all(isinstance(m.get_base_layer(), bnb.nn.Linear4bit) for m in adapted)
    assert type(model.lm_head) is nn.Linear
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert run.trainer.global_step == 3


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("bits", 3, "bits=3 is not supported"),
        ("quant_type", "nf8", "quant_type='nf8' is not supported"),
        ("compute_dtype", "float64", "compute_dtype='float64' is not a dtype name"),
    ],
)
def test_bad_value_in_yaml_names_the_field(cli, tmp_path, field, value, message):
    config = yaml.safe_load(CONFIG.read_text())
    _callback_args(config)["config"][field] = value
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))

    # jsonargparse builds the QuantizationConfig when it instantiates the callback, so its own
    # ValueError comes out, inside jsonargparse's report of the union types it tried.
    with pytest.raises(ValueError, match=re.escape(message)):
        cli.main(["fit", "--config", str(bad), f"--trainer.default_root_dir={tmp_path}"])


def test_training_options_in_yaml_nested_or_flat(cli, tmp_path):
    config = yaml.safe_load(CONFIG.read_text())
    callback_args = _callback_args(config)
    assert callback_args["options"]["chunked_loss"] is True
    callback_args["options"] = {"chunked_loss": False, "gradient_checkpointing": True}
    nested = tmp_path / "nested.yaml"
    nested.write_text(yaml.safe_dump(config))
    flat_config = yaml.safe_load(CONFIG.read_text())
    flat_args = _callback_args(flat_config)
    flat_args.pop("options")
    flat_args.update(chunked_loss=False, gradient_checkpointing=True)
    flat = tmp_path / "flat.yaml"
    flat.write_text(yaml.safe_dump(flat_config))

    built = []
    for path in (nested, flat):
        run = cli.main(
            ["fit", "--config", str(path), "--trainer.max_steps=1", f"--trainer.default_root_dir={tmp_path}"]
        )
        (callback,) = [c for c in run.trainer.callbacks if isinstance(c, BnbQuantization)]
        built.append(callback.options)
        assert run.model.model.is_gradient_checkpointing
    assert built[0] == built[1]
    assert (built[0].chunked_loss, built[0].gradient_checkpointing) == (False, True)


@pytest.mark.parametrize("memory", ["24GB", ["recompute", "keep"], "offload"])
def test_activation_memory_in_yaml_nested_or_flat(cli, tmp_path, memory):
    built = []
    for form in ("nested", "flat"):
        config = yaml.safe_load(CONFIG.read_text())
        callback_args = _callback_args(config)
        if form == "nested":
            callback_args["options"] = {"activation_memory": memory}
        else:
            callback_args.pop("options")
            callback_args["activation_memory"] = memory
        path = tmp_path / f"{form}.yaml"
        path.write_text(yaml.safe_dump(config))
        run = cli.main(
            ["fit", "--config", str(path), "--trainer.max_steps=1", f"--trainer.default_root_dir={tmp_path}"]
        )
        (callback,) = [c for c in run.trainer.callbacks if isinstance(c, BnbQuantization)]
        built.append(callback.options.activation_memory)
        expected = tuple(memory) if isinstance(memory, list) else (memory,) * 2
        if memory == "24GB":
            assert callback.activation_plan.budget == 24 * 10**9
        else:
            assert callback.activation_plan.modes == expected
    assert built[0] == built[1]


def test_a_model_built_empty_and_filled_from_yaml(cli, tmp_path):
    """model.empty_weights with the callback's weights: the YAML form of ``qlora_finetune.py --model DIR``."""
    import qlora_finetune
    from conftest import tiny_llama
    from test_example import save_tokenizer

    model_dir = tmp_path / "model"
    vocab_size = save_tokenizer(qlora_finetune, model_dir)
    tiny_llama(tie=False, vocab=vocab_size).save_pretrained(model_dir, max_shard_size="40KB")
    yaml_config = yaml.safe_load(CONFIG.read_text())
    _callback_args(yaml_config)["weights"] = str(model_dir)
    yaml_config["model"].update(model_path=str(model_dir), empty_weights=True)
    yaml_config["data"].update(seq_len=32, batch_size=4)
    path = tmp_path / "meta.yaml"
    path.write_text(yaml.safe_dump(yaml_config))

    run = cli.main(
        ["fit", "--config", str(path), "--trainer.max_steps=2", f"--trainer.default_root_dir={tmp_path}"]
    )

    (callback,) = [c for c in run.trainer.callbacks if isinstance(c, BnbQuantization)]
    assert callback.weights == str(model_dir)
    assert len(callback.report.converted) == 14
    assert {p.device.type for p in run.model.parameters()} == {"cpu"}
    assert run.trainer.global_step == 2


def test_a_missing_weights_directory_in_yaml_is_named(cli, tmp_path):
    config = yaml.safe_load(CONFIG.read_text())
    _callback_args(config)["weights"] = str(tmp_path / "no-such-model")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    # The callback's FileNotFoundError, inside jsonargparse's report of the union types it tried.
    with pytest.raises(ValueError, match=r"weights='.*no-such-model' does not exist"):
        cli.main(["fit", "--config", str(bad), f"--trainer.default_root_dir={tmp_path}"])
