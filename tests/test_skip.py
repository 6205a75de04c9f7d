"""Skip rules: which modules stay in full precision, and how name patterns select modules."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import TiedMLP, tiny_gpt2, tiny_llama, tiny_opt
from torch import nn
from transformers.quantizers.base import get_keys_to_not_convert as transformers_keys_to_not_convert
from transformers.quantizers.quantizers_utils import should_convert_module

from bnb_lightning.skip import (
    LAST_MODULE,
    OUTPUT_EMBEDDINGS,
    TIED,
    default_skips,
    get_keys_to_not_convert,
    keep_in_fp32_patterns,
    matches_any,
    matches_pattern,
)


def _from_config(config_class: str, model_class: str, **fields):
    def build():
        torch.manual_seed(0)
        config = getattr(transformers, config_class)(vocab_size=256, **fields)
        return getattr(transformers, model_class)(config).eval()

    return build


_DECODER = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
ARCHITECTURES = {
    "llama-tied": lambda: tiny_llama(tie=True),
    "llama-untied": lambda: tiny_llama(tie=False),
    "gpt2-conv1d": tiny_gpt2,
    "opt": tiny_opt,
    "qwen2-tied": _from_config(
        "Qwen2Config", "Qwen2ForCausalLM", num_key_value_heads=2, tie_word_embeddings=True, **_DECODER
    ),
    "phi-lm-head-bias": _from_config("PhiConfig", "PhiForCausalLM", **_DECODER),
    "gpt-neox": _from_config("GPTNeoXConfig", "GPTNeoXForCausalLM", **_DECODER),
    "t5-encoder-decoder": _from_config(
        "T5Config", "T5ForConditionalGeneration", d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4
    ),
}


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_same_modules_as_transformers(architecture):
    model = ARCHITECTURES[architecture]()
    # transformers only strips ".weight", so a last parameter that is a bias keeps ".bias"
    # (GPT-2: "transformer.ln_f.bias"); ours names the module, as documented.
    expected = sorted({key.removesuffix(".bias") for key in transformers_keys_to_not_convert(model)})
    assert get_keys_to_not_convert(model) == expected


@pytest.mark.parametrize(
    ("architecture", "expected"),
    [
        ("llama-tied", ["lm_head", "model.embed_tokens", "model.norm"]),
        ("llama-untied", ["lm_head"]),
        ("gpt2-conv1d", ["lm_head", "transformer.ln_f", "transformer.wte"]),
        ("phi-lm-head-bias", ["lm_head"]),
    ],
)
def test_known_architectures(architecture, expected):
    assert get_keys_to_not_convert(ARCHITECTURES[architecture]()) == expected


def test_reasons_on_llama():
    assert default_skips(tiny_llama(tie=True)) == {
        "lm_head": TIED,
        "model.embed_tokens": TIED,
        "model.norm": LAST_MODULE,
    }
    assert default_skips(tiny_llama(tie=False)) == {"lm_head": OUTPUT_EMBEDDINGS}


def test_plain_module_tied_weights_are_found_by_identity():
    model = TiedMLP()
    assert model.head.weight is model.embed.weight
    skips = default_skips(model)
    assert skips["head"] == TIED
    assert skips["embed"] == TIED
    # The tied head is deduplicated out of named_parameters(), so the last parameter is the norm's.
    assert skips["norm"] == LAST_MODULE
    assert get_keys_to_not_convert(model) == ["embed", "head", "norm"]


def test_plain_module_without_ties_has_no_tie_reason():
    model = TiedMLP()
    model.head.weight = nn.Parameter(model.embed.weight.detach().clone())
    assert get_keys_to_not_convert(model) == ["head"]
    assert default_skips(model) == {"head": LAST_MODULE}


def test_last_module_fallback_for_a_head_that_declares_nothing():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    assert default_skips(model) == {"2": LAST_MODULE}


def test_output_embeddings_of_a_nested_model_are_found():
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = tiny_llama(tie=False)
            self.classifier = nn.Linear(64, 2)

    skips = default_skips(Wrapper())
    assert skips["backbone.lm_head"] == OUTPUT_EMBEDDINGS
    assert skips["classifier"] == LAST_MODULE


def test_model_without_parameters_has_no_skips():
    assert get_keys_to_not_convert(nn.ReLU()) == []


def test_keep_in_fp32_patterns_of_t5():
    model = ARCHITECTURES["t5-encoder-decoder"]()
    assert keep_in_fp32_patterns(model) == sorted(type(model)._keep_in_fp32_modules)
    assert keep_in_fp32_patterns(TiedMLP()) == []


@pytest.mark.parametrize(
    ("name", "pattern", "expected"),
    [
        # prefix up to a "." boundary
        ("model.layers.1.mlp", "model.layers.1", True),
        ("model.layers.11.mlp", "model.layers.1", False),
        ("model.layers.1", "model.layers.1", True),
        ("model.layers.10", "model.layers.1", False),
        # regular expression, same boundary
        ("model.layers.11.mlp.down_proj", r"model.layers.\d+.mlp", True),
        ("model.layers.0.self_attn.q_proj", r"model.layers.\d+.mlp", False),
        ("model.layers.3.mlp.gate", "model.layers.*.mlp.gate", True),
        ("model.layers.3.mlp.gate_proj", ".*mlp.gate", False),
        ("model.layers.3.self_attn.q_proj", ".*(q|v)_proj", True),
        ("model.layers.3.self_attn.k_proj", ".*(q|v)_proj", False),
        # suffix
        ("lm_head", "lm_head", True),
        ("model.lm_head", "lm_head", True),
        ("model.decoder.layers.23.fc1", "fc1", True),
        ("model.decoder.layers.23.fc1", "fc2", False),
        ("model.layers.0.mlp.down_proj", "mlp.down_proj", True),
        ("model.layers.0.mlp.down_proj", "up_proj", False),
    ],
)
def test_matches_pattern(name, pattern, expected):
    assert matches_pattern(name, pattern) is expected
    # The same rules as transformers' llm_int8_skip_modules / modules_to_not_convert, in the releases
    # that match at "." boundaries (older ones let "model.layers.1" select "model.layers.11").
    if should_convert_module("model.layers.11.mlp", ["model.layers.1"]):
        assert (not should_convert_module(name, [pattern])) is expected


def test_matches_any():
    assert matches_any("model.layers.0.mlp.up_proj", ["lm_head", "up_proj"])
    assert not matches_any("model.layers.0.mlp.up_proj", ["lm_head", "down_proj"])
    assert not matches_any("model.layers.0.mlp.up_proj", [])


def test_an_invalid_regex_still_matches_as_a_suffix():
    assert matches_pattern("model.layers[1", "layers[1")
    assert not matches_pattern("model.layers.1", "layers[1")
