"""QLoRA on several devices: BnbQuantization under Lightning's DDP, FSDP and FSDP2 strategies, checked and measured.

For each strategy, a Llama-shaped model is quantized to NF4 with double quantization by
``BnbQuantization`` and trained with LoRA r=16 on all linear layers, gradient checkpointing on,
``precision="bf16-true"``, one sequence of ``--seq`` random tokens per device and step. The model is
either random (``--shape``, bfloat16, built on each rank's own device from the same seed) or, with
``--weights DIR``, a checkpoint directory (``make_checkpoint.py``'s, or any ``save_pretrained`` Llama
in bfloat16 or NF4 with double quantization): built on the meta device from ``DIR/config.json`` and
filled by ``BnbQuantization(weights=DIR)`` while quantizing, so no rank ever holds the bfloat16
model (a 70B shape is 141 GB in bfloat16, 39.5 GB in NF4). Then a second run resumes from the
checkpoint the first one wrote (with ``--weights``, loading the base again). One JSON line per
strategy goes to stdout and is appended to ``--out`` (default ``benchmarks/results/multi_gpu.jsonl``), with:

- ``peak_memory_gib`` per device (training, after quantization), ``setup_peak_memory_gib`` (quantizing
  and loading), ``tokens_per_s`` in all and per device;
- per rank, ``setup_s`` (the first run's quantization, loading from ``--weights`` included, and FSDP2's
  sharding), ``host_peak_fit_gib`` (peak RSS to the end of the first run) and ``host_peak_gib`` (peak
  RSS of the whole process, the resumed run included), ``host_private_peak_gib`` (peak of the
  process's own memory, ``RssAnon``, sampled: RSS also counts the pages of a mapped checkpoint, which
  the ranks of a host share, in each rank) and ``host_private_setup_gib`` (the same, to the end of the
  first run's setup: loading and sharding);
- ``cap_gb``: with ``--cap-gb``, each rank's device memory capped to that many GB (10**9 bytes) by
  ``torch.cuda.set_per_process_memory_fraction`` before anything is allocated on it;
- ``losses`` (rank zero's, per step of the first run), ``losses_per_rank``, ``resumed_losses`` and
  ``loss_falling`` (every rank's last loss below its first, all finite), ``resumed_loss_below_first``;
  with ``--repeat-batch`` each rank trains on the same sequence at every step, so the loss must fall;
- ``adapters_equal``: the adapters (gathered under FSDP) hash the same on every rank, after the fit
  and after the resume;
- ``checkpoint_written_once``: only rank zero's checkpoint IO wrote, one file; ``resumed``: the
  second run restored it and reached the expected step;
- under FSDP, ``base_bytes_per_device`` (what each rank's shards of the frozen base hold, plus the
  4-bit statistics every rank keeps) against ``base_bytes_expected`` (the callback's memory math).

Each strategy runs as its own command (Lightning starts the other ranks by running this file again)::

    python benchmarks/multi_gpu.py --shape 1b --devices 2            # DDP, FSDP and FSDP2 on 2 GPUs
    python benchmarks/multi_gpu.py --shape tiny --accelerator cpu    # DDP and FSDP2 on 2 CPU processes (FSDP: skipped)
    python benchmarks/multi_gpu.py --weights /tmp/llama-70b-nf4 --devices 2 --strategies fsdp2 \
        --cap-gb 24 --offload-params --activation-memory auto --repeat-batch --seq 2048 --steps 4 \
        --warmup 1   # Llama-3-70B on two 24 GB budgets

A strategy whose run fails gets a ``failed`` row with each rank's error and the figures it reached;
the ranks of a failed run end at once (none is left waiting in a collective). FSDP (torch's first
FSDP) stores 4-bit weights as bfloat16 to shard them with the rest of a block; a pre-quantized
checkpoint (stored as uint8) loads as it is, so FSDP with such ``--weights`` is recorded as skipped
(FSDP2 and DDP load it; FSDP loads a bfloat16 checkpoint).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import math
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import TorchCheckpointIO
from peft import LoraConfig
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).parent))
from qlora_bench import PROFILE_STEPS, SHAPES, free_memory, write_profile  # noqa: E402

from bnb_lightning import BnbQuantization, QuantizationConfig  # noqa: E402
from bnb_lightning.backend import is_bnb_linear, layer_quant_state  # noqa: E402
from bnb_lightning.distributed import base_memory_for, is_fsdp_wrapped, unwrapped_name  # noqa: E402
from bnb_lightning.fsdp2 import is_sharded  # noqa: E402
from bnb_lightning.io.shards import check_weights  # noqa: E402

STRATEGIES = ("ddp", "fsdp", "fsdp2")


class RandomLlama(pl.LightningModule):
    """A Llama of ``shape`` with random bfloat16 weights, the same on every rank (same seed, same device type).

    With ``weights`` (a checkpoint directory), the Llama of its ``config.json`` on the meta device
    instead, for ``BnbQuantization(weights=...)`` to fill while quantizing (``shape`` and ``device`` unused).
    """

    def __init__(
        self,
        shape: str | None,
        device: torch.device,
        seed: int = 0,
        weights: str | None = None,
        lr: float = 1e-4,
    ) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        if weights is not None:
            config = checkpoint_config(weights)
            device = torch.device("meta")  # built in an instant, on every rank: the callback fills it
        else:
            config = LlamaConfig(**SHAPES[shape], max_position_embeddings=131072, rope_theta=500000.0)
        with device:  # an 8B model initializes in seconds on a GPU, in minutes on a CPU
            self.model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16).train()
        self.vocab, self.lr = config.vocab_size, lr

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)

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


class SetupStart(pl.Callback):
    """The time the callbacks' ``setup`` began: put before ``BnbQuantization``, whose ``setup`` quantizes."""

    def __init__(self) -> None:
        self.start: float | None = None

    def setup(self, trainer, pl_module, stage):
        self.start = time.perf_counter()


class Losses(pl.Callback):
    """This rank's loss at every training step."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


class Measure(pl.Callback):
    """Step times after ``warmup`` steps, peak device memory, the base's expected and actual bytes, and
    the seconds quantization (loading and FSDP2's sharding included) took after ``started.start``."""

    def __init__(
        self,
        warmup: int,
        started: SetupStart,
        save: Callable[..., None] | None = None,
        profile: Path | None = None,
    ) -> None:
        self.warmup, self.step_s, self.expected, self.actual = warmup, [], None, None
        self.started, self.setup_s, self.save = started, None, save
        self.profile, self.profiler = profile, None

    def setup(self, trainer, pl_module, stage):
        # Runs after BnbQuantization (earlier in the callback list) quantized the model, before wrapping.
        if self.setup_s is None and self.started.start is not None:
            self.setup_s = time.perf_counter() - self.started.start
        if self.expected is None:
            self.expected = base_memory_for(trainer.strategy, pl_module)

    def on_train_start(self, trainer, pl_module):
        self.actual = local_base_bytes(pl_module)
        on_cuda = torch.cuda.is_available() and pl_module.device.type == "cuda"
        if self.save is not None:  # what the run reached, should training fail
            self.save(
                setup_s=self.setup_s,
                setup_peak_memory_gib=device_peak_gib(pl_module.device),
                base_bytes_per_device=self.actual,
                base_bytes_expected=self.expected.per_device_bytes,
                base_bytes_total=self.expected.total_bytes,
            )
        if on_cuda:
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        synchronize(pl_module.device)
        if self.profile is not None and trainer.global_step == self.warmup and self.profiler is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if pl_module.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        synchronize(pl_module.device)
        if trainer.global_step > self.warmup:
            self.step_s.append(time.perf_counter() - self.start)
        if self.profiler is not None and trainer.global_step == self.warmup + PROFILE_STEPS:
            self.profiler.__exit__(None, None, None)
            # The first PROFILE_STEPS timed steps: this rank's operator tables and a compressed trace.
            write_profile(self.profiler, self.profile.with_suffix(".txt"), pl_module.device, lora_r=16)
            self.profiler = None


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
    """A hash of this rank's full adapters (gathered from the shards under FSDP and FSDP2)."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    def whole(p: torch.Tensor) -> torch.Tensor:
        if isinstance(
            p, DTensor
        ):  # FSDP2: offloaded shards sit in CPU memory; the mesh gathers on its device
            return p.to(p.device_mesh.device_type).full_tensor()
        return p

    def digest() -> str:
        sha = hashlib.sha256()
        for name, p in sorted(
            (unwrapped_name(n), p) for n, p in module.named_parameters() if p.requires_grad
        ):
            sha.update(name.encode())
            sha.update(whole(p).detach().float().cpu().numpy().tobytes())
        return sha.hexdigest()[:16]

    if is_sharded(module) or not is_fsdp_wrapped(module):
        return digest()
    with FullyShardedDataParallel.summon_full_params(trainer.model, writeback=False):
        return digest()


class RankSequence(Dataset):
    """``length`` items, each this rank's own sequence: whatever the sampler picks, a rank sees one batch."""

    def __init__(self, sequences: torch.Tensor, length: int) -> None:
        self.sequences, self.length = sequences, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        return self.sequences[rank % len(self.sequences)]


def random_tokens(vocab: int, steps: int, seq: int, seed: int, ranks: int = 0) -> DataLoader:
    """One sequence per device and step: the distributed sampler gives each rank its own.

    ``ranks``: the same sequence at every step instead, each rank its own (``--repeat-batch``). Lightning's
    distributed sampler shuffles a training set, so the rank picks its sequence, not the sampler.
    """
    generator = torch.Generator().manual_seed(seed)
    sequences = torch.randint(0, vocab, (ranks or steps * 64, seq), generator=generator)
    dataset = RankSequence(sequences, steps * 64) if ranks else list(sequences)
    return DataLoader(dataset, batch_size=1)


def make_trainer(args, steps: int, out: Path, callbacks: list, io: RecordingCheckpointIO) -> pl.Trainer:
    quantization = BnbQuantization(
        QuantizationConfig(bits=4, quant_type="nf4", double_quant=True),
        peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"),
        # Every block recomputed, unless --activation-memory hands the choice to the planner.
        gradient_checkpointing=True if args.activation_memory is None else None,
        activation_memory=args.activation_memory,
        compile_blocks={"auto": None, "on": True, "off": False}[args.compile],
        weights=args.weights,
        offload_params=args.offload_params and args.run == "fsdp2",
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
            *[c for c in callbacks if isinstance(c, SetupStart)],  # before the quantization it times
            quantization,
            *[c for c in callbacks if not isinstance(c, SetupStart)],
            ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=steps),
        ],
        plugins=[io],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
    )


def cap_device_memory(device: torch.device, cap_gb: float | None) -> float | None:
    """Cap what torch's allocator gives this process on ``device`` to ``cap_gb`` GB; return the fraction set.

    Called before anything is allocated there, so the cap holds from the first tensor on.
    """
    if cap_gb is None or device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    if cap_gb * 1e9 > total:
        raise SystemExit(f"--cap-gb {cap_gb} is more than {device}'s {total / 1e9:.1f} GB.")
    fraction = cap_gb * 1e9 / total
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    return fraction


def device_peak_gib(device: torch.device) -> float | None:
    """The peak of what torch allocated on ``device`` since the last reset; ``None`` off CUDA."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def host_peak_gib() -> float:
    """This process's peak resident memory so far (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def private_host_bytes() -> int | None:
    """This process's anonymous resident memory (Linux's ``RssAnon``): what it holds on its own, not
    the pages of mapped files, which the processes of a host share; ``None`` where it is not known."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PrivateHostPeak:
    """The peak of :func:`private_host_bytes`, sampled every ``interval`` seconds by a daemon thread
    (the kernel keeps no peak of it): with ranks sharing a mapped checkpoint, ``ru_maxrss`` counts
    its pages in every rank, this counts what each rank adds."""

    def __init__(self, interval: float = 0.02) -> None:
        self.peak = private_host_bytes()
        if self.peak is not None:
            threading.Thread(target=self._sample, args=(interval,), daemon=True).start()

    def _sample(self, interval: float) -> None:
        while True:
            self.peak = max(self.peak, private_host_bytes() or 0)
            time.sleep(interval)

    def gib(self) -> float | None:
        if self.peak is None:
            return None
        self.peak = max(self.peak, private_host_bytes() or 0)
        return self.peak / 2**30


def run_rank(args) -> None:
    """One rank of one strategy: fit, resume, and this rank's figures to ``--work``/rank<N>.json.

    The file is written as the figures come (after quantization, after the fit, at the end), so a run
    that fails later still tells what it reached. A failure ends the process at once, after its
    traceback and this rank's figures: the other ranks, waiting in a collective, would otherwise keep
    it (and the command) waiting for the process group's timeout; ``main`` then ends them.
    """
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // max(1, args.devices)))
    if args.accelerator == "cpu":
        torch.set_num_threads(1)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))  # one node: the global rank
    device = torch.device("cuda", local_rank) if args.accelerator == "cuda" else torch.device("cpu")
    out = Path(args.work)
    result: dict[str, Any] = {"rank": local_rank}
    private = PrivateHostPeak()

    def save(**figures: Any) -> None:
        if "setup_s" in figures and "host_private_setup_gib" not in result:
            result["host_private_setup_gib"] = private.gib()  # the first run's setup, loading included
        result.update(figures, host_peak_gib=host_peak_gib(), host_private_peak_gib=private.gib())
        (out / f"rank{local_rank}.json").write_text(json.dumps(result))

    try:
        fit_and_resume(args, device, out, save)
        # Every rank's figures are written before rank zero's process ends; then no interpreter teardown,
        # where gloo's threads at times abort a process that has written everything.
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
    except BaseException as error:
        import traceback

        traceback.print_exc()
        if "step_s_median" not in result:  # failed in the first run: its peak so far (training's, or setup's)
            result["peak_memory_gib"] = device_peak_gib(device)
        save(error=f"{type(error).__name__}: {error}"[:2000])
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def fit_and_resume(args, device: torch.device, out: Path, save: Callable[..., None]) -> None:
    save(memory_fraction=cap_device_memory(device, args.cap_gb))
    ranks = args.devices if args.repeat_batch else 0  # --repeat-batch: each rank its own sequence
    started, losses = SetupStart(), Losses()
    rank = int(os.environ.get("LOCAL_RANK", 0))
    profile = None if args.profile is None else Path(args.profile, f"{args.run}-{args.shape}-rank{rank}")
    measure, io = Measure(args.warmup, started, save, profile), RecordingCheckpointIO()
    trainer = make_trainer(args, args.steps, out, [started, measure, losses], io)
    module = RandomLlama(args.shape, device, weights=args.weights, lr=args.lr)
    data = random_tokens(module.vocab, args.steps * args.devices, args.seq, seed=1, ranks=ranks)
    trainer.fit(module, data)
    step_s = sorted(measure.step_s)
    save(
        step_s_median=step_s[len(step_s) // 2] if step_s else None,
        step_s=measure.step_s,
        peak_memory_gib=device_peak_gib(device),  # training's: Measure reset the peak when it started
        host_peak_fit_gib=host_peak_gib(),
        losses=losses.losses,
        written=list(io.written),
    )
    save(adapters=adapter_hash(trainer, module))
    checkpoints = sorted((out / "ckpt").glob("*.ckpt"))
    # Lightning gives each callback the module's `log` (bound methods): the callbacks go too, or they keep
    # the first model, under FSDP2 its shards on the device (ModelParallelStrategy leaves them there).
    del module, trainer, data, started, measure, losses
    # The module's quantized base sits in reference cycles (hooks, the trainer's references).
    free_memory(device)

    io, losses = RecordingCheckpointIO(), Losses()
    trainer = make_trainer(args, args.steps + 2, out / "resumed", [losses], io)
    resumed = RandomLlama(args.shape, device, weights=args.weights, lr=args.lr)
    trainer.fit(
        resumed,
        random_tokens(resumed.vocab, (args.steps + 2) * args.devices, args.seq, seed=1, ranks=ranks),
        ckpt_path=checkpoints[-1] if checkpoints else None,
    )
    save(
        checkpoints=[str(c) for c in checkpoints],
        resumed_step=trainer.global_step,
        resumed_adapters=adapter_hash(trainer, resumed),
        resumed_written=list(io.written),
        resumed_losses=losses.losses,
    )


def falling(losses: Sequence[float]) -> bool:
    return len(losses) >= 2 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def run_settings(strategy: str, args) -> dict[str, Any]:
    return {
        "strategy": strategy,
        "shape": args.shape,
        "weights": args.weights,
        "weights_format": args.weights_format,
        "devices": args.devices,
        "accelerator": args.accelerator,
        "seq": args.seq,
        "steps": args.steps,
        "warmup": args.warmup,
        "lr": args.lr,
        "repeat_batch": args.repeat_batch,
        "cap_gb": args.cap_gb,
        "offload_params": args.offload_params and strategy == "fsdp2",
        "activation_memory": args.activation_memory,
        "compile_blocks": args.compile,
        "fsdp_wrap": args.fsdp_wrap if strategy == "fsdp" else None,
    }


def summarize(strategy: str, args, ranks: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """The row of one strategy from its ranks' figures; a failed run's ranks may lack the later ones."""
    tokens = args.seq  # per device and step
    per_device = [tokens / r["step_s_median"] if r.get("step_s_median") else None for r in ranks]
    writes = [len(r.get("written", [])) for r in ranks]
    losses = [r.get("losses") for r in ranks]
    resumed = [r.get("resumed_losses") for r in ranks]
    finished = bool(ranks) and all("resumed_step" in r for r in ranks)
    row: dict[str, Any] = {
        **run_settings(strategy, args),
        "status": "measured",
        "seconds": round(seconds, 1),
        "memory_fraction": [r.get("memory_fraction") for r in ranks],
        "setup_s": [r.get("setup_s") for r in ranks],
        "host_peak_gib": [r.get("host_peak_gib") for r in ranks],
        "host_peak_fit_gib": [r.get("host_peak_fit_gib") for r in ranks],
        "host_private_peak_gib": [r.get("host_private_peak_gib") for r in ranks],
        "host_private_setup_gib": [r.get("host_private_setup_gib") for r in ranks],
        "setup_peak_memory_gib": [r.get("setup_peak_memory_gib") for r in ranks],
        "peak_memory_gib": [r.get("peak_memory_gib") for r in ranks],
        "tokens_per_s_per_device": per_device,
        "step_s": [r.get("step_s") for r in ranks],
        "tokens_per_s": sum(per_device) if per_device and all(per_device) else None,
        "adapters_equal": finished
        and len({r["adapters"] for r in ranks}) == 1
        and len({r["resumed_adapters"] for r in ranks}) == 1,
        "checkpoint_written_once": finished
        and writes[0] == 1
        and sum(writes) == 1
        and len(ranks[0]["checkpoints"]) == 1,
        "resumed": finished
        and all(r["resumed_step"] == args.steps + 2 for r in ranks)
        and sum(len(r["resumed_written"]) for r in ranks) == 1,
        "base_bytes_per_device": [r.get("base_bytes_per_device") for r in ranks],
        "base_bytes_expected": ranks[0].get("base_bytes_expected") if ranks else None,
        "base_bytes_total": ranks[0].get("base_bytes_total") if ranks else None,
        "losses": losses[0] if losses else None,
        "losses_per_rank": losses,
        "resumed_losses": resumed,
        "loss_falling": bool(losses) and all(ls is not None and falling(ls) for ls in losses),
        # The resumed run starts from the trained adapters: its first loss is below the first run's first.
        "resumed_loss_below_first": finished
        and all(bool(r) and bool(ls) and r[0] < ls[0] for r, ls in zip(resumed, losses, strict=True)),
    }
    return row


def checkpoint_config(weights: str) -> Any:
    """The transformers config of the checkpoint directory ``weights`` (its ``config.json``)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(weights)


def shape_of(config: Any) -> str | None:
    """The name of the ``qlora_bench.SHAPES`` entry ``config`` has the shape of; ``None`` for another."""
    for name, fields in SHAPES.items():
        if all(getattr(config, key, None) == value for key, value in fields.items()):
            return name
    return None


def weights_format(config: Any) -> str:
    """``bf16`` (not quantized), ``nf4-dq`` (what this benchmark trains) or what else the checkpoint holds.

    Raises:
        SystemExit: a checkpoint quantized otherwise than NF4 with double quantization in uint8 (the
            benchmark's config), or not a Llama: BnbQuantization would refuse it on every rank.
    """
    if getattr(config, "model_type", None) != "llama":
        raise SystemExit(
            f"--weights: a Llama checkpoint is expected; its config.json says {config.model_type!r}."
        )
    quantization = getattr(config, "quantization_config", None)
    if quantization is None:
        return "bf16"
    if not isinstance(quantization, dict):
        quantization = quantization.to_dict()
    nf4_dq = (
        quantization.get("load_in_4bit")
        and quantization.get("bnb_4bit_quant_type") == "nf4"
        and quantization.get("bnb_4bit_use_double_quant")
        and quantization.get("bnb_4bit_quant_storage", "uint8") == "uint8"
    )
    if not nf4_dq:
        raise SystemExit(
            f"--weights: the checkpoint is quantized as {quantization}; this benchmark trains NF4 with double "
            "quantization (uint8 storage) and loads a pre-quantized checkpoint as it is: pass a bfloat16 one "
            "or make_checkpoint.py --bits 4 (its defaults)."
        )
    return "nf4-dq"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shape", choices=sorted(SHAPES), help="default: 1b, or with --weights the checkpoint's (checked)"
    )
    parser.add_argument(
        "--weights",
        help="a checkpoint directory (make_checkpoint.py's): the model is built on the meta device from its "
        "config.json and BnbQuantization(weights=...) fills it while quantizing",
    )
    parser.add_argument(
        "--cap-gb",
        type=float,
        help="cap each rank's device memory to this many GB (10**9 bytes), set_per_process_memory_fraction",
    )
    parser.add_argument(
        "--repeat-batch",
        action="store_true",
        help="each rank trains on the same sequence at every step (the loss must fall)",
    )
    parser.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate of the adapters")
    parser.add_argument(
        "--offload-params",
        action="store_true",
        help="fsdp2: BnbQuantization(offload_params=True), each rank's shards in CPU memory",
    )
    parser.add_argument(
        "--activation-memory",
        help="BnbQuantization(activation_memory=...), e.g. auto or offload; default: every block recomputed",
    )
    parser.add_argument("--devices", type=int, help="default: every GPU, or 2 processes on the CPU")
    parser.add_argument(
        "--accelerator", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument(
        "--steps",
        type=int,
        default=12,
        help="training steps per fit (the resume adds 2); 70B: 4 with --warmup 1",
    )
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
    parser.add_argument(
        "--profile",
        help=f"profile each rank's first {PROFILE_STEPS} timed steps: operator tables and a gzipped trace in DIR",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/multi_gpu.jsonl"))
    parser.add_argument("--work", help=argparse.SUPPRESS)  # set for the per-strategy runs
    parser.add_argument("--run", choices=STRATEGIES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.weights_format = None
    if args.weights is not None:
        try:
            check_weights(args.weights)  # the package's own check, before any rank starts
        except (OSError, ValueError) as error:
            parser.error(f"--weights: {error}")
        config = checkpoint_config(args.weights)
        args.weights_format = weights_format(config)
        shape = shape_of(config)
        if args.shape is not None and args.shape != shape:
            parser.error(
                f"--shape {args.shape} but --weights {args.weights} holds the {shape or 'another'} shape "
                f"(hidden_size {config.hidden_size}, {config.num_hidden_layers} layers); leave --shape out."
            )
        args.shape = shape
    elif args.shape is None:
        args.shape = "1b"
    if args.steps <= args.warmup:
        parser.error(f"--steps {args.steps} leaves no timed step after --warmup {args.warmup}.")
    return args


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
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for strategy in args.strategies:
        if strategy == "fsdp" and args.weights_format == "nf4-dq":
            row = {
                "strategy": strategy,
                "status": "skipped",
                "weights": args.weights,
                "reason": "torch's FSDP shards 4-bit weights stored as bfloat16 (quant_storage) and a "
                "pre-quantized checkpoint (uint8) loads as it is: BnbQuantization refuses it. FSDP2 and DDP "
                "load it; FSDP loads a bfloat16 checkpoint.",
            }
        elif strategy == "fsdp" and args.accelerator == "cpu":
            row = {"strategy": strategy, "status": "skipped", "reason": "torch's FSDP needs a GPU"}
        else:
            row = run_strategy(strategy, args, argv)
        rows.append(row)
        line = json.dumps(row)
        print(line, flush=True)
        # Row by row: a strategy that runs out of time loses only itself.
        with args.out.open("a") as file:
            file.write(line + "\n")
    return rows


def tee(stream: Any, lines: collections.deque[str]) -> None:
    """The ranks' output on this process's stderr as it comes, its last lines kept for a failed run's row."""
    for line in stream:
        sys.stderr.write(line)
        lines.append(line)


def run_strategy(strategy: str, args, argv: Sequence[str] | None) -> dict[str, Any]:
    """Run one strategy's ranks (this file again, with ``--run``) and summarize what they wrote."""
    with tempfile.TemporaryDirectory(prefix="bnb_multi_gpu_") as work:
        command = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])]
        command += ["--run", strategy, "--work", work, "--seq", str(args.seq), "--devices", str(args.devices)]
        print(
            f"multi_gpu.py: {strategy} on {args.devices} {args.accelerator} devices ...",
            file=sys.stderr,
            flush=True,
        )
        start = time.perf_counter()
        # A session of its own: Lightning starts the other ranks from rank zero, and ranks a failed rank
        # left waiting in a collective end with it (below) instead of holding the command.
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        log: collections.deque[str] = collections.deque(maxlen=200)
        echo = threading.Thread(target=tee, args=(process.stdout, log), daemon=True)
        echo.start()
        returncode = process.wait()
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        echo.join(timeout=10)
        process.stdout.close()
        seconds = time.perf_counter() - start
        files = [Path(work) / f"rank{rank}.json" for rank in range(args.devices)]
        ranks = [json.loads(file.read_text()) for file in files if file.exists()]
        if returncode != 0:
            # What the ranks reached (their figures so far), each rank's error, and the log's end.
            row = summarize(strategy, args, ranks, seconds)
            row.update(
                status="failed",
                returncode=returncode,
                rank_errors=[r.get("error") for r in ranks],
                error="".join(log)[-3000:],
            )
            return row
        print(f"multi_gpu.py: {strategy} done in {seconds:.0f} s", file=sys.stderr, flush=True)
        return summarize(strategy, args, ranks, seconds)


if __name__ == "__main__":
    main()
