"""quantize_model: agreement with transformers, ties, skips, idempotence, dry run, the report's figures,
failures (the report's table: test_report.py)."""

from __future__ import annotations

import re
import warnings

import bitsandbytes as bnb
import pytest
import torch
from conftest import TiedMLP, bnb_layer_names, quantized_llama, tiny_gpt2, tiny_llama, tiny_opt
from peft import LoraConfig
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from bnb_lightning.adapters import inject_adapters
from bnb_lightning.backend import check_device_supported, is_bnb_linear, is_plain_linear
from bnb_lightning.config import QuantizationConfig
from bnb_lightning.io.checkpoint import base_fingerprint
from bnb_lightning.quantize import QuantizationError, quantize_model
from bnb_lightning.skip import NOT_TARGETED, OUTPUT_EMBEDDINGS, TIED, USER_SKIP
from bnb_lightning.transfer import PARTIAL_HOST_COPY, shard_rows

ARCHITECTURES = {
    "llama-tied": lambda: tiny_llama(tie=True),
    "llama-untied": lambda: tiny_llama(tie=False),
    "gpt2-conv1d": tiny_gpt2,
    "opt": tiny_opt,
}

# The same schemes written as transformers' BitsAndBytesConfig arguments.
BNB_SCHEMES = {
    "nf4-double-quant": {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
    },
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": False},
    "fp4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
    "int8": {"load_in_8bit": True},
}

CONFIGS = {
    "nf4-double-quant": QuantizationConfig(bits=4, quant_type="nf4", double_quant=True),
    "nf4": QuantizationConfig(bits=4, quant_type="nf4", double_quant=False),
    "fp4": QuantizationConfig(bits=4, quant_type="fp4"),
    "int8": QuantizationConfig(bits=8),
}


def _plain_linear_names(model: nn.Module) -> list[str]:
    return sorted(name for name, module in model.named_modules() if name and is_plain_linear(module))


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer object, tied ones under each of their names."""
    return {
        **dict(model.named_parameters(remove_duplicate=False)),
        **dict(model.named_buffers(remove_duplicate=False)),
    }


def _raw_bytes(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the tensors as they are in memory, quantization statistics included.

    Unlike ``state_dict()``, this does not undo bitsandbytes' CPU repacking of 4-bit weights.
    """
    raw = {name: tensor.data.clone() for name, tensor in _tensors(model).items()}
    for name, module in model.named_modules():
        quant_state = getattr(getattr(module, "weight", None), "quant_state", None)
        for state_name, state in (
            ("quant_state", quant_state),
            ("state2", getattr(quant_state, "state2", None)),
        ):
            for key, value in getattr(state, "__dict__", {}).items():
                if isinstance(value, torch.Tensor):
                    raw[f"{name}.{state_name}.{key}"] = value.clone()
    return raw


def _snapshot(model: nn.Module) -> dict:
    """Objects and values of everything in the model, to prove later that nothing changed."""
    return {
        "modules": dict(model.named_modules()),
        "tensors": _tensors(model),
        "values": {name: tensor.detach().clone() for name, tensor in model.state_dict().items()},
    }


def _assert_unchanged(model: nn.Module, snapshot: dict) -> None:
    modules = dict(model.named_modules())
    assert modules.keys() == snapshot["modules"].keys()
    assert all(modules[name] is module for name, module in snapshot["modules"].items())
    tensors = _tensors(model)
    assert tensors.keys() == snapshot["tensors"].keys()
    assert all(tensors[name] is tensor for name, tensor in snapshot["tensors"].items())
    values = model.state_dict()
    for name, value in snapshot["values"].items():
        assert values[name].dtype == value.dtype, name
        assert torch.equal(values[name], value), name


def _assert_same_quantized_bytes(ours: nn.Module, reference: nn.Module) -> None:
    """Packed weights and statistics, read before any forward (a CPU forward may repack 4-bit weights)."""
    assert type(ours) is type(reference)
    assert ours.weight.dtype == reference.weight.dtype
    assert torch.equal(ours.weight.data, reference.weight.data)
    if isinstance(ours, bnb.nn.Linear8bitLt):
        assert torch.equal(ours.weight.SCB, reference.weight.SCB)
        return
    assert ours.compute_dtype == reference.compute_dtype
    ours_state = ours.weight.quant_state.as_dict(packed=False)
    reference_state = reference.weight.quant_state.as_dict(packed=False)
    assert ours_state.keys() == reference_state.keys()
    for key, value in reference_state.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(ours_state[key], value), key
        else:
            assert ours_state[key] == value, key


# -- agreement with transformers ---------------------------------------------------------------------


@pytest.mark.parametrize("scheme", BNB_SCHEMES)
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_agrees_with_transformers_from_pretrained(architecture, scheme, tmp_path, tokens):
    build = ARCHITECTURES[architecture]
    build().save_pretrained(tmp_path)
    bnb_config = BitsAndBytesConfig(**BNB_SCHEMES[scheme])
    reference = AutoModelForCausalLM.from_pretrained(
        tmp_path, quantization_config=bnb_config, device_map="cpu"
    )

    model = build()
    report = quantize_model(model, QuantizationConfig.from_bitsandbytes_config(bnb_config), device="cpu")

    converted = bnb_layer_names(model)
    assert converted == bnb_layer_names(reference)
    assert converted, "nothing was quantized"
    assert _plain_linear_names(model) == _plain_linear_names(reference)
    assert sorted(report.converted) == converted
    assert sorted(report.skipped) == _plain_linear_names(model)
    reference_layers = dict(reference.named_modules())
    for name, layer in model.named_modules():
        if is_bnb_linear(layer):
            _assert_same_quantized_bytes(layer, reference_layers[name])

    # Before any forward: bitsandbytes' CPU repacking (AVX512-BF16 CPUs) changes the reference's own state
    # dict afterwards; ours is restored exactly (bnb_lightning.io.layer_state).
    reference_state = reference.state_dict()
    with torch.no_grad():
        logits = model(tokens).logits
        reference_logits = reference(tokens).logits
    # Same bytes, same kernels, same order of operations: bit-identical logits.
    assert torch.equal(logits, reference_logits)
    # Same modes everywhere: bitsandbytes picks its kernels by training mode.
    assert [m.training for m in model.modules()] == [m.training for m in reference.modules()]

    # state_dict() (which undoes bitsandbytes' CPU repacking after a forward) holds the same bytes too.
    state = model.state_dict()
    assert state.keys() == reference_state.keys()
    for key, value in reference_state.items():
        assert state[key].dtype == value.dtype, key
        assert torch.equal(state[key], value), key


@pytest.mark.parametrize("scheme", ["nf4-double-quant", "int8"])
def test_accepts_a_bitsandbytes_config_directly(scheme):
    bnb_config = BitsAndBytesConfig(**BNB_SCHEMES[scheme])
    direct, converted = tiny_llama(tie=False), tiny_llama(tie=False)
    quantize_model(direct, bnb_config, device="cpu")
    quantize_model(converted, QuantizationConfig.from_bitsandbytes_config(bnb_config), device="cpu")
    direct_state, converted_state = direct.state_dict(), converted.state_dict()
    assert direct_state.keys() == converted_state.keys()
    assert all(torch.equal(direct_state[key], converted_state[key]) for key in direct_state)


# -- ties and skipped modules ------------------------------------------------------------------------


@pytest.mark.parametrize("config", ["nf4-double-quant", "fp4", "int8"])
def test_tied_plain_module_keeps_its_tie(config, tokens):
    model = TiedMLP()
    embedding = model.embed.weight
    report = quantize_model(model, CONFIGS[config], device="cpu")

    assert model.embed.weight is embedding
    assert model.head.weight is embedding
    assert type(model.head) is nn.Linear
    layer_type = bnb.nn.Linear8bitLt if CONFIGS[config].bits == 8 else bnb.nn.Linear4bit
    assert type(model.up) is layer_type and type(model.down) is layer_type
    for layer in (model.up, model.down):
        assert layer.weight.requires_grad is False
        assert layer.bias.requires_grad is False
    assert embedding.requires_grad is True
    assert report.converted == ["up", "down"]
    assert report.skipped == {"head": TIED}
    assert model(tokens).shape == (*tokens.shape, 256)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_skipped_modules_keep_their_tensors(tie):
    model = tiny_llama(tie=tie)
    lm_head, lm_head_weight = model.lm_head, model.lm_head.weight
    embedding, norm_weight = model.model.embed_tokens.weight, model.model.norm.weight
    lm_head_value = lm_head_weight.detach().clone()

    quantize_model(model, QuantizationConfig(), device="cpu")

    assert model.lm_head is lm_head
    assert model.lm_head.weight is lm_head_weight
    assert torch.equal(model.lm_head.weight, lm_head_value)
    assert model.model.embed_tokens.weight is embedding
    assert model.model.norm.weight is norm_weight
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is tie


def test_quantizing_a_model_with_adapters_leaves_the_adapters_alone():
    model = quantized_llama()
    inject_adapters(model, LoraConfig(r=4, target_modules="all-linear"))
    report = quantize_model(model, QuantizationConfig(bits=4), device="cpu")
    assert report.converted == []
    assert {reason for reason in report.skipped.values()} == {"PEFT adapter", "tied weights"}
    assert all(
        type(m) is nn.Linear
        for n, m in model.named_modules()
        if n.endswith(("lora_A.default", "lora_B.default"))
    )


# -- idempotence -------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", ["nf4-double-quant", "fp4", "int8"])
@pytest.mark.parametrize("forward_in_between", [False, True], ids=["no-forward", "after-forward"])
def test_second_call_changes_nothing(config, forward_in_between, tokens):
    model = tiny_llama(tie=False)
    first = quantize_model(model, CONFIGS[config], device="cpu")
    if forward_in_between:
        # In eval mode without grad, bitsandbytes may repack 4-bit weights in place for its CPU kernel;
        # the second call must leave that layout alone too.
        with torch.no_grad():
            model(tokens)
    modules, tensors, raw = dict(model.named_modules()), _tensors(model), _raw_bytes(model)

    second = quantize_model(model, CONFIGS[config], device="cpu")

    assert dict(model.named_modules()) == modules
    assert all(a is b for a, b in zip(_tensors(model).values(), tensors.values(), strict=True))
    after = _raw_bytes(model)
    assert after.keys() == raw.keys()
    assert all(torch.equal(after[key], raw[key]) for key in raw)
    assert second.converted == []
    assert sorted(second.already_quantized) == sorted(first.converted)
    assert second.skipped == first.skipped
    if not forward_in_between:
        # After a repacking forward the layers really hold other bytes (bfloat16 absmax, no nesting).
        assert second.bytes_after == first.bytes_after
    assert "converted 0 linear layers" in second.summary()
    assert f"{len(first.converted)} already quantized" in second.summary()


# -- dry run -----------------------------------------------------------------------------------------

DRY_RUN_CONFIGS = {
    **CONFIGS,
    "nf4-bf16-storage": QuantizationConfig(quant_storage="bfloat16"),
    "int8-fp16-weights": QuantizationConfig(bits=8, has_fp16_weights=True),
}
MODELS = {"llama-untied": lambda: tiny_llama(tie=False), "gpt2-conv1d": tiny_gpt2, "tied-mlp": TiedMLP}


@pytest.mark.parametrize("config", DRY_RUN_CONFIGS)
@pytest.mark.parametrize("architecture", MODELS)
def test_dry_run_leaves_the_model_alone_and_predicts_the_bytes(architecture, config):
    model = MODELS[architecture]()
    snapshot = _snapshot(model)

    estimate = quantize_model(model, DRY_RUN_CONFIGS[config], device="cpu", dry_run=True)

    _assert_unchanged(model, snapshot)
    assert estimate.dry_run
    assert "would convert" in estimate.summary()

    real = quantize_model(model, DRY_RUN_CONFIGS[config], device="cpu")
    assert [(m.name, m.action, m.reason) for m in estimate.modules] == [
        (m.name, m.action, m.reason) for m in real.modules
    ]
    assert [m.bytes_after for m in estimate.modules] == [m.bytes_after for m in real.modules]
    assert estimate.bytes_after == real.bytes_after
    assert estimate.bytes_before == real.bytes_before


# -- report ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "bytes_after"),
    [
        # A 64x64 q_proj without bias: 4096 weights, 64 blocks of 64.
        ("nf4", 4096 // 2 + 64 * 4 + 16 * 4),  # packed + float32 absmax + quant map
        ("nf4-double-quant", 4096 // 2 + 64 + 1 * 4 + 256 * 4 + 16 * 4),  # uint8 absmax + nested stats
        ("int8", 4096 + 64 * 4),  # int8 weight + float32 row scales
    ],
)
def test_report_bytes_of_one_layer(config, bytes_after):
    report = quantize_model(tiny_llama(tie=False), CONFIGS[config], device="cpu")
    q_proj = next(m for m in report.modules if m.name == "model.layers.0.self_attn.q_proj")
    assert (q_proj.layer_type, q_proj.action) == ("Linear", "converted")
    assert q_proj.bytes_before == 64 * 64 * 4
    assert q_proj.bytes_after == bytes_after


@pytest.mark.parametrize("architecture", ["llama-tied", "gpt2-conv1d"])
def test_report_reason_for_tied_lm_head(architecture):
    report = quantize_model(ARCHITECTURES[architecture](), QuantizationConfig(bits=8), device="cpu")
    assert report.skipped["lm_head"] == TIED
    assert "8-bit LLM.int8" in report.summary()


# -- skip_modules, replace_default_skips, target_modules ----------------------------------------------


def test_skip_modules_add_to_the_default_skips():
    model = tiny_llama(tie=False)
    report = quantize_model(model, QuantizationConfig(skip_modules=["mlp.down_proj"]), device="cpu")
    assert type(model.lm_head) is nn.Linear
    assert report.skipped["lm_head"] == OUTPUT_EMBEDDINGS
    for layer in model.model.layers:
        assert type(layer.mlp.down_proj) is nn.Linear
        assert type(layer.mlp.up_proj) is bnb.nn.Linear4bit
    assert report.skipped["model.layers.0.mlp.down_proj"] == USER_SKIP


def test_replace_default_skips_quantizes_the_lm_head():
    model = tiny_llama(tie=False)
    config = QuantizationConfig(skip_modules=["mlp.down_proj"], replace_default_skips=True)
    report = quantize_model(model, config, device="cpu")
    assert type(model.lm_head) is bnb.nn.Linear4bit
    assert "lm_head" in report.converted
    assert set(report.skipped) == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}


def test_target_modules_restricts_conversion():
    model = tiny_llama(tie=False)
    report = quantize_model(model, QuantizationConfig(target_modules=["q_proj"]), device="cpu")
    assert bnb_layer_names(model) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert report.skipped["model.layers.0.mlp.up_proj"] == NOT_TARGETED
    # The default skips still come first.
    assert report.skipped["lm_head"] == OUTPUT_EMBEDDINGS


# -- warnings ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["skip_modules", "target_modules"])
def test_pattern_matching_nothing_warns(field):
    model = tiny_llama(tie=False)
    config = QuantizationConfig(**{field: ["q_proj", "mlp.dwn_proj"]})
    with pytest.warns(
        UserWarning, match=rf"{field} pattern 'mlp.dwn_proj' matches no module of LlamaForCausalLM"
    ):
        quantize_model(model, config, device="cpu")


def test_matching_patterns_do_not_warn():
    config = QuantizationConfig(skip_modules=["down"], target_modules=["up"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantize_model(TiedMLP(), config, device="cpu")
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert [m for m in messages if "kernels" not in m] == []


def test_model_without_linear_layers_warns():
    model = nn.Sequential(nn.Embedding(16, 8), nn.LayerNorm(8))
    snapshot = _snapshot(model)
    with pytest.warns(
        UserWarning, match="Sequential has no nn.Linear or Conv1D layer, so nothing was quantized"
    ):
        report = quantize_model(model, QuantizationConfig(), device="cpu")
    assert report.modules == []
    _assert_unchanged(model, snapshot)


def test_model_quantized_by_transformers_is_left_alone(tmp_path):
    tiny_llama(tie=False).save_pretrained(tmp_path)
    bnb_config = BitsAndBytesConfig(**BNB_SCHEMES["nf4-double-quant"])
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=bnb_config, device_map="cpu")
    snapshot = _snapshot(model)

    with pytest.warns(
        UserWarning, match=r"already quantized: it has 14 bitsandbytes layers.*leaves it as it is"
    ):
        report = quantize_model(model, QuantizationConfig(bits=8), device="cpu")

    _assert_unchanged(model, snapshot)
    assert report.converted == []
    assert sorted(report.already_quantized) == bnb_layer_names(model)


# -- failures ----------------------------------------------------------------------------------------


def test_meta_weights_raise_before_anything_changes():
    with torch.device("meta"):
        model = tiny_llama(tie=False)
    snapshot = {name: module for name, module in model.named_modules()}
    with pytest.raises(ValueError, match=r"meta device.*'model.embed_tokens.weight'.*load them first"):
        quantize_model(model, QuantizationConfig())
    assert all(dict(model.named_modules())[name] is module for name, module in snapshot.items())
    assert bnb_layer_names(model) == []


def test_a_skipped_module_on_meta_raises_before_anything_changes():
    model = tiny_llama(tie=False)
    model.lm_head.to("meta")
    snapshot = {name: module for name, module in model.named_modules()}
    with pytest.raises(ValueError, match="'lm_head.weight'"):
        quantize_model(model, QuantizationConfig(), device="cpu")
    assert all(dict(model.named_modules())[name] is module for name, module in snapshot.items())
    assert bnb_layer_names(model) == []


@pytest.mark.parametrize("config", ["nf4-double-quant", "nf4", "fp4"])
def test_failure_in_the_middle_restores_the_model(config, tokens):
    model = tiny_llama(tie=False)
    # bitsandbytes cannot store the 5 packed bytes of a 3x3 weight as float32: a real failure after
    # the layers before it were converted.
    model.model.layers[1].probe = nn.Linear(3, 3)
    float_storage = CONFIGS[config].replace(quant_storage="float32")
    snapshot = _snapshot(model)

    with pytest.raises(QuantizationError, match=r"'model.layers.1.probe'.*restored") as raised:
        quantize_model(model, float_storage, device="cpu")

    assert "to view Byte as Float" in str(raised.value.__cause__)
    _assert_unchanged(model, snapshot)
    assert bnb_layer_names(model) == []
    # Fixing the cause and calling again works.
    del model.model.layers[1].probe
    report = quantize_model(model, float_storage, device="cpu")
    assert "model.layers.1.self_attn.k_proj" in report.converted
    with torch.no_grad():
        assert torch.isfinite(model(tokens).logits).all()


def test_weights_bitsandbytes_cannot_quantize_are_refused_before_any_layer_changes():
    model = tiny_llama(tie=False).double()
    snapshot = _snapshot(model)
    # Before: bitsandbytes failed on the first layer, and the message said to call quantize_model again.
    with pytest.raises(
        ValueError, match=r"14 linear layers have torch.float64 weights .* Cast the model first"
    ):
        quantize_model(model, QuantizationConfig(), device="cpu")
    _assert_unchanged(model, snapshot)


@pytest.mark.parametrize(
    ("first", "second", "conflict"),
    [
        (QuantizationConfig(), QuantizationConfig(bits=8), "bits: 4 -> 8"),
        (QuantizationConfig(bits=8), QuantizationConfig(), "bits: 8 -> 4"),
        (QuantizationConfig(), QuantizationConfig(quant_type="fp4"), "quant_type: 'nf4' -> 'fp4'"),
        (QuantizationConfig(), QuantizationConfig(double_quant=False), "double_quant: True -> False"),
        (QuantizationConfig(compute_dtype="bf16"), QuantizationConfig(compute_dtype="fp32"), "compute_dtype"),
        (QuantizationConfig(bits=8), QuantizationConfig(bits=8, threshold=4.0), "threshold: 6.0 -> 4.0"),
    ],
)
def test_quantizing_again_with_another_config_is_refused(first, second, conflict):
    model = tiny_llama()
    quantize_model(model, first, device="cpu")
    state = {key: value.clone() for key, value in model.state_dict().items()}
    # Before: a silent no-op ("converted 0 ... already quantized"), the layers staying as they were.
    with pytest.raises(
        ValueError, match=re.escape(f"already quantized by bnb_lightning with another config ({conflict}")
    ):
        quantize_model(model, second, device="cpu")
    assert all(torch.equal(state[key], value) for key, value in model.state_dict().items())
    # The same config again, or one that only leaves the compute dtype to the layers, changes nothing.
    assert quantize_model(model, first, device="cpu").converted == []
    assert (
        quantize_model(model, first.replace(compute_dtype=None) if first.bits == 4 else first).converted == []
    )


# -- compute dtype, modes, training ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_model_computes_in_its_own_dtype(dtype, tokens):
    model = tiny_llama(tie=False, dtype=dtype)
    quantize_model(model, QuantizationConfig(), device="cpu")
    layers = [m for m in model.modules() if is_bnb_linear(m)]
    assert layers
    assert {layer.compute_dtype for layer in layers} == {dtype}
    assert model.lm_head.weight.dtype == dtype
    with torch.no_grad():
        assert model(tokens).logits.dtype == dtype
    # bitsandbytes may pick a compute dtype from the first input; an explicit one must stay.
    assert {layer.compute_dtype for layer in layers} == {dtype}


def test_explicit_compute_dtype_wins():
    model = tiny_llama(tie=False, dtype=torch.bfloat16)
    quantize_model(model, QuantizationConfig(compute_dtype="float32"), device="cpu")
    assert {m.compute_dtype for m in model.modules() if is_bnb_linear(m)} == {torch.float32}


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("config", ["nf4-double-quant", "int8"])
def test_quantized_layers_follow_the_model_mode(config, training):
    model = tiny_llama(tie=False).train(training)
    quantize_model(model, CONFIGS[config], device="cpu")
    assert {m.training for m in model.modules()} == {training}


def _loss_and_input_grad(model: nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    model.train()
    inputs_embeds = model.get_input_embeddings()(tokens).detach().requires_grad_(True)
    loss = model(inputs_embeds=inputs_embeds, labels=tokens).loss
    loss.backward()
    return loss.detach(), inputs_embeds.grad


@pytest.mark.parametrize(("config", "min_cosine"), [("int8", 0.999), ("nf4-double-quant", 0.98)])
def test_forward_and_backward_on_cpu(config, min_cosine, tokens):
    full_loss, full_grad = _loss_and_input_grad(tiny_llama(tie=False), tokens)
    model = tiny_llama(tie=False)
    quantize_model(model, CONFIGS[config], device="cpu")

    loss, grad = _loss_and_input_grad(model, tokens)

    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    # The gradient flows through the quantized layers and stays close to the full-precision one.
    assert torch.nn.functional.cosine_similarity(grad.flatten(), full_grad.flatten(), dim=0) > min_cosine
    assert loss == pytest.approx(full_loss.item(), rel=0.01)
    for layer in (m for m in model.modules() if is_bnb_linear(m)):
        assert layer.weight.grad is None
    assert model.model.norm.weight.grad is not None


# -- device ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu"), None])
def test_cpu_device(device):
    model = TiedMLP()
    report = quantize_model(model, QuantizationConfig(), device=device)
    assert report.device == "cpu"
    assert model.up.weight.device.type == "cpu"


@pytest.mark.parametrize(
    ("device", "error", "match"),
    [
        pytest.param(
            "mps",
            RuntimeError,
            "'mps' is not available",
            marks=pytest.mark.skipif(torch.backends.mps.is_available(), reason="MPS is available here"),
        ),
        ("meta", ValueError, "cannot quantize onto the meta device"),
        pytest.param(
            "cuda",
            RuntimeError,
            "'cuda' is not available",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here"),
        ),
    ],
)
def test_unusable_device_fails_before_anything_changes(device, error, match):
    model = TiedMLP()
    snapshot = _snapshot(model)
    with pytest.raises(error, match=match):
        check_device_supported(device)
    with pytest.raises(error, match=match):
        quantize_model(model, QuantizationConfig(), device=device)
    _assert_unchanged(model, snapshot)


@pytest.mark.parametrize("world", [2, 3])
def test_host_shard_keeps_the_rows_fsdp2_gives_each_rank_and_the_same_fingerprint(world):
    """keep_on_host + host_shard (the callback under FSDP2): each rank keeps, of each packed weight, the
    rows torch.chunk gives it (FSDP2's shard), whole statistics, and the whole model's fingerprint."""
    whole = tiny_llama()
    quantize_model(whole, QuantizationConfig(bits=4), "cpu", keep_on_host=True)
    for rank in range(world):
        part = tiny_llama()
        quantize_model(part, QuantizationConfig(bits=4), "cpu", keep_on_host=True, host_shard=(rank, world))
        assert base_fingerprint(part) == base_fingerprint(whole)
        for name in bnb_layer_names(whole):
            expected, got = whole.get_submodule(name).weight, part.get_submodule(name).weight
            rows = torch.arange(expected.shape[0]).chunk(world)
            start, end = (rows[rank][0].item(), rows[rank][-1].item() + 1) if rank < len(rows) else (0, 0)
            assert (
                getattr(got, PARTIAL_HOST_COPY).start == start and getattr(got, PARTIAL_HOST_COPY).end == end
            )
            assert torch.equal(got.data[start:end], expected.data[start:end]), name
            assert got.device.type == "cpu" and got.shape == expected.shape
            for key, value in expected.quant_state.as_dict(packed=True).items():
                assert torch.equal(got.quant_state.as_dict(packed=True)[key], value), (name, key)
    assert getattr(whole.model.layers[0].mlp.up_proj.weight, PARTIAL_HOST_COPY, None) is None


def test_shard_rows_are_torch_chunks_the_last_ones_short_or_empty():
    for length in (1, 2, 5, 7, 64, 65):
        for world in (1, 2, 3, 4, 8):
            chunks = torch.arange(length).chunk(world)
            for rank in range(world):
                start, end = shard_rows(length, rank, world)
                expected = chunks[rank].tolist() if rank < len(chunks) else []
                assert list(range(start, end)) == expected, (length, world, rank)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"host_shard": (0, 2)}, "needs keep_on_host=True"),
        ({"keep_on_host": True, "host_shard": (2, 2)}, r"0 <= rank < world, got \(2, 2\)"),
        ({"keep_on_host": True, "host_shard": [0, 2]}, r"got \[0, 2\]"),
    ],
)
def test_host_shard_refusals_name_the_fix(kwargs, message):
    model = tiny_llama()
    with pytest.raises(ValueError, match=message):
        quantize_model(model, QuantizationConfig(bits=4), "cpu", **kwargs)
    assert not any(is_bnb_linear(m) for m in model.modules())


def test_keep_on_host_gives_the_same_model_in_cpu_memory_and_is_4bit_only():
    """Quantized on the device, kept in CPU memory (FSDP2 moves each rank's shard): on the CPU, the same model."""
    kept, direct = tiny_llama(), tiny_llama()
    quantize_model(kept, QuantizationConfig(bits=4), "cpu", keep_on_host=True)
    quantize_model(direct, QuantizationConfig(bits=4), "cpu")
    expected, got = direct.state_dict(), kept.state_dict()
    assert expected.keys() == got.keys() and all(torch.equal(got[k], v) for k, v in expected.items())
    model = tiny_llama()
    with pytest.raises(ValueError, match="keep_on_host=True keeps 4-bit layers.*bits=8"):
        quantize_model(model, QuantizationConfig(bits=8), "cpu", keep_on_host=True)
    assert not any(is_bnb_linear(m) for m in model.modules())
