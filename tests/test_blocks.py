"""Transformer blocks: found in transformers models wherever they sit, checkpointing turned on and off
and checked before anything changes, blocks compiled in place."""

from __future__ import annotations

import pytest
from conftest import TiedMLP, tiny_gpt2, tiny_llama
from torch import nn

from bnb_lightning.training.blocks import (
    block_class_names,
    check_gradient_checkpointing,
    check_uncheckpointed_blocks,
    checkpointable_blocks,
    checkpointing_enabled,
    compile_blocks,
    set_checkpointing,
    transformer_blocks,
    transformers_models,
    will_checkpoint,
)


class TwoModels(nn.Module):
    """A module holding two transformers models (e.g. a policy and a reference) and a plain head."""

    def __init__(self):
        super().__init__()
        self.policy, self.reference, self.head = tiny_llama(), tiny_gpt2(), nn.Linear(64, 1)


def test_only_the_outermost_transformers_models_are_found():
    llama = tiny_llama()
    # LlamaForCausalLM holds a LlamaModel, a transformers model too: only the outer one counts.
    assert transformers_models(llama) == [llama]
    wrapper = nn.ModuleDict({"model": llama})
    assert transformers_models(wrapper) == [llama]
    both = TwoModels()
    assert transformers_models(both) == [both.policy, both.reference]
    assert transformers_models(TiedMLP()) == []


def test_blocks_are_the_classes_transformers_does_not_split():
    both = TwoModels()
    assert block_class_names(both.policy) == {"LlamaDecoderLayer"}
    assert block_class_names(both) == {"LlamaDecoderLayer", "GPT2Block"}
    assert transformer_blocks(both) == [*both.policy.model.layers, *both.reference.transformer.h]
    assert transformer_blocks(TiedMLP()) == [] and block_class_names(TiedMLP()) == set()


def test_checkpointable_blocks_are_the_decoder_layers_in_model_order():
    llama = tiny_llama(layers=3)
    assert checkpointable_blocks(llama) == list(llama.model.layers)
    assert checkpointable_blocks(nn.ModuleList([llama.model.layers[2], llama.model.layers[0]])) == [
        llama.model.layers[2],
        llama.model.layers[0],
    ]
    assert checkpointable_blocks(TiedMLP()) == []


def test_checkpointing_on_and_off_is_non_reentrant():
    llama = tiny_llama()
    assert not checkpointing_enabled(llama)
    set_checkpointing(llama, True)
    assert checkpointing_enabled(llama)
    assert all(layer.gradient_checkpointing for layer in llama.model.layers)
    assert llama.model.layers[0]._gradient_checkpointing_func.keywords["use_reentrant"] is False
    set_checkpointing(llama, False)
    assert not checkpointing_enabled(llama)
    assert not any(layer.gradient_checkpointing for layer in llama.model.layers)


@pytest.mark.parametrize(
    ("already_on", "gradient_checkpointing", "expected"),
    [(False, None, False), (True, None, True), (True, False, False), (False, True, True)],
)
def test_will_checkpoint_follows_the_model_unless_told_and_changes_nothing(
    already_on, gradient_checkpointing, expected
):
    llama = tiny_llama()
    set_checkpointing(llama, already_on)
    assert will_checkpoint(nn.ModuleDict({"model": llama}), gradient_checkpointing) is expected
    assert checkpointing_enabled(llama) is already_on
    # No transformers model: nothing to checkpoint, whatever is asked.
    assert will_checkpoint(TiedMLP(), True) is False


def test_uncheckpointed_blocks_are_checked_against_the_model():
    llama = tiny_llama()
    check_uncheckpointed_blocks(llama, 0, checkpointing=False)
    check_uncheckpointed_blocks(llama, 2, checkpointing=True)
    with pytest.raises(
        ValueError, match=r"uncheckpointed_blocks=3 .* LlamaForCausalLM has 2\. .* from 0 to 2"
    ):
        check_uncheckpointed_blocks(llama, 3, checkpointing=True)
    with pytest.raises(ValueError, match=r"TiedMLP has none \(it needs a transformers model"):
        check_uncheckpointed_blocks(TiedMLP(), 1, checkpointing=True)
    with pytest.raises(ValueError, match="only applies with gradient checkpointing on"):
        check_uncheckpointed_blocks(llama, 1, checkpointing=False)


def test_gradient_checkpointing_needs_a_transformers_model_only_when_asked_for():
    check_gradient_checkpointing(nn.ModuleDict({"model": tiny_llama()}), True)
    for asked in (None, False):
        check_gradient_checkpointing(TiedMLP(), asked)
    with pytest.raises(
        ValueError, match=r"gradient_checkpointing=True needs a transformers model inside TiedMLP"
    ):
        check_gradient_checkpointing(TiedMLP(), True)


def test_compile_blocks_compiles_each_block_in_place_and_keeps_the_state_dict():
    llama = tiny_llama(layers=3)
    keys = list(llama.state_dict())
    layers = list(llama.model.layers)
    assert compile_blocks(llama) == 3
    assert list(llama.model.layers) == layers  # the same modules, compiled in place
    assert all(layer._compiled_call_impl is not None for layer in llama.model.layers)
    assert llama.model.norm._compiled_call_impl is None and llama._compiled_call_impl is None
    assert list(llama.state_dict()) == keys
    assert compile_blocks(TiedMLP()) == 0
