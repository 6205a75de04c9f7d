"""benchmarks/make_checkpoint.py: a checkpoint written tensor by tensor, pre-quantized, is the one
transformers' save_pretrained writes for the same weights after from_pretrained(quantization_config=...),
loads with from_pretrained, and is the same for the same seed."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from conftest import file_bytes, leftovers
from safetensors import safe_open
from transformers import LlamaForCausalLM

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "make_checkpoint.py"
MAX_SHARD_GB = "0.00003"  # 30 kB: the tiny shape's checkpoints take 3 to 8 shards
UNTIED = "tiny-untied"  # the tiny shape with its own lm_head, as the 8b and 70b shapes have
# name -> (shape, the options that make it, StorageFormat's arguments for transformers' reference)
VARIANTS = {
    "bf16": ("tiny", ["--bits", "16"], (16,)),
    "nf4": ("tiny", ["--bits", "4"], (4, "nf4", True)),
    "nf4-no-double-quant": ("tiny", ["--bits", "4", "--no-double-quant"], (4, "nf4", False)),
    "fp4": ("tiny", ["--bits", "4", "--quant-type", "fp4"], (4, "fp4", True)),
    "int8": ("tiny", ["--bits", "8"], (8,)),
    "bf16-untied": (UNTIED, ["--bits", "16"], (16,)),
    "nf4-untied": (UNTIED, ["--bits", "4"], (4, "nf4", True)),
    "int8-untied": (UNTIED, ["--bits", "8"], (8,)),
}
VARIANT = pytest.mark.parametrize("variant", list(VARIANTS))


@pytest.fixture(scope="module")
def make_checkpoint():
    spec = importlib.util.spec_from_file_location("make_checkpoint", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up while the class is built
    spec.loader.exec_module(module)
    module.SHAPES[UNTIED] = {**module.SHAPES["tiny"], "tie_word_embeddings": False}  # qlora_bench's dict
    yield module
    del module.SHAPES[UNTIED], sys.modules[spec.name]


def write(module, out: Path, variant: str, seed: int = 0) -> Path:
    shape, options, _ = VARIANTS[variant]
    common = ["--shape", shape, "--device", "cpu", "--max-shard-gb", MAX_SHARD_GB, "--seed", str(seed)]
    module.main([*common, *options, "--out", str(out)])
    return out


@pytest.fixture(scope="module")
def checkpoints(make_checkpoint, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {variant: write(make_checkpoint, root / variant, variant) for variant in VARIANTS}


@pytest.fixture(scope="module")
def references(make_checkpoint, checkpoints, tmp_path_factory) -> dict[str, Path]:
    """What transformers itself saves after quantizing the bf16 checkpoint of the shape while loading it."""
    root = tmp_path_factory.mktemp("references")
    for variant, (shape, _, storage) in VARIANTS.items():
        quantization = make_checkpoint.StorageFormat(*storage).bnb_config()
        options = {"quantization_config": quantization} if quantization is not None else {}
        bf16 = checkpoints["bf16-untied" if shape == UNTIED else "bf16"]
        LlamaForCausalLM.from_pretrained(bf16, device_map="cpu", **options).save_pretrained(root / variant)
    return {variant: root / variant for variant in VARIANTS}


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    loaded = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, "pt") as file:
            assert file.metadata() == {"format": "pt"}
            loaded.update({key: file.get_tensor(key) for key in file.keys()})
    return loaded


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def parameter_of(key: str) -> str:
    """The model parameter a stored tensor belongs to: a weight, or one of its quantization statistics."""
    if ".weight." in key:  # 4-bit: weight.absmax, weight.quant_state.bitsandbytes__nf4, ...
        return key.split(".weight.")[0] + ".weight"
    if key.endswith((".SCB", ".weight_format")):  # 8-bit
        return key.rpartition(".")[0] + ".weight"
    return key


@VARIANT
def test_same_files_as_transformers_save_pretrained(checkpoints, references, variant):
    written, expected = tensors(checkpoints[variant]), tensors(references[variant])

    assert written.keys() == expected.keys()
    for key, tensor in expected.items():
        assert (written[key].dtype, written[key].shape) == (tensor.dtype, tensor.shape), key
        # Each weight is drawn from its own seed, so the quantized checkpoints hold exactly the
        # quantization of the bf16 one: the same bytes transformers' quantizer produced from it.
        assert torch.equal(written[key], tensor), key
    for name in ("config.json", "generation_config.json"):
        assert read_json(checkpoints[variant] / name) == read_json(references[variant] / name), name


@VARIANT
def test_shards_and_index(make_checkpoint, checkpoints, variant):
    directory = checkpoints[variant]
    index = read_json(directory / make_checkpoint.INDEX_NAME)
    shards = sorted(directory.glob("*.safetensors"))

    assert len(shards) >= 3
    assert [path.name for path in shards] == [
        f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)
    ]
    written = {}
    for path in shards:
        with safe_open(path, "pt") as file:
            written.update(dict.fromkeys(file.keys(), path.name))
            shard_bytes = sum(file.get_tensor(key).nbytes for key in file.keys())
            parameters = {parameter_of(key) for key in file.keys()}
        # Over the limit only when it holds one weight (with its statistics) larger than the limit.
        assert shard_bytes <= float(MAX_SHARD_GB) * 10**9 or len(parameters) == 1, path.name
    assert index["weight_map"] == written
    assert index["metadata"]["total_size"] == sum(tensor.nbytes for tensor in tensors(directory).values())
    # A quantized weight's statistics sit in its shard, so a loader reading shard by shard has all of it.
    for key, file in written.items():
        assert written[parameter_of(key)] == file, key
    assert leftovers(directory.parent) == []


@VARIANT
def test_loads_with_transformers_and_runs(checkpoints, tokens, variant):
    model = LlamaForCausalLM.from_pretrained(checkpoints[variant], device_map="cpu")

    bits = VARIANTS[variant][2][0]
    layer_type = {4: bnb.nn.Linear4bit, 8: bnb.nn.Linear8bitLt, 16: torch.nn.Linear}[bits]
    assert type(model.model.layers[1].mlp.down_proj) is layer_type
    assert type(model.lm_head) is torch.nn.Linear  # kept in bf16, tied to the embeddings or not
    with torch.no_grad():
        logits = model(tokens).logits
    assert logits.shape == (*tokens.shape, 256)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("variant", ["nf4", "nf4-no-double-quant", "fp4"])
def test_4bit_weights_dequantize_to_the_initial_distribution(checkpoints, variant):
    bf16, written = tensors(checkpoints["bf16"]), tensors(checkpoints[variant])
    for layer in range(2):
        name = f"model.layers.{layer}.mlp.gate_proj.weight"
        stats = {
            key.removeprefix(name + "."): value
            for key, value in written.items()
            if key.startswith(name + ".")
        }
        state = bnb.functional.QuantState.from_dict(stats, device=torch.device("cpu"))
        weight = bnb.functional.dequantize_4bit(written[name], state).float()
        original = bf16[name].float()

        assert weight.shape == original.shape == (128, 64)
        assert weight.std().item() == pytest.approx(0.02, rel=0.1)
        assert abs(weight.mean().item()) < 0.002
        # 4-bit rounding moves a weight by under a tenth of their spread, on average (nf4 0.07, fp4 0.09)
        assert (weight - original).abs().mean().item() < 0.15 * original.std().item()


def test_refuses_a_directory_that_holds_something(make_checkpoint, tmp_path):
    out = tmp_path / "checkpoint"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")

    with pytest.raises(SystemExit, match=r"--out .*checkpoint already exists and is not an empty directory"):
        write(make_checkpoint, out, "nf4")
    assert file_bytes(out) == {"notes.txt": b"keep me"}
    assert leftovers(tmp_path) == []

    (out / "notes.txt").unlink()  # an empty directory is taken
    write(make_checkpoint, out, "nf4")
    assert (out / "config.json").exists() and leftovers(tmp_path) == []


def test_a_failed_or_interrupted_run_leaves_nothing_behind(make_checkpoint, checkpoints, tmp_path):
    out, stale = tmp_path / "checkpoint", tmp_path / "checkpoint.partial"
    for shard in ("model-00001-of-00003.safetensors", "model-00009-of-00009.safetensors"):
        stale.mkdir(exist_ok=True)  # as a killed run leaves it
        (stale / shard).write_bytes(b"half")

    with pytest.raises((RuntimeError, NotImplementedError)):  # no values can be drawn or copied on "meta"
        make_checkpoint.write_checkpoint(out, "tiny", make_checkpoint.StorageFormat(16), device="meta")
    assert not out.exists() and leftovers(tmp_path) == []

    stale.mkdir()
    (stale / "model-00001-of-00003.safetensors").write_bytes(b"half")
    write(make_checkpoint, out, "nf4")
    assert file_bytes(out) == file_bytes(checkpoints["nf4"]) and leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("option", "message"),
    [(["--max-shard-gb", "0"], "max_shard_gb=0.0 is not positive"), (["--bits", "3"], "invalid choice: 3")],
)
def test_rejects_bad_options(make_checkpoint, tmp_path, capsys, option, message):
    argv = ["--shape", "tiny", "--bits", "4", "--out", str(tmp_path / "checkpoint"), *option]

    with pytest.raises(SystemExit) as raised:
        make_checkpoint.main(argv)
    assert message in str(raised.value) + capsys.readouterr().err
    assert not (tmp_path / "checkpoint").exists()


def test_same_seed_same_files(make_checkpoint, checkpoints, tmp_path):
    again = write(make_checkpoint, tmp_path / "again", "nf4")
    other_seed = write(make_checkpoint, tmp_path / "other", "nf4", seed=1)

    assert file_bytes(again) == file_bytes(checkpoints["nf4"])
    assert tensors(other_seed).keys() == tensors(again).keys()
    assert file_bytes(other_seed) != file_bytes(again)


def test_70b_plan_fits_the_benchmark_disk(make_checkpoint, capsys):
    planned = make_checkpoint.plan_tensors(
        make_checkpoint.meta_model("70b"), make_checkpoint.StorageFormat(4)
    )
    quantized = {tensor.name for tensor in planned if tensor.quantized}

    assert len(quantized) == 80 * 7
    assert {"lm_head.weight", "model.embed_tokens.weight"}.isdisjoint(quantized)
    assert {tensor.name for tensor in planned} >= {"lm_head.weight", "model.embed_tokens.weight"}  # untied
    summary = make_checkpoint.main(["--shape", "70b", "--bits", "4", "--out", "unused", "--dry-run"])
    assert 70e9 < summary["parameters"] < 71e9
    assert 38e9 < summary["bytes"] < 41e9  # 4-bit linear layers, bf16 embeddings and lm_head: < 64 GB disk
    assert summary["shards"] == 8
    assert "70b Llama, 4-bit" in capsys.readouterr().out
