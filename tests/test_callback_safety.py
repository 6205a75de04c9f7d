"""BnbQuantization refuses before it changes anything and serves each module it is given (what it
says on resume about a checkpoint: test_checkpoint.py)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from conftest import CausalLM, TiedMLP, batches, bnb_layer_names, fit, lora, trainer
from peft import LoraConfig, PrefixTuningConfig

from bnb_lightning import BnbQuantization, QuantizationConfig


def trainables(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def snapshot(module: torch.nn.Module) -> dict:
    return {
        "types": {name: type(m) for name, m in module.named_modules()},
        "state": {k: v.detach().clone() for k, v in module.state_dict().items()},
        "requires_grad": {n: p.requires_grad for n, p in module.named_parameters()},
    }


def assert_unchanged(module: torch.nn.Module, before: dict) -> None:
    after = snapshot(module)
    assert after["types"] == before["types"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(after["state"][k], v) for k, v in before["state"].items())


# -- each module is served ------------------------------------------------------------------------------


def test_a_callback_reused_on_a_second_module_prepares_that_one_too(tmp_path):
    callback = BnbQuantization(peft_config=lora())
    first, second = CausalLM(), CausalLM()
    fit(tmp_path / "first", first, [callback], max_steps=2)
    first_report = callback.report

    # Before: the callback counted itself done, so the second module trained unquantized, every
    # parameter of it, and its checkpoints were filtered by the first module's frozen keys.
    run = fit(tmp_path / "second", second, [callback], max_steps=2)
    assert len(bnb_layer_names(second.model)) == 14
    trained = trainables(second)
    assert trained and all("lora_" in name for name in trained)
    assert callback.report is not first_report and len(callback.report.converted) == 14
    path = tmp_path / "second.ckpt"
    run.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)["state_dict"]
    assert set(trained) <= set(saved)
    assert not any(key.endswith("q_proj.base_layer.weight") for key in saved)  # adapter-only, still


def test_a_new_callback_keeps_the_adapters_a_module_was_trained_with(tmp_path):
    module = CausalLM()
    fit(tmp_path / "fit", module, [BnbQuantization(peft_config=lora())], max_steps=4)
    trained = trainables(module)

    # Before: the new callback injected the adapters again, and PEFT re-initialised them.
    evaluation = trainer(tmp_path / "eval", [BnbQuantization(peft_config=lora())], limit_val_batches=1)
    evaluation.validate(module, batches())
    now = trainables(module)
    assert now.keys() == trained.keys()
    assert all(torch.equal(now[name], value) for name, value in trained.items())

    # Adapters of another config are refused, and the trained ones stay.
    other = trainer(
        tmp_path / "other",
        [BnbQuantization(peft_config=LoraConfig(r=8, lora_alpha=8, target_modules="all-linear"))],
        limit_val_batches=1,
    )
    with pytest.raises(ValueError, match=r"already has adapters from another peft_config \(r: 4 -> 8"):
        other.validate(module, batches())
    assert all(torch.equal(trainables(module)[name], value) for name, value in trained.items())


def test_another_quantization_config_on_a_quantized_module_is_refused(tmp_path):
    module = CausalLM()
    fit(tmp_path / "fit", module, [BnbQuantization(peft_config=lora())], max_steps=2)
    before = snapshot(module)
    callback = BnbQuantization(QuantizationConfig(bits=8), peft_config=lora())

    # Before: "converted 0 ... already quantized", 4-bit layers kept, and `bits: 8` in the checkpoints.
    with pytest.raises(
        ValueError, match=r"already quantized by bnb_lightning with another config \(bits: 4 -> 8\)"
    ):
        fit(tmp_path / "again", module, [callback], max_steps=4)
    assert_unchanged(module, before)
    assert callback.state_dict() == {}


# -- validate, then mutate -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("peft_config", "message"),
    [
        # One typo among valid names: PEFT drops it silently.
        (
            LoraConfig(r=4, target_modules=["q_proj", "v_prj"]),
            r"'v_prj' matches no module .* Did you mean \['v_proj'",
        ),
        (LoraConfig(r=4, target_modules=["qproj"]), r"'qproj' matches no module"),
        (LoraConfig(r=4, target_modules="attn\\.nothing"), r"PEFT cannot add the adapters of LoraConfig"),
        (
            PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
            r"PrefixTuningConfig learns virtual tokens .* peft.LoraConfig",
        ),
    ],
    ids=["typo-among-valid", "unknown", "regex-matching-nothing", "prompt-learning"],
)
def test_a_peft_config_that_cannot_apply_is_refused_before_quantizing(tmp_path, peft_config, message):
    module = CausalLM()
    before = snapshot(module)
    callback = BnbQuantization(peft_config=peft_config)

    # Before: refused by PEFT after quantization (or not at all), leaving a quantized model.
    with pytest.raises(ValueError, match=message):
        fit(tmp_path / "bad", module, [callback], max_steps=2)
    assert_unchanged(module, before)
    assert callback.report is None and callback.state_dict() == {}

    # Nothing was left half-done: the same module trains with a good config.
    fit(tmp_path / "good", module, [BnbQuantization(peft_config=lora())], max_steps=2)
    assert len(bnb_layer_names(module)) == 14 and all("lora_" in name for name in trainables(module))


class PlainLM(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = TiedMLP()

    def training_step(self, batch, batch_idx):
        logits = self.model(batch[:, :-1])
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)


def test_gradient_checkpointing_on_a_model_without_it_is_refused_before_quantizing(tmp_path):
    module = PlainLM()
    before = snapshot(module)
    callback = BnbQuantization(
        gradient_checkpointing=True, peft_config=LoraConfig(r=2, target_modules=["up"])
    )
    with pytest.raises(ValueError, match="gradient_checkpointing=True needs a transformers model"):
        fit(tmp_path, module, [callback], max_steps=2)
    assert_unchanged(module, before)


def test_offload_params_outside_fsdp2_is_refused_before_quantizing(tmp_path):
    module = PlainLM()
    before = snapshot(module)
    callback = BnbQuantization(offload_params=True, peft_config=LoraConfig(r=2, target_modules=["up"]))
    with pytest.raises(
        RuntimeError, match=r"offload_params=True .* SingleDeviceStrategy\. Use ModelParallelStrategy"
    ):
        fit(tmp_path, module, [callback], max_steps=2)
    assert_unchanged(module, before)


def test_a_model_on_the_meta_device_gets_our_error_not_lightnings_teardown(tmp_path):
    with torch.device("meta"):
        module = PlainLM()
    # Before: Lightning's teardown, moving the model to the CPU, replaced the error with
    # "NotImplementedError: Cannot copy out of meta tensor".
    with pytest.raises(ValueError, match="have no data yet \\(meta device\\)"):
        fit(tmp_path, module, [BnbQuantization(peft_config=LoraConfig(r=2, target_modules=["up"]))])


def test_without_a_peft_config_the_callback_says_what_trains(tmp_path):
    # Before: embeddings, norms and the lm_head trained without a word.
    with pytest.warns(
        UserWarning, match=r"no peft_config, so the parameters left in full precision train: .*norm"
    ):
        fit(tmp_path, CausalLM(), [BnbQuantization()], max_steps=1)


class FailingSetup(CausalLM):
    def setup(self, stage):
        raise RuntimeError("the module's own setup failed")


def test_a_failed_fit_takes_its_wrappers_off_the_module(tmp_path):
    module = FailingSetup(build="configure_model")
    run = trainer(tmp_path, [BnbQuantization(peft_config=lora())])
    with pytest.raises(RuntimeError, match="the module's own setup failed"):
        run.fit(module, batches())
    # Lightning calls no teardown hook when a run fails; before, the callback's wrapper of
    # configure_model stayed on the module, to quantize it in a later run of any Trainer.
    assert "configure_model" not in vars(module) and "on_load_checkpoint" not in vars(module)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"merge_tolerance": "0.1"}, TypeError, "merge_tolerance must be a number .* got str '0.1'"),
        ({"merge_tolerance": True}, TypeError, "merge_tolerance must be a number"),
        ({"merge_tolerance": float("inf")}, ValueError, "merge_tolerance=inf must be a finite number"),
        (
            {"peft_config": {"class_path": "peft.LoraConfig", "init_args": {"r": 4}}},
            TypeError,
            r"LightningCLI's YAML form; in Python, pass the object, e\.g\. peft\.LoraConfig\(\*\*init_args\)",
        ),
        (
            {"config": {"class_path": "bnb_lightning.QuantizationConfig", "init_args": {"bits": 8}}},
            TypeError,
            r"QuantizationConfig\(\*\*init_args\)",
        ),
        ({"config": {"bits": 8, "double_quant": True}}, ValueError, "double_quant=True applies to 4-bit"),
        ({"offload_params": "yes"}, TypeError, "offload_params"),
    ],
)
def test_arguments_of_the_wrong_kind_are_refused_with_the_fix(kwargs, error, message):
    with pytest.raises(error, match=message):
        BnbQuantization(**{"peft_config": lora(), **kwargs})


def test_hooks_the_user_set_on_the_instance_run_and_stay(tmp_path):
    # The callback wraps `configure_model` (to quantize right after it) and `on_load_checkpoint` (to
    # complete adapter-only checkpoints) on the instance; a user's own instance hooks run and come back.
    from conftest import tiny_llama

    module = CausalLM(build="configure_model")
    calls = []

    def configure_model():
        calls.append("configure_model")
        if module.model is None:
            module.model = tiny_llama().train()

    def on_load_checkpoint(checkpoint):
        calls.append("on_load_checkpoint")

    module.configure_model, module.on_load_checkpoint = configure_model, on_load_checkpoint
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    callback = BnbQuantization(peft_config=lora())
    trainer(tmp_path, [callback, checkpoints], max_steps=2, enable_checkpointing=True).fit(module, batches())
    assert bnb_layer_names(module.model) and calls == ["configure_model"]
    assert vars(module)["configure_model"] is configure_model
    assert vars(module)["on_load_checkpoint"] is on_load_checkpoint

    trainer(tmp_path, [callback, checkpoints], max_steps=4, enable_checkpointing=True).fit(
        module, batches(), ckpt_path=tmp_path / "last.ckpt"
    )
    assert calls == ["configure_model", "configure_model", "on_load_checkpoint"]
    assert vars(module)["configure_model"] is configure_model
    assert vars(module)["on_load_checkpoint"] is on_load_checkpoint
