"""A short LoRA fit of a tiny quantized Llama on 2 processes, then a resume from its checkpoint.

Lightning's "ddp" strategy starts the other ranks by running this file again, so tests run it as a
subprocess. Each rank writes what it saw to ``--out``/rank<N>.pt: losses, its adapters, the files
its checkpoint IO wrote, the log lines it emitted, the steps after resuming.

    python tests/scripts/distributed_fit.py --out /tmp/run --strategy ddp     # 2 CPU processes, gloo
    python tests/scripts/distributed_fit.py --out /tmp/run --strategy fsdp2   # ModelParallelStrategy, gloo
    python tests/scripts/distributed_fit.py --out /tmp/run --strategy fsdp --accelerator cuda --devices 1
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import TorchCheckpointIO
from peft import LoraConfig
from torch.utils.data import DataLoader

from bnb_lightning import BnbQuantization, QuantizationConfig
from bnb_lightning.backend import is_bnb_linear

sys.path.insert(0, str(Path(__file__).parents[1]))
from conftest import VOCAB, tiny_llama  # noqa: E402  (the tests' tiny Llama)


class CausalLM(pl.LightningModule):
    def __init__(self, seed: int, tie: bool = True, vocab: int = VOCAB) -> None:
        super().__init__()
        self.model = tiny_llama(seed=seed, tie=tie, vocab=vocab).train()
        self.losses: list[float] = []
        # Rows of the output layer's and the input embeddings' weights this rank holds when the last
        # block's backward starts.
        self.head_rows: list[int] = []
        self.embedding_rows: list[int] = []
        self.model.model.layers[-1].register_full_backward_pre_hook(self.record_rows)

    def record_rows(self, module, grad_output) -> None:
        from torch.distributed.tensor import DTensor

        for rows, layer in (
            (self.head_rows, self.model.get_output_embeddings()),
            (self.embedding_rows, self.model.get_input_embeddings()),
        ):
            weight = layer.weight
            rows.append((weight.to_local() if isinstance(weight, DTensor) else weight).shape[0])

    def training_step(self, batch, batch_idx):
        loss = self.model(input_ids=batch, labels=batch).loss
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)

    def configure_model(self):
        # ModelParallelStrategy requires this hook; the model is built already, and BnbQuantization shards it.
        pass


class RecordingCheckpointIO(TorchCheckpointIO):
    """Lightning's own checkpoint IO, remembering which files this process wrote."""

    def __init__(self) -> None:
        self.written: list[str] = []

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        self.written.append(str(path))
        super().save_checkpoint(checkpoint, path, storage_options=storage_options)


class LogRecorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def batches() -> DataLoader:
    # A repeated pattern, so the loss falls within a few steps; 8 sequences, 2 per rank and step.
    return DataLoader(list(torch.arange(8 * 16).remainder(7).view(8, 16)), batch_size=2)


def adapters(trainer: pl.Trainer, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """This rank's full adapters (gathered from the shards under FSDP), by their unwrapped names."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    from bnb_lightning.distributed import is_fsdp_wrapped, unwrapped_name

    def read() -> dict[str, torch.Tensor]:
        return {
            unwrapped_name(n): p.detach().cpu().float().clone()
            for n, p in module.named_parameters()
            if p.requires_grad
        }

    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in module.parameters()):  # FSDP2: gathered from the shards
        return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu().float().clone()
                for n, p in module.named_parameters() if p.requires_grad}  # fmt: skip
    if not is_fsdp_wrapped(module):
        return read()
    with FullyShardedDataParallel.summon_full_params(trainer.model, writeback=False):
        return read()


def make_trainer(
    args, out: Path, io: RecordingCheckpointIO, steps: int
) -> tuple[pl.Trainer, BnbQuantization]:
    callback = BnbQuantization(
        QuantizationConfig(bits=args.bits),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
        # Compiled blocks with gradient checkpointing, as on one GPU; off by default under DDP.
        compile_blocks=args.compile or None,
        gradient_checkpointing=True if args.compile and not args.offload else None,
        activation_memory="offload" if args.offload else args.activation_memory,
        # Under FSDP exports are refused (rank zero holds only a shard of the adapters).
        export_adapters_to=None if args.strategy == "fsdp" else str(out / "adapters"),
        offload_params=args.offload_params,
    )
    strategy = args.strategy
    if strategy == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(
            data_parallel_size=args.devices, tensor_parallel_size=1, save_distributed_checkpoint=False
        )
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        strategy=strategy,
        precision=args.precision,
        max_steps=steps,
        callbacks=[callback, ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=steps)],
        plugins=[io],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
    )
    return trainer, callback


def fsdp2_units(module: torch.nn.Module) -> list[torch.nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [
        m for m in module.modules() if isinstance(m, FSDPModule) and m._get_fsdp_state()._fsdp_param_group
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--strategy", default="ddp")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--resume-steps", type=int, default=4)
    parser.add_argument("--seed-per-rank", action="store_true", help="a different base on each rank")
    parser.add_argument("--compile", action="store_true", help="compile the blocks, checkpointed")
    parser.add_argument("--offload", action="store_true", help="activation_memory='offload'")
    parser.add_argument("--offload-params", action="store_true", help="FSDP2's shards in CPU memory")
    parser.add_argument("--activation-memory", help="BnbQuantization(activation_memory=...), e.g. keep")
    parser.add_argument(
        "--untied", action="store_true", help="an output layer of its own, not the embeddings'"
    )
    parser.add_argument("--vocab", type=int, default=VOCAB, help="the tiny Llama's vocabulary")
    parser.add_argument(
        "--straight", action="store_true", help="also fit all the steps in one run, for comparison"
    )
    args = parser.parse_args()
    # Two processes on a small machine: intra-op threads only slow the tiny ops down.
    torch.set_num_threads(1)
    recorder = LogRecorder()
    logging.getLogger("lightning.pytorch").addHandler(recorder)
    logging.getLogger("bnb_lightning").addHandler(recorder)
    logging.getLogger("bnb_lightning").setLevel(logging.INFO)

    io = RecordingCheckpointIO()
    trainer, callback = make_trainer(args, args.out, io, args.steps)
    rank = trainer.global_rank
    seed = int(os.environ.get("LOCAL_RANK", 0)) if args.seed_per_rank else 0
    module = CausalLM(seed, tie=not args.untied, vocab=args.vocab)
    try:
        trainer.fit(module, batches())
    except Exception as error:
        # What a failure after quantization left behind, for the test to check.
        torch.save(
            {
                "error": str(error),
                "quantized_layers": sum(is_bnb_linear(m) for m in module.modules()),
                "adapter_parameters": [n for n, _ in module.named_parameters() if "lora_" in n],
                "prepared": callback._prepared_for(module),
                "wrapped_hooks": sorted({"on_load_checkpoint", "configure_model"} & set(vars(module))),
            },
            args.out / f"failed_rank{rank}.pt",
        )
        raise
    result = {
        "losses": module.losses,
        "head_rows": module.head_rows,
        "embedding_rows": module.embedding_rows,
        # What the activation planner counts for the loss over a sharded output layer, at 32 tokens a rank.
        "loss_bytes": callback.activations._sharded_head_bytes(32) if callback.activations else None,
        # The share of this machine's memory each rank plans its offload with.
        "host_share": callback.activations.host_share if callback.activations else None,
        "adapters": adapters(trainer, module),
        "written": list(io.written),
        "logs": list(recorder.lines),
        "fingerprint": callback.state_dict()["base_fingerprint"],
        # What DDP synchronizes gradients of: the parameters that require grad.
        "trainable": sorted(n for n, p in module.named_parameters() if p.requires_grad),
        "trainable_dtypes": {n: p.dtype for n, p in module.named_parameters() if p.requires_grad},
        # How many units each block's forward starts gathering ahead of time (FSDP2).
        "forward_prefetch": [
            len(getattr(block._get_fsdp_state(), "_states_to_forward_prefetch", None) or [])
            for block in module.model.model.layers
            if hasattr(block, "_get_fsdp_state")
        ],
        # FSDP2's offload policy of each unit (its modules' state), by class name.
        "offload_policies": sorted(
            {type(m._get_fsdp_state()._fsdp_param_group.offload_policy).__name__ for m in fsdp2_units(module)}
        ),
    }

    # Resume in a new Trainer and a new model from the checkpoint the first fit wrote.
    (checkpoint,) = sorted((args.out / "ckpt").glob("*.ckpt"))
    io = RecordingCheckpointIO()
    trainer, callback = make_trainer(args, args.out / "resumed", io, args.steps + args.resume_steps)
    resumed = CausalLM(seed, tie=not args.untied, vocab=args.vocab)
    trainer.fit(resumed, batches(), ckpt_path=checkpoint)
    result.update(
        checkpoint=str(checkpoint),
        resumed_losses=resumed.losses,
        resumed_adapters=adapters(trainer, resumed),
        resumed_global_step=trainer.global_step,
        resumed_written=list(io.written),
    )
    if args.straight:
        # The same steps without stopping: what the first fit and the resumed one should add up to.
        trainer, _ = make_trainer(
            args, args.out / "straight", RecordingCheckpointIO(), args.steps + args.resume_steps
        )
        straight = CausalLM(seed, tie=not args.untied, vocab=args.vocab)
        trainer.fit(straight, batches())
        result.update(straight_losses=straight.losses, straight_adapters=adapters(trainer, straight))
    torch.save(result, args.out / f"rank{rank}.pt")
    # Every rank's file is written before rank zero's process (the one the test waits for) ends. Then
    # the process ends without the interpreter's teardown: there, gloo's threads at times abort a
    # process that has written everything ("terminate called without an active exception"), with or
    # without the process group destroyed first.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
