"""examples/qlora_finetune.py, run in-process: the loss falls, the base stays frozen byte for byte."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture
def example(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import qlora_finetune

    return qlora_finetune


class BaseSnapshot(pl.Callback):
    """The model's state_dict when training starts and when it ends, split into base and LoRA entries.

    The quantized base is compared through ``state_dict`` (packed bytes plus quantization
    statistics), not ``weight.data``: bitsandbytes may repack a CPU 4-bit weight in place for its
    inference kernel, which changes ``.data`` but not what is saved.
    """

    def __init__(self) -> None:
        self.start: dict[str, torch.Tensor] = {}
        self.end: dict[str, torch.Tensor] = {}

    @staticmethod
    def _copy(pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        return {
            name: value.detach().clone() if isinstance(value, torch.Tensor) else value
            for name, value in pl_module.model.state_dict().items()
        }

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = self._copy(pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self.end = self._copy(pl_module)


class LogLines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


@pytest.mark.parametrize(
    ("bits", "steps", "packed_dtype"),
    [(4, 40, torch.uint8), (8, 20, torch.int8)],
    ids=["nf4", "int8"],
)
def test_example_trains_only_the_adapters(example, bits, steps, packed_dtype):
    snapshot = BaseSnapshot()
    lines = LogLines()
    lightning_logger = logging.getLogger("lightning.pytorch")
    lightning_logger.addHandler(lines)
    try:
        result = example.main(
            ["--bits", str(bits), "--max-steps", str(steps), "--seq-len", "64"], callbacks=[snapshot]
        )
    finally:
        lightning_logger.removeHandler(lines)

    # The loss really falls: from about uniform over 256 bytes (5.55) to well below it.
    assert len(result["losses"]) == steps
    assert result["last_loss"] < result["first_loss"] - 1.0
    assert result["last_loss"] < 4.5

    report = result["report"]
    assert report.bits == bits
    assert len(report.converted) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    assert report.skipped == {"model.lm_head": "tied weights"}
    model = result["module"].model
    assert type(model.lm_head) is nn.Linear
    assert model.lm_head.weight is model.get_input_embeddings().weight

    # What the user sees: the summary goes through Lightning's logger, which prints INFO by default.
    assert lightning_logger.getEffectiveLevel() <= logging.INFO
    assert any(f"converted 14 linear layers to {bits}-bit" in line for line in lines.lines), lines.lines

    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)

    base = [name for name in snapshot.start if "lora_" not in name]
    lora = [name for name in snapshot.start if "lora_" in name]
    assert snapshot.start.keys() == snapshot.end.keys()
    assert any(snapshot.start[name].dtype == packed_dtype for name in base), "base is not quantized"
    changed_base = [name for name in base if not _same(snapshot.start[name], snapshot.end[name])]
    assert changed_base == []
    unchanged_lora = [name for name in lora if _same(snapshot.start[name], snapshot.end[name])]
    assert lora and unchanged_lora == []


def save_tokenizer(example, directory: Path) -> int:
    """A small byte-level BPE tokenizer trained on the example's corpus, saved into ``directory``; its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train(
        [str(example.DEFAULT_DATA)],
        trainers.BpeTrainer(
            vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
        ),
    )
    PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(directory)
    return tokenizer.get_vocab_size()


def test_example_with_a_local_transformers_model(example, tmp_path):
    """``--model DIR`` loads a saved model and its own tokenizer (here a GPT-2 with Conv1D layers)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    vocab_size = save_tokenizer(example, tmp_path)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    GPT2LMHeadModel(config).save_pretrained(tmp_path)

    result = example.main(
        ["--model", str(tmp_path), "--max-steps", "3", "--seq-len", "32", "--batch-size", "4"]
    )

    assert len(result["losses"]) == 3 and all(torch.isfinite(torch.tensor(result["losses"])))
    assert len(result["report"].converted) == 8  # 2 blocks x (c_attn, c_proj, c_fc, mlp.c_proj)
    assert result["report"].skipped == {"model.lm_head": "tied weights"}


def test_example_model_is_built_empty_and_filled_from_its_files(example, tmp_path):
    """``--model DIR``: built on meta from config.json, filled from the (sharded, bfloat16) files while quantizing."""
    from conftest import tiny_llama
    from safetensors.torch import load_file

    vocab_size = save_tokenizer(example, tmp_path)
    tiny_llama(dtype=torch.bfloat16, vocab=vocab_size).save_pretrained(tmp_path, max_shard_size="40KB")
    files = {}
    for file in tmp_path.glob("model-*-of-*.safetensors"):
        files.update(load_file(file))
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 2

    result = example.main(
        ["--model", str(tmp_path), *"--max-steps 3 --seq-len 32 --batch-size 4 --lora-r 4".split()]
    )

    assert result["callback"].weights == str(tmp_path)
    assert result["module"].hparams.empty_weights is True
    assert len(result["losses"]) == 3 and all(torch.isfinite(torch.tensor(result["losses"])))
    assert len(result["report"].converted) == 14
    assert result["report"].skipped == {"model.lm_head": "tied weights"}
    model = result["module"].model
    # The frozen embeddings (tied to the lm_head) are the file's, in the file's dtype.
    assert torch.equal(model.get_input_embeddings().weight, files["model.embed_tokens.weight"])
    assert model.lm_head.weight is model.get_input_embeddings().weight


@pytest.mark.parametrize("script", ["fabric_qlora", "plain_qlora"])
def test_fabric_and_plain_loops_train_exactly_as_the_callback(example, script):
    import importlib

    steps = ["--max-steps", "6", "--batch-size", "4", "--seq-len", "32"]
    callback_run = example.main([*steps, "--precision", "32-true", "--accelerator", "cpu"])
    run = importlib.import_module(script).main(steps)

    # prepare_model is the callback's setup: the same quantization, adapters and loss, step by step.
    assert run["losses"] == callback_run["losses"]
    # The callback quantizes the LightningModule, whose transformers model is its `model` attribute.
    assert [f"model.{name}" for name in run["prepared"].report.converted] == callback_run["report"].converted
    assert run["prepared"].chunked_loss == [""]
    assert run["prepared"].options.compile_blocks is False  # on the CPU
    trainable = {n for n, p in run["model"].named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
