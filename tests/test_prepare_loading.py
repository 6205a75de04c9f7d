"""prepare_model(weights=...) and BnbQuantization(weights=...): a model built on the meta device, filled from a
save_pretrained directory while quantizing, prepares and trains exactly as the same model loaded in memory;
a refused checkpoint leaves the model on meta."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import BITS, CausalLM, bnb_layer_names, fit, lora, tiny_llama
from peft import LoraConfig
from test_checkpoint import adapters, checkpointing
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from bnb_lightning import BnbQuantization, QuantizationConfig, prepare_model
from bnb_lightning.io.loading import CheckpointError


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """conftest's tiny Llama (tied, seed 0) in bfloat16, saved by transformers in several shards."""
    directory = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(dtype=torch.bfloat16).save_pretrained(directory, max_shard_size="20KB")
    assert len(list(directory.glob("model-*-of-*.safetensors"))) > 3
    return directory


def empty_model(path: Path) -> nn.Module:
    """The documented way: the model of ``path``'s config.json, built on the meta device."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))


def loaded_model(path: Path) -> nn.Module:
    """The same model loaded in memory, as transformers loads it (the file's dtype; rotary buffers in float32)."""
    return AutoModelForCausalLM.from_pretrained(path).train()


class EmptyCausalLM(CausalLM):
    """conftest's CausalLM with the Llama saved at ``path``: built on meta in ``__init__`` or in
    ``configure_model``, or (``"in_memory"``) loaded whole, for comparison."""

    def __init__(self, path: Path, build: str = "configure_model"):
        super().__init__(build=build)
        self.path = path
        if build == "init":
            self.model = empty_model(path)
        elif build == "in_memory":
            self.model = loaded_model(path)

    def configure_model(self) -> None:
        if self.model is None:
            self.model = empty_model(self.path)


def random_lora() -> LoraConfig:
    # B not zero, so every adapter gets a gradient.
    return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)


def prepared(model: nn.Module, bits: int, **kwargs) -> nn.Module:
    torch.manual_seed(0)  # the same adapter initialization for every model
    prepare_model(model, QuantizationConfig(bits=bits), device="cpu", peft_config=random_lora(), **kwargs)
    return model


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    # state_dict(): bitsandbytes' canonical packing, taken before any forward (CPU kernels repack 4-bit weights).
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def assert_same_state(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    assert [key for key in expected if actual[key].dtype != expected[key].dtype] == []
    assert [key for key in expected if not torch.equal(actual[key], expected[key])] == []


def training_step(model: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    tokens = torch.arange(32).remainder(7).view(2, 16)
    model.train()
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def everything(model: nn.Module) -> dict[str, object]:
    """Every module, parameter and buffer object under each of its names."""
    return {
        **{f"module:{name}": module for name, module in model.named_modules(remove_duplicate=False)},
        **dict(model.named_parameters(remove_duplicate=False)),
        **dict(model.named_buffers(remove_duplicate=False)),
    }


def assert_unchanged(model: nn.Module, before: dict[str, object]) -> None:
    """The same objects, still on the meta device."""
    after = everything(model)
    assert after.keys() == before.keys()
    assert [name for name in before if after[name] is not before[name]] == []
    assert {p.device.type for p in model.parameters()} == {"meta"}


def other_size(saved: Path, tmp_path: Path) -> Path:
    """A checkpoint of another configuration (wider MLP), in the same layout."""
    torch.manual_seed(0)
    model = tiny_llama(dtype=torch.bfloat16)
    config = model.config
    config.intermediate_size = 256
    directory = tmp_path / "other-size"
    type(model)(config).to(torch.bfloat16).save_pretrained(directory, max_shard_size="20KB")
    return directory


# -- prepare_model -------------------------------------------------------------------------------------------


@BITS
def test_prepare_model_with_weights_equals_prepare_model_in_memory(saved, bits):
    """Same quantized state, adapters, report, loss and adapter gradients as the model the checkpoint was saved from."""
    in_memory = prepared(loaded_model(saved), bits)
    expected = state(in_memory)
    model = empty_model(saved)
    assert {p.device.type for p in model.parameters()} == {"meta"}

    loaded = prepared(model, bits, weights=saved)

    assert_same_state(state(loaded), expected)
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert len(bnb_layer_names(loaded)) == 14
    loss, grads = training_step(loaded)
    expected_loss, expected_grads = training_step(in_memory)
    assert torch.equal(loss, expected_loss)
    assert grads.keys() == expected_grads.keys() and len(grads) == 28
    assert [name for name in grads if not torch.equal(grads[name], expected_grads[name])] == []


def test_a_lightning_module_reads_the_checkpoint_under_its_models_name(saved):
    """save_pretrained names tensors 'model.embed_tokens.weight'; the LightningModule's are 'model.model.…'."""
    in_memory = EmptyCausalLM(saved, build="in_memory")
    module = EmptyCausalLM(saved, build="init")
    torch.manual_seed(0)
    expected = prepare_model(in_memory, QuantizationConfig(bits=4), device="cpu", peft_config=random_lora())
    torch.manual_seed(0)

    result = prepare_model(
        module, QuantizationConfig(bits=4), device="cpu", peft_config=random_lora(), weights=saved
    )

    assert result.report.converted == expected.report.converted
    assert result.report.skipped == expected.report.skipped == {"model.lm_head": "tied weights"}
    assert result.fingerprint == expected.fingerprint
    assert_same_state(state(module), state(in_memory))


def test_weights_replace_the_weights_a_model_already_has(saved):
    """As quantize_model(weights=...): the checkpoint's values win, in the file's dtype."""
    expected = state(prepared(empty_model(saved), 4, weights=saved))
    model = tiny_llama(seed=1).train()  # other values, in float32

    assert_same_state(state(prepared(model, 4, weights=saved)), expected)


def test_a_refused_checkpoint_leaves_the_model_on_meta(saved, tmp_path):
    model = empty_model(saved)
    before = everything(model)

    with pytest.raises(
        CheckpointError, match=r"shape mismatch for .model\.layers\.0\.mlp\.gate_proj\.weight.*not changed"
    ):
        prepare_model(model, device="cpu", peft_config=lora(), weights=other_size(saved, tmp_path))
    assert_unchanged(model, before)

    incomplete = Path(shutil.copytree(saved, tmp_path / "incomplete"))
    next(incomplete.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match=r"model-00002-.*is absent"):
        prepare_model(model, device="cpu", peft_config=lora(), weights=incomplete)
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"peft_config": LoraConfig(r=4, target_modules=["q_proj", "qv_proj"])},
            r"target_modules entry 'qv_proj' matches no module",
        ),
        (
            {"options": {"gradient_checkpointing": True, "uncheckpointed_blocks": 5}},
            r"uncheckpointed_blocks=5 .* has 2",
        ),
    ],
    ids=["peft-config", "uncheckpointed-blocks"],
)
def test_checks_before_loading_hold_on_a_meta_model(saved, kwargs, message):
    """What prepare_model checks before quantizing is checked on the meta model, before any file is read."""
    model = empty_model(saved)
    before = everything(model)
    with pytest.raises(ValueError, match=message):
        prepare_model(model, device="cpu", weights=saved, **kwargs)
    assert_unchanged(model, before)


def test_training_options_apply_to_a_model_built_on_meta(saved):
    model = empty_model(saved)
    options = {"gradient_checkpointing": True, "uncheckpointed_blocks": 1}
    result = prepare_model(model, device="cpu", peft_config=lora(), options=options, weights=saved)
    assert result.checkpointing
    assert [layer.gradient_checkpointing for layer in model.model.layers] == [True, False]
    loss, grads = training_step(model)
    assert torch.isfinite(loss) and len(grads) == 28


def test_a_model_on_meta_without_weights_names_weights_as_the_fix(saved):
    model = empty_model(saved)
    before = everything(model)
    with pytest.raises(
        ValueError, match=r"no data yet \(meta device\).*weights='path/to/model'.*not changed"
    ):
        prepare_model(model, device="cpu", peft_config=lora())
    assert_unchanged(model, before)


def test_a_failure_after_loading_keeps_the_loaded_model_and_a_second_call_continues(saved):
    """As in memory: the restore point is the just-quantized model, and calling again continues from it."""
    expected = state(prepared(empty_model(saved), 4, weights=saved))
    model = empty_model(saved)

    def refuse(fingerprint: str) -> None:
        raise RuntimeError("ranks differ")

    with pytest.raises(RuntimeError, match="ranks differ"):
        prepared(model, 4, weights=saved, check_base=refuse)
    assert len(bnb_layer_names(model)) == 14
    assert not any("lora_" in name for name, _ in model.named_parameters())

    assert_same_state(state(prepared(model, 4, weights=saved)), expected)


# -- BnbQuantization -----------------------------------------------------------------------------------------


@BITS
@pytest.mark.parametrize("build", ["init", "configure_model"])
def test_fit_with_weights_trains_as_the_model_in_memory(saved, tmp_path, bits, build):
    config = QuantizationConfig(bits=bits)
    in_memory = EmptyCausalLM(saved, build="in_memory")
    in_memory_callback = BnbQuantization(config, peft_config=lora())
    torch.manual_seed(0)
    fit(tmp_path / "memory", in_memory, [in_memory_callback], max_steps=6)
    module = EmptyCausalLM(saved, build)
    callback = BnbQuantization(config, peft_config=lora(), weights=str(saved))
    torch.manual_seed(0)

    fit(tmp_path / "meta", module, [callback], max_steps=6)

    assert len(bnb_layer_names(module.model)) == 14
    assert module.model.lm_head.weight is module.model.model.embed_tokens.weight
    assert {p.device.type for p in module.parameters()} == {"cpu"}
    assert all(torch.isfinite(torch.tensor(module.losses)))
    assert module.losses[-1] < module.losses[0] - 0.3, module.losses
    assert module.losses == in_memory.losses
    assert callback.report.converted == in_memory_callback.report.converted
    assert callback.report.skipped == {"model.lm_head": "tied weights"}
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert "configure_model" not in vars(module)  # the instance wrapper removed itself


def test_resume_with_weights_continues_exactly(saved, tmp_path):
    """Adapter-only checkpoints of a model loaded through weights=: the base comes from the files again."""

    def callback() -> BnbQuantization:
        return BnbQuantization(peft_config=lora(), weights=str(saved))

    straight = EmptyCausalLM(saved)
    torch.manual_seed(0)
    fit(tmp_path / "straight", straight, [callback()], max_steps=8)
    first_half = EmptyCausalLM(saved)
    torch.manual_seed(0)
    fit(
        tmp_path / "first",
        first_half,
        [callback(), checkpointing(tmp_path, 4)],
        max_steps=4,
        enable_checkpointing=True,
    )
    (path,) = (tmp_path / "ckpt").glob("*.ckpt")
    assert all("lora_" in key for key in torch.load(path, weights_only=False)["state_dict"])
    resumed = EmptyCausalLM(saved)

    fit(tmp_path / "resumed", resumed, [callback()], ckpt_path=path, max_steps=8)

    assert first_half.losses + resumed.losses == straight.losses
    expected, got = adapters(straight), adapters(resumed)
    assert expected.keys() == got.keys()
    assert [name for name in expected if not torch.equal(expected[name], got[name])] == []


@pytest.mark.parametrize(
    ("weights", "error", "message"),
    [
        (
            "missing",
            FileNotFoundError,
            r"weights='.*missing' does not exist\. Pass the directory save_pretrained",
        ),
        (
            "empty",
            FileNotFoundError,
            r"'.*empty' holds neither model\.safetensors nor model\.safetensors\.index",
        ),
        ("notes.txt", CheckpointError, r"'.*notes\.txt' is not a safetensors file"),
        (3, TypeError, r"weights must be a path .* got int 3"),
    ],
)
def test_a_bad_weights_path_fails_at_construction(tmp_path, weights, error, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(error, match=message):
        BnbQuantization(weights=str(tmp_path / weights) if isinstance(weights, str) else weights)


@pytest.mark.parametrize("build", ["init", "configure_model"])
def test_a_refused_checkpoint_in_fit_leaves_the_model_on_meta_and_the_next_fit_loads(saved, tmp_path, build):
    truncated = Path(shutil.copytree(saved, tmp_path / "truncated"))
    shard = next(truncated.glob("model-00003-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-100])
    module = EmptyCausalLM(saved, build)

    with pytest.raises(CheckpointError, match=r"cannot read '.*model-00003-.*truncated or corrupt"):
        fit(tmp_path, module, [BnbQuantization(peft_config=lora(), weights=str(truncated))])
    assert {p.device.type for p in module.parameters()} == {"meta"}
    assert bnb_layer_names(module) == []
    assert "configure_model" not in vars(module)

    # The model exists now, with linear layers on meta: the callback loads it in its own setup.
    fit(tmp_path, module, [BnbQuantization(peft_config=lora(), weights=str(saved))], max_steps=2)
    assert len(bnb_layer_names(module.model)) == 14
    assert all(torch.isfinite(torch.tensor(module.losses)))


def test_fit_of_a_model_on_meta_without_weights_names_weights_as_the_fix(saved, tmp_path):
    module = EmptyCausalLM(saved)
    with pytest.raises(
        ValueError, match=r"no data yet \(meta device\).*weights='path/to/model'.*BnbQuantization"
    ):
        fit(tmp_path, module, [BnbQuantization(peft_config=lora())])
    assert {p.device.type for p in module.parameters()} == {"meta"}
