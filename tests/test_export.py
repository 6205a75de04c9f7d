"""Export and load adapters in PEFT's format: what an export replaces and keeps, atomic writes, loader
errors (the merged full-precision model: test_merge.py)."""

from __future__ import annotations

import json
import re
import resource
import signal
from pathlib import Path

import pytest
import torch
from conftest import (
    BITS,
    BNB_CONFIGS,
    MANIFEST,
    TIE,
    CausalLM,
    TiedMLP,
    batches,
    file_bytes,
    leftovers,
    logits,
    lora,
    tiny_llama,
    trained_model,
    trainer,
)
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from bnb_lightning import BnbQuantization, QuantizationConfig, inject_adapters, prepare_model, quantize_model
from bnb_lightning.adapters import adapter_root
from bnb_lightning.io.export import ADAPTER_CONFIG, ADAPTER_WEIGHTS, export_adapters, load_adapters
from bnb_lightning.io.merge import MergeToleranceError, export_merged


def recorded_exports(directory: Path) -> dict:
    return json.loads((directory / MANIFEST).read_text())["exports"]


def structure(model: torch.nn.Module) -> tuple:
    """What loading adapters changes: module types, state-dict keys, requires_grad flags, attributes."""
    return (
        [(name, type(module)) for name, module in model.named_modules()],
        sorted(model.state_dict()),
        [(name, parameter.requires_grad) for name, parameter in model.named_parameters()],
        [sorted(vars(module)) for module in model.modules()],
    )


def lora_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" in name}


# -- adapters -------------------------------------------------------------------------------------------------


@TIE
@BITS
def test_adapters_load_with_peft_on_the_original_base_with_identical_logits(tmp_path, tokens, bits, tie):
    tiny_llama(tie=tie).save_pretrained(tmp_path / "base")
    model = trained_model(bits, tie)
    before = logits(model, tokens)  # on CPUs with AVX512-BF16 this repacks the 4-bit weights
    export_adapters(model, tmp_path / "adapters")
    # Exporting leaves the model alone (bitsandbytes' state_dict() would undo the repacking, lossily).
    assert torch.equal(logits(model, tokens), before)

    base = AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", quantization_config=BitsAndBytesConfig(**BNB_CONFIGS[bits]), device_map="cpu"
    )
    reference = PeftModel.from_pretrained(base, tmp_path / "adapters")
    # Same quantized bytes, same adapter weights, same PEFT layers and kernels: bit-identical.
    assert torch.equal(logits(model, tokens), logits(reference, tokens))


def test_adapter_files_are_what_peft_save_pretrained_writes(tmp_path):
    model = trained_model(4)
    export_adapters(model, tmp_path / "ours", base_model_name_or_path=str(tmp_path / "base"))

    tiny_llama().save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", quantization_config=BitsAndBytesConfig(**BNB_CONFIGS[4]), device_map="cpu"
    )
    base.name_or_path = str(tmp_path / "base")
    get_peft_model(base, lora(task_type="CAUSAL_LM")).save_pretrained(tmp_path / "peft")

    ours, theirs = tmp_path / "ours" / ADAPTER_WEIGHTS, tmp_path / "peft" / ADAPTER_WEIGHTS
    with safe_open(ours, "pt") as mine, safe_open(theirs, "pt") as peft_file:
        assert mine.metadata() == peft_file.metadata() == {"format": "pt"}
        assert sorted(mine.keys()) == sorted(peft_file.keys())
        for key in mine.keys():
            assert mine.get_slice(key).get_shape() == peft_file.get_slice(key).get_shape(), key
            assert mine.get_slice(key).get_dtype() == peft_file.get_slice(key).get_dtype(), key
    config = json.loads((tmp_path / "ours" / ADAPTER_CONFIG).read_text())
    reference = json.loads((tmp_path / "peft" / ADAPTER_CONFIG).read_text())
    config["target_modules"], reference["target_modules"] = (
        sorted(config["target_modules"]),
        sorted(reference["target_modules"]),
    )
    assert config == reference
    assert config["inference_mode"] is True and config["base_model_name_or_path"] == str(tmp_path / "base")
    # The model keeps its own config as it was.
    assert model.peft_config["default"].inference_mode is False


def test_export_from_a_lightning_module_trained_with_the_callback(tmp_path, tokens):
    module = CausalLM()
    callback = BnbQuantization(QuantizationConfig(bits=4), peft_config=lora())
    trainer(tmp_path, [callback], max_steps=2).fit(module, batches())

    export_adapters(module, tmp_path / "adapters")
    result = export_merged(module, tmp_path / "merged", tokens)

    assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == [
        ADAPTER_CONFIG,
        ADAPTER_WEIGHTS,
        MANIFEST,
    ]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    difference = (logits(reloaded, tokens) - logits(module.model, tokens)).abs().max().item()
    assert difference == result.max_abs_diff

    # The base recorded from the LightningModule is the bare model's, quantized the same way: the base check
    # passes, whatever wraps the model and whichever parameters trained.
    bare = tiny_llama()
    quantize_model(bare, QuantizationConfig(bits=4), device="cpu")
    load_adapters(bare, tmp_path / "adapters")
    assert torch.equal(logits(bare.eval(), tokens), logits(module.model.eval(), tokens))


def test_export_adapters_needs_adapters(tmp_path):
    model = tiny_llama()
    quantize_model(model, QuantizationConfig(bits=4), device="cpu")
    with pytest.raises(ValueError, match="has no PEFT adapters to export; add them with"):
        export_adapters(model, tmp_path / "adapters")
    inject_adapters(model, lora())
    with pytest.raises(
        ValueError, match=r"adapter_name='other' is not an adapter of .* it has \['default'\]"
    ):
        export_adapters(model, tmp_path / "adapters", adapter_name="other")
    assert not (tmp_path / "adapters").exists()


# -- what an export replaces, keeps and refuses --------------------------------------------------------------


def test_adapters_exported_into_a_saved_base_model_keep_its_files(tmp_path, tokens):
    directory = tmp_path / "model"
    tiny_llama().save_pretrained(directory)
    base_files = file_bytes(directory)
    assert {"config.json", "generation_config.json", "model.safetensors"} <= base_files.keys()
    base = AutoModelForCausalLM.from_pretrained(
        directory, quantization_config=BitsAndBytesConfig(**BNB_CONFIGS[4]), device_map="cpu"
    )
    model = trained_model(4)

    export_adapters(model, directory)

    files = file_bytes(directory)
    assert {name: files[name] for name in base_files} == base_files  # byte for byte
    assert sorted(files.keys() - base_files.keys()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST]
    assert recorded_exports(directory)["adapters"]["files"] == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    reference = PeftModel.from_pretrained(base, directory)
    assert torch.equal(logits(reference, tokens), logits(model, tokens))
    assert leftovers(tmp_path) == []


def test_an_export_keeps_the_users_own_files(tmp_path):
    directory = tmp_path / "adapters"
    directory.mkdir()
    (directory / "config.json").write_text('{"lr": 0.01}')
    save_file({"cache": torch.arange(4.0)}, directory / "cache.safetensors")
    users = file_bytes(directory)

    model = trained_model(4, steps=1)
    export_adapters(model, directory)
    export_adapters(model, directory)  # and again: the second export replaces only the first one's files

    files = file_bytes(directory)
    assert {name: files[name] for name in users} == users
    assert sorted(files) == sorted([*users, ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST])


def test_a_foreign_adapter_file_is_refused_and_nothing_changes(tmp_path):
    directory = tmp_path / "adapters"
    get_peft_model(tiny_llama(), lora(task_type="CAUSAL_LM")).save_pretrained(directory)  # PEFT's own export
    before = file_bytes(directory)
    with pytest.raises(
        FileExistsError,
        match=re.escape(
            f"it holds {ADAPTER_CONFIG}, {ADAPTER_WEIGHTS}, which bnb_lightning did not write (there is no {MANIFEST}"
        ),
    ):
        export_adapters(trained_model(4, steps=1), directory)
    assert file_bytes(directory) == before
    assert leftovers(tmp_path) == []


def test_an_export_removes_only_what_its_previous_export_wrote(tmp_path, tokens):
    directory = tmp_path / "export"
    llama = trained_model(4, steps=1)
    export_merged(llama, directory, tokens)  # config.json, generation_config.json, model.safetensors
    export_adapters(llama, directory)  # beside the merged model, which stays
    (directory / "tokenizer.json").write_text("{}")
    assert {"config.json", "model.safetensors", ADAPTER_WEIGHTS} <= {p.name for p in directory.iterdir()}
    adapter_files = {name: (directory / name).read_bytes() for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)}

    mlp = TiedMLP()
    quantize_model(mlp, QuantizationConfig(bits=4), device="cpu")
    inject_adapters(mlp, LoraConfig(r=4, target_modules=["up", "down"], init_lora_weights=False))
    result = export_merged(mlp, directory, tokens)  # a plain module: model.safetensors only

    # The previous merged export's config.json and generation_config.json go; the adapters stay.
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        [ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST, "model.safetensors", "tokenizer.json"]
    )
    assert {name: (directory / name).read_bytes() for name in adapter_files} == adapter_files
    exports = recorded_exports(directory)
    assert exports["merged"] == {"files": ["model.safetensors"]}
    assert exports["adapters"]["files"] == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    reloaded = TiedMLP()
    load_model(reloaded, directory / "model.safetensors")
    with torch.no_grad():
        assert (reloaded(tokens) - mlp.eval()(tokens)).abs().max().item() == result.max_abs_diff
    assert leftovers(tmp_path) == []


# -- loading adapters -----------------------------------------------------------------------------------------


@BITS
def test_load_adapters_restores_the_trained_model(tmp_path, tokens, bits):
    model = trained_model(bits)
    export_adapters(model, tmp_path / "adapters")
    expected = logits(model, tokens)

    fresh = tiny_llama()
    quantize_model(fresh, QuantizationConfig(bits=bits), device="cpu")
    root = load_adapters(fresh, tmp_path / "adapters")  # injects them from adapter_config.json
    assert root is fresh
    assert torch.equal(logits(fresh.eval(), tokens), expected)
    # Loaded adapters train; nothing else does.
    trainable = [n for n, p in fresh.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)

    injected = tiny_llama()
    quantize_model(injected, QuantizationConfig(bits=bits), device="cpu")
    inject_adapters(injected, lora())
    load_adapters(injected, tmp_path / "adapters")  # into adapters that are already there
    assert torch.equal(logits(injected.eval(), tokens), expected)


def test_load_adapters_into_a_bfloat16_base_without_adapters_takes_float32_ones(tmp_path, tokens):
    # Adapters trained under bf16-mixed (or 32-true) on a bfloat16 base are float32; PEFT would inject
    # new ones in bfloat16. load_adapters gives the ones it injects the file's dtype instead of refusing.
    model = tiny_llama(dtype=torch.bfloat16)
    prepare_model(
        model, QuantizationConfig(bits=4), peft_config=lora(init_lora_weights=False), precision="bf16-mixed"
    )
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    export_adapters(model, tmp_path / "adapters")

    fresh = tiny_llama(dtype=torch.bfloat16)
    quantize_model(fresh, QuantizationConfig(bits=4), device="cpu")
    load_adapters(fresh, tmp_path / "adapters")
    assert {p.dtype for p in fresh.parameters() if p.requires_grad} == {torch.float32}
    assert torch.equal(logits(fresh.eval(), tokens), logits(model.eval(), tokens))


@pytest.mark.parametrize("missing", [ADAPTER_WEIGHTS, ADAPTER_CONFIG])
def test_load_adapters_names_the_missing_file(tmp_path, missing):
    model = trained_model(4, steps=1)
    export_adapters(model, tmp_path / "adapters")
    (tmp_path / "adapters" / missing).unlink()
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path / 'adapters' / missing} is missing"):
        load_adapters(model, tmp_path / "adapters")
    with pytest.raises(FileNotFoundError, match=rf"adapter directory {tmp_path / 'nowhere'} does not exist"):
        load_adapters(model, tmp_path / "nowhere")


def test_load_adapters_refuses_a_dtype_that_would_round_and_names_the_file(tmp_path):
    model = trained_model(4, steps=1)
    export_adapters(model, tmp_path / "adapters")
    path = tmp_path / "adapters" / ADAPTER_WEIGHTS
    save_file({k: v.double() for k, v in load_file(path).items()}, path, metadata={"format": "pt"})
    before = {n: p.clone() for n, p in model.named_parameters() if "lora_" in n}

    with pytest.raises(
        ValueError, match=rf"{path}: '.*lora_A.weight' is torch.float64, the model's adapter is torch.float32"
    ):
        load_adapters(model, tmp_path / "adapters")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if "lora_" in n)

    # A lossless upcast loads: bfloat16 adapters into float32 ones.
    save_file({k: v.bfloat16() for k, v in load_file(path).items()}, path, metadata={"format": "pt"})
    load_adapters(model, tmp_path / "adapters")
    lora_a = model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert torch.equal(
        lora_a, before["model.layers.0.self_attn.q_proj.lora_A.default.weight"].bfloat16().float()
    )


def test_load_adapters_refuses_another_rank_and_names_the_file(tmp_path):
    model = trained_model(4, steps=1)
    export_adapters(model, tmp_path / "adapters")
    other = tiny_llama()
    quantize_model(other, QuantizationConfig(bits=4), device="cpu")
    inject_adapters(other, LoraConfig(r=8, target_modules="all-linear"))
    path = tmp_path / "adapters" / ADAPTER_WEIGHTS
    with pytest.raises(ValueError, match=rf"{path}: '.*' has shape \(4, 64\), the model's adapter \(8, 64\)"):
        load_adapters(other, tmp_path / "adapters")
    narrower = tiny_llama()
    quantize_model(narrower, QuantizationConfig(bits=4), device="cpu")
    inject_adapters(narrower, LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(
        ValueError, match=rf"{path} does not hold the adapters of LlamaForCausalLM: missing \[\]"
    ):
        load_adapters(narrower, tmp_path / "adapters")


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [("r", 8, "has shape"), ("target_modules", ["q_proj"], "does not hold the adapters of")],
)
def test_a_refused_load_leaves_a_model_without_adapters_as_it_was(tmp_path, field, value, error):
    export_adapters(trained_model(4, steps=1), tmp_path / "adapters")
    path = tmp_path / "adapters" / ADAPTER_CONFIG
    exported = path.read_text()
    # A config that does not fit the weights file: the adapters it injects are not the file's.
    path.write_text(json.dumps({**json.loads(exported), field: value}))
    model = tiny_llama()
    quantize_model(model, QuantizationConfig(bits=4), device="cpu")
    before = structure(model)

    with pytest.raises(ValueError, match=error):
        load_adapters(model, tmp_path / "adapters")
    assert structure(model) == before
    assert adapter_root(model) is None

    path.write_text(exported)
    load_adapters(model, tmp_path / "adapters")  # the same model still takes the right adapters
    assert adapter_root(model) is model


def test_adapters_of_another_base_are_refused_unless_check_base_is_off(tmp_path):
    trained = trained_model(4)
    export_adapters(trained, tmp_path / "adapters")
    other = tiny_llama(seed=1)  # the same shapes, other weights
    quantize_model(other, QuantizationConfig(bits=4), device="cpu")
    before = structure(other)

    with pytest.raises(
        ValueError,
        match=rf"the adapters in {tmp_path / 'adapters'} were trained on another base model: {MANIFEST} records "
        r"the quantized base they were exported from as fingerprint [0-9a-f]{16}, and LlamaForCausalLM, "
        r"quantized the same way \(bits=4, .*quant_type=nf4.*\), has fingerprint [0-9a-f]{16}\. .* pass "
        r"check_base=False to load them anyway",
    ):
        load_adapters(other, tmp_path / "adapters")
    assert structure(other) == before
    base = recorded_exports(tmp_path / "adapters")["adapters"]["base"]
    assert base["quantization"] == [
        {
            "bits": 4,
            "quant_type": "nf4",
            "double_quant": True,
            "blocksize": 64,
            "quant_storage": "uint8",
            "dtype": "float32",
        }
    ]

    load_adapters(other, tmp_path / "adapters", check_base=False)
    assert lora_weights(other).keys() == lora_weights(trained).keys()
    assert all(torch.equal(value, lora_weights(trained)[name]) for name, value in lora_weights(other).items())

    # Adapters without our manifest (as PeftModel.save_pretrained writes them) have no base to compare.
    (tmp_path / "adapters" / MANIFEST).unlink()
    again = tiny_llama(seed=1)
    quantize_model(again, QuantizationConfig(bits=4), device="cpu")
    load_adapters(again, tmp_path / "adapters")


@pytest.mark.parametrize(
    "config",
    [
        QuantizationConfig(bits=8),
        QuantizationConfig(bits=4, quant_type="fp4"),
        QuantizationConfig(bits=4, double_quant=False),
    ],
    ids=["int8", "fp4", "single-quant"],
)
def test_adapters_load_into_their_base_quantized_another_way(tmp_path, config):
    trained = trained_model(4)  # NF4 with double quantization
    export_adapters(trained, tmp_path / "adapters")
    model = tiny_llama()
    quantize_model(model, config, device="cpu")
    load_adapters(model, tmp_path / "adapters")
    assert all(torch.equal(value, lora_weights(trained)[name]) for name, value in lora_weights(model).items())


# -- atomic writes --------------------------------------------------------------------------------------------


@pytest.fixture
def file_size_limit():
    """Make writes past a size fail for real (EFBIG), as a full disk would, for this process only."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process

    def limit(size: int) -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))

    yield limit
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, handler)


@pytest.mark.parametrize("kind", ["adapters", "merged"])
def test_a_write_failing_midway_leaves_the_previous_export_intact(tmp_path, tokens, file_size_limit, kind):
    model = trained_model(4, steps=1)
    directory = tmp_path / "export"
    if kind == "adapters":
        export_adapters(model, directory)
        weights = ADAPTER_WEIGHTS
        # Another base model name: the new adapter_config.json differs from the previous one.
        export_again = lambda: export_adapters(model, directory, base_model_name_or_path="elsewhere")  # noqa: E731
    else:
        export_merged(model, directory, tokens)
        weights = "model.safetensors"
        export_again = lambda: export_merged(model, directory, tokens, dtype=torch.bfloat16)  # noqa: E731
    previous = file_bytes(directory)

    # The config file is written first and fits under the limit; the weights file fails halfway.
    file_size_limit(len(previous[weights]) // 4)
    with pytest.raises(Exception, match="(?i)file too large") as error:
        export_again()
    file_size_limit(resource.RLIM_INFINITY)
    assert not isinstance(error.value, MergeToleranceError)
    assert file_bytes(directory) == previous
    assert leftovers(tmp_path) == []


def test_reexport_replaces_export_files_and_keeps_other_files(tmp_path):
    model = trained_model(4, steps=1)
    directory = tmp_path / "adapters"
    export_adapters(model, directory)
    (directory / "tokenizer.json").write_text("{}")
    (directory / "notes").mkdir()
    (directory / "notes" / "run.txt").write_text("lr=1e-2")
    # Named like a PEFT export, but not written by bnb_lightning: kept, as any file of the user's.
    (directory / "adapter_model.bin").write_bytes(b"the user's")

    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.add_(1.0)
    export_adapters(model, directory)

    assert sorted(p.name for p in directory.iterdir()) == sorted(
        [ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST, "tokenizer.json", "notes", "adapter_model.bin"]
    )
    assert (directory / "notes" / "run.txt").read_text() == "lr=1e-2"
    assert (directory / "adapter_model.bin").read_bytes() == b"the user's"
    saved = load_file(directory / ADAPTER_WEIGHTS)[
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    ]
    assert torch.equal(saved, model.model.layers[0].self_attn.q_proj.lora_B["default"].weight)
    assert leftovers(tmp_path) == []


def test_export_to_a_file_path_fails_before_writing(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="it is a file; pass a directory path"):
        export_adapters(trained_model(4, steps=1), tmp_path / "file")
    assert (tmp_path / "file").read_text() == "x"
