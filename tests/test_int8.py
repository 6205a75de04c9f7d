"""8-bit layers trained through a dequantized matmul: same stored weights, exact arithmetic on them."""

from __future__ import annotations

import copy

import bitsandbytes as bnb
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_weight_recomputed, tiny_llama

from bnb_lightning import QuantizationConfig, quantize_model
from bnb_lightning.training.int8 import dequantize_int8, remove_dequantized_int8, use_dequantized_int8


def int8_layers(model):
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]


@pytest.fixture
def model():
    model = tiny_llama(tie=False)
    quantize_model(model, QuantizationConfig(bits=8))
    return model


def test_forward_and_backward_use_the_dequantized_weight(model):
    layer = int8_layers(model)[0]
    weight = dequantize_int8(layer.weight.data, layer.weight.SCB, torch.float32)
    assert use_dequantized_int8(model) == 14
    x = torch.randn(3, 5, layer.in_features, requires_grad=True)

    out = layer(x)
    out.square().sum().backward()

    reference_x = x.detach().clone().requires_grad_()
    reference = F.linear(reference_x, weight)
    reference.square().sum().backward()
    torch.testing.assert_close(out, reference)
    torch.testing.assert_close(x.grad, reference_x.grad)
    # The weight is the one bitsandbytes stores: SCB / 127 per row times the int8 values.
    torch.testing.assert_close(weight, layer.weight.data.float() * layer.weight.SCB[:, None] / 127)


@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
def test_compiled_backward_recomputes_the_weight_instead_of_saving_it(model, backend):
    model.to(torch.bfloat16)
    layer = int8_layers(model)[0]
    use_dequantized_int8(model)
    weight = dequantize_int8(layer.weight.data, layer.weight.SCB, torch.bfloat16)
    assert_weight_recomputed(layer, weight, backend)


def test_close_to_the_llm_int8_matmul(model, tokens):
    with torch.no_grad():
        expected = model.train()(tokens).logits
        use_dequantized_int8(model)
        actual = model(tokens).logits
    # On CUDA, LLM.int8 also quantizes activations, so the two differ by that rounding; bitsandbytes'
    # CPU backend multiplies by the dequantized weight too.
    assert (actual - expected).abs().max() < 0.05 * expected.abs().max()


def test_stored_weights_and_state_dict_are_unchanged(model, tokens):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    use_dequantized_int8(model)
    model.train()(tokens, labels=tokens).loss.backward()
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_autocast_runs_the_matmul_in_bfloat16(model):
    use_dequantized_int8(model)
    layer = int8_layers(model)[0]
    x = torch.randn(2, layer.in_features, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32


def test_copies_follow_and_removal_restores_bitsandbytes_matmul(model, tmp_path, tokens):
    use_dequantized_int8(model)
    with torch.no_grad():
        expected = model(tokens).logits
    clone = copy.deepcopy(model)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    for copied in (clone, loaded):
        assert {type(layer).__name__ for layer in int8_layers(copied)} == {"DequantizedLinear8bitLt"}
        with torch.no_grad():
            torch.testing.assert_close(copied(tokens).logits, expected)

    remove_dequantized_int8(model)
    assert all(type(layer) is bnb.nn.Linear8bitLt for layer in int8_layers(model))
    assert use_dequantized_int8(model) == 14


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dequantization_rounds_once_from_float32(dtype):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randint(-127, 128, (96, 130), dtype=torch.int8, generator=generator)
    row_absmax = torch.rand(96, generator=generator) * 4
    # What bitsandbytes' int8_vectorwise_dequant computes, in float32, then one rounding to dtype.
    expected = (weight.float() * (row_absmax * (1 / 127))[:, None]).to(dtype)
    assert torch.equal(dequantize_int8(weight, row_absmax, dtype), expected)
    # bitsandbytes multiplies in another order: the same values up to float32 rounding.
    reference = bnb.functional.int8_vectorwise_dequant(weight, row_absmax).to(dtype)
    torch.testing.assert_close(dequantize_int8(weight, row_absmax, dtype), reference)


def test_a_forward_replaced_by_someone_else_is_left_alone(model):
    layer = int8_layers(model)[0]
    layer.forward = layer.forward  # e.g. accelerate's hooks
    assert use_dequantized_int8(model) == 13
    assert type(layer) is bnb.nn.Linear8bitLt
