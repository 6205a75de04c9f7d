"""PEFT adapters on a quantized model: the config checked without touching the model, injected all or
nothing, into the transformers model inside a module, and kept when injected again."""

from __future__ import annotations

import pytest
import torch
from conftest import TiedMLP, model_structure, quantized_llama, tiny_gpt2, tiny_llama
from peft import LoraConfig, PromptTuningConfig, inject_adapter_in_model
from peft.tuners.lora import bnb as lora_bnb
from torch import nn

from bnb_lightning import QuantizationConfig, inject_adapters, quantize_model
from bnb_lightning.adapters import adapter_root, adapter_target, require_peft_config


@pytest.mark.parametrize(("bits", "lora_type"), [(4, lora_bnb.Linear4bit), (8, lora_bnb.Linear8bitLt)])
def test_adapters_use_peft_bitsandbytes_layers(bits, lora_type):
    model = quantized_llama(bits)
    inject_adapters(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    q_proj = model.model.layers[0].self_attn.q_proj
    assert type(q_proj) is lora_type
    # The 4/8-bit flag PEFT reads was only lent for the injection.
    assert not hasattr(model, "is_loaded_in_4bit") and not hasattr(model, "is_loaded_in_8bit")
    tokens = torch.arange(16).view(1, 16)
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    assert torch.isfinite(loss) and q_proj.lora_A["default"].weight.grad is not None


def test_only_adapters_train_and_parameters_outside_the_model_are_frozen():
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = quantized_llama()
            self.value_head = nn.Linear(64, 1)

    wrapper = Wrapper()
    root = inject_adapters(wrapper, LoraConfig(r=4, target_modules="all-linear"))
    assert root is wrapper.model
    trainable = [name for name, p in wrapper.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert not wrapper.value_head.weight.requires_grad


def test_the_users_peft_config_is_left_as_given():
    config = LoraConfig(r=4, target_modules="all-linear")
    inject_adapters(quantized_llama(), config)
    assert config.target_modules == "all-linear"
    gpt2 = tiny_gpt2().train()
    quantize_model(gpt2, QuantizationConfig(bits=4), device="cpu")
    inject_adapters(gpt2, config)  # the same config serves a second, different model
    assert any("lora_A" in name for name, _ in gpt2.named_parameters())


def test_adapters_on_a_plain_module_by_name():
    model = TiedMLP()
    quantize_model(model, QuantizationConfig(bits=4), device="cpu")
    inject_adapters(model, LoraConfig(r=4, target_modules=["up", "down"]))
    assert type(model.up) is lora_bnb.Linear4bit
    assert model.head.weight is model.embed.weight and not model.head.weight.requires_grad


def test_target_modules_matching_nothing_fail():
    with pytest.raises(ValueError, match="not_a_layer"):
        inject_adapters(quantized_llama(), LoraConfig(r=4, target_modules=["not_a_layer"]))


def test_injection_refused_by_peft_leaves_the_model_as_it_was():
    model = quantized_llama()
    before = model_structure(model)
    # layers_to_transform selects no layer: PEFT refuses after matching the names.
    with pytest.raises(ValueError, match=r"PEFT cannot add the adapters of LoraConfig .*layers_to_transform"):
        inject_adapters(model, LoraConfig(r=4, target_modules=["q_proj"], layers_to_transform=[7]))
    assert model_structure(model) == before


@pytest.mark.parametrize(
    ("peft_config", "message"),
    [
        (
            LoraConfig(r=4, target_modules=["q_proj", "v_prj"]),
            r"'v_prj' matches no module .*Did you mean \['v_proj'",
        ),
        (
            LoraConfig(r=4, target_modules=["lm_haed"]),
            r"'lm_haed' matches no module .*Did you mean \['lm_head'",
        ),
    ],
)
def test_a_typo_among_target_modules_is_named(peft_config, message):
    from bnb_lightning.adapters import check_peft_config

    # PEFT alone adds adapters to q_proj and ignores 'v_prj' without a word.
    with pytest.raises(ValueError, match=message):
        check_peft_config(tiny_llama(), peft_config)


def test_the_peft_check_costs_no_memory_and_accepts_dora_on_quantized_layers():
    from bnb_lightning.adapters import check_peft_config

    model = quantized_llama()
    before = model_structure(model)
    check_peft_config(model, LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    assert model_structure(model) == before


def test_injecting_the_same_adapters_again_keeps_them_and_other_adapters_are_refused():
    model = quantized_llama()
    config = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    inject_adapters(model, config)
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    # PEFT alone would give the 'default' adapter new weights.
    inject_adapters(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    assert all(torch.equal(p, adapters[n]) for n, p in model.named_parameters() if p.requires_grad)
    with pytest.raises(ValueError, match=r"already has adapters from another peft_config \(r: 4 -> 8"):
        inject_adapters(model, LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False))


# -- where adapters go ---------------------------------------------------------------------------------


def test_adapters_go_into_the_one_transformers_model_inside_a_module():
    llama = quantized_llama()
    wrapper = nn.ModuleDict({"model": llama, "value_head": nn.Linear(64, 1)})
    assert adapter_target(wrapper) is llama
    assert adapter_root(wrapper) is None
    inject_adapters(wrapper, LoraConfig(r=4, target_modules=["q_proj"]))
    assert adapter_root(wrapper) is llama and adapter_root(llama) is llama
    assert set(llama.peft_config) == {"default"} and not hasattr(wrapper, "peft_config")

    # Two transformers models: neither is the one, so the adapters go into the module holding them.
    both = nn.ModuleDict({"policy": tiny_llama(), "reference": tiny_gpt2()})
    assert adapter_target(both) is both
    plain = TiedMLP()
    assert adapter_target(plain) is plain


def test_adapters_peft_added_by_itself_are_not_added_again():
    model = quantized_llama()
    inject_adapter_in_model(LoraConfig(r=4, target_modules=["q_proj"]), model)
    before = model_structure(model)
    with pytest.raises(
        ValueError,
        match=r"already has PEFT adapters \['default'\], not added by bnb_lightning; .*peft_config=None",
    ):
        inject_adapters(model, LoraConfig(r=4, target_modules=["q_proj"]))
    assert model_structure(model) == before


@pytest.mark.parametrize(
    ("peft_config", "hint"),
    [
        ({"r": 8}, False),
        ({"class_path": "peft.LoraConfig", "init_args": {"r": 8}}, True),
        ("lora", False),
    ],
    ids=["dict", "class-path-dict", "str"],
)
def test_a_peft_config_must_be_a_peft_config_object(peft_config, hint):
    require_peft_config(LoraConfig(r=4))
    with pytest.raises(
        TypeError, match=r"peft_config must be a PEFT config such as peft.LoraConfig\(...\)"
    ) as error:
        require_peft_config(peft_config)
    assert ("LoraConfig(**init_args)" in str(error.value)) is hint


def test_a_prompt_learning_config_is_refused_before_anything_changes():
    model = quantized_llama()
    before = model_structure(model)
    with pytest.raises(ValueError, match=r"PromptTuningConfig learns virtual tokens .* peft.LoraConfig"):
        inject_adapters(model, PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"))
    assert model_structure(model) == before
