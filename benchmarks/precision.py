"""bf16-true against bf16-mixed: does training the adapters in bfloat16 cost accuracy?

Runs ``examples/qlora_finetune.py`` as it is (its tiny random Llama, its shipped byte-level corpus,
4-bit NF4, LoRA r=16 on every linear layer, AdamW at lr 3e-3 unless ``--lr``) once per precision,
with the same seed and therefore the same initial weights and the same batch order (checked: a hash
of every batch is recorded). Under ``bf16-true`` the adapters and AdamW's state are bfloat16; under ``bf16-mixed`` they
are float32 and the forward runs under bfloat16 autocast.

For every optimizer step it also measures the *adapter updates lost to bfloat16 rounding*: from the
optimizer's state after the step it computes, in float32, what AdamW meant to add to each element
(``lr * m_hat / (sqrt(v_hat) + eps)``, plus weight decay), and counts the elements whose intended update
is nonzero but whose stored value did not change at all. A second count takes the elements with a
nonzero gradient instead. After training, the loss over every block of the corpus (no gradient, the
run's own precision) is less noisy than the last training batch's; the example has no
held-out split, so this is not a validation loss.

One JSON line per run goes to ``--out``; a Markdown table is printed::

    python benchmarks/precision.py --steps 300
    python benchmarks/precision.py --steps 300 --lr 2e-4 --out benchmarks/results/precision-cpu-lr2e-4.jsonl
    python benchmarks/precision.py --steps 20 --out /tmp/precision.jsonl   # a quick check
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import platform
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import bitsandbytes
import lightning
import lightning.pytorch as pl
import peft
import torch
import transformers

EXAMPLES = Path(__file__).parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import qlora_finetune  # noqa: E402 -- the example itself, from its directory

DEFAULT_OUT = Path(__file__).parent / "results" / "precision-cpu.jsonl"
PRECISIONS = ("bf16-true", "bf16-mixed")


class UpdateProbe(pl.Callback):
    """Compares, at every optimizer step, what AdamW meant to add to each trainable element with what
    the stored parameter actually changed by; hashes the batches; scores the corpus after training."""

    def __init__(self) -> None:
        self.before: dict[int, torch.Tensor] = {}
        self.steps: list[dict[str, float]] = []
        self.batch_hash = hashlib.sha256()
        self.parameter_dtypes: set[str] = set()
        self.state_dtypes: set[str] = set()
        self.corpus_loss: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batch_hash.update(batch.cpu().numpy().tobytes())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.before = {id(p): p.detach().clone() for group in optimizer.param_groups for p in group["params"]}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        (optimizer,) = trainer.optimizers
        intended_nonzero = lost = grad_nonzero = lost_with_grad = elements = 0
        relative_errors: list[torch.Tensor] = []
        for group in optimizer.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                before = self.before[id(p)]
                after = p.detach()
                state = optimizer.state[p]
                self.parameter_dtypes.add(str(p.dtype))
                self.state_dtypes.add(str(state["exp_avg"].dtype))
                step = float(state["step"])
                # torch.optim.AdamW's update, recomputed in float32 from the moments it just stored.
                m_hat = state["exp_avg"].float() / (1 - beta1**step)
                v_hat = state["exp_avg_sq"].float() / (1 - beta2**step)
                intended = -group["lr"] * m_hat / (v_hat.sqrt() + group["eps"])
                intended -= group["lr"] * group["weight_decay"] * before.float()
                applied = after.float() - before.float()
                unchanged = after == before
                nonzero = intended != 0
                intended_nonzero += int(nonzero.sum())
                lost += int((nonzero & unchanged).sum())
                if p.grad is not None:
                    has_grad = p.grad != 0
                    grad_nonzero += int(has_grad.sum())
                    lost_with_grad += int((has_grad & unchanged).sum())
                elements += p.numel()
                relative_errors.append(((applied - intended).abs() / intended.abs())[nonzero])
        errors = torch.cat(relative_errors)
        self.steps.append(
            {
                "loss": float(outputs["loss"]),
                "elements": elements,
                "intended_nonzero": intended_nonzero,
                "lost": lost,
                "grad_nonzero": grad_nonzero,
                "lost_with_grad": lost_with_grad,
                "median_relative_error": float(errors.median()) if errors.numel() else 0.0,
            }
        )

    def on_train_end(self, trainer, pl_module) -> None:
        # Left in train mode: every dropout of the example is 0, and in eval mode without gradients
        # bitsandbytes repacks 4-bit weights for its CPU inference kernel, which needs output widths
        # this tiny model's MLP (336) does not have.
        blocks = trainer.datamodule.blocks.to(pl_module.device)
        total = 0.0
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            for batch in blocks.split(trainer.datamodule.batch_size):
                total += float(pl_module.model(input_ids=batch, labels=batch).loss) * len(batch)
        self.corpus_loss = total / len(blocks)


def run(precision: str, steps: int, seed: int, lr: float | None = None) -> dict[str, Any]:
    probe = UpdateProbe()
    argv = ["--precision", precision, "--max-steps", str(steps), "--seed", str(seed), "--accelerator", "cpu"]
    if lr is not None:
        argv += ["--lr", str(lr)]
    result = qlora_finetune.main(argv, callbacks=[probe])
    losses = result["losses"]
    measured = probe.steps
    lost = sum(s["lost"] for s in measured)
    intended = sum(s["intended_nonzero"] for s in measured)
    lost_with_grad = sum(s["lost_with_grad"] for s in measured)
    grad_nonzero = sum(s["grad_nonzero"] for s in measured)
    tail = losses[-20:]
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "precision": precision,
        "command": " ".join(["examples/qlora_finetune.py", *argv]),
        "steps": len(losses),
        "seed": seed,
        "lr": qlora_finetune.parse_args(argv).lr,
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "bitsandbytes": bitsandbytes.__version__,
            "lightning": lightning.__version__,
            "peft": peft.__version__,
            "transformers": transformers.__version__,
        },
        "trainable_dtype": sorted(probe.parameter_dtypes),
        "optimizer_state_dtype": sorted(probe.state_dtypes),
        "trainable_elements": measured[0]["elements"],
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "last20_mean_loss": statistics.fmean(tail),
        "last20_min_loss": min(tail),
        "last20_max_loss": max(tail),
        "corpus_loss": probe.corpus_loss,
        "lost_update_fraction": lost / intended if intended else 0.0,
        "lost_update_fraction_last_100_steps": _fraction(measured[-100:], "lost", "intended_nonzero"),
        "lost_with_grad_fraction": lost_with_grad / grad_nonzero if grad_nonzero else 0.0,
        "median_relative_update_error": statistics.median(s["median_relative_error"] for s in measured),
        "measured_steps": len(measured),
        "seconds": result["seconds"],
        "seconds_per_step": result["seconds"] / len(losses),
        "batch_order_sha256": probe.batch_hash.hexdigest(),
        "losses": [round(loss, 5) for loss in losses],
        "lost_per_step": [
            round(s["lost"] / s["intended_nonzero"], 6) if s["intended_nonzero"] else 0.0 for s in measured
        ],
    }


def _fraction(steps: Sequence[dict[str, float]], part: str, whole: str) -> float:
    total = sum(s[whole] for s in steps)
    return sum(s[part] for s in steps) / total if total else 0.0


def table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| precision | adapters, AdamW state | steps | final loss | last-20 mean (min-max) | corpus loss "
        "| updates lost to rounding | median update error | wall time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['precision']} | {', '.join(row['trainable_dtype'])}, {', '.join(row['optimizer_state_dtype'])} "
            f"| {row['steps']} | {row['final_loss']:.3f} | {row['last20_mean_loss']:.3f} "
            f"({row['last20_min_loss']:.3f}-{row['last20_max_loss']:.3f}) | {row['corpus_loss']:.3f} "
            f"| {100 * row['lost_update_fraction']:.2f}% | {100 * row['median_relative_update_error']:.2f}% "
            f"| {row['seconds']:.0f} s |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="bf16-true against bf16-mixed on the QLoRA example, on the CPU."
    )
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default: the example's)")
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON lines file, appended to")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    rows = []
    for precision in args.precisions:
        row = run(precision, args.steps, args.seed, args.lr)
        if not math.isfinite(row["final_loss"]):
            print(f"{precision}: the loss is {row['final_loss']}", file=sys.stderr)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as out:
            out.write(json.dumps(row) + "\n")
        rows.append(row)
    if len({row["batch_order_sha256"] for row in rows}) > 1:
        print("warning: the runs saw different batches", file=sys.stderr)
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
