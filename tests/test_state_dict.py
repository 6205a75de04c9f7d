"""Quantized state dicts round-trip: load_state_dict(strict=True), torch files, safetensors files."""

from __future__ import annotations

import copy
import json
import re

import bitsandbytes as bnb
import pytest
import torch
from accelerate import init_empty_weights
from conftest import tiny_gpt2, tiny_llama
from safetensors import safe_open

from bnb_lightning import QuantizationConfig, get_keys_to_not_convert, quantize_model, replace_with_bnb_linear
from bnb_lightning.backend import flat_bytes
from bnb_lightning.state_dict import (
    TIED_METADATA_KEY,
    load_state_dict_file,
    read_state_dict_file,
    save_state_dict_file,
)

pytestmark = pytest.mark.filterwarnings("ignore:MatMul8bitLt")

ARCHITECTURES = {
    "llama-tied": lambda seed: tiny_llama(tie=True, seed=seed),
    "llama-untied": lambda seed: tiny_llama(tie=False, seed=seed),
    "gpt2-conv1d": lambda seed: tiny_gpt2(seed=seed),
}
QUANTIZATIONS = {
    "nf4": QuantizationConfig(bits=4, quant_type="nf4", double_quant=False),
    "nf4-double-quant": QuantizationConfig(bits=4, quant_type="nf4", double_quant=True),
    "fp4": QuantizationConfig(bits=4, quant_type="fp4", double_quant=False),
    "fp4-double-quant": QuantizationConfig(bits=4, quant_type="fp4", double_quant=True),
    "int8": QuantizationConfig(bits=8),
}
Q_PROJ = "model.layers.0.self_attn.q_proj"


def quantized(architecture: str, quantization: str, seed: int):
    """A tiny model with weights from ``seed``, quantized on the CPU (eval mode, as conftest builds it)."""
    model = ARCHITECTURES[architecture](seed)
    quantize_model(model, QUANTIZATIONS[quantization], device="cpu")
    return model


def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """Under no_grad and in eval mode, bitsandbytes repacks 4-bit weights on CPUs with AVX512-BF16."""
    torch.manual_seed(0)  # same dropout masks in training mode
    with torch.no_grad():
        return model(tokens).logits


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
    expected = logits(source, tokens)
    assert not torch.equal(logits(target, tokens), expected)  # the target has run a forward too

    state_dict = source.state_dict()
    result = target.load_state_dict(state_dict, strict=True)

    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(logits(target, tokens), expected)
    if architecture == "llama-tied":
        assert target.lm_head.weight is target.model.embed_tokens.weight
    for name, layer in bnb_layers(target).items():
        assert not layer.weight.requires_grad
        # Copied, as load_state_dict does: nothing shares memory with the state dict.
        loaded = state_dict[f"{name}.weight"].untyped_storage().data_ptr()
        assert layer.weight.untyped_storage().data_ptr() != loaded


@pytest.mark.parametrize("route", ["torch.save+torch.load(weights_only)", "torch file", "safetensors file"])
@pytest.mark.parametrize("quantization", QUANTIZATIONS)
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_round_trip_through_files(architecture, quantization, route, tokens, tmp_path):
    source, target = quantized(architecture, quantization, 0), quantized(architecture, quantization, 1)
    expected = logits(source, tokens)
    assert not torch.equal(logits(target, tokens), expected)

    if route.startswith("torch.save"):
        torch.save(source.state_dict(), tmp_path / "model.pt")
        result = target.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True), strict=True)
    else:
        path = tmp_path / ("model.safetensors" if route == "safetensors file" else "model.pt")
        assert save_state_dict_file(source, path) == path
        result = load_state_dict_file(target, path)

    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(logits(target, tokens), expected)
    if architecture == "llama-tied":
        assert target.lm_head.weight is target.model.embed_tokens.weight


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
@pytest.mark.parametrize("architecture", ["llama-untied", "gpt2-conv1d"])
def test_saving_after_an_eval_forward_round_trips_exactly(architecture, quantization, tokens, tmp_path):
    source = quantized(architecture, quantization, 0)
    before_forward = {key: value.clone() for key, value in source.state_dict().items()}
    expected = logits(source, tokens)
    if QUANTIZATIONS[quantization].bits == 4 and repacks_on_this_cpu(source):
        assert packed_for_cpu(source), "the eval forward did not repack the weights for the CPU"

    # The state dict is what quantization made, not bitsandbytes' lossy inverse of its CPU layout.
    after_forward = source.state_dict()
    assert after_forward.keys() == before_forward.keys()
    for key, value in before_forward.items():
        assert after_forward[key].dtype == value.dtype and torch.equal(after_forward[key], value), key
    assert torch.equal(logits(source, tokens), expected)  # saving did not change the model

    save_state_dict_file(source, tmp_path / "model.safetensors")
    target = quantized(architecture, quantization, 1)
    logits(target, tokens)  # repacked too, and loading resets that
    load_state_dict_file(target, tmp_path / "model.safetensors")
    assert not packed_for_cpu(target)
    assert torch.equal(logits(target, tokens), expected)


def test_tied_weights_are_stored_once_in_safetensors_and_tied_again(tokens, tmp_path):
    source = quantized("llama-tied", "nf4", 0)
    path = save_state_dict_file(source, tmp_path / "model.safetensors")
    with safe_open(path, framework="pt") as file:
        stored, metadata = set(file.keys()), file.metadata()
    assert "lm_head.weight" not in stored and "model.embed_tokens.weight" in stored
    assert json.loads(metadata[TIED_METADATA_KEY]) == {"lm_head.weight": "model.embed_tokens.weight"}
    state_dict = read_state_dict_file(path)
    assert state_dict["lm_head.weight"] is state_dict["model.embed_tokens.weight"]

    untied = quantized("llama-untied", "nf4", 1)  # same keys; both weights get the one stored tensor
    load_state_dict_file(untied, path)
    assert torch.equal(untied.lm_head.weight, source.model.embed_tokens.weight)
    assert torch.equal(logits(untied, tokens), logits(source, tokens))


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
    assert torch.equal(logits(target, tokens), logits(source, tokens))


def test_a_deep_copy_keeps_the_hooks(tokens):
    source, target = quantized("llama-tied", "nf4", 0), copy.deepcopy(quantized("llama-tied", "nf4", 1))
    target.load_state_dict(source.state_dict(), strict=True)
    assert torch.equal(logits(target, tokens), logits(source, tokens))


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


def test_a_file_of_another_model_lists_the_keys_and_leaves_the_model_untouched(tokens, tmp_path):
    path = save_state_dict_file(quantized("gpt2-conv1d", "nf4", 0), tmp_path / "gpt2.safetensors")
    target = quantized("llama-untied", "nf4", 1)
    before = logits(target, tokens)
    with pytest.raises(RuntimeError) as error:
        load_state_dict_file(target, path)
    message = str(error.value)
    assert f"'{path}' does not fit LlamaForCausalLM" in message
    assert re.search(r"missing \d+ keys: 'model.embed_tokens.weight', .* and \d+ more", message)
    assert re.search(r"unexpected \d+ keys: 'transformer\.h\.0\.", message)
    assert torch.equal(logits(target, tokens), before)


@pytest.mark.parametrize(
    ("key", "change", "expected"),
    [
        (
            "model.norm.weight",
            lambda v: torch.ones(32),
            "'model.norm.weight': (32,) torch.float32 in the file, (64,)",
        ),
        (
            f"{Q_PROJ}.weight",
            lambda v: v.to(torch.int8),
            "(2048, 1) torch.int8 in the file, (2048, 1) torch.uint8",
        ),
    ],
)
def test_a_file_with_another_shape_or_dtype_names_the_entry(key, change, expected, tokens, tmp_path):
    state_dict = quantized("llama-untied", "nf4", 0).state_dict()
    state_dict[key] = change(state_dict[key])
    path = save_state_dict_file(state_dict, tmp_path / "model.pt")
    target = quantized("llama-untied", "nf4", 1)
    before = logits(target, tokens)
    with pytest.raises(
        RuntimeError, match=r"'.*model\.pt' does not fit LlamaForCausalLM: 1 shape or dtype mismatch"
    ):
        load_state_dict_file(target, path)
    with pytest.raises(RuntimeError) as error:
        load_state_dict_file(target, path)
    assert expected in str(error.value)
    assert torch.equal(logits(target, tokens), before)


# The last quantized layer torch reaches: with a check in its load hook only, every tensor before it is
# overwritten by the time the hook refuses the file.
LAST_LAYER = "model.layers.1.mlp.down_proj"


def quantized_with(config: QuantizationConfig, seed: int):
    model = tiny_llama(tie=False, seed=seed)
    quantize_model(model, config, device="cpu")
    return model


UNFIT_FILES = {
    "a nested_absmax missing": (
        QUANTIZATIONS["nf4-double-quant"],
        QUANTIZATIONS["nf4-double-quant"],
        lambda state_dict: state_dict.pop(f"{LAST_LAYER}.weight.nested_absmax"),
        True,
        rf"missing statistics for the quantized weight '{LAST_LAYER}.weight': \['nested_absmax'\]",
    ),
    "nf4 into fp4": (
        QUANTIZATIONS["nf4"],
        QUANTIZATIONS["fp4"],
        lambda state_dict: None,
        True,
        rf"14 quantized layers do not fit: '{Q_PROJ}.weight' was saved as nf4 but the layer is configured for "
        r"fp4; .*quant_type='nf4'.* and 11 more layers \('model.layers.0.self_attn.o_proj', ",
    ),
    "bfloat16 quant_storage into float16": (
        QuantizationConfig(bits=4, quant_storage="bfloat16"),
        QuantizationConfig(bits=4, quant_storage="float16"),
        lambda state_dict: None,
        True,
        rf"dtype torch.bfloat16 of '{Q_PROJ}.weight' does not fit this Linear4bit: .* in torch.float16",
    ),
    "an int8 weight in another layout": (
        QUANTIZATIONS["int8"],
        QUANTIZATIONS["int8"],
        lambda state_dict: state_dict.update(
            {f"{LAST_LAYER}.weight_format": torch.tensor(1, dtype=torch.uint8)}
        ),
        True,
        rf"{LAST_LAYER}.weight_format=1: only row-major int8 weights \(0\) can be loaded",
    ),
    "an SCB missing, not strict": (
        QUANTIZATIONS["int8"],
        QUANTIZATIONS["int8"],
        lambda state_dict: state_dict.pop(f"{LAST_LAYER}.SCB"),
        False,
        rf"missing statistics for the quantized weight '{LAST_LAYER}.weight': \['SCB'\]",
    ),
}


@pytest.mark.parametrize("case", UNFIT_FILES)
def test_a_file_whose_statistics_do_not_fit_leaves_every_tensor_untouched(case, tokens, tmp_path):
    saved_config, model_config, change, strict, expected = UNFIT_FILES[case]
    state_dict = quantized_with(saved_config, 0).state_dict()
    change(state_dict)
    path = save_state_dict_file(state_dict, tmp_path / "model.safetensors")
    target = quantized_with(model_config, 1)
    expected_logits = logits(target, tokens)
    before = {key: value.clone() for key, value in target.state_dict().items()}

    with pytest.raises(RuntimeError) as error:
        load_state_dict_file(target, path, strict=strict)

    after = target.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():  # bytes: packed 4-bit data in a float16 storage holds NaN patterns
        assert after[key].dtype == value.dtype and torch.equal(flat_bytes(after[key]), flat_bytes(value)), key
    assert torch.equal(logits(target, tokens), expected_logits)
    assert re.search(rf"(?s)'{path}' does not fit LlamaForCausalLM: .*{expected}", str(error.value))


def test_the_packed_dtype_is_checked_by_plain_load_state_dict_too():
    state_dict = quantized("llama-untied", "nf4", 0).state_dict()
    state_dict[f"{Q_PROJ}.weight"] = state_dict[f"{Q_PROJ}.weight"].to(torch.int8)
    with pytest.raises(
        RuntimeError, match=rf"dtype torch.int8 of '{Q_PROJ}.weight' does not fit this Linear4bit"
    ):
        quantized("llama-untied", "nf4", 1).load_state_dict(state_dict)


@pytest.mark.parametrize("through", ["load_state_dict", "load_state_dict_file"])
@pytest.mark.parametrize("quantization", ["nf4-double-quant", "int8"])
def test_not_strict_reports_missing_and_unexpected_keys_as_torch_does(quantization, through, tmp_path):
    source, target = quantized("llama-untied", quantization, 0), quantized("llama-untied", quantization, 1)
    state_dict = source.state_dict()
    del state_dict[f"{Q_PROJ}.weight"]  # its statistics stay, with no weight to go with
    state_dict["extra.weight"] = torch.ones(2)
    if through == "load_state_dict":
        result = target.load_state_dict(state_dict, strict=False)
    else:
        result = load_state_dict_file(
            target, save_state_dict_file(state_dict, tmp_path / "m.safetensors"), strict=False
        )

    statistics = sorted(key for key in state_dict if key.startswith(f"{Q_PROJ}."))
    assert statistics  # weight.absmax, ... for 4-bit; SCB, weight_format for int8
    assert result.missing_keys == [f"{Q_PROJ}.weight"]
    assert sorted(result.unexpected_keys) == sorted([*statistics, "extra.weight"])
    k_proj = Q_PROJ.replace("q_proj", "k_proj")
    assert torch.equal(
        target.get_submodule(k_proj).weight, source.get_submodule(k_proj).weight
    )  # the rest loaded

    if through == "load_state_dict_file":
        with pytest.raises(RuntimeError, match=r"missing 1 keys: .*q_proj.weight'; unexpected \d+ keys: "):
            load_state_dict_file(target, tmp_path / "m.safetensors")


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


# -- files ----------------------------------------------------------------------------------------------


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"no state dict file at '{tmp_path / 'none.safetensors'}'"):
        load_state_dict_file(quantized("llama-untied", "nf4", 0), tmp_path / "none.safetensors")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_truncated_file_is_named(suffix, tmp_path):
    path = save_state_dict_file(quantized("llama-untied", "nf4", 0), tmp_path / f"model{suffix}")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    target = quantized("llama-untied", "nf4", 1)
    with pytest.raises(ValueError, match=rf"cannot read '{path}' as a .* file: .*truncated or corrupt"):
        load_state_dict_file(target, path)


def test_a_training_checkpoint_is_not_a_state_dict(tmp_path):
    path = tmp_path / "last.ckpt"
    torch.save({"epoch": 3, "state_dict": {"weight": torch.ones(2)}}, path)
    with pytest.raises(
        ValueError,
        match=rf"'{path}' is not a state dict file.*entries 'epoch', 'state_dict' are not tensors.*'state_dict' entry",
    ):
        read_state_dict_file(path)


def test_an_unknown_suffix_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"suffix '.npz'.*\.safetensors"):
        save_state_dict_file({"weight": torch.ones(2)}, tmp_path / "model.npz")


@pytest.mark.parametrize(
    ("suffix", "failing_entry"),
    [
        (".safetensors", torch.empty(2, device="meta")),  # safetensors cannot copy data out of a meta tensor
        (".pt", lambda: None),  # torch.save cannot pickle a lambda
    ],
)
def test_an_interrupted_save_keeps_the_previous_file(suffix, failing_entry, tmp_path):
    path = save_state_dict_file(quantized("llama-untied", "nf4", 0), tmp_path / f"model{suffix}")
    previous = path.read_bytes()
    with pytest.raises(Exception):  # noqa: B017 - the writer's own error
        save_state_dict_file({"weight": torch.ones(2), "broken": failing_entry}, path)
    assert path.read_bytes() == previous
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left
