"""The loading path: replace_with_bnb_linear + set_module_quantized_tensor_to_device, against transformers."""

from __future__ import annotations

import copy
import warnings

import bitsandbytes as bnb
import pytest
import torch
from accelerate import init_empty_weights
from conftest import VOCAB, TiedMLP, assert_same_loss_and_grads, lora_step, tiny_gpt2, tiny_llama
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

from bnb_lightning import (
    QuantizationConfig,
    get_keys_to_not_convert,
    quantize_model,
    replace_8bit_linear,
    replace_with_bnb_linear,
    set_module_8bit_tensor_to_device,
    set_module_quantized_tensor_to_device,
)
from bnb_lightning.replace import _refuse_empty_forward, load_quantized_state_dict

pytestmark = pytest.mark.filterwarnings("ignore:MatMul8bitLt")

BNB_LAYERS = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
ARCHITECTURES = {
    "llama-tied": lambda: tiny_llama(tie=True),
    "llama-untied": lambda: tiny_llama(tie=False),
    "gpt2-conv1d": tiny_gpt2,
}
QUANTIZATIONS = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "nf4-double-quant": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "int8": dict(load_in_8bit=True),
}


def bnb_config(quantization: str) -> BitsAndBytesConfig:
    """A fresh config each time: transformers may change the one it is given."""
    fields = QUANTIZATIONS[quantization]
    if fields.get("load_in_4bit"):
        fields = {**fields, "bnb_4bit_compute_dtype": torch.float32}
    return BitsAndBytesConfig(**fields)


TOKENS = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """``get(arch)`` -> full-precision checkpoint dir; ``get(arch, quantization)`` -> the dir that
    transformers' ``save_pretrained`` wrote for the model it quantized on load. Built once per module."""
    made: dict[tuple[str, str | None], str] = {}

    def get(arch: str, quantization: str | None = None) -> str:
        if (arch, quantization) not in made:
            path = tmp_path_factory.mktemp(f"{arch}-{quantization or 'fp'}")
            if quantization is None:
                ARCHITECTURES[arch]().save_pretrained(path)
            else:
                transformers_model(get(arch), quantization).save_pretrained(path)
            made[arch, quantization] = str(path)
        return made[arch, quantization]

    return get


@pytest.fixture(scope="module")
def transformers_logits(checkpoints):
    """``get(arch, quantization, source)`` -> logits of transformers' own loading of that checkpoint."""
    made: dict[tuple[str, str, str], torch.Tensor] = {}

    def get(arch: str, quantization: str, source: str) -> torch.Tensor:
        if (arch, quantization, source) not in made:
            if source == "prequantized":
                model = transformers_model(checkpoints(arch, quantization))
            else:  # quantized on load
                model = transformers_model(checkpoints(arch), quantization)
            made[arch, quantization, source] = logits(model, TOKENS)
        return made[arch, quantization, source]

    return get


def transformers_model(path: str, quantization: str | None = None) -> nn.Module:
    """transformers' own loading. Fresh each time: on AVX512-BF16 CPUs an eval forward of Linear4bit
    repacks ``weight.data`` in place (same results, different bytes), so weights are compared unrun."""
    # No quantization_config key for a pre-quantized checkpoint: an explicit None would override its own.
    extra = {} if quantization is None else {"quantization_config": bnb_config(quantization)}
    return AutoModelForCausalLM.from_pretrained(path, device_map="cpu", **extra).eval()


def skeleton(path: str, quantization: str) -> nn.Module:
    """The bnb_lightning path: an empty model on meta, its linears swapped for empty bnb layers."""
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    assert all(p.device.type == "meta" for p in model.parameters())
    assert all(b.device.type == "cpu" for b in model.buffers())  # e.g. rotary inv_freq, not in checkpoints
    modules_to_not_convert = get_keys_to_not_convert(model)
    return replace_with_bnb_linear(
        model, modules_to_not_convert, quantization_config=bnb_config(quantization)
    )


def load_tensor_by_tensor(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """What a user of transformers' old API writes: each weight with its statistics, the rest plain."""
    quantized = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, BNB_LAYERS)}

    def weight_of(key: str) -> str | None:
        module_name, _, stat = key.rpartition(".")
        if stat in ("SCB", "weight_format") and f"{module_name}.weight" in quantized:
            return f"{module_name}.weight"
        return next((w for w in quantized if key.startswith(f"{w}.")), None)

    statistics: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if weight_of(key) is not None:
            statistics.setdefault(weight_of(key), {})[key] = value
    for key, value in state_dict.items():
        if weight_of(key) is None:
            set_module_quantized_tensor_to_device(
                model, key, "cpu", value, quantized_stats=statistics.get(key)
            )


def logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(tokens).logits


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_save_pretrained_writes_quant_state_on_cpu(checkpoints, arch, quantization):
    state_dict = load_file(f"{checkpoints(arch, quantization)}/model.safetensors")
    full_precision = ARCHITECTURES[arch]()
    layers = [n for n, m in full_precision.named_modules() if type(m).__name__ in ("Linear", "Conv1D")]
    layers.remove("lm_head")  # transformers keeps the output embeddings in full precision
    fields = QUANTIZATIONS[quantization]
    for name in layers:
        if fields.get("load_in_8bit"):
            expected = {"weight": torch.int8, "SCB": torch.float32, "weight_format": torch.uint8}
        else:
            nested = ("nested_absmax", "nested_quant_map") if fields.get("bnb_4bit_use_double_quant") else ()
            stats = (
                "absmax",
                "quant_map",
                f"quant_state.bitsandbytes__{fields['bnb_4bit_quant_type']}",
                *nested,
            )
            expected = {"weight": torch.uint8, **{f"weight.{stat}": None for stat in stats}}
        for suffix, dtype in expected.items():
            assert f"{name}.{suffix}" in state_dict, f"{name}.{suffix} not saved"
            assert dtype is None or state_dict[f"{name}.{suffix}"].dtype == dtype


@pytest.mark.parametrize(
    ("source", "loader"),
    [
        ("prequantized", "load_quantized_state_dict"),
        ("prequantized", "tensor_by_tensor"),  # how the statistics are grouped matters only here
        ("full_precision", "load_quantized_state_dict"),
    ],
)
@pytest.mark.parametrize("quantization", QUANTIZATIONS)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_checkpoint_loads_to_transformers_logits(
    checkpoints, transformers_logits, arch, quantization, source, loader
):
    path = checkpoints(arch, quantization if source == "prequantized" else None)
    model = skeleton(path, quantization)
    state_dict = load_file(f"{path}/model.safetensors")
    if loader == "load_quantized_state_dict":
        missing = load_quantized_state_dict(model, state_dict, "cpu")
        assert missing == (["lm_head.weight"] if model.config.tie_word_embeddings else [])
    else:
        load_tensor_by_tensor(model, state_dict)
    if model.config.tie_word_embeddings:
        model.tie_weights()
    assert not [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    layers = [m for m in model.modules() if isinstance(m, BNB_LAYERS)]
    assert layers and all(m.weight.dtype in (torch.uint8, torch.int8) for m in layers)
    assert type(model.lm_head) is nn.Linear
    # Same kernels, same packed weights and statistics: the logits are bit-identical.
    expected = transformers_logits(arch, quantization, source)
    torch.testing.assert_close(logits(model, TOKENS), expected, rtol=0, atol=0)


@pytest.mark.parametrize("quantization", ["nf4-double-quant", "fp4", "int8"])
@pytest.mark.parametrize("source", ["prequantized", "full_precision"])
def test_conv1d_weights_are_transposed_only_when_full_precision(checkpoints, source, quantization):
    path = checkpoints("gpt2-conv1d", quantization if source == "prequantized" else None)
    model = skeleton(path, quantization)
    load_tensor_by_tensor(model, load_file(f"{path}/model.safetensors"))
    reference = transformers_model(path, None if source == "prequantized" else quantization)
    full_precision = tiny_gpt2()  # the same seeded weights as the checkpoint, Conv1D layout (in, out)
    for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):  # attn.c_proj is square
        ours = model.get_submodule(f"transformer.h.0.{name}")
        theirs = reference.get_submodule(f"transformer.h.0.{name}")
        conv1d_weight = full_precision.get_submodule(f"transformer.h.0.{name}").weight
        assert (ours.in_features, ours.out_features) == tuple(conv1d_weight.shape)
        assert torch.equal(ours.weight.data, theirs.weight.data)
        if isinstance(ours, bnb.nn.Linear4bit):
            assert tuple(ours.weight.quant_state.shape) == (ours.out_features, ours.in_features)
            dequantized = bnb.functional.dequantize_4bit(ours.weight.data, ours.weight.quant_state)
            tolerance = 0.25 * conv1d_weight.abs().max().item()
        else:
            assert ours.weight.shape == (ours.out_features, ours.in_features)
            dequantized = ours.weight.data.float() * ours.weight.SCB[:, None] / 127
            tolerance = conv1d_weight.abs().max().item() / 127
        torch.testing.assert_close(dequantized, conv1d_weight.T, rtol=0, atol=tolerance)


# ---------------------------------------------------------------- calling a model before it is loaded


def empty_checks(model: nn.Module) -> list[str]:
    """The layers that still run replace_with_bnb_linear's empty-layer check before each forward."""
    return [
        name
        for name, module in model.named_modules()
        if any(hook is _refuse_empty_forward for hook in module._forward_pre_hooks.values())
    ]


EMPTY_Q_PROJ = (
    r"model\.layers\.0\.self_attn\.q_proj \({layer}\) has no weights yet \(weight on the meta device\): "
    r"replace_with_bnb_linear\(\) built it empty\. Load its weights with "
    r"set_module_quantized_tensor_to_device\(\.\.\.\) or load_quantized_state_dict\(\.\.\.\) before calling"
)


@pytest.mark.parametrize("quantization", ["nf4-double-quant", "int8"])
def test_an_empty_model_names_the_layer_to_load_and_runs_without_the_check_once_loaded(
    checkpoints, transformers_logits, quantization
):
    path = checkpoints("llama-untied", quantization)
    model = skeleton(path, quantization)
    layer = "Linear8bitLt" if quantization == "int8" else "Linear4bit"
    with pytest.raises(RuntimeError, match=EMPTY_Q_PROJ.format(layer=layer)):
        logits(model, TOKENS)
    assert len(empty_checks(model)) == 14

    load_quantized_state_dict(model, load_file(f"{path}/model.safetensors"), "cpu")

    assert empty_checks(model) == []  # gone before the first forward: nothing runs per step
    expected = transformers_logits("llama-untied", quantization, "prequantized")
    torch.testing.assert_close(logits(model, TOKENS), expected, rtol=0, atol=0)


# bitsandbytes 0.50 cannot deep-copy a Linear4bit on the meta device, with or without the check.
@pytest.mark.parametrize(("bits", "copy_with"), [(4, "torch.save"), (8, "torch.save"), (8, "deepcopy")])
def test_the_check_survives_copies_and_leaves_when_load_state_dict_fills_the_layers(
    bits, copy_with, tmp_path
):
    config = QuantizationConfig(bits=bits)
    source = tiny_llama(tie=False)
    quantize_model(source, config, device="cpu")
    model = replace_with_bnb_linear(tiny_llama(tie=False), quantization_config=config)
    if copy_with == "deepcopy":
        model = copy.deepcopy(model)
    else:
        torch.save(model, tmp_path / "model.pt")
        model = torch.load(tmp_path / "model.pt", weights_only=False)
    with pytest.raises(
        RuntimeError, match=EMPTY_Q_PROJ.format(layer="Linear8bitLt" if bits == 8 else "Linear4bit")
    ):
        logits(model, TOKENS)

    model.load_state_dict(source.state_dict(), strict=True, assign=True)

    assert empty_checks(model) == []
    assert torch.equal(logits(model, TOKENS), logits(source, TOKENS))


@pytest.mark.parametrize("bits", [4, 8])
def test_a_layer_filled_by_hand_drops_the_check_at_its_first_forward(bits):
    source = tiny_llama(tie=False)
    quantize_model(source, QuantizationConfig(bits=bits), device="cpu")
    model = replace_with_bnb_linear(tiny_llama(tie=False), quantization_config=QuantizationConfig(bits=bits))
    for name in empty_checks(model):  # copies: bitsandbytes moves an int8 weight's scales into its layer
        model.get_submodule(name).weight = copy.deepcopy(source.get_submodule(name).weight)

    assert len(empty_checks(model)) == 14  # no loader of ours saw the weights arrive
    assert torch.equal(logits(model, TOKENS), logits(source, TOKENS))
    assert empty_checks(model) == []


def test_a_4bit_layer_given_full_precision_weights_says_it_has_no_quantization_state():
    model = replace_with_bnb_linear(tiny_llama(tie=False), quantization_config=QuantizationConfig())
    model.load_state_dict(tiny_llama(tie=False).state_dict(), assign=True)  # plain float Parameters
    with pytest.raises(
        RuntimeError,
        match=r"^model\.layers\.0\.self_attn\.q_proj \(Linear4bit\) has a weight but no 4-bit quantization "
        r"state: .*load_quantized_state_dict\(\.\.\.\), which quantize full-precision weights",
    ):
        logits(model, TOKENS)


def test_quantize_model_adds_no_check():
    model = tiny_llama(tie=False)
    quantize_model(model, QuantizationConfig(), device="cpu")
    assert empty_checks(model) == []


@pytest.mark.parametrize("loaded_with", ["load_quantized_state_dict", "load_state_dict(assign=True)"])
def test_compiled_blocks_train_after_loading_an_empty_model(loaded_with):
    config = QuantizationConfig(compute_dtype=torch.bfloat16)
    source = tiny_llama(tie=False, dtype=torch.bfloat16)
    quantize_model(source, config, device="cpu")

    def loss_and_grads(compiled: bool):
        with init_empty_weights():
            model = tiny_llama(tie=False, dtype=torch.bfloat16, seed=1)
        replace_with_bnb_linear(model, get_keys_to_not_convert(model), quantization_config=config)
        if loaded_with == "load_quantized_state_dict":
            load_quantized_state_dict(model, source.state_dict(), "cpu")
        else:
            model.load_state_dict(source.state_dict(), strict=True, assign=True)
        return lora_step(model, TOKENS, fused=compiled, compiled=compiled)

    torch._dynamo.reset()
    expected_loss, expected_grads, _ = loss_and_grads(compiled=False)
    torch._dynamo.reset()
    loss, grads, graphs = loss_and_grads(compiled=True)
    # One graph for both blocks: a hook left on the layers would make the compiler give up on them.
    assert graphs == 1
    assert_same_loss_and_grads((expected_loss, expected_grads), (loss, grads))


# ---------------------------------------------------------------- set_module_quantized_tensor_to_device


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(64, 32)
        self.head = nn.Linear(32, 8, bias=False)
        self.norm = nn.LayerNorm(32)
        self.register_buffer("scale", torch.ones(32))
        self.register_buffer("cache", torch.zeros(4), persistent=False)


def bnb_net(bits: int = 4, quant_type: str = "nf4") -> Net:
    config = QuantizationConfig(bits=4, quant_type=quant_type) if bits == 4 else QuantizationConfig(bits=8)
    return replace_with_bnb_linear(Net(), modules_to_not_convert=["head"], quantization_config=config)


def saved_layer(bits: int, quant_type: str = "nf4", out_features: int = 32) -> dict[str, torch.Tensor]:
    """State dict of a real bnb layer quantized on CPU, keyed as in a checkpoint of ``Net``."""
    torch.manual_seed(0)
    if bits == 8:
        layer = bnb.nn.Linear8bitLt(64, out_features, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(64, out_features, quant_type=quant_type, compress_statistics=True)
    return {f"proj.{key}": value for key, value in layer.to("cpu").state_dict().items()}


def weight_and_stats(bits: int, quant_type: str = "nf4", out_features: int = 32, drop: str = ""):
    state = saved_layer(bits, quant_type, out_features)
    stats = {k: v for k, v in state.items() if k not in ("proj.weight", "proj.bias") and k != f"proj.{drop}"}
    return state["proj.weight"], stats


ERRORS = {
    "unknown module": (4, lambda: ("proj2.weight", torch.zeros(32, 64), None), ["'proj2.weight'", "'proj2'"]),
    "unknown parameter": (
        4,
        lambda: ("proj.weights", torch.zeros(32, 64), None),
        ["'proj.weights'", "no parameter or buffer 'weights'"],
    ),
    "plain shape": (4, lambda: ("norm.weight", torch.ones(31), None), ["'norm.weight'", "(31,)", "(32,)"]),
    "buffer shape": (4, lambda: ("scale", torch.ones(3, 32), None), ["'scale'", "(3, 32)", "(32,)"]),
    "4-bit float shape": (
        4,
        lambda: ("proj.weight", torch.zeros(32, 63), None),
        ["'proj.weight'", "(32, 63)", "(32, 64)"],
    ),
    "int8 float shape": (
        8,
        lambda: ("proj.weight", torch.zeros(64, 32), None),
        ["'proj.weight'", "(64, 32)", "(32, 64)"],
    ),
    "4-bit prequantized shape": (
        4,
        lambda: ("proj.weight", *weight_and_stats(4, out_features=16)),
        ["'proj.weight'", "(16, 64)", "(32, 64)"],
    ),
    "int8 prequantized shape": (
        8,
        lambda: ("proj.weight", *weight_and_stats(8, out_features=16)),
        ["'proj.weight'", "(16, 64)", "(32, 64)"],
    ),
    "truncated 4-bit weight": (
        4,
        lambda: ("proj.weight", weight_and_stats(4)[0][:-8], weight_and_stats(4)[1]),
        ["'proj.weight (packed)'", "(1016,)", "(1024,)"],
    ),
    "float with 4-bit stats": (
        4,
        lambda: ("proj.weight", torch.zeros(32, 64), weight_and_stats(4)[1]),
        ["dtype torch.float32 of 'proj.weight' contradicts", "torch.uint8"],
    ),
    "float with SCB": (
        8,
        lambda: ("proj.weight", torch.zeros(32, 64), weight_and_stats(8)[1]),
        ["dtype torch.float32 of 'proj.weight' contradicts", "torch.int8"],
    ),
    "int8 without stats": (
        8,
        lambda: ("proj.weight", weight_and_stats(8)[0], None),
        ["dtype torch.int8 of 'proj.weight' contradicts", "quantized_stats"],
    ),
    "packed 4-bit without stats": (
        4,
        lambda: ("proj.weight", weight_and_stats(4)[0], None),
        ["dtype torch.uint8 of 'proj.weight' contradicts", "quantized_stats"],
    ),
    "4-bit checkpoint into int8 layer": (
        8,
        lambda: ("proj.weight", *weight_and_stats(4)),
        ["dtype torch.uint8 of 'proj.weight' contradicts", "Linear8bitLt", "torch.int8"],
    ),
    "missing SCB": (
        8,
        lambda: ("proj.weight", *weight_and_stats(8, drop="SCB")),
        ["missing statistics", "'proj.weight'", "['SCB']", "'proj.SCB'"],
    ),
    "missing absmax": (
        4,
        lambda: ("proj.weight", *weight_and_stats(4, drop="weight.absmax")),
        ["missing statistics", "'proj.weight'", "['absmax']"],
    ),
    "missing quant_map": (
        4,
        lambda: ("proj.weight", *weight_and_stats(4, drop="weight.quant_map")),
        ["missing statistics", "'proj.weight'", "['quant_map']"],
    ),
    "missing nested_absmax": (
        4,
        lambda: ("proj.weight", *weight_and_stats(4, drop="weight.nested_absmax")),
        ["missing statistics", "'proj.weight'", "['nested_absmax']"],
    ),
    "missing quant_state": (
        4,
        lambda: ("proj.weight", *weight_and_stats(4, drop="weight.quant_state.bitsandbytes__nf4")),
        ["missing statistics", "'proj.weight'", "quant_state.bitsandbytes__<nf4|fp4>"],
    ),
    "unexpected statistic": (
        8,
        lambda: (
            "proj.weight",
            weight_and_stats(8)[0],
            {**weight_and_stats(8)[1], "proj.absmax": torch.ones(1)},
        ),
        ["unexpected entry 'proj.absmax'", "'proj.weight'"],
    ),
    "value for a None bias": (4, lambda: ("head.bias", torch.zeros(8), None), ["'head.bias'", "None"]),
    "meta without value": (4, lambda: ("proj.weight", None, None), ["'proj.weight'", "meta device"]),
}


@pytest.mark.parametrize("case", ERRORS)
def test_errors_name_the_tensor_and_the_mismatch(case):
    bits, make_arguments, fragments = ERRORS[case]
    net = bnb_net(bits)
    tensor_name, value, quantized_stats = make_arguments()
    before = dict(net.named_parameters())
    with pytest.raises(ValueError) as error:
        set_module_quantized_tensor_to_device(net, tensor_name, "cpu", value, quantized_stats=quantized_stats)
    for fragment in fragments:
        assert fragment in str(error.value)
    assert all(parameter is before[name] for name, parameter in net.named_parameters())  # nothing half-set


def test_nf4_checkpoint_into_fp4_layer_says_which_quant_type():
    net = bnb_net(4, quant_type="fp4")
    with pytest.raises(ValueError, match=r"'proj.weight' was saved as nf4 .* configured for fp4.*'nf4'"):
        set_module_quantized_tensor_to_device(net, "proj.weight", "cpu", *weight_and_stats(4, "nf4"))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("keys", ["full", "bare"])
def test_statistics_load_with_full_or_bare_keys(bits, keys):
    weight, stats = weight_and_stats(bits)
    if keys == "bare":
        stats = {key.removeprefix("proj.").removeprefix("weight."): value for key, value in stats.items()}
    net = bnb_net(bits)
    set_module_quantized_tensor_to_device(net, "proj.weight", "cpu", weight, quantized_stats=stats)
    assert torch.equal(net.proj.weight.data, weight)
    if bits == 8:
        assert torch.equal(net.proj.weight.SCB, stats["SCB" if keys == "bare" else "proj.SCB"])
    else:
        assert (
            net.proj.weight.quant_state.quant_type == "nf4"
            and net.proj.quant_state is net.proj.weight.quant_state
        )
        assert tuple(net.proj.weight.quant_state.shape) == (32, 64)


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize(
    ("tensor_name", "requires_grad"),
    [("norm.weight", True), ("norm.bias", False), ("head.weight", True), ("proj.bias", False)],
)
def test_plain_parameters_keep_requires_grad(tensor_name, requires_grad, device):
    net = bnb_net(4)
    net.norm.bias.requires_grad_(False)  # a frozen parameter stays frozen; bnb layers were frozen on replace
    value = torch.arange(net.get_parameter(tensor_name).numel(), dtype=torch.float32)
    value = value.reshape(net.get_parameter(tensor_name).shape)
    set_module_quantized_tensor_to_device(net, tensor_name, device, value)
    parameter = net.get_parameter(tensor_name)
    assert type(parameter) is nn.Parameter and parameter.device.type == device
    assert parameter.requires_grad is requires_grad
    if device == "cpu":
        assert torch.equal(parameter, value)


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize(("tensor_name", "persistent"), [("scale", True), ("cache", False)])
def test_buffers_stay_buffers(tensor_name, persistent, device):
    net = Net()
    value = [2.0] * net.get_buffer(tensor_name).numel()  # not a tensor: converted
    set_module_quantized_tensor_to_device(net, tensor_name, device, value)
    buffer = net.get_buffer(tensor_name)
    assert not isinstance(buffer, nn.Parameter) and buffer.device.type == device
    assert tensor_name not in dict(net.named_parameters())
    assert (tensor_name in net.state_dict()) is persistent
    if device == "cpu":
        assert torch.equal(buffer, torch.full_like(buffer, 2.0))


def test_without_value_a_real_tensor_is_moved_and_a_float_bnb_weight_quantized():
    net = replace_with_bnb_linear(Net(), ["head"], quantization_config=QuantizationConfig(bits=8))
    net.proj.weight = bnb.nn.Int8Params(torch.randn(32, 64), requires_grad=False, has_fp16_weights=False)
    for name in ("norm.weight", "proj.weight"):
        set_module_quantized_tensor_to_device(net, name, "cpu")
    assert net.norm.weight.device.type == "cpu" and net.norm.weight.requires_grad
    assert net.proj.weight.dtype == torch.int8 and net.proj.weight.SCB.shape == (32,)


@pytest.mark.parametrize("bits", [4, 8])
def test_without_value_a_quantized_weight_is_moved_as_is(bits):
    weight, stats = weight_and_stats(bits)
    net = bnb_net(bits)
    set_module_quantized_tensor_to_device(net, "proj.weight", "cpu", weight, quantized_stats=stats)
    set_module_quantized_tensor_to_device(net, "proj.weight", "cpu")
    assert torch.equal(net.proj.weight.data, weight)
    statistic = net.proj.weight.SCB if bits == 8 else net.proj.weight.quant_state.absmax
    assert statistic is not None and statistic.device.type == "cpu"


# ---------------------------------------------------------------- replace_with_bnb_linear


def linear_names(model: nn.Module, kind: type | tuple[type, ...]) -> set[str]:
    return {name for name, module in model.named_modules() if isinstance(module, kind)}


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("arch", ["llama-untied", "gpt2-conv1d"])
def test_replaced_layers_are_empty_frozen_and_shaped_like_the_original(arch, bits):
    model = ARCHITECTURES[arch]()
    originals = {
        name: (module.weight.shape, module.bias is not None)
        for name, module in model.named_modules()
        if type(module).__name__ in ("Linear", "Conv1D")
    }
    replace_with_bnb_linear(model, quantization_config=QuantizationConfig(bits=bits))
    replaced = linear_names(model, BNB_LAYERS)
    assert replaced == set(originals) - {"lm_head"} and type(model.lm_head) is nn.Linear  # default skip
    for name in replaced:
        layer = model.get_submodule(name)
        assert isinstance(layer, bnb.nn.Linear8bitLt if bits == 8 else bnb.nn.Linear4bit)
        assert all(p.device.type == "meta" and not p.requires_grad for p in layer.parameters())
        weight_shape, has_bias = originals[name]
        expected = weight_shape if arch == "llama-untied" else weight_shape[::-1]  # Conv1D is (in, out)
        assert (layer.out_features, layer.in_features) == tuple(expected) and (
            layer.bias is not None
        ) is has_bias
    untouched = [
        p for n, p in model.named_parameters() if n.split(".weight")[0].split(".bias")[0] not in replaced
    ]
    assert untouched and all(p.device.type == "cpu" and p.requires_grad for p in untouched)


@pytest.mark.parametrize(
    ("modules_to_not_convert", "kept"),
    [
        (None, {"lm_head"}),
        ([], set()),
        (["q_proj"], {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"}),
        ("down_proj", {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}),  # one pattern
        (["model.layers.1"], {f"model.layers.1.{n}" for n in ("self_attn.q_proj", "self_attn.k_proj",
         "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}),
        (["model.layers.*.mlp", "lm_head"], {"lm_head"} | {f"model.layers.{i}.mlp.{n}" for i in (0, 1)
         for n in ("gate_proj", "up_proj", "down_proj")}),
    ],
)  # fmt: skip
def test_modules_to_not_convert_are_kept(modules_to_not_convert, kept):
    model = tiny_llama(tie=False)
    linears = linear_names(model, nn.Linear)
    replace_with_bnb_linear(model, modules_to_not_convert, quantization_config=QuantizationConfig())
    assert linear_names(model, BNB_LAYERS) == linears - kept


@pytest.mark.parametrize("current_key_name", [["model", "layers", "0"], None])
def test_current_key_name_prefixes_the_matched_names(current_key_name):
    model = tiny_llama(tie=False)
    block = model.model.layers[0]
    replace_with_bnb_linear(block, ["model.layers.0.mlp"], current_key_name, QuantizationConfig())
    mlp_kept = all(type(m) is nn.Linear for m in block.mlp.modules() if isinstance(m, nn.Linear))
    assert mlp_kept is (current_key_name is not None)
    assert isinstance(block.self_attn.q_proj, bnb.nn.Linear4bit)


@pytest.mark.parametrize(
    ("make_model", "modules_to_not_convert", "model_name"),
    [
        (lambda: nn.Sequential(nn.Embedding(8, 4), nn.LayerNorm(4)), None, "Sequential"),
        (TiedMLP, ["up", "down", "head"], "TiedMLP"),
    ],
)
def test_warns_when_nothing_is_replaced(make_model, modules_to_not_convert, model_name):
    with pytest.warns(
        UserWarning, match=rf"found no nn.Linear or Conv1D layer to replace in {model_name}"
    ) as w:
        replace_with_bnb_linear(make_model(), modules_to_not_convert)
    message = str(next(r.message for r in w if "found no" in str(r.message)))
    assert "Nothing will be quantized" in message and str(modules_to_not_convert or ["lm_head"]) in message


def test_no_warning_when_something_is_replaced():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        replace_with_bnb_linear(TiedMLP(), ["head"])
    assert not [w for w in caught if "found no" in str(w.message)]


CONFIG_FORMS = {
    "QuantizationConfig": lambda bits: (
        QuantizationConfig(bits=4, quant_type="fp4", double_quant=False, compute_dtype="bf16")
        if bits == 4
        else QuantizationConfig(bits=8, threshold=4.0)
    ),
    "BitsAndBytesConfig": lambda bits: (
        BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.bfloat16
        )
        if bits == 4
        else BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=4.0)
    ),
    "BitsAndBytesConfig dict": lambda bits: CONFIG_FORMS["BitsAndBytesConfig"](bits).to_dict(),
    "QuantizationConfig dict": lambda bits: (
        dict(bits=4, quant_type="fp4", double_quant=False, compute_dtype="bfloat16")
        if bits == 4
        else dict(bits=8, threshold=4.0)
    ),
}


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("form", CONFIG_FORMS)
def test_quantization_config_forms(form, bits):
    model = replace_with_bnb_linear(TiedMLP(), ["head"], quantization_config=CONFIG_FORMS[form](bits))
    layer = model.up
    if bits == 4:
        assert type(layer) is bnb.nn.Linear4bit and layer.compute_dtype == torch.bfloat16
        assert layer.weight.quant_type == "fp4" and layer.weight.compress_statistics is False
    else:
        assert type(layer) is bnb.nn.Linear8bitLt and layer.state.threshold == 4.0
        assert layer.state.has_fp16_weights is False


def test_quantization_config_of_another_type_is_refused():
    with pytest.raises(
        TypeError, match="quantization config must be a bnb_lightning.QuantizationConfig.*got str"
    ):
        replace_with_bnb_linear(TiedMLP(), quantization_config="nf4")


@pytest.mark.parametrize("config", [QuantizationConfig(), {"bits": 4}], ids=["QuantizationConfig", "dict"])
def test_a_config_passed_as_modules_to_not_convert_is_refused_by_name(config):
    model = TiedMLP()
    with pytest.raises(TypeError, match="looks like a quantization config. Pass it by name"):
        replace_with_bnb_linear(model, config)
    assert type(model.up) is nn.Linear


def test_config_skip_and_target_modules_are_honoured():
    skipped = replace_with_bnb_linear(
        TiedMLP(), ["head"], quantization_config=QuantizationConfig(skip_modules=["up"])
    )
    assert linear_names(skipped, BNB_LAYERS) == {"down"}
    targeted = replace_with_bnb_linear(
        TiedMLP(), [], quantization_config=QuantizationConfig(target_modules=["up"])
    )
    assert linear_names(targeted, BNB_LAYERS) == {"up"}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compute_dtype_defaults_to_the_replaced_weight_dtype(dtype):
    model = replace_with_bnb_linear(
        tiny_llama(tie=False, dtype=dtype), quantization_config=QuantizationConfig()
    )
    assert model.model.layers[0].mlp.up_proj.compute_dtype == dtype


# ---------------------------------------------------------------- deprecated names


def test_replace_8bit_linear_is_a_deprecated_alias():
    with pytest.warns(FutureWarning, match="replace_8bit_linear is deprecated.*replace_with_bnb_linear"):
        old = replace_8bit_linear(TiedMLP(), ["head"], quantization_config=QuantizationConfig(bits=8))
    new = replace_with_bnb_linear(TiedMLP(), ["head"], quantization_config=QuantizationConfig(bits=8))
    assert [(n, type(m)) for n, m in old.named_modules()] == [(n, type(m)) for n, m in new.named_modules()]


def test_set_module_8bit_tensor_to_device_is_a_deprecated_alias():
    weight, stats = weight_and_stats(8)
    old, new = bnb_net(8), bnb_net(8)
    with pytest.warns(FutureWarning, match="set_module_8bit_tensor_to_device is deprecated"):
        set_module_8bit_tensor_to_device(old, "proj.weight", "cpu", weight, quantized_stats=stats)
    set_module_quantized_tensor_to_device(new, "proj.weight", "cpu", weight, quantized_stats=stats)
    assert torch.equal(old.proj.weight.data, new.proj.weight.data)
    assert torch.equal(old.proj.weight.SCB, new.proj.weight.SCB)


@pytest.mark.parametrize("training", [False, True])
def test_replaced_layers_follow_the_model_train_eval_mode(training):
    model = tiny_llama(tie=False).train(training)
    replace_with_bnb_linear(model, quantization_config=QuantizationConfig(bits=8))
    assert isinstance(model.model.layers[0].mlp.up_proj, bnb.nn.Linear8bitLt)
    assert model.model.layers[0].mlp.up_proj.training is training


@pytest.mark.parametrize(("in_features", "out_features"), [(64, 48), (32, 64), (128, 336)])
def test_4bit_layers_of_any_shape_run_an_eval_forward_on_the_cpu(in_features, out_features):
    # On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights for inference in blocks of 32 rows
    # and of its quantization blocksize, and asserts on other shapes; those layers keep its generic kernels.
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(in_features, out_features), torch.nn.ReLU(), torch.nn.Linear(out_features, 8)
    )
    quantize_model(model, QuantizationConfig(bits=4), device="cpu")
    layer = model[0]
    assert isinstance(layer, bnb.nn.Linear4bit)
    x = torch.randn(2, in_features)
    weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    expected = torch.nn.functional.linear(x, weight, layer.bias)
    with torch.no_grad():
        out = layer.eval()(x)
    torch.testing.assert_close(out, expected, rtol=1e-3, atol=1e-3)
