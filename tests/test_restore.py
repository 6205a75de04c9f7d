"""restore_point: a model put back as it was, after preparation steps that changed it in every way."""

from __future__ import annotations

import bitsandbytes as bnb
import torch
from conftest import TiedMLP, model_structure, quantized_llama
from peft import LoraConfig
from torch import nn

from bnb_lightning import inject_adapters, prepare_for_kbit_training, use_dequantized_int8
from bnb_lightning.restore import restore_point


def test_a_restore_point_takes_back_every_preparation_step(tokens):
    from bnb_lightning import use_chunked_loss, use_fused_4bit_dequantize
    from bnb_lightning.prepare import cast_to_float32
    from bnb_lightning.restore import restore_point

    model = quantized_llama(dtype=torch.bfloat16)
    before = model_structure(model)
    with torch.no_grad():
        logits = model(tokens).logits
    restore = restore_point(model)
    prepare_for_kbit_training(model, gradient_checkpointing=True)
    inject_adapters(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    cast_to_float32(model)
    use_fused_4bit_dequantize(model)
    use_chunked_loss(model)
    model.model.layers[0].compile()
    assert model_structure(model) != before

    restore()
    assert model_structure(model) == before
    assert not model.is_gradient_checkpointing
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, logits)


def test_a_restore_point_puts_back_the_objects_it_saw_and_copies_no_weights(tokens):
    model = TiedMLP()
    children, parameters = dict(model.named_children()), dict(model.named_parameters())
    data = {name: p.data for name, p in parameters.items()}
    with torch.no_grad():
        expected = model(tokens)
    restore = restore_point(model)

    model.up = nn.Linear(64, 256)  # a child replaced, as PEFT wraps a layer
    model.embed.weight.data = model.embed.weight.data.half()  # a cast of the data
    model.norm.weight.requires_grad_(False)
    model.down.register_forward_hook(lambda module, args, output: output * 0)
    model.register_buffer("scale", torch.ones(1))
    model.forward = lambda tokens: None  # an instance forward
    bias = model.down.bias.detach().clone()
    with torch.no_grad():
        model.down.bias.add_(1.0)  # in place: the restore point holds no copy to go back to
    changed_bias = model.down.bias.detach().clone()

    restore()
    assert dict(model.named_children()) == children
    assert all(model.get_parameter(name) is p for name, p in parameters.items())
    assert all(p.data.data_ptr() == data[name].data_ptr() for name, p in model.named_parameters())
    assert model.embed.weight.dtype == torch.float32 and model.head.weight is model.embed.weight
    assert model.norm.weight.requires_grad
    assert not model.down._forward_hooks and "scale" not in dict(model.named_buffers())
    assert "forward" not in vars(model)
    assert torch.equal(model.down.bias, changed_bias)
    with torch.no_grad():
        model.down.bias.copy_(bias)
        assert torch.equal(model(tokens), expected)


def test_a_restore_point_of_a_quantized_model_takes_back_a_class_swap():
    model = quantized_llama(bits=8)
    restore = restore_point(model)
    assert use_dequantized_int8(model) == 14
    restore()
    assert {type(m).__name__ for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt)} == {
        "Linear8bitLt"
    }
