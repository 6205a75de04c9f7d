"""Checkpoints with BnbQuantization: adapter-only by default, exact resume, clear refusals that name the
real cause, and the base fingerprint's checksums (the checkpoint IO: test_checkpoint_io.py)."""

from __future__ import annotations

import pickle

import lightning.pytorch as pl
import pytest
import torch
from conftest import BNB_LAYERS, CausalLM, batches, fit, lora, trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from peft import LoraConfig

from bnb_lightning import BnbQuantization, QuantizationConfig


def checkpointing(tmp_path, every: int) -> ModelCheckpoint:
    return ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=every, save_top_k=-1)


def adapters(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("bits", [4, 8])
def test_checkpoint_holds_adapters_and_a_quantization_record(tmp_path, bits):
    module = CausalLM()
    callback = BnbQuantization(QuantizationConfig(bits=bits), peft_config=lora())
    fit(tmp_path, module, [callback, checkpointing(tmp_path, 4)], max_steps=4, enable_checkpointing=True)
    (path,) = (tmp_path / "ckpt").glob("*.ckpt")
    checkpoint = torch.load(path, weights_only=False)
    assert checkpoint["state_dict"] and all("lora_" in key for key in checkpoint["state_dict"])
    assert set(checkpoint["state_dict"]) == {n for n, p in module.named_parameters() if p.requires_grad}
    assert checkpoint["optimizer_states"] and checkpoint["global_step"] == 4
    record = checkpoint["callbacks"]["BnbQuantization"]
    assert record["config"]["bits"] == bits and record["adapter_only"] is True
    assert len(record["base_fingerprint"]) == 16


def test_full_checkpoint_when_asked(tmp_path):
    module = CausalLM()
    callback = BnbQuantization(peft_config=lora(), save_base_weights=True)
    fit(tmp_path, module, [callback, checkpointing(tmp_path, 4)], max_steps=4, enable_checkpointing=True)
    (path,) = (tmp_path / "ckpt").glob("*.ckpt")
    state = torch.load(path, weights_only=False)["state_dict"]
    assert any(key.endswith(".weight.absmax") for key in state)
    assert state.keys() == module.state_dict().keys()


def test_adapter_only_checkpoint_is_a_small_fraction_of_the_full_one(tmp_path):
    sizes = {}
    for save_base in (False, True):
        module = CausalLM(hidden=256, layers=2)
        assert sum(p.numel() for p in module.parameters()) > 1_000_000
        # Classic LoRA: rank 2 on the attention's query and value projections.
        small_lora = LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
        callback = BnbQuantization(peft_config=small_lora, save_base_weights=save_base)
        run = fit(tmp_path / str(save_base), module, [callback], max_steps=1)
        path = tmp_path / f"{save_base}.ckpt"
        run.save_checkpoint(path)
        sizes[save_base] = path.stat().st_size
    assert sizes[False] < 0.1 * sizes[True], sizes


@pytest.mark.parametrize("save_base_weights", [False, True], ids=["adapter-only", "full"])
@pytest.mark.parametrize("bits", [4, 8])
def test_resume_continues_exactly(tmp_path, bits, save_base_weights):
    config = QuantizationConfig(bits=bits)
    options = dict(peft_config=lora(), save_base_weights=save_base_weights)
    straight = CausalLM()
    fit(tmp_path / "straight", straight, [BnbQuantization(config, peft_config=lora())], max_steps=8)

    first_half = CausalLM()
    fit(
        tmp_path / "first",
        first_half,
        [BnbQuantization(config, **options), checkpointing(tmp_path, 4)],
        max_steps=4,
        enable_checkpointing=True,
    )
    (path,) = (tmp_path / "ckpt").glob("*.ckpt")
    resumed = CausalLM()
    fit(
        tmp_path / "resumed",
        resumed,
        [BnbQuantization(config, **options)],
        ckpt_path=path,
        max_steps=8,
    )

    assert first_half.losses + resumed.losses == straight.losses
    expected, got = adapters(straight), adapters(resumed)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    assert all(
        isinstance(m, BNB_LAYERS) for n, m in resumed.named_modules() if n.endswith("q_proj.base_layer")
    )


@pytest.fixture
def saved_checkpoint(tmp_path):
    fit(
        tmp_path / "run",
        CausalLM(),
        [
            BnbQuantization(QuantizationConfig(quant_type="nf4"), peft_config=lora()),
            checkpointing(tmp_path, 4),
        ],
        max_steps=4,
        enable_checkpointing=True,
    )
    (path,) = (tmp_path / "ckpt").glob("*.ckpt")
    return path


def test_resume_with_another_quantization_config_is_refused(tmp_path, saved_checkpoint):
    callback = BnbQuantization(QuantizationConfig(quant_type="fp4"), peft_config=lora())
    with pytest.raises(ValueError, match=r"another quantization config \(quant_type: 'nf4' -> 'fp4'\)"):
        fit(tmp_path, CausalLM(), [callback], ckpt_path=saved_checkpoint, max_steps=8)


def test_resume_on_another_base_is_refused_unless_allowed(tmp_path, saved_checkpoint):
    class OtherBase(CausalLM):
        def __init__(self):
            super().__init__()
            from conftest import tiny_llama

            self.model = tiny_llama(seed=1).train()

    with pytest.raises(ValueError, match="frozen base differs.*other base weights"):
        fit(
            tmp_path,
            OtherBase(),
            [BnbQuantization(peft_config=lora())],
            ckpt_path=saved_checkpoint,
            max_steps=8,
        )
    module = OtherBase()
    callback = BnbQuantization(peft_config=lora(), check_base_on_resume=False)
    fit(tmp_path, module, [callback], ckpt_path=saved_checkpoint, max_steps=8)
    assert len(module.losses) == 4


def test_truncated_checkpoint_names_the_file(tmp_path, saved_checkpoint):
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(saved_checkpoint.read_bytes()[:2000])
    with pytest.raises(ValueError, match=r"truncated\.ckpt.*cannot be read"):
        fit(tmp_path, CausalLM(), [BnbQuantization(peft_config=lora())], ckpt_path=truncated, max_steps=8)


def test_foreign_file_names_the_file(tmp_path):
    foreign = tmp_path / "weights.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(ValueError, match=r"weights\.pt.*is not a Lightning checkpoint"):
        fit(tmp_path, CausalLM(), [BnbQuantization(peft_config=lora())], ckpt_path=foreign, max_steps=8)


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path):
    class Unpicklable:
        def __reduce__(self):
            raise pickle.PicklingError("disk full (simulated inside the writer)")

    class FailSecondSave(pl.Callback):
        saves = 0

        def on_save_checkpoint(self, trainer, pl_module, checkpoint):
            self.saves += 1
            if self.saves == 2:
                checkpoint["poison"] = Unpicklable()

    path = tmp_path / "model.ckpt"
    run = fit(tmp_path, CausalLM(), [BnbQuantization(peft_config=lora()), FailSecondSave()], max_steps=2)
    run.save_checkpoint(path)
    before = path.read_bytes()
    with pytest.raises(pickle.PicklingError, match="simulated inside the writer"):
        run.save_checkpoint(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".ckpt"] == ["model.ckpt"]


def test_validate_from_an_adapter_only_checkpoint(tmp_path):
    trained = CausalLM()
    callback = BnbQuantization(peft_config=lora())
    run = fit(tmp_path / "run", trained, [callback], max_steps=6, limit_val_batches=2)
    path = tmp_path / "adapters.ckpt"
    run.save_checkpoint(path)
    expected = run.validate(trained, batches(n=8))[0]["val_loss"]

    fresh = CausalLM()
    evaluation = trainer(tmp_path / "eval", [BnbQuantization(peft_config=lora())], limit_val_batches=2)
    before = evaluation.validate(fresh, batches(n=8))[0]["val_loss"]
    evaluation = trainer(tmp_path / "eval", [BnbQuantization(peft_config=lora())], limit_val_batches=2)
    restored = evaluation.validate(CausalLM(), batches(n=8), ckpt_path=path)[0]["val_loss"]
    assert restored == pytest.approx(expected, abs=1e-6) and abs(before - expected) > 1e-3


class LoadsStateItself(pl.strategies.SingleDeviceStrategy):
    """A strategy that, like FSDP's with a full checkpoint, loads the module state in `load_checkpoint`
    (not strictly) and hands the hooks the checkpoint without its `state_dict`."""

    def load_checkpoint(self, checkpoint_path, weights_only=None):
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        self.lightning_module.load_state_dict(checkpoint.pop("state_dict"), strict=False)
        return checkpoint

    def load_model_state_dict(self, checkpoint, strict=True):
        pass


def test_resume_under_a_strategy_that_loads_the_state_itself(tmp_path, saved_checkpoint):
    saved = torch.load(saved_checkpoint, weights_only=False)["state_dict"]
    resumed = CausalLM()
    callback = BnbQuantization(QuantizationConfig(quant_type="nf4"), peft_config=lora())
    run = trainer(tmp_path / "resumed", [callback], max_steps=4, strategy=LoadsStateItself("cpu"))
    run.fit(resumed, batches(n=8), ckpt_path=saved_checkpoint)  # no step left: restores only
    assert run.global_step == 4
    got = adapters(resumed)
    assert got.keys() == saved.keys()
    assert all(torch.equal(saved[name], got[name]) for name in saved)


# -- resume: the real cause ---------------------------------------------------------------------------------


@pytest.fixture
def checkpoint_path(tmp_path):
    fit(
        tmp_path / "run",
        CausalLM(),
        [
            BnbQuantization(peft_config=lora()),
            ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1),
        ],
        max_steps=2,
        enable_checkpointing=True,
    )
    (path,) = (tmp_path / "ckpt").glob("*.ckpt")
    return path


def test_resume_under_another_precision_is_not_a_config_change(tmp_path, checkpoint_path):
    # Before: refused as "another quantization config (compute_dtype: None -> 'bfloat16')".
    module = CausalLM()
    fit(
        tmp_path,
        module,
        [BnbQuantization(peft_config=lora())],
        checkpoint_path,
        max_steps=4,
        precision="bf16-mixed",
    )
    assert len(module.losses) == 2


def test_resume_without_the_peft_config_names_the_adapters_not_the_base(tmp_path, checkpoint_path):
    # Before: "the checkpoint's frozen base differs ... trained on other base weights".
    with pytest.raises(
        ValueError, match=r"trainable parameters are not the model's: it holds 28 tensors .*peft_config"
    ):
        fit(tmp_path, CausalLM(), [BnbQuantization()], checkpoint_path, max_steps=4)


def test_resume_with_another_rank_names_the_shapes(tmp_path, checkpoint_path):
    # Before: torch's list of size mismatches for every adapter.
    with pytest.raises(
        ValueError,
        match=r"differ in shape \('.*lora_A.default.weight': \(4, 64\) in the checkpoint, \(8, 64\)",
    ):
        fit(
            tmp_path,
            CausalLM(),
            [BnbQuantization(peft_config=LoraConfig(r=8, lora_alpha=8, target_modules="all-linear"))],
            checkpoint_path,
            max_steps=4,
        )


def test_threshold_does_not_block_an_8bit_resume(tmp_path):
    fit(
        tmp_path / "run",
        CausalLM(),
        [
            BnbQuantization(QuantizationConfig(bits=8), peft_config=lora()),
            ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1),
        ],
        max_steps=2,
        enable_checkpointing=True,
    )
    (path,) = (tmp_path / "ckpt").glob("*.ckpt")
    module = CausalLM()
    callback = BnbQuantization(QuantizationConfig(bits=8, threshold=4.0), peft_config=lora())
    fit(tmp_path, module, [callback], path, max_steps=4)
    assert len(module.losses) == 2


# -- the base fingerprint ----------------------------------------------------------------------------------


def test_base_checksums_are_exact_across_chunks():
    """The fingerprint in saved checkpoints must not change with how it is computed."""
    from bnb_lightning.io.checkpoint import _CHUNK_ROWS, _PERIOD, _checksums

    data = torch.randint(
        0,
        256,
        (2 * _CHUNK_ROWS * _PERIOD + 7 * _PERIOD + 12345,),
        dtype=torch.uint8,
        generator=torch.Generator().manual_seed(0),
    )
    as_int = data.to(torch.int64)
    positions = torch.arange(data.numel(), dtype=torch.int64) % 65521 + 1
    assert _checksums(data).tolist() == [int(as_int.sum()), int((as_int * positions).sum())]
    weights = torch.randn(1000, 3, dtype=torch.bfloat16)
    assert torch.equal(_checksums(weights), _checksums(weights.view(torch.uint8)))


def test_small_tensors_summed_together_give_each_ones_checksums():
    from bnb_lightning.io.checkpoint import _PERIOD, _SMALL_BATCH_BYTES, _checksums, _small_checksums

    generator = torch.Generator().manual_seed(0)
    sizes = [0, 1, 7, 4096, _PERIOD - 1, 3] + [60_000] * 9 + [64]
    tensors = [torch.randint(0, 256, (size,), dtype=torch.uint8, generator=generator) for size in sizes]
    tensors += [torch.randn(100, 7, dtype=torch.bfloat16), torch.randn(5, 3).t(), torch.tensor(2.5)]
    # Several batches; empty, non-contiguous and 0-d tensors.
    assert sum(sizes) > 2 * _SMALL_BATCH_BYTES
    assert torch.equal(_small_checksums(tensors), torch.stack([_checksums(t) for t in tensors]))
