"""QLoRA on several devices: BnbQuantization under Lightning's DDP, FSDP and FSDP2 strategies, checked and measured.

For each strategy, a Llama-shaped model with random weights (``--shape``, bfloat16, built on each
rank's own device from the same seed) is quantized to NF4 with double quantization by
``BnbQuantization`` and trained with LoRA r=16 on all linear layers, gradient checkpointing on,
``precision="bf16-true"``, one sequence of ``--seq`` random tokens per device and step. Then a
second run resumes from the checkpoint the first one wrote. One JSON line per strategy goes to
stdout and is appended to ``--out`` (default ``benchmarks/results/multi_gpu.jsonl``), with:

- ``peak_memory_gib`` per device (training, after quantization), ``tokens_per_s`` in all and per device;
- ``adapters_equal``: the adapters (gathered under FSDP) hash the same on every rank, after the fit
  and after the resume;
- ``checkpoint_written_once``: only rank zero's checkpoint IO wrote, one file; ``resumed``: the
  second run restored it and reached the expected step;
- under FSDP, ``base_bytes_per_device`` (what each rank's shards of the frozen base hold, plus the
  4-bit statistics every rank keeps) against ``base_bytes_expected`` (the callback's memory math).

Each strategy runs as its own command (Lightning starts the other ranks by running this file again)::

    python benchmarks/multi_gpu.py --shape 1b --devices 2            # DDP, FSDP and FSDP2 on 2 GPUs
    python benchmarks/multi_gpu.py --shape tiny --accelerator cpu    # DDP and FSDP2 on 2 CPU processes (FSDP: skipped)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import TorchCheckpointIO
from peft import LoraConfig
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
from qlora_bench import SHAPES  # noqa: E402

from bnb_lightning import BnbQuantization, QuantizationConfig  # noqa: E402
from bnb_lightning.backend import is_bnb_linear, layer_quant_state  # noqa: E402
from bnb_lightning.distributed import base_memory_for, is_fsdp_wrapped, unwrapped_name  # noqa: E402

STRATEGIES = ("ddp", "fsdp", "fsdp2")


class RandomLlama(pl.LightningModule):
    """A Llama of ``shape`` with random bfloat16 weights, the same on every rank (same seed, same device type)."""

    def __init__(self, shape: str, device: torch.device, seed: int = 0) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        config = LlamaConfig(**SHAPES[shape], max_position_embeddings=131072, rope_theta=500000.0)
        with device:  # an 8B model initializes in seconds on a GPU, in minutes on a CPU
            self.model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16).train()
        self.vocab = config.vocab_size

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-4)

    def configure_model(self):
        # ModelParallelStrategy (fsdp2) requires the hook; the model exists, and BnbQuantization shards it.
        pass


class RecordingCheckpointIO(TorchCheckpointIO):
    """Lightning's own checkpoint IO, remembering which files this process wrote."""

    def __init__(self) -> None:
        self.written: list[str] = []

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        self.written.append(str(path))
        super().save_checkpoint(checkpoint, path, storage_options=storage_options)


class Measure(pl.Callback):
    """Step times after ``warmup`` steps, peak device memory, the base's expected and actual bytes."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.step_s, self.expected, self.actual = warmup, [], None, None

    def setup(self, trainer, pl_module, stage):
        # Runs after BnbQuantization (earlier in the callback list) quantized the model, before wrapping.
        if self.expected is None:
            self.expected = base_memory_for(trainer.strategy, pl_module)

    def on_train_start(self, trainer, pl_module):
        self.actual = local_base_bytes(pl_module)
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        synchronize(pl_module.device)
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        synchronize(pl_module.device)
        if trainer.global_step > self.warmup:
            self.step_s.append(time.perf_counter() - self.start)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def local_base_bytes(module: torch.nn.Module) -> int:
    """Bytes of the frozen base this rank holds now: its shards under FSDP, with the 4-bit statistics."""
    from torch.distributed.tensor import DTensor

    local = [
        p.to_local() if isinstance(p, DTensor) else p for p in module.parameters() if not p.requires_grad
    ]
    total = sum(p.numel() * p.element_size() for p in local)
    for layer in module.modules():
        if not is_bnb_linear(layer):
            continue
        # Under FSDP the weight may be a plain view; bitsandbytes keeps the statistics on the layer too.
        state = layer_quant_state(layer)
        if state is not None:
            total += sum(
                v.nbytes for v in state.as_dict(packed=False).values() if isinstance(v, torch.Tensor)
            )
    return total


def adapter_hash(trainer: pl.Trainer, module: torch.nn.Module) -> str:
    """A hash of this rank's full adapters (gathered from the shards under FSDP)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    def digest() -> str:
        sha = hashlib.sha256()
        for name, p in sorted(
            (unwrapped_name(n), p) for n, p in module.named_parameters() if p.requires_grad
        ):
            sha.update(name.encode())
            sha.update(p.detach().float().cpu().numpy().tobytes())
        return sha.hexdigest()[:16]

    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in module.parameters()):  # FSDP2: gather each adapter
        sha = hashlib.sha256()
        for name, p in sorted((n, p) for n, p in module.named_parameters() if p.requires_grad):
            whole = p.full_tensor() if isinstance(p, DTensor) else p
            sha.update(name.encode())
            sha.update(whole.detach().float().cpu().numpy().tobytes())
        return sha.hexdigest()[:16]
    if not is_fsdp_wrapped(module):
        return digest()
    with FullyShardedDataParallel.summon_full_params(trainer.model, writeback=False):
        return digest()


def random_tokens(vocab: int, steps: int, seq: int, seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    # One sequence per device and step: the distributed sampler gives each rank its own.
    return DataLoader(list(torch.randint(0, vocab, (steps * 64, seq), generator=generator)), batch_size=1)


def make_trainer(args, steps: int, out: Path, callbacks: list, io: RecordingCheckpointIO) -> pl.Trainer:
    quantization = BnbQuantization(
        QuantizationConfig(bits=4, quant_type="nf4", double_quant=True),
        peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"),
        gradient_checkpointing=True,
        compile_blocks={"auto": None, "on": True, "off": False}[args.compile],
    )
    strategy: Any = args.run
    if args.run == "fsdp" and args.fsdp_wrap == "blocks":
        from lightning.pytorch.strategies import FSDPStrategy
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        # One FSDP unit per decoder block, adapters included (mixed requires_grad, use_orig_params=True).
        strategy = FSDPStrategy(auto_wrap_policy={LlamaDecoderLayer})
    if args.run == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        # FSDP2: BnbQuantization quantizes, then shards one unit per block; checkpoints are adapter-only.
        strategy = ModelParallelStrategy(
            data_parallel_size=args.devices, tensor_parallel_size=1, save_distributed_checkpoint=False
        )
    return pl.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        strategy=strategy,
        precision="bf16-true",
        max_steps=steps,
        callbacks=[
            quantization,
            *callbacks,
            ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=steps),
        ],
        plugins=[io],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
    )


def run_rank(args) -> None:
    """One rank of one strategy: fit, resume, and this rank's figures to ``--work``/rank<N>.json."""
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // max(1, args.devices)))
    if args.accelerator == "cpu":
        torch.set_num_threads(1)
    device = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if args.accelerator == "cuda" else None
    )
    device = device or torch.device("cpu")
    out = Path(args.work)
    measure, io = Measure(args.warmup), RecordingCheckpointIO()
    trainer = make_trainer(args, args.steps, out, [measure], io)
    module = RandomLlama(args.shape, device)
    trainer.fit(module, random_tokens(module.vocab, args.steps * args.devices, args.seq, seed=1))
    rank = trainer.global_rank
    step_s = sorted(measure.step_s)
    result: dict[str, Any] = {
        "rank": rank,
        "step_s_median": step_s[len(step_s) // 2] if step_s else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "adapters": adapter_hash(trainer, module),
        "written": list(io.written),
        "base_bytes_per_device": measure.actual,
        "base_bytes_expected": measure.expected.per_device_bytes,
        "base_bytes_total": measure.expected.total_bytes,
    }
    checkpoints = sorted((out / "ckpt").glob("*.ckpt"))
    del module, trainer
    if device.type == "cuda":
        torch.cuda.empty_cache()

    io = RecordingCheckpointIO()
    trainer = make_trainer(args, args.steps + 2, out / "resumed", [], io)
    resumed = RandomLlama(args.shape, device)
    trainer.fit(
        resumed,
        random_tokens(resumed.vocab, (args.steps + 2) * args.devices, args.seq, seed=1),
        ckpt_path=checkpoints[-1] if checkpoints else None,
    )
    result.update(
        checkpoints=[str(c) for c in checkpoints],
        resumed_step=trainer.global_step,
        resumed_adapters=adapter_hash(trainer, resumed),
        resumed_written=list(io.written),
    )
    (out / f"rank{rank}.json").write_text(json.dumps(result))


def summarize(strategy: str, args, work: Path, seconds: float) -> dict[str, Any]:
    ranks = [json.loads((work / f"rank{r}.json").read_text()) for r in range(args.devices)]
    tokens = args.seq  # per device and step
    per_device = [tokens / r["step_s_median"] if r["step_s_median"] else None for r in ranks]
    writes = [len(r["written"]) for r in ranks]
    row: dict[str, Any] = {
        "strategy": strategy,
        "status": "measured",
        "shape": args.shape,
        "devices": args.devices,
        "accelerator": args.accelerator,
        "seq": args.seq,
        "compile_blocks": args.compile,
        "fsdp_wrap": args.fsdp_wrap if strategy == "fsdp" else None,
        "seconds": round(seconds, 1),
        "peak_memory_gib": [r["peak_memory_gib"] for r in ranks],
        "tokens_per_s_per_device": per_device,
        "tokens_per_s": sum(p for p in per_device if p) if all(per_device) else None,
        "adapters_equal": len({r["adapters"] for r in ranks}) == 1
        and len({r["resumed_adapters"] for r in ranks}) == 1,
        "checkpoint_written_once": writes[0] == 1 and sum(writes) == 1 and len(ranks[0]["checkpoints"]) == 1,
        "resumed": all(r["resumed_step"] == args.steps + 2 for r in ranks)
        and sum(len(r["resumed_written"]) for r in ranks) == 1,
        "base_bytes_per_device": [r["base_bytes_per_device"] for r in ranks],
        "base_bytes_expected": ranks[0]["base_bytes_expected"],
        "base_bytes_total": ranks[0]["base_bytes_total"],
    }
    return row


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--devices", type=int, help="default: every GPU, or 2 processes on the CPU")
    parser.add_argument(
        "--accelerator", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=12, help="training steps per fit (the resume adds 2)")
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the timing")
    parser.add_argument(
        "--compile",
        choices=("auto", "on", "off"),
        default="auto",
        help="compile_blocks: auto is BnbQuantization's default (on for 4-bit on CUDA)",
    )
    parser.add_argument(
        "--fsdp-wrap",
        choices=("callback", "blocks"),
        default="callback",
        help="FSDP units: the callback's policy (a unit per block and per trainable leaf) or one per block",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/multi_gpu.jsonl"))
    parser.add_argument("--work", help=argparse.SUPPRESS)  # set for the per-strategy runs
    parser.add_argument("--run", choices=STRATEGIES, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.devices is None:
        args.devices = torch.cuda.device_count() if args.accelerator == "cuda" else 2
    if args.run:
        run_rank(args)
        return []
    if args.accelerator == "cpu":
        args.seq = min(args.seq, 64)
    rows = []
    for strategy in args.strategies:
        if strategy == "fsdp" and args.accelerator == "cpu":
            rows.append({"strategy": strategy, "status": "skipped", "reason": "torch's FSDP needs a GPU"})
            continue
        with tempfile.TemporaryDirectory(prefix="bnb_multi_gpu_") as work:
            command = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])]
            command += [
                "--run",
                strategy,
                "--work",
                str(work),
                "--seq",
                str(args.seq),
                "--devices",
                str(args.devices),
            ]
            start = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                rows.append({"strategy": strategy, "status": "failed", "error": done.stderr[-3000:]})
            else:
                rows.append(summarize(strategy, args, Path(work), time.perf_counter() - start))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as file:
        for row in rows:
            line = json.dumps(row)
            print(line)
            file.write(line + "\n")
    return rows


if __name__ == "__main__":
    main()
