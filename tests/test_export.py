"""Export: adapters in PEFT's format, a merged full-precision model, atomic writes, loader errors."""

from __future__ import annotations

import json
import re
import resource
import signal
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from conftest import TiedMLP, tiny_gpt2, tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file
from test_callback import CausalLM, batches, lora, trainer
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from bnb_lightning import BnbQuantization, QuantizationConfig, inject_adapters, quantize_model
from bnb_lightning.adapters import adapter_root
from bnb_lightning.export import ADAPTER_CONFIG, ADAPTER_WEIGHTS, export_adapters, load_adapters
from bnb_lightning.merge import MergeToleranceError, dequantized_weight, export_merged, merged_model

# The manifest every export writes (its name is in the README and the docstrings).
MANIFEST = "bnb_lightning_export.json"
BNB_CONFIGS = {
    4: dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    8: dict(load_in_8bit=True),
}
TIE = pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
BITS = pytest.mark.parametrize("bits", [4, 8])


def trained_model(bits: int, tie: bool = True, dtype: torch.dtype = torch.float32, steps: int = 3):
    """A quantized tiny Llama whose LoRA adapters took a few optimizer steps (so B is not zero)."""
    model = tiny_llama(tie=tie, dtype=dtype).train()
    quantize_model(model, QuantizationConfig(bits=bits), device="cpu")
    inject_adapters(model, lora(task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tokens = torch.arange(32).remainder(7).view(2, 16)
    for _ in range(steps):
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    return model.eval()


def logits(model, tokens) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


def snapshot(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.endswith((".partial", ".previous", ".tmp")))


def recorded_exports(directory: Path) -> dict:
    return json.loads((directory / MANIFEST).read_text())["exports"]


def structure(model: torch.nn.Module) -> tuple:
    """What loading adapters changes: module types, state-dict keys, requires_grad flags, attributes."""
    return (
        [(name, type(module)) for name, module in model.named_modules()],
        sorted(model.state_dict()),
        [(name, parameter.requires_grad) for name, parameter in model.named_parameters()],
        [sorted(vars(module)) for module in model.modules()],
    )


def lora_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" in name}


# -- adapters -------------------------------------------------------------------------------------------------


@TIE
@BITS
def test_adapters_load_with_peft_on_the_original_base_with_identical_logits(tmp_path, tokens, bits, tie):
    tiny_llama(tie=tie).save_pretrained(tmp_path / "base")
    model = trained_model(bits, tie)
    before = logits(model, tokens)  # on CPUs with AVX512-BF16 this repacks the 4-bit weights
    export_adapters(model, tmp_path / "adapters")
    # Exporting leaves the model alone (bitsandbytes' state_dict() would undo the repacking, lossily).
    assert torch.equal(logits(model, tokens), before)

    base = AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", quantization_config=BitsAndBytesConfig(**BNB_CONFIGS[bits]), device_map="cpu"
    )
    reference = PeftModel.from_pretrained(base, tmp_path / "adapters")
    # Same quantized bytes, same adapter weights, same PEFT layers and kernels: bit-identical.
    assert torch.equal(logits(model, tokens), logits(reference, tokens))


def test_adapter_files_are_what_peft_save_pretrained_writes(tmp_path):
    model = trained_model(4)
    export_adapters(model, tmp_path / "ours", base_model_name_or_path=str(tmp_path / "base"))

    tiny_llama().save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", quantization_config=BitsAndBytesConfig(**BNB_CONFIGS[4]), device_map="cpu"
    )
    base.name_or_path = str(tmp_path / "base")
    get_peft_model(base, lora(task_type="CAUSAL_LM")).save_pretrained(tmp_path / "peft")

    ours, theirs = tmp_path / "ours" / ADAPTER_WEIGHTS, tmp_path / "peft" / ADAPTER_WEIGHTS
    with safe_open(ours, "pt") as mine, safe_open(theirs, "pt") as peft_file:
        assert mine.metadata() == peft_file.metadata() == {"format": "pt"}
        assert sorted(mine.keys()) == sorted(peft_file.keys())
        for key in mine.keys():
            assert mine.get_slice(key).get_shape() == peft_file.get_slice(key).get_shape(), key
            assert mine.get_slice(key).get_dtype() == peft_file.get_slice(key).get_dtype(), key
    config = json.loads((tmp_path / "ours" / ADAPTER_CONFIG).read_text())
    reference = json.loads((tmp_path / "peft" / ADAPTER_CONFIG).read_text())
    config["target_modules"], reference["target_modules"] = (
        sorted(config["target_modules"]),
        sorted(reference["target_modules"]),
    )
    assert config == reference
    assert config["inference_mode"] is True and config["base_model_name_or_path"] == str(tmp_path / "base")
    # The model keeps its own config as it was.
    assert model.peft_config["default"].inference_mode is False


def test_export_from_a_lightning_module_trained_with_the_callback(tmp_path, tokens):
    module = CausalLM()
    callback = BnbQuantization(QuantizationConfig(bits=4), peft_config=lora())
    trainer(tmp_path, [callback], max_steps=2).fit(module, batches())

    export_adapters(module, tmp_path / "adapters")
    result = export_merged(module, tmp_path / "merged", tokens)

    assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == [
        ADAPTER_CONFIG,
        ADAPTER_WEIGHTS,
        MANIFEST,
    ]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    difference = (logits(reloaded, tokens) - logits(module.model, tokens)).abs().max().item()
    assert difference == result.max_abs_diff

    # The base recorded from the LightningModule is the bare model's, quantized the same way: the base check
    # passes, whatever wraps the model and whichever parameters trained.
    bare = tiny_llama()
    quantize_model(bare, QuantizationConfig(bits=4), device="cpu")
    load_adapters(bare, tmp_path / "adapters")
    assert torch.equal(logits(bare.eval(), tokens), logits(module.model.eval(), tokens))


def test_export_adapters_needs_adapters(tmp_path):
    model = tiny_llama()
    quantize_model(model, QuantizationConfig(bits=4), device="cpu")
    with pytest.raises(ValueError, match="has no PEFT adapters to export; add them with"):
        export_adapters(model, tmp_path / "adapters")
    inject_adapters(model, lora())
    with pytest.raises(
        ValueError, match=r"adapter_name='other' is not an adapter of .* it has \['default'\]"
    ):
        export_adapters(model, tmp_path / "adapters", adapter_name="other")
    assert not (tmp_path / "adapters").exists()


# -- what an export replaces, keeps and refuses --------------------------------------------------------------


def test_adapters_exported_into_a_saved_base_model_keep_its_files(tmp_path, tokens):
    directory = tmp_path / "model"
    tiny_llama().save_pretrained(directory)
    base_files = snapshot(directory)
    assert {"config.json", "generation_config.json", "model.safetensors"} <= base_files.keys()
    base = AutoModelForCausalLM.from_pretrained(
        directory, quantization_config=BitsAndBytesConfig(**BNB_CONFIGS[4]), device_map="cpu"
    )
    model = trained_model(4)

    export_adapters(model, directory)

    files = snapshot(directory)
    assert {name: files[name] for name in base_files} == base_files  # byte for byte
    assert sorted(files.keys() - base_files.keys()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST]
    assert recorded_exports(directory)["adapters"]["files"] == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    reference = PeftModel.from_pretrained(base, directory)
    assert torch.equal(logits(reference, tokens), logits(model, tokens))
    assert leftovers(tmp_path) == []


def test_a_merged_export_into_a_saved_base_model_is_refused(tmp_path, tokens):
    directory = tmp_path / "model"
    tiny_llama().save_pretrained(directory)
    before = snapshot(directory)
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
    assert snapshot(directory) == before
    assert leftovers(tmp_path) == []


def test_an_export_keeps_the_users_own_files(tmp_path):
    directory = tmp_path / "adapters"
    directory.mkdir()
    (directory / "config.json").write_text('{"lr": 0.01}')
    save_file({"cache": torch.arange(4.0)}, directory / "cache.safetensors")
    users = snapshot(directory)

    model = trained_model(4, steps=1)
    export_adapters(model, directory)
    export_adapters(model, directory)  # and again: the second export replaces only the first one's files

    files = snapshot(directory)
    assert {name: files[name] for name in users} == users
    assert sorted(files) == sorted([*users, ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST])


def test_a_foreign_adapter_file_is_refused_and_nothing_changes(tmp_path):
    directory = tmp_path / "adapters"
    get_peft_model(tiny_llama(), lora(task_type="CAUSAL_LM")).save_pretrained(directory)  # PEFT's own export
    before = snapshot(directory)
    with pytest.raises(
        FileExistsError,
        match=re.escape(
            f"it holds {ADAPTER_CONFIG}, {ADAPTER_WEIGHTS}, which bnb_lightning did not write (there is no {MANIFEST}"
        ),
    ):
        export_adapters(trained_model(4, steps=1), directory)
    assert snapshot(directory) == before
    assert leftovers(tmp_path) == []


def test_an_export_removes_only_what_its_previous_export_wrote(tmp_path, tokens):
    directory = tmp_path / "export"
    llama = trained_model(4, steps=1)
    export_merged(llama, directory, tokens)  # config.json, generation_config.json, model.safetensors
    export_adapters(llama, directory)  # beside the merged model, which stays
    (directory / "tokenizer.json").write_text("{}")
    assert {"config.json", "model.safetensors", ADAPTER_WEIGHTS} <= {p.name for p in directory.iterdir()}
    adapter_files = {name: (directory / name).read_bytes() for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)}

    mlp = TiedMLP()
    quantize_model(mlp, QuantizationConfig(bits=4), device="cpu")
    inject_adapters(mlp, LoraConfig(r=4, target_modules=["up", "down"], init_lora_weights=False))
    result = export_merged(mlp, directory, tokens)  # a plain module: model.safetensors only

    # The previous merged export's config.json and generation_config.json go; the adapters stay.
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        [ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST, "model.safetensors", "tokenizer.json"]
    )
    assert {name: (directory / name).read_bytes() for name in adapter_files} == adapter_files
    exports = recorded_exports(directory)
    assert exports["merged"] == {"files": ["model.safetensors"]}
    assert exports["adapters"]["files"] == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    reloaded = TiedMLP()
    load_model(reloaded, directory / "model.safetensors")
    with torch.no_grad():
        assert (reloaded(tokens) - mlp.eval()(tokens)).abs().max().item() == result.max_abs_diff
    assert leftovers(tmp_path) == []


# -- loading adapters -----------------------------------------------------------------------------------------


@BITS
def test_load_adapters_restores_the_trained_model(tmp_path, tokens, bits):
    model = trained_model(bits)
    export_adapters(model, tmp_path / "adapters")
    expected = logits(model, tokens)

    fresh = tiny_llama()
    quantize_model(fresh, QuantizationConfig(bits=bits), device="cpu")
    root = load_adapters(fresh, tmp_path / "adapters")  # injects them from adapter_config.json
    assert root is fresh
    assert torch.equal(logits(fresh.eval(), tokens), expected)
    # Loaded adapters train; nothing else does.
    trainable = [n for n, p in fresh.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)

    injected = tiny_llama()
    quantize_model(injected, QuantizationConfig(bits=bits), device="cpu")
    inject_adapters(injected, lora())
    load_adapters(injected, tmp_path / "adapters")  # into adapters that are already there
    assert torch.equal(logits(injected.eval(), tokens), expected)


@pytest.mark.parametrize("missing", [ADAPTER_WEIGHTS, ADAPTER_CONFIG])
def test_load_adapters_names_the_missing_file(tmp_path, missing):
    model = trained_model(4, steps=1)
    export_adapters(model, tmp_path / "adapters")
    (tmp_path / "adapters" / missing).unlink()
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path / 'adapters' / missing} is missing"):
        load_adapters(model, tmp_path / "adapters")
    with pytest.raises(FileNotFoundError, match=rf"adapter directory {tmp_path / 'nowhere'} does not exist"):
        load_adapters(model, tmp_path / "nowhere")


def test_load_adapters_refuses_a_dtype_that_would_round_and_names_the_file(tmp_path):
    model = trained_model(4, steps=1)
    export_adapters(model, tmp_path / "adapters")
    path = tmp_path / "adapters" / ADAPTER_WEIGHTS
    save_file({k: v.double() for k, v in load_file(path).items()}, path, metadata={"format": "pt"})
    before = {n: p.clone() for n, p in model.named_parameters() if "lora_" in n}

    with pytest.raises(
        ValueError, match=rf"{path}: '.*lora_A.weight' is torch.float64, the model's adapter is torch.float32"
    ):
        load_adapters(model, tmp_path / "adapters")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if "lora_" in n)

    # A lossless upcast loads: bfloat16 adapters into float32 ones.
    save_file({k: v.bfloat16() for k, v in load_file(path).items()}, path, metadata={"format": "pt"})
    load_adapters(model, tmp_path / "adapters")
    lora_a = model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert torch.equal(
        lora_a, before["model.layers.0.self_attn.q_proj.lora_A.default.weight"].bfloat16().float()
    )


def test_load_adapters_refuses_another_rank_and_names_the_file(tmp_path):
    model = trained_model(4, steps=1)
    export_adapters(model, tmp_path / "adapters")
    other = tiny_llama()
    quantize_model(other, QuantizationConfig(bits=4), device="cpu")
    inject_adapters(other, LoraConfig(r=8, target_modules="all-linear"))
    path = tmp_path / "adapters" / ADAPTER_WEIGHTS
    with pytest.raises(ValueError, match=rf"{path}: '.*' has shape \(4, 64\), the model's adapter \(8, 64\)"):
        load_adapters(other, tmp_path / "adapters")
    narrower = tiny_llama()
    quantize_model(narrower, QuantizationConfig(bits=4), device="cpu")
    inject_adapters(narrower, LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(
        ValueError, match=rf"{path} does not hold the adapters of LlamaForCausalLM: missing \[\]"
    ):
        load_adapters(narrower, tmp_path / "adapters")


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [("r", 8, "has shape"), ("target_modules", ["q_proj"], "does not hold the adapters of")],
)
def test_a_refused_load_leaves_a_model_without_adapters_as_it_was(tmp_path, field, value, error):
    export_adapters(trained_model(4, steps=1), tmp_path / "adapters")
    path = tmp_path / "adapters" / ADAPTER_CONFIG
    exported = path.read_text()
    # A config that does not fit the weights file: the adapters it injects are not the file's.
    path.write_text(json.dumps({**json.loads(exported), field: value}))
    model = tiny_llama()
    quantize_model(model, QuantizationConfig(bits=4), device="cpu")
    before = structure(model)

    with pytest.raises(ValueError, match=error):
        load_adapters(model, tmp_path / "adapters")
    assert structure(model) == before
    assert adapter_root(model) is None

    path.write_text(exported)
    load_adapters(model, tmp_path / "adapters")  # the same model still takes the right adapters
    assert adapter_root(model) is model


def test_adapters_of_another_base_are_refused_unless_check_base_is_off(tmp_path):
    trained = trained_model(4)
    export_adapters(trained, tmp_path / "adapters")
    other = tiny_llama(seed=1)  # the same shapes, other weights
    quantize_model(other, QuantizationConfig(bits=4), device="cpu")
    before = structure(other)

    with pytest.raises(
        ValueError,
        match=rf"the adapters in {tmp_path / 'adapters'} were trained on another base model: {MANIFEST} records "
        r"the quantized base they were exported from as fingerprint [0-9a-f]{16}, and LlamaForCausalLM, "
        r"quantized the same way \(bits=4, .*quant_type=nf4.*\), has fingerprint [0-9a-f]{16}\. .* pass "
        r"check_base=False to load them anyway",
    ):
        load_adapters(other, tmp_path / "adapters")
    assert structure(other) == before
    base = recorded_exports(tmp_path / "adapters")["adapters"]["base"]
    assert base["quantization"] == [
        {
            "bits": 4,
            "quant_type": "nf4",
            "double_quant": True,
            "blocksize": 64,
            "quant_storage": "uint8",
            "dtype": "float32",
        }
    ]

    load_adapters(other, tmp_path / "adapters", check_base=False)
    assert lora_weights(other).keys() == lora_weights(trained).keys()
    assert all(torch.equal(value, lora_weights(trained)[name]) for name, value in lora_weights(other).items())

    # Adapters without our manifest (as PeftModel.save_pretrained writes them) have no base to compare.
    (tmp_path / "adapters" / MANIFEST).unlink()
    again = tiny_llama(seed=1)
    quantize_model(again, QuantizationConfig(bits=4), device="cpu")
    load_adapters(again, tmp_path / "adapters")


@pytest.mark.parametrize(
    "config",
    [
        QuantizationConfig(bits=8),
        QuantizationConfig(bits=4, quant_type="fp4"),
        QuantizationConfig(bits=4, double_quant=False),
    ],
    ids=["int8", "fp4", "single-quant"],
)
def test_adapters_load_into_their_base_quantized_another_way(tmp_path, config):
    trained = trained_model(4)  # NF4 with double quantization
    export_adapters(trained, tmp_path / "adapters")
    model = tiny_llama()
    quantize_model(model, config, device="cpu")
    load_adapters(model, tmp_path / "adapters")
    assert all(torch.equal(value, lora_weights(trained)[name]) for name, value in lora_weights(model).items())


# -- merged model ---------------------------------------------------------------------------------------------


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
    previous = snapshot(tmp_path / "merged")
    with pytest.raises(MergeToleranceError):
        export_merged(model, tmp_path / "merged", tokens, tolerance=first.max_abs_diff / 2)
    assert snapshot(tmp_path / "merged") == previous
    assert leftovers(tmp_path) == []


# -- atomic writes --------------------------------------------------------------------------------------------


@pytest.fixture
def file_size_limit():
    """Make writes past a size fail for real (EFBIG), as a full disk would, for this process only."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process

    def limit(size: int) -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))

    yield limit
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, handler)


@pytest.mark.parametrize("kind", ["adapters", "merged"])
def test_a_write_failing_midway_leaves_the_previous_export_intact(tmp_path, tokens, file_size_limit, kind):
    model = trained_model(4, steps=1)
    directory = tmp_path / "export"
    if kind == "adapters":
        export_adapters(model, directory)
        weights = ADAPTER_WEIGHTS
        # Another base model name: the new adapter_config.json differs from the previous one.
        export_again = lambda: export_adapters(model, directory, base_model_name_or_path="elsewhere")  # noqa: E731
    else:
        export_merged(model, directory, tokens)
        weights = "model.safetensors"
        export_again = lambda: export_merged(model, directory, tokens, dtype=torch.bfloat16)  # noqa: E731
    previous = snapshot(directory)

    # The config file is written first and fits under the limit; the weights file fails halfway.
    file_size_limit(len(previous[weights]) // 4)
    with pytest.raises(Exception, match="(?i)file too large") as error:
        export_again()
    file_size_limit(resource.RLIM_INFINITY)
    assert not isinstance(error.value, MergeToleranceError)
    assert snapshot(directory) == previous
    assert leftovers(tmp_path) == []


def test_reexport_replaces_export_files_and_keeps_other_files(tmp_path):
    model = trained_model(4, steps=1)
    directory = tmp_path / "adapters"
    export_adapters(model, directory)
    (directory / "tokenizer.json").write_text("{}")
    (directory / "notes").mkdir()
    (directory / "notes" / "run.txt").write_text("lr=1e-2")
    # Named like a PEFT export, but not written by bnb_lightning: kept, as any file of the user's.
    (directory / "adapter_model.bin").write_bytes(b"the user's")

    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.add_(1.0)
    export_adapters(model, directory)

    assert sorted(p.name for p in directory.iterdir()) == sorted(
        [ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST, "tokenizer.json", "notes", "adapter_model.bin"]
    )
    assert (directory / "notes" / "run.txt").read_text() == "lr=1e-2"
    assert (directory / "adapter_model.bin").read_bytes() == b"the user's"
    saved = load_file(directory / ADAPTER_WEIGHTS)[
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    ]
    assert torch.equal(saved, model.model.layers[0].self_attn.q_proj.lora_B["default"].weight)
    assert leftovers(tmp_path) == []


def test_export_to_a_file_path_fails_before_writing(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="it is a file; pass a directory path"):
        export_adapters(trained_model(4, steps=1), tmp_path / "file")
    assert (tmp_path / "file").read_text() == "x"
