"""Files written by the flat module layout of bnb_lightning 0.1.0 load unchanged.

``tests/fixtures/flat_layout/`` was written by ``tests/fixtures/make_flat_layout.py`` with that layout:
an adapter-only Lightning checkpoint, the adapters exported in PEFT's format, 4-bit and 8-bit state
dict files, and pickled training layers (whose classes pickle records by module path).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from safetensors.torch import load_file

FIXTURES = Path(__file__).parent / "fixtures"
sys.path.insert(0, str(FIXTURES))

import make_flat_layout as flat  # noqa: E402

from bnb_lightning import (  # noqa: E402
    QuantizationConfig,
    load_adapters,
    load_state_dict_file,
    quantize_model,
    save_state_dict_file,
)

SAVED = FIXTURES / "flat_layout"


def expected_logits() -> torch.Tensor:
    return load_file(SAVED / "expected.safetensors")["logits"]


def safetensors_content(path: Path) -> tuple[dict, bytes]:
    """The header, parsed (safetensors writes its metadata in no fixed order), and the tensor bytes."""
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size]), data[8 + size :]


def quantized_base(bits: int) -> torch.nn.Module:
    model = flat.tiny_llama(layers=1)
    quantize_model(model, QuantizationConfig(bits=bits), device="cpu")
    return model


@pytest.mark.parametrize("bits", [4, 8])
def test_state_dict_files_are_written_byte_for_byte_as_before(tmp_path, bits):
    model = quantized_base(bits)
    path = save_state_dict_file(model, tmp_path / "base.safetensors")
    assert safetensors_content(path) == safetensors_content(SAVED / f"base-{bits}bit.safetensors")

    fresh = quantized_base(bits)
    load_state_dict_file(fresh, SAVED / f"base-{bits}bit.safetensors")
    assert fresh.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in fresh.state_dict().items())


def test_a_checkpoint_resumes_with_the_same_base_fingerprint_and_adapters(tmp_path):
    checkpoint = shutil.copy(SAVED / "last.ckpt", tmp_path / "last.ckpt")
    module = flat.TinyLM()
    # The checkpoint is at step 3: fit restores it (checking the base's fingerprint) and stops.
    flat.trainer(tmp_path / "run", steps=3).fit(
        module, torch.utils.data.DataLoader(list(flat.TOKENS), batch_size=2), ckpt_path=checkpoint
    )
    module.eval()
    with torch.no_grad():
        logits = module.model(input_ids=flat.TOKENS[:1]).logits
    torch.testing.assert_close(logits, expected_logits(), rtol=0, atol=0)


def test_exported_adapters_load_into_the_same_base():
    model = quantized_base(4)
    load_adapters(model, SAVED / "adapters")
    with torch.no_grad():
        logits = model.eval()(input_ids=flat.TOKENS[:1]).logits
    torch.testing.assert_close(logits, expected_logits(), rtol=0, atol=0)


def test_pickled_training_layers_unpickle_as_the_same_classes(tokens):
    written = json.loads((SAVED / "written_by.json").read_text())["classes"]
    assert written == {
        "int8": "bnb_lightning.int8.DequantizedLinear8bitLt",
        "4bit": "bnb_lightning.linear4bit.FusedLinear4bit",
    }
    layers = torch.load(SAVED / "layers.pt", weights_only=False)
    assert (
        isinstance(layers["int8"], bnb.nn.Linear8bitLt)
        and type(layers["int8"]).__name__ == "DequantizedLinear8bitLt"
    )
    assert (
        isinstance(layers["4bit"], bnb.nn.Linear4bit) and type(layers["4bit"]).__name__ == "FusedLinear4bit"
    )
    hidden = torch.randn(2, 128)
    assert layers["int8"](hidden).shape == layers["4bit"](hidden).shape == (2, 64)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("int8", "training.int8"),
        ("linear4bit", "training.linear4bit"),
        ("loss", "training.loss"),
        ("blocks", "training.blocks"),
        ("files", "io.files"),
        ("state_dict", "io.state_dict"),
        ("layer_state", "io.layer_state"),
        ("checkpoint", "io.checkpoint"),
        ("export", "io.export"),
        ("merge", "io.merge"),
    ],
)
def test_module_paths_of_the_flat_layout_are_the_new_modules(old, new):
    import importlib

    import bnb_lightning

    module = importlib.import_module(f"bnb_lightning.{new}")
    assert importlib.import_module(f"bnb_lightning.{old}") is module
    assert getattr(bnb_lightning, old) is module
    with pytest.raises(AttributeError, match="has no attribute 'nowhere'"):
        bnb_lightning.nowhere  # noqa: B018
