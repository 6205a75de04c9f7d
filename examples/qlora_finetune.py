"""QLoRA fine-tuning of a causal language model with PyTorch Lightning and ``BnbQuantization``.

Runs as it is, on a laptop CPU, in well under a minute: a small Llama built from a config
(random weights, nothing downloaded) learns the text in ``examples/data/corpus.txt`` one byte at a
time. During ``Trainer.fit`` the callback quantizes every linear layer to 4-bit NF4 (the tied
lm_head stays in full precision), adds LoRA adapters, and only the adapters train::

    python examples/qlora_finetune.py
    python examples/qlora_finetune.py --bits 8 --max-steps 100

With your own model, a local transformers directory (its tokenizer is used instead of bytes)::

    python examples/qlora_finetune.py --model path/to/model --data my_text.txt \
        --accelerator cuda --precision bf16-mixed --lora-r 16 --activation-memory 24GB

The model is built empty (on the meta device) from the directory's ``config.json`` and filled from
its safetensors files while it is quantized, ``BnbQuantization(weights=...)``: the full-precision
model is never in memory, so a model larger than the host's memory loads as its quantized size.

A random model can only learn what its adapters add on top of frozen random weights, so the
default run learns byte statistics and common words, not language; the loss still falls well
below the 5.55 of a uniform guess over 256 bytes.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from peft import LoraConfig
from torch.utils.data import DataLoader

from bnb_lightning import BnbQuantization, QuantizationConfig

DEFAULT_DATA = Path(__file__).parent / "data" / "corpus.txt"
BYTE_VOCAB_SIZE = 256


class ByteTokenizer:
    """UTF-8 bytes are the token ids (0..255): no vocabulary file, nothing to download."""

    vocab_size = BYTE_VOCAB_SIZE

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def load_tokenizer(path: str | None) -> Any:
    """The tokenizer saved with a local model directory, or bytes when there is none."""
    if path is None:
        return ByteTokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def tiny_llama(hidden_size: int = 128, num_layers: int = 2) -> torch.nn.Module:
    """A small random Llama over bytes, with the lm_head tied to the input embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=BYTE_VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 8 // 3 // 16 * 16,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        # The embedding matrix is frozen and doubles as the lm_head, so its scale bounds the logits.
        # At Llama's 0.02 a model this narrow cannot express confident predictions at all.
        initializer_range=0.1,
    )
    return LlamaForCausalLM(config)


class TextDataModule(pl.LightningDataModule):
    """A text file cut into fixed-length blocks of token ids; each batch is a ``(batch, seq_len)`` tensor.

    Args:
        data_path: a UTF-8 text file; ``None`` is the corpus shipped with this example.
        tokenizer_path: a local transformers model or tokenizer directory; ``None`` uses bytes.
        seq_len: tokens per block.
        batch_size: blocks per batch.
    """

    def __init__(
        self,
        data_path: str | None = None,
        tokenizer_path: str | None = None,
        seq_len: int = 128,
        batch_size: int = 16,
    ) -> None:
        super().__init__()
        self.data_path = Path(data_path or DEFAULT_DATA)
        self.tokenizer_path = tokenizer_path
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.blocks: torch.Tensor | None = None

    def setup(self, stage: str) -> None:
        text = self.data_path.read_text(encoding="utf-8")
        ids = torch.tensor(load_tokenizer(self.tokenizer_path).encode(text), dtype=torch.long)
        count = len(ids) // self.seq_len
        if count < self.batch_size:
            raise ValueError(
                f"{self.data_path} has {len(ids)} tokens, enough for {count} blocks of seq_len={self.seq_len}, "
                f"fewer than one batch of batch_size={self.batch_size}; use more text or smaller values."
            )
        self.blocks = ids[: count * self.seq_len].view(count, self.seq_len)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.blocks, batch_size=self.batch_size, shuffle=True, drop_last=True)


class CausalLM(pl.LightningModule):
    """A transformers causal LM as ``self.model``, trained on next-token prediction.

    Args:
        model_path: a local transformers model directory; ``None`` builds :func:`tiny_llama`.
        empty_weights: build ``model_path``'s model from its ``config.json`` alone, on the meta device, in
            ``configure_model``, for ``BnbQuantization(weights=model_path)`` to fill while quantizing.
            ``False``: load it whole with ``from_pretrained``.
        hidden_size: width of the tiny Llama (ignored with ``model_path``).
        num_layers: depth of the tiny Llama (ignored with ``model_path``).
        lr: AdamW learning rate of the adapters.
    """

    def __init__(
        self,
        model_path: str | None = None,
        hidden_size: int = 128,
        num_layers: int = 2,
        lr: float = 3e-3,
        empty_weights: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if empty_weights and model_path is None:
            raise ValueError("empty_weights=True builds model_path's model empty; pass model_path too.")
        self.model: torch.nn.Module | None = None
        if model_path is None:
            self.model = tiny_llama(hidden_size, num_layers)
        elif not empty_weights:
            from transformers import AutoModelForCausalLM

            # from_pretrained returns the model in eval mode, and Lightning keeps each module's mode.
            self.model = AutoModelForCausalLM.from_pretrained(model_path).train()
        self.lr = lr

    def configure_model(self) -> None:
        # Lightning calls this after the callbacks' setup; BnbQuantization fills the model right after it.
        if self.model is None:
            from transformers import AutoConfig, AutoModelForCausalLM

            with torch.device("meta"):
                self.model = AutoModelForCausalLM.from_config(
                    AutoConfig.from_pretrained(self.hparams.model_path)
                )

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        # transformers shifts the labels itself: position t is scored on predicting token t + 1.
        loss = self.model(input_ids=batch, labels=batch).loss
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # Lightning calls this after the callback's setup, so only the LoRA adapters require grad here.
        trainable = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.AdamW(trainable, lr=self.lr, weight_decay=0.0)


class LossHistory(pl.Callback):
    """Keeps every training loss, to report first and last without a logger."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def add_training_arguments(parser: argparse.ArgumentParser, max_steps: int) -> None:
    """The loop's arguments every example shares, so that they train alike."""
    parser.add_argument("--max-steps", type=int, default=max_steps)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)


def lora_config(r: int) -> LoraConfig:
    """LoRA of rank ``r`` (alpha 2r, no dropout) on every linear layer, as every example trains it."""
    return LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="QLoRA fine-tuning with PyTorch Lightning and BnbQuantization."
    )
    parser.add_argument(
        "--model",
        help="local transformers model directory, built on the meta device and filled from its safetensors while "
        "quantizing (default: a tiny random Llama)",
    )
    parser.add_argument("--data", help=f"UTF-8 text file to train on (default: {DEFAULT_DATA.name})")
    parser.add_argument("--bits", type=int, choices=(4, 8), default=4)
    parser.add_argument(
        "--quant-type",
        choices=("nf4", "fp4"),
        default=None,
        help="4-bit data type (default: nf4; 4-bit only)",
    )
    parser.add_argument(
        "--precision",
        default="bf16-mixed" if torch.cuda.is_available() else "32-true",
        help="Trainer precision (default: bf16-mixed with CUDA, 32-true without)",
    )
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--devices", default="1", help="a count, or 'auto'")
    add_training_arguments(parser, max_steps=150)
    parser.add_argument(
        "--activation-memory",
        default="auto",
        help="the device memory activations are planned into: auto (the device's), a budget such as 24GB, "
        "or keep, recompute or offload for every block (default: auto)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, callbacks: Sequence[pl.Callback] = ()) -> dict[str, Any]:
    """Fine-tune and return what happened: losses, the quantization report, the trained module.

    Args:
        argv: command-line arguments (default: ``sys.argv[1:]``).
        callbacks: more Lightning callbacks for the Trainer, e.g. your own logging.
    """
    args = parse_args(argv)
    pl.seed_everything(args.seed, verbose=False)
    quantization = BnbQuantization(
        config=QuantizationConfig(bits=args.bits, quant_type=args.quant_type),
        peft_config=lora_config(args.lora_r),
        activation_memory=args.activation_memory,
        weights=args.model,  # None: the tiny Llama, in memory
    )
    module = CausalLM(model_path=args.model, empty_weights=args.model is not None, lr=args.lr)
    data = TextDataModule(
        args.data, tokenizer_path=args.model, seq_len=args.seq_len, batch_size=args.batch_size
    )
    # The epochs max_steps spans, so the progress bar reads "Epoch 3/9" rather than "Epoch 3/-2".
    data.setup("fit")
    epochs = math.ceil(args.max_steps / len(data.train_dataloader()))
    history = LossHistory()
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=int(args.devices) if args.devices.isdigit() else args.devices,
        precision=args.precision,
        max_steps=args.max_steps,
        max_epochs=epochs,
        callbacks=[quantization, history, *callbacks],
        logger=False,
        # A full checkpoint would hold the quantized base as well as the small adapters.
        enable_checkpointing=False,
        # Lightning's summary counts a packed 4-bit weight as half its size; the callback's count does not.
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - start
    first, last = history.losses[0], history.losses[-1]
    print(f"loss {first:.2f} -> {last:.2f} in {len(history.losses)} steps ({seconds:.1f} s)")
    return {
        "first_loss": first,
        "last_loss": last,
        "losses": history.losses,
        "report": quantization.report,
        "callback": quantization,
        "module": module,
        "seconds": seconds,
    }


if __name__ == "__main__":
    main()
