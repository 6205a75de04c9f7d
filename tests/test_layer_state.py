"""One quantized layer in a state dict: plain ``model.load_state_dict(model.state_dict(), strict=True)``
round-trips, whatever bitsandbytes did to the layer since (CPU repacking, int8 forwards), and statistics
that do not fit the layer are refused with its name (whole files: test_state_dict.py)."""

from __future__ import annotations

import copy

import bitsandbytes as bnb
import pytest
import torch
from accelerate import init_empty_weights
from conftest import ARCHITECTURES, Q_PROJ, QUANTIZATIONS, quantized, seeded_logits, tiny_llama

from bnb_lightning import QuantizationConfig, get_keys_to_not_convert, quantize_model, replace_with_bnb_linear
from bnb_lightning.io.state_dict import load_state_dict_file, save_state_dict_file

pytestmark = pytest.mark.filterwarnings("ignore:MatMul8bitLt")


def bnb_layers(model) -> dict:
    return {n: m for n, m in model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))}


def packed_for_cpu(model) -> list[str]:
    return [
        name
        for name, layer in bnb_layers(model).items()
        if getattr(getattr(layer.weight, "quant_state", None), "packing_format_for_cpu", False)
    ]


def repacks_on_this_cpu(model) -> bool:
    return any(getattr(layer, "support_avx512bf16_for_cpu", False) for layer in bnb_layers(model).values())


# -- round trips ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("quantization", QUANTIZATIONS)
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_state_dict_loads_strictly_into_a_model_quantized_from_other_weights(
    architecture, quantization, mode, tokens
):
    source, target = quantized(architecture, quantization, 0), quantized(architecture, quantization, 1)
    source.train(mode == "train")
    target.train(mode == "train")
    expected = seeded_logits(source, tokens)
    assert not torch.equal(seeded_logits(target, tokens), expected)  # the target has run a forward too

    state_dict = source.state_dict()
    result = target.load_state_dict(state_dict, strict=True)

    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(seeded_logits(target, tokens), expected)
    if architecture == "llama-tied":
        assert target.lm_head.weight is target.model.embed_tokens.weight
    for name, layer in bnb_layers(target).items():
        assert not layer.weight.requires_grad
        # Copied, as load_state_dict does: nothing shares memory with the state dict.
        loaded = state_dict[f"{name}.weight"].untyped_storage().data_ptr()
        assert layer.weight.untyped_storage().data_ptr() != loaded


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
@pytest.mark.parametrize("architecture", ["llama-untied", "gpt2-conv1d"])
def test_saving_after_an_eval_forward_round_trips_exactly(architecture, quantization, tokens, tmp_path):
    source = quantized(architecture, quantization, 0)
    before_forward = {key: value.clone() for key, value in source.state_dict().items()}
    expected = seeded_logits(source, tokens)
    if QUANTIZATIONS[quantization].bits == 4 and repacks_on_this_cpu(source):
        assert packed_for_cpu(source), "the eval forward did not repack the weights for the CPU"

    # The state dict is what quantization made, not bitsandbytes' lossy inverse of its CPU layout.
    after_forward = source.state_dict()
    assert after_forward.keys() == before_forward.keys()
    for key, value in before_forward.items():
        assert after_forward[key].dtype == value.dtype and torch.equal(after_forward[key], value), key
    assert torch.equal(seeded_logits(source, tokens), expected)  # saving did not change the model

    save_state_dict_file(source, tmp_path / "model.safetensors")
    target = quantized(architecture, quantization, 1)
    seeded_logits(target, tokens)  # repacked too, and loading resets that
    load_state_dict_file(target, tmp_path / "model.safetensors")
    assert not packed_for_cpu(target)
    assert torch.equal(seeded_logits(target, tokens), expected)


@pytest.mark.parametrize("quantization", ["nf4-double-quant", "int8"])
def test_an_empty_model_loads_with_assign(quantization, tokens):
    source = quantized("llama-untied", quantization, 0)
    with init_empty_weights():
        target = tiny_llama(tie=False, seed=1)
    replace_with_bnb_linear(
        target, get_keys_to_not_convert(target), quantization_config=QUANTIZATIONS[quantization]
    )

    target.load_state_dict(source.state_dict(), strict=True, assign=True)

    assert not [name for name, p in target.named_parameters() if p.device.type == "meta"]
    assert torch.equal(seeded_logits(target, tokens), seeded_logits(source, tokens))


def test_a_deep_copy_keeps_the_hooks(tokens):
    source, target = quantized("llama-tied", "nf4", 0), copy.deepcopy(quantized("llama-tied", "nf4", 1))
    target.load_state_dict(source.state_dict(), strict=True)
    assert torch.equal(seeded_logits(target, tokens), seeded_logits(source, tokens))


# -- what does not fit ----------------------------------------------------------------------------------


def test_another_quant_type_names_the_layer_and_the_fix(tmp_path):
    source, target = quantized("llama-untied", "nf4", 0), quantized("llama-untied", "fp4", 1)
    weights = {name: layer.weight for name, layer in bnb_layers(target).items()}
    pattern = rf"'{Q_PROJ}.weight' was saved as nf4 but the layer is configured for fp4; .*quant_type='nf4'"
    with pytest.raises(RuntimeError, match=pattern):
        target.load_state_dict(source.state_dict(), strict=True)
    assert all(layer.weight is weights[name] for name, layer in bnb_layers(target).items())  # kept

    save_state_dict_file(source, tmp_path / "model.safetensors")
    with pytest.raises(RuntimeError, match=rf"(?s)'{tmp_path / 'model.safetensors'}'.*{pattern}"):
        load_state_dict_file(target, tmp_path / "model.safetensors")


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize(
    ("quantization", "dropped", "reported"),
    [
        ("nf4", ["weight.absmax"], "['absmax']"),
        ("nf4", ["weight.quant_map"], "['quant_map']"),
        ("nf4-double-quant", ["weight.nested_absmax"], "['nested_absmax']"),
        ("fp4", ["weight.quant_state.bitsandbytes__fp4"], "quant_state.bitsandbytes__<nf4|fp4>"),
        ("nf4", ["weight.absmax", "weight.quant_map", "weight.quant_state.bitsandbytes__nf4"], "'absmax'"),
        ("int8", ["SCB"], "['SCB']"),
    ],
)
def test_missing_statistics_name_the_layer(quantization, dropped, reported, strict):
    source, target = quantized("llama-untied", quantization, 0), quantized("llama-untied", quantization, 1)
    state_dict = source.state_dict()
    for name in dropped:
        del state_dict[f"{Q_PROJ}.{name}"]
    # Even without strict: packed data with stale or no scales would compute garbage.
    with pytest.raises(
        RuntimeError, match=rf"missing statistics for the quantized weight '{Q_PROJ}.weight'"
    ) as error:
        target.load_state_dict(state_dict, strict=strict)
    assert reported in str(error.value)


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_a_full_precision_state_dict_into_a_quantized_model_is_refused(quantization):
    target = quantized("llama-untied", quantization, 1)
    with pytest.raises(RuntimeError, match=rf"dtype torch.float32 of '{Q_PROJ}.weight' does not fit"):
        target.load_state_dict(tiny_llama(tie=False).state_dict(), strict=True)


def test_statistics_of_another_shape_or_block_count_name_the_layer():
    source, target = quantized("llama-untied", "nf4", 0), quantized("llama-untied", "nf4", 1)
    k_proj = Q_PROJ.replace("q_proj", "k_proj")  # 32 x 64 (two key-value heads), q_proj is 64 x 64
    state_dict = source.state_dict()
    swapped = {
        key.replace(k_proj, Q_PROJ): value for key, value in state_dict.items() if key.startswith(k_proj)
    }
    with pytest.raises(RuntimeError, match=rf"shape mismatch for '{Q_PROJ}.weight'.*\(32, 64\).*\(64, 64\)"):
        target.load_state_dict({**state_dict, **swapped}, strict=True)

    state_dict = source.state_dict()
    state_dict[f"{Q_PROJ}.weight.absmax"] = state_dict[f"{Q_PROJ}.weight.absmax"][:-1]
    with pytest.raises(
        RuntimeError, match=rf"{Q_PROJ}.weight.absmax holds 63 block scales, but 64 blocks of 64"
    ):
        target.load_state_dict(state_dict, strict=True)


def test_the_packed_dtype_is_checked_by_plain_load_state_dict_too():
    state_dict = quantized("llama-untied", "nf4", 0).state_dict()
    state_dict[f"{Q_PROJ}.weight"] = state_dict[f"{Q_PROJ}.weight"].to(torch.int8)
    with pytest.raises(
        RuntimeError, match=rf"dtype torch.int8 of '{Q_PROJ}.weight' does not fit this Linear4bit"
    ):
        quantized("llama-untied", "nf4", 1).load_state_dict(state_dict)


def test_a_stray_scb_of_another_layer_is_reported_not_fatal():
    # bitsandbytes alone fails with a KeyError: every Linear8bitLt whose prefix is as long takes the stray
    # 'q_proj.SCB' for its own.
    source = quantized("llama-untied", "int8", 0)
    target = tiny_llama(tie=False, seed=1)
    quantize_model(target, QuantizationConfig(bits=8, skip_modules=[Q_PROJ]), device="cpu")
    state_dict = {key: value for key, value in source.state_dict().items() if key != f"{Q_PROJ}.weight"}
    result = target.load_state_dict(state_dict, strict=False)
    assert result.missing_keys == [f"{Q_PROJ}.weight"]
    assert sorted(result.unexpected_keys) == [f"{Q_PROJ}.SCB", f"{Q_PROJ}.weight_format"]
