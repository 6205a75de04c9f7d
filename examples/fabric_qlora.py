"""QLoRA with Lightning Fabric: ``prepare_model`` does what ``BnbQuantization`` does in a Trainer.

Runs as it is, on a CPU, in seconds: the small random Llama and the byte-level corpus of
``qlora_finetune.py``, quantized to 4-bit NF4 with LoRA adapters on every linear layer::

    python examples/fabric_qlora.py
    python examples/fabric_qlora.py --accelerator cuda --precision bf16-mixed --max-steps 300
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from qlora_finetune import TextDataModule, add_training_arguments, lora_config, tiny_llama

from bnb_lightning import QuantizationConfig, TrainingOptions, prepare_model


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="QLoRA fine-tuning with Lightning Fabric and prepare_model.")
    parser.add_argument("--bits", type=int, choices=(4, 8), default=4)
    parser.add_argument(
        "--precision", default="32-true", help="Fabric precision: 32-true, bf16-mixed, bf16-true"
    )
    parser.add_argument("--accelerator", default="cpu")
    add_training_arguments(parser, max_steps=30)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Fine-tune and return the losses and what ``prepare_model`` did."""
    args = parse_args(argv)
    fabric = L.Fabric(accelerator=args.accelerator, devices=1, precision=args.precision)
    fabric.seed_everything(args.seed, verbose=False)
    model = tiny_llama().train()
    prepared = prepare_model(
        model,
        QuantizationConfig(bits=args.bits),
        TrainingOptions(),
        device=fabric.device,
        peft_config=lora_config(args.lora_r),
        precision=str(args.precision),
    )
    print(prepared.report.compact(), *prepared.messages(), sep="\n")
    # Only the adapters require grad now.
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0
    )
    model, optimizer = fabric.setup(model, optimizer)
    data = TextDataModule(seq_len=args.seq_len, batch_size=args.batch_size)
    data.setup("fit")
    loader = fabric.setup_dataloaders(data.train_dataloader())
    losses: list[float] = []
    while len(losses) < args.max_steps:
        for batch in loader:
            loss = model(input_ids=batch, labels=batch).loss
            fabric.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            if len(losses) == args.max_steps:
                break
    print(f"loss {losses[0]:.2f} -> {losses[-1]:.2f} in {len(losses)} steps")
    return {"losses": losses, "prepared": prepared, "model": model}


if __name__ == "__main__":
    main()
