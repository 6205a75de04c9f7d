"""Quantized state dict files: torch and safetensors files round-trip, are checked whole before anything
loads, and name the file when it does not fit (one layer's entries and load hooks: test_layer_state.py)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import ARCHITECTURES, Q_PROJ, QUANTIZATIONS, quantized, seeded_logits, tiny_llama
from safetensors import safe_open

from bnb_lightning import QuantizationConfig, quantize_model
from bnb_lightning.backend import flat_bytes
from bnb_lightning.io.state_dict import (
    TIED_METADATA_KEY,
    load_state_dict_file,
    read_state_dict_file,
    save_state_dict_file,
)

pytestmark = pytest.mark.filterwarnings("ignore:MatMul8bitLt")

# -- round trips ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["torch.save+torch.load(weights_only)", "torch file", "safetensors file"])
@pytest.mark.parametrize("quantization", QUANTIZATIONS)
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_round_trip_through_files(architecture, quantization, route, tokens, tmp_path):
    source, target = quantized(architecture, quantization, 0), quantized(architecture, quantization, 1)
    expected = seeded_logits(source, tokens)
    assert not torch.equal(seeded_logits(target, tokens), expected)

    if route.startswith("torch.save"):
        torch.save(source.state_dict(), tmp_path / "model.pt")
        result = target.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True), strict=True)
    else:
        path = tmp_path / ("model.safetensors" if route == "safetensors file" else "model.pt")
        assert save_state_dict_file(source, path) == path
        result = load_state_dict_file(target, path)

    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(seeded_logits(target, tokens), expected)
    if architecture == "llama-tied":
        assert target.lm_head.weight is target.model.embed_tokens.weight


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
    assert torch.equal(seeded_logits(untied, tokens), seeded_logits(source, tokens))


# -- what does not fit ----------------------------------------------------------------------------------


def test_a_file_of_another_model_lists_the_keys_and_leaves_the_model_untouched(tokens, tmp_path):
    path = save_state_dict_file(quantized("gpt2-conv1d", "nf4", 0), tmp_path / "gpt2.safetensors")
    target = quantized("llama-untied", "nf4", 1)
    before = seeded_logits(target, tokens)
    with pytest.raises(RuntimeError) as error:
        load_state_dict_file(target, path)
    message = str(error.value)
    assert f"'{path}' does not fit LlamaForCausalLM" in message
    assert re.search(r"missing \d+ keys: 'model.embed_tokens.weight', .* and \d+ more", message)
    assert re.search(r"unexpected \d+ keys: 'transformer\.h\.0\.", message)
    assert torch.equal(seeded_logits(target, tokens), before)


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
    before = seeded_logits(target, tokens)
    with pytest.raises(
        RuntimeError, match=r"'.*model\.pt' does not fit LlamaForCausalLM: 1 shape or dtype mismatch"
    ):
        load_state_dict_file(target, path)
    with pytest.raises(RuntimeError) as error:
        load_state_dict_file(target, path)
    assert expected in str(error.value)
    assert torch.equal(seeded_logits(target, tokens), before)


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
    expected_logits = seeded_logits(target, tokens)
    before = {key: value.clone() for key, value in target.state_dict().items()}

    with pytest.raises(RuntimeError) as error:
        load_state_dict_file(target, path, strict=strict)

    after = target.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():  # bytes: packed 4-bit data in a float16 storage holds NaN patterns
        assert after[key].dtype == value.dtype and torch.equal(flat_bytes(after[key]), flat_bytes(value)), key
    assert torch.equal(seeded_logits(target, tokens), expected_logits)
    assert re.search(rf"(?s)'{path}' does not fit LlamaForCausalLM: .*{expected}", str(error.value))


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


def test_a_state_dict_read_from_safetensors_is_not_a_view_of_the_file(tmp_path):
    """safetensors maps its files; what was read must survive the file being saved over (cut short here)."""
    path = tmp_path / "state.safetensors"
    save_state_dict_file({"weight": torch.arange(64.0).view(8, 8)}, path)
    state = read_state_dict_file(path)
    with open(path, "r+b") as handle:
        handle.write(b"\0" * path.stat().st_size)
        handle.truncate(8)
    assert torch.equal(state["weight"], torch.arange(64.0).view(8, 8))
