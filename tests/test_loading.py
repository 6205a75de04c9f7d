"""quantize_model(weights=...): a meta model filled from a checkpoint while quantizing, as quantize_model would
quantize it in memory; pre-quantized checkpoints loaded byte for byte; ties, buffers; each refusal leaves the
model as it was."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from conftest import tiny_gpt2, tiny_opt
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    BitsAndBytesConfig,
    LlamaConfig,
    LlamaForCausalLM,
)

from bnb_lightning import QuantizationConfig, quantize_model
from bnb_lightning.backend import is_bnb_linear
from bnb_lightning.io.checkpoint import base_fingerprint
from bnb_lightning.io.loading import PREQUANTIZED, CheckpointError
from bnb_lightning.transfer import shard_rows

VOCAB = 128
SCHEMES = {
    "nf4-double-quant": QuantizationConfig(bits=4, quant_type="nf4", double_quant=True),
    "fp4": QuantizationConfig(bits=4, quant_type="fp4", double_quant=False),
    "int8": QuantizationConfig(bits=8),
}
# Pre-quantized checkpoints, written by transformers, and the config that matches each.
PREQUANTIZED_SCHEMES = {
    "nf4-double-quant": (
        BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        ),
        QuantizationConfig(bits=4, quant_type="nf4", double_quant=True, compute_dtype=torch.bfloat16),
    ),
    "int8": (BitsAndBytesConfig(load_in_8bit=True), QuantizationConfig(bits=8)),
}


def llama_config(tie: bool = True, intermediate_size: int = 128) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=64,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
    )


def bf16_llama(tie: bool = True) -> LlamaForCausalLM:
    """The model every full-precision checkpoint here is saved from (same seed, so the same weights)."""
    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config(tie)).to(torch.bfloat16).eval()


def meta_llama(tie: bool = True, intermediate_size: int = 128) -> LlamaForCausalLM:
    with torch.device("meta"):
        return LlamaForCausalLM(llama_config(tie, intermediate_size)).eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Directories written by save_pretrained: bf16 sharded and single-file (tied and untied), pre-quantized."""
    root = tmp_path_factory.mktemp("checkpoints")
    paths = {}
    for tie in (True, False):
        model = bf16_llama(tie)
        suffix = "" if tie else "-untied"
        paths[f"sharded{suffix}"] = root / f"sharded{suffix}"
        model.save_pretrained(paths[f"sharded{suffix}"], max_shard_size="20KB")
        paths[f"single{suffix}"] = root / f"single{suffix}"
        model.save_pretrained(paths[f"single{suffix}"])
    for name, (bnb_config, _) in PREQUANTIZED_SCHEMES.items():
        quantized = LlamaForCausalLM.from_pretrained(
            paths["single"], quantization_config=bnb_config, device_map="cpu"
        )
        paths[name] = root / name
        quantized.save_pretrained(paths[name], max_shard_size="20KB")
    torch.manual_seed(0)
    paths["gpt2"] = root / "gpt2"
    tiny_gpt2().save_pretrained(paths["gpt2"])
    return paths


def _copy(source: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(source, tmp_path / source.name))


def _file_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def _everything(model: nn.Module) -> dict[str, object]:
    """Every module, parameter and buffer object under each of its names."""
    return {
        **{f"module:{name}": module for name, module in model.named_modules(remove_duplicate=False)},
        **dict(model.named_parameters(remove_duplicate=False)),
        **dict(model.named_buffers(remove_duplicate=False)),
    }


def _assert_unchanged(model: nn.Module, before: dict[str, object]) -> None:
    """The documented failure state: the very same objects, still on the meta device."""
    after = _everything(model)
    assert after.keys() == before.keys()
    assert all(after[name] is before[name] for name in before)
    assert all(p.device.type == "meta" for p in model.parameters())


def _tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("layout", ["sharded", "single", "file"])
def test_loading_equals_quantizing_in_memory(checkpoints, scheme, layout):
    """Same keys, same bytes, same report as quantize_model on the model the checkpoint was saved from."""
    config = SCHEMES[scheme]
    directory = checkpoints["single" if layout == "file" else layout]
    weights = directory / "model.safetensors" if layout == "file" else directory
    if layout == "sharded":
        assert len(list(directory.glob("model-*-of-*.safetensors"))) > 3
    in_memory = bf16_llama()
    expected = quantize_model(in_memory, config, "cpu")
    model = meta_llama()  # float32 on meta: the file's bfloat16 is kept, as in memory

    report = quantize_model(model, config, "cpu", weights=weights)

    wanted, loaded = in_memory.state_dict(), model.state_dict()
    assert loaded.keys() == wanted.keys()
    assert [key for key in wanted if not torch.equal(loaded[key], wanted[key])] == []
    assert all(loaded[key].dtype == wanted[key].dtype for key in wanted)
    assert report.converted == expected.converted and len(report.converted) == 14
    assert report.skipped == expected.skipped
    assert (report.bytes_before, report.bytes_after) == (expected.bytes_before, expected.bytes_after)
    assert report.seconds > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = quantize_model(model, config, "cpu")  # the layers are its own: nothing to do, no warning
    assert again.converted == [] and len(again.already_quantized) == 14


@pytest.mark.parametrize("build", ["meta-device", "init_empty_weights"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_forward_ties_and_buffers(checkpoints, build, tie):
    """Logits equal those of transformers' loading quantized in memory; ties kept; rotary buffers computed."""
    config = SCHEMES["nf4-double-quant"]
    directory = checkpoints["sharded" if tie else "sharded-untied"]
    if build == "meta-device":
        model = meta_llama(tie)
    else:
        with init_empty_weights():  # buffers stay real: moved as they are
            model = LlamaForCausalLM(llama_config(tie)).eval()
    reference = LlamaForCausalLM.from_pretrained(directory, device_map="cpu").eval()
    quantize_model(reference, config, "cpu")

    quantize_model(model, config, "cpu", weights=directory)

    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    assert [name for name, tensor in tensors if tensor.device.type == "meta"] == []
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is tie
    if not tie:
        assert torch.equal(
            model.lm_head.weight,
            load_file(directory.parent / "single-untied/model.safetensors")["lm_head.weight"],
        )
    rotary = model.model.rotary_emb
    assert torch.equal(rotary.inv_freq, reference.model.rotary_emb.inv_freq)
    assert rotary.inv_freq.dtype == torch.float32 and torch.equal(rotary.original_inv_freq, rotary.inv_freq)
    with torch.no_grad():
        assert torch.equal(model(_tokens()).logits, reference(_tokens()).logits)


@pytest.mark.parametrize("scheme", list(PREQUANTIZED_SCHEMES))
def test_prequantized_checkpoint_loads_as_it_is(checkpoints, scheme):
    """transformers' bitsandbytes checkpoint: the file's bytes in the model, transformers' logits."""
    _, config = PREQUANTIZED_SCHEMES[scheme]
    directory = checkpoints[scheme]
    model = meta_llama()

    report = quantize_model(model, config, "cpu", weights=directory)

    in_file, loaded = _file_tensors(directory), model.state_dict()
    assert loaded.keys() == in_file.keys() | {"lm_head.weight"}  # the tied name save_pretrained leaves out
    assert [key for key in in_file if not torch.equal(loaded[key], in_file[key])] == []
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert len(report.already_quantized) == 14 and report.converted == []
    assert {m.reason for m in report.modules if m.name in report.already_quantized} == {PREQUANTIZED}
    reference = LlamaForCausalLM.from_pretrained(directory, device_map="cpu").eval()
    assert is_bnb_linear(reference.model.layers[0].mlp.up_proj)
    with torch.no_grad():
        assert torch.equal(model(_tokens()).logits, reference(_tokens()).logits)


@pytest.mark.parametrize("source", ["sharded", "nf4-double-quant", "int8"])
def test_a_model_loaded_to_the_cpu_owns_its_memory(checkpoints, tmp_path, source):
    """safetensors maps its files: what the loader keeps on the CPU must not be a view of them, or saving
    over the checkpoint later (as a fine-tuning script may) would change the model or crash it."""
    directory = _copy(checkpoints[source], tmp_path)
    config = SCHEMES["nf4-double-quant"] if source == "sharded" else PREQUANTIZED_SCHEMES[source][1]
    model = meta_llama()
    quantize_model(model, config, "cpu", weights=directory)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    for file in directory.glob("*.safetensors"):  # overwritten in place, then cut short
        with open(file, "r+b") as handle:
            handle.write(b"\0" * file.stat().st_size)
            handle.truncate(8)
    after = model.state_dict()
    assert [key for key in before if not torch.equal(after[key], before[key])] == []
    with torch.no_grad():
        assert torch.isfinite(model(_tokens()).logits).all()


def _packed_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: module.weight for name, module in model.named_modules() if is_bnb_linear(module)}


def test_mapped_weights_stay_views_of_the_files_for_the_ranks_of_a_host_to_share(checkpoints):
    """keep_on_host + mapped_weights (FSDP2's loading): a pre-quantized checkpoint's packed weights are the
    files' mapped pages (storage the process did not allocate, which every process of the host maps
    once), not copies; the model is the same. Statistics, norms and embeddings are still copies."""
    _, config = PREQUANTIZED_SCHEMES["nf4-double-quant"]
    directory = checkpoints["nf4-double-quant"]
    copied, mapped = meta_llama(), meta_llama()

    quantize_model(copied, config, "cpu", weights=directory, keep_on_host=True)
    quantize_model(mapped, config, "cpu", weights=directory, keep_on_host=True, mapped_weights=True)

    copied_weights, mapped_weights = _packed_weights(copied), _packed_weights(mapped)
    assert len(mapped_weights) == 14
    # A copy owns (resizable) storage; a view of safetensors' memory map does not.
    assert all(weight.untyped_storage().resizable() for weight in copied_weights.values())
    assert not any(weight.untyped_storage().resizable() for weight in mapped_weights.values())
    for name, module in mapped.named_modules():
        if is_bnb_linear(module):
            assert module.weight.quant_state.absmax.untyped_storage().resizable(), name
    assert mapped.model.embed_tokens.weight.untyped_storage().resizable()
    reference, loaded = copied.state_dict(), mapped.state_dict()
    assert [key for key in reference if not torch.equal(loaded[key], reference[key])] == []
    with torch.no_grad():
        assert torch.equal(mapped(_tokens()).logits, copied(_tokens()).logits)


def test_mapped_weights_only_change_what_a_prequantized_checkpoint_holds(checkpoints):
    """From full-precision weights, quantizing makes new tensors: mapped_weights changes nothing there."""
    model = meta_llama()
    quantize_model(
        model,
        SCHEMES["nf4-double-quant"],
        "cpu",
        weights=checkpoints["sharded"],
        keep_on_host=True,
        mapped_weights=True,
    )
    assert all(weight.untyped_storage().resizable() for weight in _packed_weights(model).values())


def test_host_shard_loads_each_rank_its_rows_of_what_it_quantizes(checkpoints):
    """From a bf16 checkpoint under FSDP2 (keep_on_host + host_shard): rank 1 of 2 keeps its rows of every
    packed weight, as a whole load has them, and the same fingerprint; the rest is whole."""
    config = SCHEMES["nf4-double-quant"]
    whole, part = meta_llama(), meta_llama()
    quantize_model(whole, config, "cpu", weights=checkpoints["sharded"], keep_on_host=True)
    quantize_model(part, config, "cpu", weights=checkpoints["sharded"], keep_on_host=True, host_shard=(1, 2))

    assert base_fingerprint(part) == base_fingerprint(whole)
    weights = _packed_weights(whole)
    for name, got in _packed_weights(part).items():
        start, end = shard_rows(got.shape[0], 1, 2)
        assert start < end and torch.equal(got.data[start:end], weights[name].data[start:end]), name
    expected, loaded = whole.state_dict(), part.state_dict()
    unpartitioned = [key for key in expected if not key.endswith(".weight") or "layers" not in key]
    assert [key for key in unpartitioned if not torch.equal(loaded[key], expected[key])] == []


def test_mapped_weights_without_keep_on_host_or_a_checkpoint_is_refused(checkpoints):
    config = PREQUANTIZED_SCHEMES["nf4-double-quant"][1]
    model = meta_llama()
    before = _everything(model)
    with pytest.raises(ValueError, match="mapped_weights=True .* needs keep_on_host=True"):
        quantize_model(model, config, "cpu", weights=checkpoints["nf4-double-quant"], mapped_weights=True)
    _assert_unchanged(model, before)
    with pytest.raises(ValueError, match="without weights=... there is no file"):
        quantize_model(bf16_llama(), config, "cpu", keep_on_host=True, mapped_weights=True)


@pytest.mark.parametrize("scheme", ["nf4-double-quant", "int8"])
@pytest.mark.parametrize("build", [tiny_gpt2, tiny_opt], ids=["gpt2-conv1d", "opt-biases"])
def test_conv1d_and_biases(tmp_path, build, scheme):
    """GPT-2's Conv1D (weights stored transposed) and OPT's biased linears: as quantize_model makes them."""
    torch.manual_seed(0)
    in_memory = build().to(torch.bfloat16).eval()
    in_memory.save_pretrained(tmp_path, max_shard_size="20KB")
    quantize_model(in_memory, SCHEMES[scheme], "cpu")
    with torch.device("meta"):
        model = build().eval()

    quantize_model(model, SCHEMES[scheme], "cpu", weights=tmp_path)

    wanted, loaded = in_memory.state_dict(), model.state_dict()
    assert loaded.keys() == wanted.keys()
    assert [key for key in wanted if not torch.equal(loaded[key], wanted[key])] == []
    with torch.no_grad():
        assert torch.equal(model(_tokens()).logits, in_memory(_tokens()).logits)


def test_dry_run_reads_headers_only(checkpoints):
    model = meta_llama()
    before = _everything(model)

    report = quantize_model(
        model, SCHEMES["nf4-double-quant"], "cpu", weights=checkpoints["sharded"], dry_run=True
    )

    _assert_unchanged(model, before)
    assert report.dry_run and len(report.converted) == 14
    assert report.bytes_after < report.bytes_before


def test_progress_bar_when_asked(checkpoints, capsys):
    from bnb_lightning.io.loading import quantize_from_checkpoint

    quantize_from_checkpoint(meta_llama(), checkpoints["sharded"], SCHEMES["int8"], "cpu", progress=True)
    assert "Loading sharded" in capsys.readouterr().err
    quantize_from_checkpoint(meta_llama(), checkpoints["sharded"], SCHEMES["int8"], "cpu")  # small: no bar
    assert capsys.readouterr().err == ""


# Refusals: each names the file and the tensor, and leaves the model as it was.


def _refused(
    weights: Path, config: QuantizationConfig, error=CheckpointError, model: nn.Module | None = None
):
    model = meta_llama() if model is None else model
    before = _everything(model)
    with pytest.raises(error) as raised:
        quantize_model(model, config, "cpu", weights=weights)
    _assert_unchanged(model, before)
    return str(raised.value)


def test_truncated_shard(checkpoints, tmp_path):
    directory = _copy(checkpoints["sharded"], tmp_path)
    shard = sorted(directory.glob("model-*.safetensors"))[2]
    shard.write_bytes(shard.read_bytes()[:-100])
    listed = [
        k
        for k, v in json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"].items()
        if v == shard.name
    ]

    message = _refused(directory, SCHEMES["nf4-double-quant"])

    assert str(shard) in message and repr(listed[0]) in message and "truncated or corrupt" in message


def test_corrupt_index_and_absent_shard(checkpoints, tmp_path):
    directory = _copy(checkpoints["sharded"], tmp_path)
    index = directory / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"]
    shard = sorted(directory.glob("model-*.safetensors"))[1]
    shard.unlink()
    message = _refused(directory, SCHEMES["int8"], FileNotFoundError)
    first = next(key for key, name in weight_map.items() if name == shard.name)
    assert str(shard) in message and repr(first) in message

    index.write_text(index.read_text()[:50])
    assert str(index) in _refused(directory, SCHEMES["int8"])


def test_missing_tensor(checkpoints, tmp_path):
    directory = _copy(checkpoints["single"], tmp_path)
    tensors = load_file(directory / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"], tensors["model.norm.weight"]
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})

    message = _refused(directory, SCHEMES["nf4-double-quant"])

    assert str(directory / "model.safetensors") in message
    assert "'model.layers.1.mlp.up_proj.weight'" in message and "'model.norm.weight'" in message


def test_shape_mismatch(checkpoints):
    message = _refused(checkpoints["sharded"], SCHEMES["fp4"], model=meta_llama(intermediate_size=96))
    assert "shape mismatch for 'model.layers.0.mlp.gate_proj.weight'" in message
    assert "the checkpoint has (128, 64), the model expects (96, 64)" in message
    assert "model-0" in message  # the shard that holds it


def test_checkpoint_of_another_architecture(checkpoints):
    message = _refused(checkpoints["gpt2"], SCHEMES["nf4-double-quant"])
    assert str(checkpoints["gpt2"] / "model.safetensors") in message
    assert "another model" in message and "GPT2LMHeadModel" in message
    assert "'model.embed_tokens.weight'" in message and "'transformer.h.0.attn.c_attn.bias'" in message


@pytest.mark.parametrize(
    ("scheme", "config", "expected"),
    [
        (
            "nf4-double-quant",
            QuantizationConfig(bits=4, quant_type="fp4"),
            "quant_type='nf4' in the checkpoint, 'fp4'",
        ),
        (
            "nf4-double-quant",
            QuantizationConfig(bits=4, double_quant=False),
            "double_quant=True in the checkpoint, False",
        ),
        ("nf4-double-quant", QuantizationConfig(bits=8), "bits=4 in the checkpoint, 8 in the config"),
        ("int8", QuantizationConfig(bits=4), "bits=8 in the checkpoint, 4 in the config"),
    ],
)
def test_prequantized_checkpoint_of_another_quantization(checkpoints, scheme, config, expected):
    message = _refused(checkpoints[scheme], config)
    assert expected in message
    assert "model.layers.0." in message and str(checkpoints[scheme]) in message and ".safetensors'" in message


def test_prequantized_layer_the_config_keeps(checkpoints):
    config = PREQUANTIZED_SCHEMES["int8"][1].replace(skip_modules=["down_proj"])
    message = _refused(checkpoints["int8"], config)
    assert "'model.layers.0.mlp.down_proj.SCB'" in message and "skip_modules" in message


def test_corrupt_statistics_found_while_loading_leave_the_model_unchanged(checkpoints, tmp_path):
    """Caught only once the data is read, after other layers were built: nothing is swapped in."""
    directory = _copy(checkpoints["nf4-double-quant"], tmp_path)
    key = "model.layers.1.mlp.up_proj.weight.absmax"
    shard = (
        directory / json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"][key]
    )
    tensors = load_file(shard)
    tensors[key] = tensors[key][:-1].clone()
    save_file(tensors, shard, metadata={"format": "pt"})

    message = _refused(directory, PREQUANTIZED_SCHEMES["nf4-double-quant"][1])

    assert "'model.layers.1.mlp.up_proj.weight'" in message and str(shard) in message and "absmax" in message


def test_unexpected_tensors_warn_and_are_not_loaded(checkpoints, tmp_path):
    directory = _copy(checkpoints["single"], tmp_path)
    tensors = load_file(directory / "model.safetensors")
    tensors["model.extra_head.weight"] = torch.ones(3, 3)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    model = meta_llama()

    with pytest.warns(
        UserWarning, match=r"1 tensors LlamaForCausalLM has no place for.*'model.extra_head.weight'"
    ):
        report = quantize_model(model, SCHEMES["int8"], "cpu", weights=directory)

    assert len(report.converted) == 14 and not hasattr(model.model, "extra_head")


def test_meta_buffer_nothing_can_compute(tmp_path):
    """A plain module's non-persistent buffer on meta: refused, with init_empty_weights as the fix, which works."""

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(64, 64)
            self.head = nn.Linear(64, 8)
            self.register_buffer("scale", torch.full((64,), 0.5), persistent=False)

        def forward(self, x):
            return self.head(self.proj(x) * self.scale)

    torch.manual_seed(0)
    save_file(Scaled().state_dict(), tmp_path / "model.safetensors")
    with torch.device("meta"):
        model = Scaled()
    before = _everything(model)
    with pytest.raises(CheckpointError, match=r"buffer 'scale' is on the meta device.*init_empty_weights"):
        quantize_model(model, SCHEMES["int8"], "cpu", weights=tmp_path)
    _assert_unchanged(model, before)

    with init_empty_weights():
        model = Scaled()
    report = quantize_model(model, SCHEMES["int8"], "cpu", weights=tmp_path)
    assert report.converted == ["proj"] and torch.equal(model.scale, torch.full((64,), 0.5))
