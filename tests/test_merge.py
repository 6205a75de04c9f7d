"""The merged export: adapters merged into the dequantized base, a full-precision model transformers or
safetensors reload, checked against the quantized model's logits before anything is written."""

from __future__ import annotations

import json
import re

import bitsandbytes as bnb
import pytest
import torch
from conftest import (
    BITS,
    BNB_CONFIGS,
    MANIFEST,
    TIE,
    TiedMLP,
    file_bytes,
    leftovers,
    logits,
    lora,
    tiny_gpt2,
    tiny_llama,
    trained_model,
)
from peft import LoraConfig, PeftModel
from safetensors import safe_open
from safetensors.torch import load_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from bnb_lightning import QuantizationConfig, inject_adapters, quantize_model
from bnb_lightning.io.export import export_adapters
from bnb_lightning.io.merge import MergeToleranceError, dequantized_weight, export_merged, merged_model


def test_a_merged_export_into_a_saved_base_model_is_refused(tmp_path, tokens):
    directory = tmp_path / "model"
    tiny_llama().save_pretrained(directory)
    before = file_bytes(directory)
    with pytest.raises(
        FileExistsError,
        match=re.escape(
            f"cannot export into {directory}: it holds config.json, which bnb_lightning did not write (there is "
            f"no {MANIFEST}, which every bnb_lightning export writes), and this export would replace it. Nothing "
            "in it was changed. Export into another (or an empty) directory, or remove "
            f"{directory / 'config.json'} yourself"
        ),
    ):
        export_merged(trained_model(4, steps=1), directory, tokens)
    assert file_bytes(directory) == before
    assert leftovers(tmp_path) == []


@TIE
@BITS
def test_merged_export_reloads_with_transformers(tmp_path, tokens, bits, tie):
    model = trained_model(bits, tie)
    before = logits(model, tokens)
    result = export_merged(model, tmp_path / "merged", tokens)

    assert result.dtype == torch.float32 and result.path == tmp_path / "merged"
    # The merge is exact up to how the quantized kernels round (bitsandbytes' bf16 CPU kernels, LLM.int8's
    # int8 activations): well under 1% of the largest logit here.
    assert 0 < result.max_abs_diff < 0.01 * before.abs().max().item()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert reloaded.dtype == torch.float32
    assert not any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in reloaded.modules())
    assert (logits(reloaded, tokens) - before).abs().max().item() == result.max_abs_diff
    assert (reloaded.lm_head.weight is reloaded.model.embed_tokens.weight) is tie
    with safe_open(tmp_path / "merged" / "model.safetensors", "pt") as weights:
        assert ("lm_head.weight" in weights.keys()) is not tie
        assert not any("lora" in key for key in weights.keys())

    # The training model is untouched: still quantized, adapters in place, same logits.
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.base_layer, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))
    assert layer.lora_A["default"].weight.requires_grad
    assert torch.equal(logits(model, tokens), before)


@BITS
def test_merged_weights_equal_transformers_dequantize_then_peft_merge(tmp_path, bits):
    tiny_llama(tie=False).save_pretrained(tmp_path / "base")
    model = trained_model(bits, tie=False)
    export_adapters(model, tmp_path / "adapters")
    base = AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", quantization_config=BitsAndBytesConfig(**BNB_CONFIGS[bits]), device_map="cpu"
    )
    reference = PeftModel.from_pretrained(base.dequantize(), tmp_path / "adapters").merge_and_unload()

    merged, expected = merged_model(model).state_dict(), reference.state_dict()
    assert merged.keys() == expected.keys()
    assert all(torch.equal(merged[key], expected[key]) for key in merged)


def test_dequantization_follows_the_cpu_repacking_of_4bit_weights(tokens):
    # On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights at the first eval forward and keeps
    # their scales in bfloat16 from then on; the dequantized weight must follow what the layer computes.
    model = tiny_llama()
    quantize_model(model, QuantizationConfig(bits=4), device="cpu")
    layer = model.model.layers[0].mlp.up_proj
    before = dequantized_weight(layer)
    logits(model, tokens)
    after = dequantized_weight(layer)
    assert torch.allclose(after, before, rtol=2**-8, atol=0)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(layer(x), x @ after.T, atol=5e-3)


def test_merged_export_in_the_base_dtype(tmp_path, tokens):
    model = trained_model(4, tie=False, dtype=torch.bfloat16)
    result = export_merged(model, tmp_path / "merged", tokens)
    assert result.dtype == torch.bfloat16 and result.max_abs_diff <= result.tolerance
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert {p.dtype for p in reloaded.parameters()} == {torch.bfloat16}
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "bfloat16"

    float32 = export_merged(model, tmp_path / "float32", tokens, dtype="float32")
    assert float32.dtype == torch.float32
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "float32").dtype == torch.float32


def test_merged_gpt2_keeps_conv1d_layers(tmp_path, tokens):
    model = tiny_gpt2().train()
    quantize_model(model, QuantizationConfig(bits=4), device="cpu")
    inject_adapters(model, lora(init_lora_weights=False))
    result = export_merged(model, tmp_path / "merged", tokens)
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", output_loading_info=True)
    assert not any(info.values()), info  # every weight in the shape GPT-2's Conv1D layers expect
    assert (logits(reloaded, tokens) - logits(model.eval(), tokens)).abs().max().item() == result.max_abs_diff


def test_merged_plain_module_as_safetensors(tmp_path, tokens):
    model = TiedMLP()
    quantize_model(model, QuantizationConfig(bits=8), device="cpu")
    inject_adapters(model, LoraConfig(r=4, target_modules=["up", "down"], init_lora_weights=False))
    result = export_merged(model, tmp_path / "merged", tokens)
    reloaded = TiedMLP()
    load_model(reloaded, tmp_path / "merged" / "model.safetensors")
    assert reloaded.head.weight is reloaded.embed.weight
    with torch.no_grad():
        difference = (reloaded(tokens) - model.eval()(tokens)).abs().max().item()
    assert difference == result.max_abs_diff


def test_merged_export_uses_the_trained_copy_of_modules_to_save(tmp_path, tokens):
    tiny_llama(tie=False).save_pretrained(tmp_path / "base")
    model = tiny_llama(tie=False).train()
    quantize_model(model, QuantizationConfig(bits=4), device="cpu")
    inject_adapters(model, lora(modules_to_save=["lm_head"]))
    trained_head = model.lm_head.modules_to_save["default"]
    with torch.no_grad():
        trained_head.weight.add_(0.1)
    model.eval()

    result = export_merged(model, tmp_path / "merged", tokens)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert torch.equal(reloaded.lm_head.weight, trained_head.weight)
    assert (logits(reloaded, tokens) - logits(model, tokens)).abs().max().item() == result.max_abs_diff

    export_adapters(model, tmp_path / "adapters")
    base = AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", quantization_config=BitsAndBytesConfig(**BNB_CONFIGS[4]), device_map="cpu"
    )
    reference = PeftModel.from_pretrained(base, tmp_path / "adapters")
    assert torch.equal(logits(model, tokens), logits(reference, tokens))


def test_merge_refuses_dora_and_tied_layers(tmp_path, tokens):
    model = tiny_llama()
    quantize_model(model, QuantizationConfig(bits=4), device="cpu")
    inject_adapters(model, LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(NotImplementedError, match="'model.layers.0.self_attn.q_proj' is a LoRA variant"):
        export_merged(model, tmp_path / "merged", tokens)

    tied = TiedMLP()
    quantize_model(tied, QuantizationConfig(bits=4), device="cpu")
    inject_adapters(tied, LoraConfig(r=4, target_modules=["head"]))
    with pytest.raises(ValueError, match="cannot merge adapters into 'head': its weight is tied"):
        export_merged(tied, tmp_path / "merged", tokens)
    assert list(tmp_path.iterdir()) == []


def test_merged_export_refuses_above_the_tolerance_and_writes_nothing(tmp_path, tokens):
    model = trained_model(4)
    with pytest.raises(
        MergeToleranceError, match=r"differ .* by up to .* more than tolerance=1e-07.* tolerance="
    ) as error:
        export_merged(model, tmp_path / "merged", tokens, tolerance=1e-7)
    assert error.value.max_abs_diff > 1e-7
    assert list(tmp_path.iterdir()) == []

    first = export_merged(model, tmp_path / "merged", tokens)
    previous = file_bytes(tmp_path / "merged")
    with pytest.raises(MergeToleranceError):
        export_merged(model, tmp_path / "merged", tokens, tolerance=first.max_abs_diff / 2)
    assert file_bytes(tmp_path / "merged") == previous
    assert leftovers(tmp_path) == []
