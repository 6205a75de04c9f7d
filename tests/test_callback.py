"""BnbQuantization under a real Lightning Trainer on CPU: quantize at setup, LoRA trains, base stays put."""

from __future__ import annotations

import logging

import bitsandbytes as bnb
import lightning.pytorch as pl
import pytest
import torch
from conftest import BNB_LAYERS, CausalLM, TiedMLP, batches, bnb_layer_names, fit, lora, trainer
from lightning.pytorch.strategies import ModelParallelStrategy
from peft import LoraConfig

from bnb_lightning import BnbQuantization, QuantizationConfig
from bnb_lightning.backend import is_bnb_linear


class SnapshotBase(pl.Callback):
    """Copies the quantized base's state right after BnbQuantization ran (it comes first in the list)."""

    def setup(self, trainer, pl_module, stage):
        if not hasattr(self, "base"):
            self.base = base_state(pl_module)


def base_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    # state_dict() gives bitsandbytes' canonical packing, whatever CPU layout a forward chose.
    return {k: v.detach().clone() for k, v in module.state_dict().items() if "lora_" not in k}


def packed_keys(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """State keys of the quantized weights and their statistics (not biases, norms or embeddings)."""
    layers = [name for name, m in module.named_modules() if isinstance(m, BNB_LAYERS)]
    return [k for k in state if any(k.startswith(f"{name}.weight") or k == f"{name}.SCB" for name in layers)]


@pytest.mark.parametrize("bits", [4, 8])
def test_fit_trains_only_adapters_and_leaves_base_bitwise_unchanged(tmp_path, bits):
    module = CausalLM()
    snapshot = SnapshotBase()
    callback = BnbQuantization(QuantizationConfig(bits=bits), peft_config=lora())
    trainer(tmp_path, [callback, snapshot]).fit(module, batches())

    assert len(bnb_layer_names(module.model)) == 14
    assert module.model.lm_head.weight is module.model.model.embed_tokens.weight
    assert module.losses[-1] < module.losses[0] - 0.5, module.losses
    after = base_state(module)
    assert after.keys() == snapshot.base.keys()
    changed = [k for k in after if not torch.equal(after[k], snapshot.base[k])]
    assert changed == []
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    lora_b = [p for n, p in module.named_parameters() if "lora_B" in n]
    assert all(p.abs().sum() > 0 for p in lora_b)  # LoRA B starts at zero: these were trained


@pytest.mark.parametrize(
    ("precision", "compute_dtype", "param_dtype"),
    [
        ("32-true", torch.float32, torch.float32),
        ("bf16-true", torch.bfloat16, torch.bfloat16),
        ("16-true", torch.float16, torch.float16),
        ("bf16-mixed", torch.bfloat16, torch.float32),
    ],
)
def test_each_precision_keeps_quantized_weights_intact(tmp_path, precision, compute_dtype, param_dtype):
    module = CausalLM()
    snapshot = SnapshotBase()
    trainer(tmp_path, [BnbQuantization(peft_config=lora()), snapshot], precision=precision).fit(
        module, batches()
    )

    layers = [m for m in module.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and {m.compute_dtype for m in layers} == {compute_dtype}
    assert {m.weight.dtype for m in layers} == {torch.uint8}
    assert module.model.model.norm.weight.dtype == param_dtype
    assert all(torch.isfinite(torch.tensor(module.losses)))
    assert module.losses[-1] < module.losses[0]
    after = base_state(module)
    # The precision plugin may cast full-precision tensors; the packed weights and their statistics not.
    packed = packed_keys(module, after)
    assert packed and all(torch.equal(after[k], snapshot.base[k]) for k in packed)
    trainable_dtypes = {p.dtype for p in module.parameters() if p.requires_grad}
    # Adapters train in float32 (Adam fails on float16, loses small steps in bfloat16), except
    # under bf16-true, which asks for bfloat16 throughout.
    assert trainable_dtypes == ({torch.bfloat16} if precision == "bf16-true" else {torch.float32})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["16-mixed", "bf16-true"])
def test_cuda_precisions(tmp_path, precision):
    module = CausalLM()
    snapshot = SnapshotBase()
    fit = trainer(
        tmp_path, [BnbQuantization(peft_config=lora()), snapshot], accelerator="cuda", precision=precision
    )
    fit.fit(module, batches())
    # The quantized weights survive Lightning's move back to the CPU and onto the GPU again.
    fit.validate(module, batches())
    assert torch.isfinite(fit.callback_metrics["val_loss"])
    # Trained on the GPU; Lightning moves the module back to the CPU when fit ends.
    assert module.packed_devices == {"cuda"}
    assert module.model.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.uint8
    assert module.losses[-1] < module.losses[0]
    after = base_state(module)
    packed = packed_keys(module, after)
    assert packed and all(torch.equal(after[k].cpu(), snapshot.base[k].cpu()) for k in packed)


@pytest.mark.parametrize("build", ["setup", "configure_model"])
def test_model_built_later_is_quantized_before_optimizers(tmp_path, build):
    module = CausalLM(build=build)
    fit = trainer(tmp_path, [BnbQuantization(peft_config=lora())])
    fit.fit(module, batches())

    assert len(bnb_layer_names(module.model)) == 14
    assert "configure_model" not in vars(module)  # the instance wrapper removed itself
    optimized = {id(p) for group in fit.optimizers[0].param_groups for p in group["params"]}
    adapters = {id(p) for n, p in module.named_parameters() if "lora_" in n}
    assert optimized == adapters
    assert module.losses[-1] < module.losses[0]


def test_quantizes_once_across_fit_validate_test(tmp_path):
    module = CausalLM()
    callback = BnbQuantization(peft_config=lora())
    fit = trainer(tmp_path, [callback], limit_val_batches=1, limit_test_batches=1)
    fit.fit(module, batches(), batches())
    report, layers = callback.report, bnb_layer_names(module)
    fit.validate(module, batches())
    fit.test(module, batches())
    assert callback.report is report
    assert bnb_layer_names(module) == layers
    # Adapters were injected once: no LoRA layer wraps another LoRA layer.
    assert all(isinstance(m.base_layer, BNB_LAYERS) for m in module.modules() if hasattr(m, "lora_A"))


def test_plain_module_with_tied_weights(tmp_path):
    class TiedLM(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net, self.losses = TiedMLP(), []

        def training_step(self, batch, batch_idx):
            logits = self.net(batch[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
            self.losses.append(loss.item())
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)

    module = TiedLM()
    callback = BnbQuantization(peft_config=LoraConfig(r=4, target_modules=["up", "down"]))
    trainer(tmp_path, [callback]).fit(module, batches())
    assert isinstance(module.net.up.base_layer, bnb.nn.Linear4bit)
    assert type(module.net.head) is torch.nn.Linear
    assert module.net.head.weight is module.net.embed.weight
    assert callback.report.skipped == {"net.head": "tied weights"}
    assert module.losses[-1] < module.losses[0]


def test_summary_and_parameter_counts_are_logged(tmp_path, caplog):
    logger = logging.getLogger("lightning.pytorch")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
            trainer(tmp_path, [BnbQuantization(peft_config=lora())], max_steps=1).fit(CausalLM(), batches())
    finally:
        logger.removeHandler(caplog.handler)
    assert "converted 14 linear layers to 4-bit nf4 on cpu" in caplog.text
    assert "tied weights" in caplog.text
    assert "trainable parameters:" in caplog.text


def test_gradient_checkpointing_is_non_reentrant(tmp_path):
    module = CausalLM()
    trainer(tmp_path, [BnbQuantization(peft_config=lora(), gradient_checkpointing=True)]).fit(
        module, batches()
    )
    recompute = module.model.model.layers[0]._gradient_checkpointing_func
    linear = torch.nn.Linear(2, 2)
    # An input without a gradient: reentrant checkpointing would leave the weight without one too.
    recompute(linear, torch.ones(1, 2)).sum().backward()
    assert linear.weight.grad is not None
    assert module.losses[-1] < module.losses[0]


def test_uncheckpointed_blocks_under_a_trainer(tmp_path):
    module = CausalLM()
    callback = BnbQuantization(peft_config=lora(), gradient_checkpointing=True, uncheckpointed_blocks=1)
    trainer(tmp_path, [callback]).fit(module, batches())
    assert [layer.gradient_checkpointing for layer in module.model.model.layers] == [True, False]
    assert module.losses[-1] < module.losses[0]


def test_too_many_uncheckpointed_blocks_are_refused_before_quantizing(tmp_path):
    module = CausalLM()
    callback = BnbQuantization(gradient_checkpointing=True, uncheckpointed_blocks=5)
    with pytest.raises(ValueError, match="uncheckpointed_blocks=5 .* has 2"):
        trainer(tmp_path, [callback]).fit(module, batches())
    assert type(module.model.model.layers[0].mlp.up_proj) is torch.nn.Linear
    assert not any(layer.gradient_checkpointing for layer in module.model.model.layers)


@pytest.mark.parametrize("upcast", [False, True])
def test_no_float32_upcast_unless_asked(tmp_path, upcast):
    module = CausalLM()
    callback = BnbQuantization(peft_config=lora(), upcast_to_float32=upcast)
    trainer(tmp_path, [callback], precision="bf16-true", max_steps=2).fit(module, batches())
    expected = torch.float32 if upcast else torch.bfloat16
    assert module.model.model.norm.weight.dtype == expected
    assert module.model.model.embed_tokens.weight.dtype == expected


def test_refuses_double_precision(tmp_path):
    with pytest.raises(RuntimeError, match="DoublePrecision.*float64.*32-true"):
        trainer(tmp_path, [BnbQuantization()], precision="64-true").fit(CausalLM(), batches())


def test_model_parallel_with_its_default_distributed_checkpoints_is_refused_before_quantizing(tmp_path):
    module = CausalLM()
    with pytest.raises(
        RuntimeError, match="save_distributed_checkpoint=True.*save_distributed_checkpoint=False"
    ):
        trainer(tmp_path, [BnbQuantization()], strategy=ModelParallelStrategy()).fit(module, batches())
    assert not any(is_bnb_linear(m) for m in module.modules())


def test_refuses_float_storage_the_precision_would_cast(tmp_path):
    callback = BnbQuantization(QuantizationConfig(quant_storage="bfloat16"))
    with pytest.raises(ValueError, match="quant_storage=torch.bfloat16 would be cast to torch.float16"):
        trainer(tmp_path, [callback], precision="16-true").fit(CausalLM(), batches())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"peft_config": {"r": 8}}, "peft_config must be a PEFT config"),
        ({"gradient_checkpointing": "yes"}, "gradient_checkpointing must be True, False or None"),
        ({"upcast_to_float32": 1}, "upcast_to_float32 must be True or False"),
        ({"chunked_loss": "auto"}, "chunked_loss must be True or False"),
        ({"dequantize_int8": "no"}, "dequantize_int8 must be True or False"),
        ({"options": {"chunked_loss": 0}}, "chunked_loss must be True or False"),
        (
            {"options": {"compile_block": True}},
            "unknown fields 'compile_block' \\(did you mean 'compile_blocks'\\?\\)",
        ),
        ({"options": "fast"}, "options must be a bnb_lightning.TrainingOptions"),
        (
            {"options": {"chunked_loss": False}, "compile_blocks": True},
            "either in options= or as keyword arguments, not both; got options and compile_blocks=True",
        ),
        ({"fuse_4bit_dequantize": "yes"}, "fuse_4bit_dequantize must be True or False"),
        ({"uncheckpointed_blocks": 1.5}, "uncheckpointed_blocks must be an int >= 0"),
        (
            {"uncheckpointed_blocks": 2, "gradient_checkpointing": False},
            "only applies with gradient checkpointing",
        ),
        ({"config": {"bits": 3}}, "bits=3 is not supported"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, message):
    with pytest.raises((TypeError, ValueError), match=message):
        BnbQuantization(**kwargs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("bits, dequantize_int8", [(4, True), (8, True), (8, False)])
def test_cuda_defaults_compile_checkpointed_blocks(tmp_path, bits, dequantize_int8):
    module = CausalLM(layers=3)
    callback = BnbQuantization(
        QuantizationConfig(bits=bits),
        peft_config=lora(),
        gradient_checkpointing=True,
        dequantize_int8=dequantize_int8,
    )
    trainer(tmp_path, [callback], accelerator="cuda", precision="bf16-true").fit(module, batches())
    # One compiled graph per block class serves all blocks, through forward and recomputation;
    # LLM.int8's matmul stays uncompiled (not measured compiled).
    compiled = [layer._compiled_call_impl is not None for layer in module.model.model.layers]
    assert compiled == [dequantize_int8] * 3
    names = {type(m).__name__ for m in module.modules() if is_bnb_linear(m)}
    expected = {4: "FusedLinear4bit", 8: "DequantizedLinear8bitLt" if dequantize_int8 else "Linear8bitLt"}
    assert names == {expected[bits]}
    assert module.losses[-1] < module.losses[0] - 0.5, module.losses


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Lightning's BitsandbytesPrecision needs CUDA")
def test_refuses_a_second_quantization_plugin(tmp_path):
    from lightning.pytorch.plugins import BitsandbytesPrecision

    plugin = BitsandbytesPrecision("nf4-dq", dtype=torch.bfloat16)
    fit = trainer(tmp_path, [BnbQuantization()], accelerator="cuda", plugins=[plugin])
    with pytest.raises(RuntimeError, match="BitsandbytesPrecision.*remove the plugin"):
        fit.fit(CausalLM(), batches())


@pytest.mark.parametrize("compile_blocks", [None, False, True])
def test_compile_blocks_switch(tmp_path, compile_blocks):
    module = CausalLM()
    callback = BnbQuantization(peft_config=lora(), compile_blocks=compile_blocks)
    trainer(tmp_path, [callback], max_steps=4).fit(module, batches())
    compiled = [layer._compiled_call_impl is not None for layer in module.model.model.layers]
    # Default: on for 4-bit on CUDA only, so off in this CPU run.
    assert compiled == [bool(compile_blocks)] * 2
    assert module.losses[-1] < module.losses[0]


class LogitsProbe(CausalLM):
    """Records whether the training forward returned logits."""

    def training_step(self, batch, batch_idx):
        output = self.model(input_ids=batch, labels=batch)
        self.returned_logits = output.logits is not None
        self.losses.append(output.loss.item())
        return output.loss


@pytest.mark.parametrize("chunked_loss", [True, False])
def test_chunked_loss_switch(tmp_path, chunked_loss):
    from bnb_lightning.training.loss import ChunkedLossForward

    module = LogitsProbe()
    callback = BnbQuantization(peft_config=lora(), chunked_loss=chunked_loss)
    trainer(tmp_path, [callback]).fit(module, batches())
    # Default on: the training forward computes the loss in chunks and returns no logits.
    assert isinstance(vars(module.model).get("forward"), ChunkedLossForward) is chunked_loss
    assert module.returned_logits is not chunked_loss
    assert module.losses[-1] < module.losses[0] - 0.5, module.losses


@pytest.mark.parametrize("dequantize_int8", [True, False])
def test_dequantize_int8_switch(tmp_path, dequantize_int8):
    module = CausalLM()
    callback = BnbQuantization(
        QuantizationConfig(bits=8), peft_config=lora(), dequantize_int8=dequantize_int8
    )
    trainer(tmp_path, [callback]).fit(module, batches())
    layers = [m for m in module.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    # Default on: each 8-bit layer's forward is the dequantized matmul; off: bitsandbytes' own.
    assert len(layers) == 14
    expected = "DequantizedLinear8bitLt" if dequantize_int8 else "Linear8bitLt"
    assert {type(layer).__name__ for layer in layers} == {expected}
    assert module.losses[-1] < module.losses[0] - 0.5, module.losses


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("fuse_4bit_dequantize", [True, False])
def test_fuse_4bit_dequantize_switch(tmp_path, bits, fuse_4bit_dequantize):
    module = CausalLM()
    callback = BnbQuantization(
        QuantizationConfig(bits=bits), peft_config=lora(), fuse_4bit_dequantize=fuse_4bit_dequantize
    )
    trainer(tmp_path, [callback], max_steps=2).fit(module, batches())
    names = {type(m).__name__ for m in module.modules() if is_bnb_linear(m)}
    # Default on for 4-bit: the layers dequantize in traceable ops once compiled; off, or 8-bit: unchanged.
    fused = bits == 4 and fuse_4bit_dequantize
    assert names == (
        {"FusedLinear4bit"} if fused else {"Linear4bit" if bits == 4 else "DequantizedLinear8bitLt"}
    )


# -- exports at the end of fit ----------------------------------------------------------------------------


def test_exports_at_the_end_of_fit(tmp_path):
    from peft import PeftConfig

    module = CausalLM()
    callback = BnbQuantization(
        peft_config=lora(),
        export_adapters_to=str(tmp_path / "adapters"),
        export_merged_to=str(tmp_path / "merged"),
    )
    fit(tmp_path, module, [callback], max_steps=4)
    assert PeftConfig.from_pretrained(tmp_path / "adapters").r == 4
    assert (tmp_path / "adapters" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "merged" / "config.json").is_file()
    assert 0 < callback.merged_export.max_abs_diff <= callback.merged_export.tolerance


def test_a_merge_beyond_tolerance_is_not_written(tmp_path):
    from bnb_lightning import MergeToleranceError

    callback = BnbQuantization(
        peft_config=lora(), export_merged_to=str(tmp_path / "merged"), merge_tolerance=0.0
    )
    with pytest.raises(MergeToleranceError):
        fit(tmp_path, CausalLM(), [callback], max_steps=4)
    assert not (tmp_path / "merged").exists()


def test_export_needs_adapters():
    with pytest.raises(ValueError, match="need adapters to export; pass a peft_config"):
        BnbQuantization(export_adapters_to="adapters")
