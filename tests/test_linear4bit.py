"""4-bit layers in compiled blocks: bitsandbytes' dequantization written as ops torch.compile fuses."""

from __future__ import annotations

import copy
import re

import bitsandbytes as bnb
import bitsandbytes.functional as BF
import pytest
import torch
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
from bitsandbytes.backends.utils import _get_4bit_code
from conftest import (
    assert_same_loss_and_grads,
    assert_weight_recomputed,
    lora_step,
    tiny_gpt2,
    tiny_llama,
    tiny_opt,
)
from torch._dynamo.testing import CompileCounterWithBackend
from torch._inductor.utils import run_and_get_code

from bnb_lightning import (
    QuantizationConfig,
    quantize_model,
    remove_fused_4bit_dequantize,
    use_fused_4bit_dequantize,
)
from bnb_lightning.training.linear4bit import dequantize_4bit


def four_bit_layers(model):
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def quantized_llama(double_quant=True, quant_type="nf4", layers=2):
    model = tiny_llama(tie=False, dtype=torch.bfloat16, layers=layers)
    config = QuantizationConfig(
        double_quant=double_quant, quant_type=quant_type, compute_dtype=torch.bfloat16
    )
    quantize_model(model, config)
    return model


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", [(128, 192), (96, 200), (33, 70)])
def test_dequantization_equals_bitsandbytes(quant_type, double_quant, shape):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    packed, state = BF.quantize_4bit(weight, quant_type=quant_type, compress_statistics=double_quant)
    absmax = state.absmax
    if double_quant:
        absmax = BF.dequantize_blockwise(state.absmax, state.state2) + state.offset
    # bitsandbytes' reference implementation; its CPU kernel agrees where rows are whole blocks
    # (in bitsandbytes 0.50.2 it misplaces the scales of rows that are not).
    code = _get_4bit_code(quant_type, packed.device)
    expected = _dequantize_4bit_compute(packed.view(-1), absmax, code, 64, shape, torch.bfloat16)
    assert torch.equal(dequantize_4bit(packed, state, torch.bfloat16), expected)
    if shape[1] % 64 == 0:
        assert torch.equal(BF.dequantize_4bit(packed, state), expected)


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", [(128, 192), (33, 70)])
def test_compiled_dequantization_is_one_kernel_writing_only_the_weight(double_quant, shape):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    packed, state = BF.quantize_4bit(weight, compress_statistics=double_quant)
    torch._dynamo.reset()
    out, (code, *_) = run_and_get_code(torch.compile(dequantize_4bit), packed, state, torch.bfloat16)
    call = code[code.index("def call(") :]
    # No unpacked indices or float32 scales in memory: only the bfloat16 weight is allocated.
    assert re.findall(r"= empty_strided_\w+\(\(([\d, ]+)\)", call) == [f"{shape[0]}, {shape[1]}"]
    assert len(re.findall(r"cpp_fused_\w+\(", call)) == 1
    assert torch.equal(out, dequantize_4bit(packed, state, torch.bfloat16))


def test_eager_forward_is_bitsandbytes_own():
    model = quantized_llama()
    layer = four_bit_layers(model)[0]
    x = torch.randn(2, 3, layer.in_features, dtype=torch.bfloat16)
    expected = layer(x)
    assert use_fused_4bit_dequantize(model) == 14
    assert type(layer).__name__ == "FusedLinear4bit"
    assert torch.equal(layer(x), expected)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
def test_compiled_forward_and_backward_match_bitsandbytes(quant_type, double_quant):
    model = quantized_llama(double_quant, quant_type)
    layer = four_bit_layers(model)[0]
    weight = BF.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(torch.bfloat16)
    use_fused_4bit_dequantize(model)
    x = torch.randn(4, 5, layer.in_features, dtype=torch.bfloat16, requires_grad=True)
    counter = CompileCounterWithBackend("aot_eager")

    out = torch.compile(layer, backend=counter, fullgraph=True)(x)
    out.float().square().sum().backward()

    reference_x = x.detach().clone().requires_grad_()
    reference = torch.nn.functional.linear(reference_x, weight)
    reference.float().square().sum().backward()
    assert counter.frame_count == 1
    assert torch.equal(out, reference)
    torch.testing.assert_close(x.grad, reference_x.grad)


@pytest.mark.parametrize("backend", ["inductor", "aot_eager"])
def test_compiled_backward_recomputes_the_weight_instead_of_saving_it(backend):
    model = quantized_llama()
    use_fused_4bit_dequantize(model)
    layer = four_bit_layers(model)[0]
    weight = BF.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(torch.bfloat16)
    assert_weight_recomputed(layer, weight, backend)


@pytest.mark.parametrize(
    "make, quant_storage",
    [
        (lambda: tiny_llama(tie=False, dtype=torch.bfloat16, layers=3), "uint8"),
        # FSDP's storage: the packed bytes live in a bfloat16 tensor.
        (lambda: tiny_llama(tie=False, dtype=torch.bfloat16, layers=3), "bfloat16"),
        # Biases, and GPT-2's Conv1D layers (transposed weights) replaced by Linear4bit.
        (lambda: tiny_gpt2(dtype=torch.bfloat16), "uint8"),
        (lambda: tiny_opt(dtype=torch.bfloat16), "uint8"),
    ],
    ids=["llama", "llama-bf16-storage", "gpt2", "opt"],
)
def test_compiled_lora_blocks_train_like_bitsandbytes_with_one_graph(make, quant_storage):
    config = QuantizationConfig(quant_storage=quant_storage, compute_dtype=torch.bfloat16)

    def loss_and_grads(fused: bool):
        model = make()
        quantize_model(model, config)
        tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
        return lora_step(model, tokens, fused=fused)

    torch._dynamo.reset()
    expected_loss, expected_grads, _ = loss_and_grads(fused=False)
    torch._dynamo.reset()
    loss, grads, graphs = loss_and_grads(fused=True)
    # One graph serves every block: the compiler guards on the layer class, the same in each block.
    assert graphs == 1
    assert_same_loss_and_grads((expected_loss, expected_grads), (loss, grads))


def test_state_dict_copies_pickles_and_removal(tmp_path):
    model = quantized_llama()
    before = model.state_dict()
    tokens = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        expected = model(tokens).logits
    use_fused_4bit_dequantize(model)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    torch.save(model, tmp_path / "model.pt")
    for copied in (copy.deepcopy(model), torch.load(tmp_path / "model.pt", weights_only=False)):
        assert {type(layer).__name__ for layer in four_bit_layers(copied)} == {"FusedLinear4bit"}
        with torch.no_grad():
            assert torch.equal(copied(tokens).logits, expected)

    remove_fused_4bit_dequantize(model)
    assert all(type(layer) is bnb.nn.Linear4bit for layer in four_bit_layers(model))


def test_a_forward_replaced_by_someone_else_is_left_alone():
    model = quantized_llama()
    layer = four_bit_layers(model)[0]
    layer.forward = layer.forward  # e.g. accelerate's hooks
    assert use_fused_4bit_dequantize(model) == 13
    assert type(layer) is bnb.nn.Linear4bit
