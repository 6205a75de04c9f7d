"""Layer class swaps: a training forward given to bitsandbytes layers by a subclass made once per class,
found again by name for pickle, taken back exactly; and the weight a compiled backward recomputes."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
import torch.nn.functional as F
from conftest import TiedMLP

from bnb_lightning import QuantizationConfig, quantize_model
from bnb_lightning.training import int8
from bnb_lightning.training.int8 import Dequantized
from bnb_lightning.training.swap import (
    find_layer_subclass,
    layer_subclass,
    recomputed_weight,
    remove_layer_subclass,
    use_layer_subclass,
)


class Counting:
    """Counts the forwards of a layer, then runs its own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls = getattr(self, "calls", 0) + 1
        return super().forward(x)


def test_a_layer_subclass_is_made_once_per_class_and_named_after_both():
    cls = layer_subclass(Counting, bnb.nn.Linear4bit)
    assert cls is layer_subclass(Counting, bnb.nn.Linear4bit)
    assert cls.__name__ == "CountingLinear4bit" and cls.__module__ == __name__
    assert cls.__mro__[:3] == (cls, Counting, bnb.nn.Linear4bit)
    other = layer_subclass(Counting, bnb.nn.Linear8bitLt)
    assert other is not cls and other.__name__ == "CountingLinear8bitLt"


def test_a_layer_subclass_is_found_again_by_its_name():
    assert find_layer_subclass(Dequantized, "DequantizedLinear8bitLt") is layer_subclass(
        Dequantized, bnb.nn.Linear8bitLt
    )
    # What pickle looks up in the mixin's module.
    assert int8.DequantizedLinear8bitLt is layer_subclass(Dequantized, bnb.nn.Linear8bitLt)
    for name in ("DequantizedParams4bit", "DequantizedNothing", "Linear8bitLt", "Dequantized"):
        with pytest.raises(
            AttributeError, match=f"module 'bnb_lightning.training.int8' has no attribute '{name}'"
        ):
            find_layer_subclass(Dequantized, name)


def test_accepted_layers_change_class_in_place_and_get_theirs_back(tokens):
    model = TiedMLP()
    quantize_model(model, QuantizationConfig(bits=4), device="cpu")
    parameters = dict(model.named_parameters())
    state = {key: value.clone() for key, value in model.state_dict().items()}
    with torch.no_grad():
        expected = model(tokens)

    # Only the layer widening 64 -> 256 is accepted.
    assert use_layer_subclass(model, bnb.nn.Linear4bit, Counting, lambda m: m.out_features > 64) == 1
    assert type(model.up) is layer_subclass(Counting, bnb.nn.Linear4bit)
    assert type(model.down) is bnb.nn.Linear4bit
    assert all(p is parameters[name] for name, p in model.named_parameters())
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(tokens), expected)
    assert model.up.calls == 1

    # Again: counted, not subclassed twice.
    assert use_layer_subclass(model, bnb.nn.Linear4bit, Counting, lambda m: m.out_features > 64) == 1
    assert type(model.up).__bases__ == (Counting, bnb.nn.Linear4bit)

    remove_layer_subclass(model, Counting)
    assert type(model.up) is bnb.nn.Linear4bit and type(model.down) is bnb.nn.Linear4bit
    with torch.no_grad():
        assert torch.equal(model(tokens), expected)
    assert model.up.calls == 1


def test_a_layer_with_a_forward_of_its_own_is_left_alone():
    model = TiedMLP()
    quantize_model(model, QuantizationConfig(bits=8), device="cpu")
    model.down.forward = model.down.forward  # e.g. accelerate's hooks
    assert use_layer_subclass(model, bnb.nn.Linear8bitLt, Counting, lambda m: True) == 1
    assert type(model.up) is layer_subclass(Counting, bnb.nn.Linear8bitLt)
    assert type(model.down) is bnb.nn.Linear8bitLt
    # Other layer types are not touched, whatever the filter says.
    assert use_layer_subclass(model, bnb.nn.Linear4bit, Counting, lambda m: True) == 0


def dequantize(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (weight * scale[:, None]).to(torch.bfloat16)


WEIGHT = torch.randint(-127, 128, (48, 32), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
SCALE = torch.rand(48, generator=torch.Generator().manual_seed(1)) / 127


def test_the_recomputed_weight_is_the_dequantized_one():
    scale = SCALE.clone().requires_grad_()
    weight = recomputed_weight(dequantize, WEIGHT, scale)
    assert torch.equal(weight, dequantize(WEIGHT, SCALE))
    weight.float().sum().backward()
    reference = SCALE.clone().requires_grad_()
    dequantize(WEIGHT, reference).float().sum().backward()
    assert torch.equal(scale.grad, reference.grad)


@pytest.mark.parametrize("recompute", [True, False])
def test_a_compiled_backward_saves_the_stored_weight_not_the_dequantized_one(recompute):
    def linear(x: torch.Tensor) -> torch.Tensor:
        weight = recomputed_weight(dequantize, WEIGHT, SCALE) if recompute else dequantize(WEIGHT, SCALE)
        return F.linear(x, weight)

    x = torch.randn(4, 32, dtype=torch.bfloat16, requires_grad=True)
    torch._dynamo.reset()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = torch.compile(linear, backend="aot_eager", fullgraph=True)(x)
    out.float().square().sum().backward()

    dequantized_saved = [t for t in saved if t.dtype == torch.bfloat16 and t.shape == WEIGHT.shape]
    assert (dequantized_saved == []) is recompute
    assert any(t.data_ptr() == WEIGHT.data_ptr() for t in saved) is recompute
    reference = x.detach().clone().requires_grad_()
    F.linear(reference, dequantize(WEIGHT, SCALE)).float().square().sum().backward()
    torch.testing.assert_close(x.grad, reference.grad)
