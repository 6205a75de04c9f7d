"""QLoRA on one GPU: BnbQuantization under a Lightning Trainer against the transformers + PEFT recipes.

Builds a Llama-shaped model with random weights from a ``LlamaConfig`` (nothing downloaded), saves it
once to a temporary directory, and measures each recipe on the same weights and the same random token
batches. The recipes and what each one is: ``RECIPES`` below (the table in ``benchmarks/README.md``
lists the same, and a test keeps them equal), or ``--help``.

For each: time to a quantized model, memory after it (peak and steady), training tokens/s over the
steps after warm-up, peak training memory. Every configuration runs ``--repeats`` times, interleaved.
One JSON line per measurement goes to ``--out``; a Markdown table with medians, ranges and ratios is
printed and written to ``--markdown``::

    python benchmarks/qlora_bench.py --shape 1b --bits 4
    python benchmarks/qlora_bench.py --smoke   # tiny model on CPU, same code paths, seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import gzip
import json
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from peft import LoraConfig
from torch.autograd import DeviceType

# Its neighbours import as top-level modules, also when this file is loaded by path (as peers.py and the tests do).
if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))
import memory_trace  # noqa: E402

# Recipe name -> what it is, one line of Markdown. The single list: benchmarks/README.md's table
# gives the same lines (tests/test_benchmark.py checks it), and RUNNERS has one runner per name.
RECIPES: dict[str, str] = {
    "bnb": "`BnbQuantization(QuantizationConfig(bits=...), LoRA)`, every option at its default (the activation "
    'planner fits the device, or `--memory-cap`), under `Trainer(precision="bf16-true")`',
    "bnb_full_loss": "`bnb` with `chunked_loss=False`: the model's own full-vocabulary loss",
    "bnb_compile": "`bnb` with `compile_blocks=True` (already the default on one CUDA device)",
    "bnb_llm_int8": "`bnb` with `dequantize_int8=False`: bitsandbytes' LLM.int8 matmul (8-bit only)",
    "bnb_bnb_dequantize": "`bnb` with `fuse_4bit_dequantize=False`: bitsandbytes' own 4-bit op in the "
    "compiled blocks (4-bit only)",
    "bnb_paged_adamw": "`bnb` with bitsandbytes' `PagedAdamW` (optimizer state in paged memory) instead of "
    "torch's `AdamW`",
    "bnb_uncheckpointed": "`bnb` with `uncheckpointed_blocks=--uncheckpointed-blocks` (default: the last "
    "quarter of the blocks keep their activations instead of recomputing them)",
    "bnb_recompute": '`bnb` with `activation_memory="recompute"`: every block checkpointed (the default before '
    "the planner)",
    "bnb_offload": '`bnb` with `activation_memory="offload"`: every block checkpointed, its input (and, on SDPA '
    "attention, its attention output) waiting in CPU memory for the backward pass",
    "bnb_torch_loss": '`bnb` with `loss_kernel="torch"`: the chunked loss in torch ops, not Liger-Kernel\'s '
    "fused linear cross-entropy (the default on CUDA where `liger-kernel` is installed)",
    "hf_prepare": "`from_pretrained(quantization_config=BitsAndBytesConfig(...))`, PEFT's "
    "`prepare_model_for_kbit_training` (float32 upcast) and `get_peft_model`; a plain torch loop under "
    "bf16 autocast, as transformers' `Trainer(bf16=True)` runs it",
    "hf_noupcast": "`hf_prepare` without the upcast: non-reentrant checkpointing, `enable_input_require_grads`",
    "hf_compile": "`hf_noupcast` with each decoder layer `torch.compile`-d (recorded as skipped, with the "
    "error, if compiling fails)",
    "hf_prepare_no_autocast": "`hf_prepare` in a loop without autocast: the upcast norms, embeddings, "
    "lm_head and hidden states between layers, and PEFT's float32 adapters, compute in float32",
    "hf_noupcast_no_autocast": "`hf_noupcast` in a loop without autocast: PEFT's float32 adapters compute "
    "in float32",
    "hf_compile_no_autocast": "`hf_compile` in a loop without autocast: PEFT's float32 adapters compute "
    "in float32",
    "bnb_precision": 'Lightning\'s `BitsandbytesPrecision("nf4-dq" / "int8")`: quantization only, not '
    "trained (CUDA only)",
    "bf16_lora": "a bfloat16 base with the same LoRA, no quantization",
}
# Ratios in the table are taken against these recipes, where they were measured.
BASELINES = tuple(recipe for recipe in RECIPES if recipe.startswith("hf_"))

SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=256,
        tie_word_embeddings=True,
    ),
    # Llama-3.2-1B
    "1b": dict(
        hidden_size=2048,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=8192,
        vocab_size=128256,
        tie_word_embeddings=True,
    ),
    # Llama-3-8B
    "8b": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=128256,
        tie_word_embeddings=False,
    ),
    # Llama-3-70B
    "70b": dict(
        hidden_size=8192,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        intermediate_size=28672,
        vocab_size=128256,
        tie_word_embeddings=False,
    ),
}

SMOKE = dict(shape="tiny", seq=[32], batch=2, warmup=1, steps=2, repeats=1)
GIB = 1024**3


class Skipped(Exception):
    """A recipe cannot run here; the message is the reason recorded in the results."""


@dataclass
class Measurement:
    recipe: str
    bits: int | None
    repeat: int
    status: str = "measured"  # "measured", "skipped" or "failed"
    reason: str = ""
    load_s: float | None = None
    quantize_s: float | None = None
    ready_peak_bytes: int | None = None
    ready_steady_bytes: int | None = None
    train_peak_bytes: int | None = None
    tokens_per_s: float | None = None
    step_s: list[float] = field(default_factory=list)
    final_loss: float | None = None
    wall_s: float | None = None  # the whole measurement, load to teardown
    seq: int | None = None  # tokens per sequence in its batches
    plan: str | None = None  # the activation plan bnb_lightning chose
    predicted_peak_bytes: int | None = None  # and the peak it predicted
    plan_cost: dict | None = None  # what it measured: one block's BlockCost, and the static bytes
    numerics: dict | None = None  # what trained: the dtypes of the adapters, of the rest, and autocast's

    def profile_name(self) -> str:
        return f"{self.recipe}-{self.bits or 'bf16'}bit-r{self.repeat}"


@dataclass
class Setup:
    """What every recipe shares: the saved weights, the batches, the device and the loop lengths."""

    model_dir: str
    device: torch.device
    batches: list[torch.Tensor]
    warmup: int
    steps: int
    lora_r: int
    uncheckpointed_blocks: int = 1
    profile_dir: str | None = None  # profile PROFILE_STEPS extra steps after the timed ones
    # The bnb recipes' Trainer precision. Under "bf16-mixed", train_loop also puts what trains in
    # float32 (PEFT's adapters already are): transformers' Trainer(bf16=True) numerics.
    precision: str = "bf16-true"


PROFILE_STEPS = 2


# ---------------------------------------------------------------- measurement helpers


def cuda(device: torch.device) -> bool:
    return device.type == "cuda"


def synchronize(device: torch.device) -> None:
    if cuda(device):
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Drop what the last recipe left behind and start a new peak.

    cuBLAS keeps a 32 MiB workspace per handle (the autograd thread has its own), which
    ``empty_cache`` leaves allocated. Lightning's accelerator setup frees them after the callbacks'
    ``setup``, so a workspace left by the previous recipe would count in the next one's ready peak
    but not in its steady footprint. Cleared here, every recipe starts as in a fresh process.
    """
    gc.collect()
    if cuda(device):
        from lightning.fabric.accelerators.cuda import _clear_cuda_memory

        torch.cuda.synchronize(device)
        _clear_cuda_memory()  # cuBLAS workspaces, then torch's cache
        torch.cuda.reset_peak_memory_stats(device)


def memory(device: torch.device) -> tuple[int | None, int | None]:
    """(peak, current) allocated bytes on the device since the last reset; ``None`` on CPU."""
    if not cuda(device):
        return None, None
    synchronize(device)
    return torch.cuda.max_memory_allocated(device), torch.cuda.memory_allocated(device)


def reset_peak(device: torch.device) -> None:
    if cuda(device):
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


class StepClock:
    """Wall time of each training step after warm-up, synchronized with the device; with a
    ``profile_name``, a torch.profiler trace of the ``PROFILE_STEPS`` steps after the timed ones."""

    def __init__(self, setup: Setup, profile_name: str) -> None:
        self.device = setup.device
        self.warmup = setup.warmup
        self.timed_end = setup.warmup + setup.steps
        self.profile_path = None
        if setup.profile_dir:
            shape = "x".join(map(str, setup.batches[0].shape)) if setup.batches else "none"
            self.profile_path = Path(setup.profile_dir, f"{profile_name}-{shape}")  # one per batch shape
        self.lora_r = setup.lora_r
        self.step_s: list[float] = []
        self._start = 0.0
        self._profiler: torch.profiler.profile | None = None

    def begin(self, step: int) -> None:
        if step == self.timed_end and self.profile_path is not None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if cuda(self.device):
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._profiler = torch.profiler.profile(
                activities=activities, profile_memory=True, record_shapes=True
            )
            self._profiler.__enter__()
        if self.warmup <= step < self.timed_end:
            synchronize(self.device)
            self._start = time.perf_counter()

    def end(self, step: int) -> None:
        if self.warmup <= step < self.timed_end:
            synchronize(self.device)
            self.step_s.append(time.perf_counter() - self._start)
        if step == self.timed_end + PROFILE_STEPS - 1 and self._profiler is not None:
            synchronize(self.device)
            self._profiler.__exit__(None, None, None)
            write_profile(self._profiler, self.profile_path, self.device, self.lora_r)
            self._profiler = None

    def record(self, result: Measurement, tokens_per_step: int) -> None:
        result.step_s = self.step_s
        result.tokens_per_s = tokens_per_step * len(self.step_s) / sum(self.step_s)


MATMULS = ("aten::mm", "aten::addmm", "aten::bmm")


def matmul_split(profiler: torch.profiler.profile, device: torch.device, lora_r: int) -> list[str]:
    """Matmul time split into the adapters' (an operand dimension equal to the LoRA rank) and the rest."""
    self_time = "self_device_time_total" if cuda(device) else "self_cpu_time_total"
    events = profiler.key_averages(group_by_input_shape=True)
    # As torch's tables count it: on CUDA the kernels' own events (not the user annotations shown
    # on the device's timeline), on the CPU every operator.
    on_device = [
        event
        for event in events
        if event.device_type != DeviceType.CPU and not getattr(event, "is_user_annotation", False)
    ]
    total = sum(getattr(event, self_time) for event in (on_device if cuda(device) else events))
    split = {"adapters": [0.0, 0], "base and others": [0.0, 0]}
    for event in events:
        if event.key in MATMULS:
            dims = {dim for shape in event.input_shapes if shape for dim in shape[-2:]}
            part = split["adapters" if lora_r in dims else "base and others"]
            part[0] += getattr(event, self_time)
            part[1] += event.count
    lines = [f"## matmuls ({', '.join(MATMULS)}) by {self_time}; LoRA rank {lora_r}"]
    for name, (time_us, calls) in split.items():
        share = 100 * time_us / total if total else 0.0
        lines.append(f"{name}: {time_us / 1e3:.1f} ms in {calls} calls, {share:.1f}% of {total / 1e3:.1f} ms")
    return lines


def write_profile(profiler: torch.profiler.profile, path: Path, device: torch.device, lora_r: int) -> None:
    """Operators by total device time and by memory allocated, as text tables, and the matmul split; the
    profiled steps' timeline next to them (``.json.gz``, for chrome://tracing or Perfetto)."""
    events = profiler.key_averages()
    time_key = "device_time_total" if cuda(device) else "cpu_time_total"
    memory_key = "self_device_memory_usage" if cuda(device) else "self_cpu_memory_usage"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = [
        f"# {path.stem}: {PROFILE_STEPS} training steps",
        *matmul_split(profiler, device, lora_r),
        f"## by {time_key}",
        events.table(sort_by=time_key, row_limit=40, max_name_column_width=90),
        f"## by self_{time_key} (kernels and operators on their own)",
        events.table(sort_by=f"self_{time_key}", row_limit=40, max_name_column_width=90),
        f"## by {memory_key}",
        events.table(sort_by=memory_key, row_limit=25, max_name_column_width=90),
    ]
    path.with_suffix(".txt").write_text("\n".join(text))
    trace = path.with_suffix(".json")
    profiler.export_chrome_trace(str(trace))
    with trace.open("rb") as raw, gzip.open(f"{trace}.gz", "wb") as packed:
        shutil.copyfileobj(raw, packed)
    trace.unlink()


def lora_config(rank: int) -> LoraConfig:
    return LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear")


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def dtype_names(parameters: list[torch.nn.Parameter]) -> str | None:
    """The floating dtypes of ``parameters``, e.g. ``"bfloat16"`` (quantized storage left out)."""
    names = sorted({str(p.dtype).removeprefix("torch.") for p in parameters if p.is_floating_point()})
    return "+".join(names) or None


def numerics(model: torch.nn.Module, autocast: torch.dtype | None) -> dict[str, str | None]:
    """What a recipe trains with: its adapters' dtype, the rest's (the frozen base that is not
    quantized: embeddings, norms, lm_head), and autocast's dtype (None: off)."""
    parameters = list(model.parameters())
    return {
        "adapters": dtype_names([p for p in parameters if p.requires_grad]),
        "frozen": dtype_names([p for p in parameters if not p.requires_grad]),
        "autocast": None if autocast is None else str(autocast).removeprefix("torch."),
    }


def autocast_dtype(device_type: str) -> torch.dtype | None:
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def train_loop(model: torch.nn.Module, setup: Setup, result: Measurement, autocast: bool = True) -> None:
    """A plain torch loop, by default under bfloat16 autocast as transformers' Trainer(bf16=True) runs it."""
    if setup.precision == "bf16-mixed":
        for parameter in trainable(model):
            if parameter.dtype in (torch.float16, torch.bfloat16):
                parameter.data = parameter.data.float()
    optimizer = torch.optim.AdamW(trainable(model), lr=1e-4, weight_decay=0.0)
    result.numerics = numerics(model, torch.bfloat16 if autocast else None)
    clock = StepClock(setup, result.profile_name())
    model.train()
    reset_peak(setup.device)
    for step, batch in enumerate(setup.batches):
        clock.begin(step)
        with torch.autocast(setup.device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock.end(step)
    result.final_loss = float(loss.detach())
    result.train_peak_bytes = memory(setup.device)[0]
    clock.record(result, setup.batches[0].numel())


def mark_ready(result: Measurement, setup: Setup, start: float) -> None:
    """The model is quantized (or loaded) and ready to train: note time and memory."""
    synchronize(setup.device)
    result.load_s = time.perf_counter() - start
    result.ready_peak_bytes, result.ready_steady_bytes = memory(setup.device)


def bnb_config(bits: int):
    from transformers import BitsAndBytesConfig

    if bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def load_bf16(setup: Setup, device: torch.device | None = None, **kwargs: Any) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    device_map = {"": str(device)} if device is not None else None
    return LlamaForCausalLM.from_pretrained(
        setup.model_dir, dtype=torch.bfloat16, device_map=device_map, **kwargs
    )


# ---------------------------------------------------------------- recipes


class CausalLMModule(pl.LightningModule):
    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: type[torch.optim.Optimizer] = torch.optim.AdamW,
    ) -> None:
        super().__init__()
        # from_pretrained returns eval mode, which Lightning keeps; transformers checkpoints only in training.
        self.model = model.train()
        self.optimizer = optimizer
        self.autocast: torch.dtype | None = None  # the precision plugin's, seen by the last step

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.autocast = autocast_dtype(batch.device.type)
        return self.model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer(trainable(self), lr=1e-4, weight_decay=0.0)


class BenchmarkHooks(pl.Callback):
    """Notes time and memory once the model is ready (``on_fit_start``) and times the warm steps."""

    def __init__(self, setup: Setup, result: Measurement, start: float) -> None:
        self.setup_ = setup
        self.result = result
        self.start = start
        self.clock = StepClock(setup, result.profile_name())

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        mark_ready(self.result, self.setup_, self.start)
        reset_peak(self.setup_.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.clock.begin(batch_idx)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.clock.end(batch_idx)
        self.result.final_loss = float(outputs["loss"])
        if batch_idx == 0:
            self.result.numerics = numerics(pl_module, pl_module.autocast)


def run_bnb(
    setup: Setup,
    bits: int,
    result: Measurement,
    optimizer: type[torch.optim.Optimizer] = torch.optim.AdamW,
    **options: Any,
) -> None:
    from bnb_lightning import BnbQuantization, QuantizationConfig

    start = time.perf_counter()
    # Loaded on the CPU: the callback quantizes layer by layer onto the GPU in `setup`.
    module = CausalLMModule(load_bf16(setup), optimizer)
    quantization = BnbQuantization(
        QuantizationConfig(bits=bits), peft_config=lora_config(setup.lora_r), **options
    )
    hooks = BenchmarkHooks(setup, result, start)
    trainer = pl.Trainer(
        accelerator=setup.device.type,
        devices=1,
        precision=setup.precision,
        max_steps=len(setup.batches),
        callbacks=[quantization, hooks],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    label = f"{result.recipe}-{setup.batches[0].shape[-1]}x{setup.batches[0].shape[0]}-r{result.repeat}"
    with memory_trace.recording(setup.device, label):
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(setup.batches, batch_size=None))
    result.quantize_s = quantization.report.seconds
    result.train_peak_bytes = memory(setup.device)[0]
    plan = quantization.activation_plan
    if plan is not None:
        result.plan = plan.summary().removeprefix("bnb_lightning: ")
        result.predicted_peak_bytes = plan.predicted_peak
        if plan.cost is not None:
            result.plan_cost = {**dataclasses.asdict(plan.cost), "static": plan.static}
    hooks.clock.record(result, setup.batches[0].numel())


def run_bnb_full_loss(setup: Setup, bits: int, result: Measurement) -> None:
    run_bnb(setup, bits, result, chunked_loss=False)


def run_bnb_compile(setup: Setup, bits: int, result: Measurement) -> None:
    run_bnb(setup, bits, result, compile_blocks=True)


def run_bnb_llm_int8(setup: Setup, bits: int, result: Measurement) -> None:
    if bits != 8:
        raise Skipped("8-bit only")
    run_bnb(setup, bits, result, dequantize_int8=False)


def run_bnb_bnb_dequantize(setup: Setup, bits: int, result: Measurement) -> None:
    if bits != 4:
        raise Skipped("4-bit only")
    run_bnb(setup, bits, result, fuse_4bit_dequantize=False)


def run_bnb_paged_adamw(setup: Setup, bits: int, result: Measurement) -> None:
    import bitsandbytes as bnb

    # On the CPU bitsandbytes falls back to an unpaged AdamW, with a warning.
    run_bnb(setup, bits, result, optimizer=bnb.optim.PagedAdamW)


def run_bnb_uncheckpointed(setup: Setup, bits: int, result: Measurement) -> None:
    run_bnb(setup, bits, result, uncheckpointed_blocks=setup.uncheckpointed_blocks)


def load_hf_quantized(setup: Setup, bits: int, result: Measurement) -> torch.nn.Module:
    start = time.perf_counter()
    model = load_bf16(setup, setup.device, quantization_config=bnb_config(bits))
    synchronize(setup.device)
    result.quantize_s = time.perf_counter() - start
    return model


def peft_model(model: torch.nn.Module, setup: Setup) -> torch.nn.Module:
    from peft import get_peft_model

    return get_peft_model(model, lora_config(setup.lora_r))


def run_hf_prepare(setup: Setup, bits: int, result: Measurement, autocast: bool = True) -> None:
    from peft import prepare_model_for_kbit_training

    start = time.perf_counter()
    model = load_hf_quantized(setup, bits, result)
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    model = peft_model(model, setup)
    mark_ready(result, setup, start)
    train_loop(model, setup, result, autocast=autocast)


def noupcast_model(setup: Setup, bits: int, result: Measurement, start: float) -> torch.nn.Module:
    model = load_hf_quantized(setup, bits, result)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    return peft_model(model, setup)


def run_hf_noupcast(setup: Setup, bits: int, result: Measurement, autocast: bool = True) -> None:
    start = time.perf_counter()
    model = noupcast_model(setup, bits, result, start)
    mark_ready(result, setup, start)
    train_loop(model, setup, result, autocast=autocast)


def run_hf_compile(setup: Setup, bits: int, result: Measurement, autocast: bool = True) -> None:
    start = time.perf_counter()
    model = noupcast_model(setup, bits, result, start)
    for layer in model.base_model.model.model.layers:
        layer.compile()
    mark_ready(result, setup, start)
    try:
        train_loop(model, setup, result, autocast=autocast)
    except Exception as error:  # compilation errors surface on the first step
        raise Skipped(f"torch.compile failed: {type(error).__name__}: {first_line(error)}") from error


def run_bnb_precision(setup: Setup, bits: int, result: Measurement) -> None:
    if not cuda(setup.device):
        raise Skipped("needs CUDA (Lightning's BitsandbytesPrecision quantizes on CUDA only)")
    from lightning.pytorch.plugins import BitsandbytesPrecision

    # Lightning's int8 mode accepts float16 only.
    dtype = torch.bfloat16 if bits == 4 else torch.float16
    plugin = BitsandbytesPrecision("nf4-dq" if bits == 4 else "int8", dtype=dtype, ignore_modules={"lm_head"})
    start = time.perf_counter()
    model = load_bf16(setup).to(dtype)
    model = plugin.convert_module(model).to(setup.device)
    synchronize(setup.device)
    result.quantize_s = time.perf_counter() - start
    mark_ready(result, setup, start)
    result.reason = "quantization only: not trained"


def run_bf16_lora(setup: Setup, bits: int | None, result: Measurement) -> None:
    start = time.perf_counter()
    model = load_bf16(setup, setup.device)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = peft_model(model, setup)
    mark_ready(result, setup, start)
    train_loop(model, setup, result)


RUNNERS: dict[str, Callable[[Setup, Any, Measurement], None]] = {
    "bnb": run_bnb,
    "bnb_full_loss": run_bnb_full_loss,
    "bnb_compile": run_bnb_compile,
    "bnb_llm_int8": run_bnb_llm_int8,
    "bnb_bnb_dequantize": run_bnb_bnb_dequantize,
    "bnb_paged_adamw": run_bnb_paged_adamw,
    "bnb_uncheckpointed": run_bnb_uncheckpointed,
    "bnb_recompute": partial(run_bnb, activation_memory="recompute"),
    "bnb_offload": partial(run_bnb, activation_memory="offload"),
    "bnb_torch_loss": partial(run_bnb, loss_kernel="torch"),
    "hf_prepare": run_hf_prepare,
    "hf_noupcast": run_hf_noupcast,
    "hf_compile": run_hf_compile,
    "hf_prepare_no_autocast": partial(run_hf_prepare, autocast=False),
    "hf_noupcast_no_autocast": partial(run_hf_noupcast, autocast=False),
    "hf_compile_no_autocast": partial(run_hf_compile, autocast=False),
    "bnb_precision": run_bnb_precision,
    "bf16_lora": run_bf16_lora,
}


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else ""


def measure(recipe: str, bits: int | None, repeat: int, setup: Setup) -> Measurement:
    """Run one recipe once; a failure is recorded, not raised, so the other recipes still run."""
    result = Measurement(recipe, bits, repeat)
    free_memory(setup.device)
    start = time.perf_counter()
    try:
        RUNNERS[recipe](setup, bits, result)
    except Skipped as skip:
        result.status, result.reason = "skipped", str(skip)
    except Exception as error:
        result.status, result.reason = "failed", f"{type(error).__name__}: {first_line(error)}"
        traceback.print_exc()  # the whole story, in the run's log; the result keeps its first line
    if result.status != "measured":
        result.load_s = result.quantize_s = result.tokens_per_s = None
        result.step_s = []
        result.ready_peak_bytes = result.ready_steady_bytes = result.train_peak_bytes = None
    free_memory(setup.device)
    result.wall_s = time.perf_counter() - start
    return result


# ---------------------------------------------------------------- model, data, environment


def save_random_model(shape: str, directory: str, seed: int, device: torch.device) -> dict[str, Any]:
    """A Llama of ``shape`` with random weights, saved once so every recipe loads the same ones.

    Initialized on ``device``: an 8B model initializes in seconds on a GPU and in minutes on a CPU.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=131072, rope_theta=500000.0)
    with device:
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory)
    parameters = sum(p.numel() for p in model.parameters())
    del model
    free_memory(device)
    return {"parameters": parameters, **SHAPES[shape]}


def warm_up_bitsandbytes(device: torch.device) -> None:
    """bitsandbytes' first kernel launches on ``device`` (4-bit both ways, 8-bit), on a tiny tensor."""
    import bitsandbytes.functional as bnb_functional

    weight = torch.randn(256, 256, device=device, dtype=torch.bfloat16)
    for quant_type in ("nf4", "fp4"):
        packed, state = bnb_functional.quantize_4bit(weight, quant_type=quant_type, compress_statistics=True)
        bnb_functional.dequantize_4bit(packed, state)
    bnb_functional.int8_vectorwise_quant(weight.half())


def warm_up_process(device: torch.device) -> None:
    """Pay the once-per-process costs before any timing, so the recipe run first is not charged them.

    Imports every library the recipes use (``torch.compile``'s too), initializes the device's math
    libraries, loads bitsandbytes' 4-bit and 8-bit kernels, and injects LoRA into a tiny model once
    (PEFT builds transformers' weight-name tables on its first injection, for every recipe).
    """
    import transformers.integrations.bitsandbytes  # noqa: F401 - transformers' quantizer path
    from peft import get_peft_model, prepare_model_for_kbit_training  # noqa: F401
    from transformers import LlamaConfig, LlamaForCausalLM

    import bnb_lightning  # noqa: F401

    warm_up_bitsandbytes(device)
    weight = torch.randn(256, 256, device=device, dtype=torch.bfloat16)
    weight @ weight
    torch.nn.Identity().compile()  # imports torch._dynamo; nothing is compiled before a call
    get_peft_model(LlamaForCausalLM(LlamaConfig(**SHAPES["tiny"])), lora_config(4))
    pl.Trainer(accelerator=device.type, devices=1, logger=False, enable_progress_bar=False)
    synchronize(device)


def random_batches(vocab: int, count: int, batch: int, seq: int, device: torch.device, seed: int):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq), generator=generator).to(device) for _ in range(count)]


def environment(device: torch.device, argv: Sequence[str]) -> dict[str, Any]:
    import bitsandbytes
    import lightning
    import peft
    import transformers

    return {
        "device": torch.cuda.get_device_name(device) if cuda(device) else "cpu (no CUDA)",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "lightning": lightning.__version__,
        "command": shlex.join(["python", "benchmarks/qlora_bench.py", *argv]),
    }


# ---------------------------------------------------------------- report


def median_range(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    if not values:
        return "–"
    values = [v / scale for v in values]
    middle = statistics.median(values)
    if len(values) == 1:
        return f"{middle:.{digits}f}"
    return f"{middle:.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def ratio(values: list[float], baseline: list[float]) -> str:
    if not values or not baseline:
        return "–"
    return f"{statistics.median(values) / statistics.median(baseline):.2f}×"


def markdown(results: list[Measurement], env: dict[str, Any], model: dict[str, Any], args) -> str:
    lines = [
        f"# QLoRA benchmark: {args.shape} ({model['parameters'] / 1e9:.2f} B parameters), "
        f"seq {', '.join(map(str, args.seq))}, batch {args.batch}, {args.warmup} warm-up + {args.steps} timed steps, "
        f"{args.repeats} repeats",
        "",
        f"- device: {env['device']}",
        f"- torch {env['torch']} (CUDA {env['cuda']}), transformers {env['transformers']}, "
        f"peft {env['peft']}, bitsandbytes {env['bitsandbytes']}, lightning {env['lightning']}",
        f"- command: `{env['command']}`",
        "- load s: weights on disk to a quantized (or bf16) model ready to train; memory in GiB, "
        "median (min–max) over repeats",
        *([f"- GPU memory capped at {args.memory_cap:g} GB"] if args.memory_cap else []),
        "",
    ]
    baselines = [b for b in BASELINES if b in args.recipes]
    for seq, bits in [(seq, bits) for seq in args.seq for bits in args.bits]:
        lines += [f"## seq {seq}, {bits}-bit", ""]
        header = [
            "recipe",
            "status",
            "load s",
            "ready peak GiB",
            "ready steady GiB",
            "tok/s",
            "train peak GiB",
        ]
        header += [f"tok/s ÷ {b}" for b in baselines] + [f"peak ÷ {b}" for b in baselines]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        groups = {
            recipe: [r for r in results if r.recipe == recipe and r.bits in (bits, None) and r.seq == seq]
            for recipe in args.recipes
        }
        for recipe, rows in groups.items():
            if not rows:
                continue
            measured = [r for r in rows if r.status == "measured"]

            def values(name: str, rows: list[Measurement] = measured) -> list[float]:
                return [getattr(r, name) for r in rows if getattr(r, name) is not None]

            status = "measured" if measured else f"{rows[0].status}: {rows[0].reason}"
            if measured and measured[0].reason:
                status += f" ({measured[0].reason})"
            cells = [
                recipe + (" (bf16)" if rows[0].bits is None else ""),
                status,
                median_range(values("load_s")),
                median_range(values("ready_peak_bytes"), GIB),
                median_range(values("ready_steady_bytes"), GIB),
                median_range(values("tokens_per_s"), digits=1),
                median_range(values("train_peak_bytes"), GIB),
            ]
            for name in ("tokens_per_s", "train_peak_bytes"):
                for baseline in baselines:
                    base_rows = [r for r in groups[baseline] if r.status == "measured"]
                    cells.append(ratio(values(name), values(name, base_rows)))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------- entry point


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="recipes:\n" + "\n".join(f"  {name}: {text}" for name, text in RECIPES.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--bits", type=int, nargs="+", choices=(4, 8), default=[4, 8])
    parser.add_argument("--recipes", nargs="+", choices=RECIPES, default=list(RECIPES))
    parser.add_argument(
        "--seq",
        type=int,
        nargs="+",
        default=[2048],
        help="tokens per sequence; several: a ladder, shortest first",
    )
    parser.add_argument("--batch", type=int, default=2, help="sequences per batch")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each configuration, interleaved")
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument(
        "--uncheckpointed-blocks",
        type=int,
        help="for bnb_uncheckpointed: blocks that keep their activations (default: a quarter of them)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--memory-cap",
        type=float,
        metavar="GB",
        help="cap the process's GPU memory at GB (1e9 bytes), e.g. 24 for a 24 GB card",
    )
    parser.add_argument(
        "--out", default="benchmarks/results/qlora_bench.jsonl", help="JSON lines, one per measurement"
    )
    parser.add_argument("--markdown", default="benchmarks/results/qlora_bench.md", help="the Markdown table")
    parser.add_argument(
        "--profile",
        metavar="DIR",
        help=f"also profile {PROFILE_STEPS} steps after the timed ones (torch.profiler tables in DIR)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny model on CPU, 1 warm-up + 2 steps, 1 repeat: checks the code paths",
    )
    args = parser.parse_args(argv)
    if args.memory_cap is not None and args.memory_cap <= 0:
        parser.error(
            f"--memory-cap {args.memory_cap:g}: give the GPU memory to allow in GB, e.g. --memory-cap 24"
        )
    if args.smoke:
        for name, value in SMOKE.items():
            setattr(args, name, value)
    return args


def main(argv: Sequence[str] | None = None) -> list[Measurement]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda:0")
    if cuda(device):
        torch.cuda.set_device(device)
        if args.memory_cap:
            # As on a smaller card: allocations past the cap fail with torch's out-of-memory error.
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap * 1e9 / total), device)
    env = environment(device, argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results: list[Measurement] = []
    with tempfile.TemporaryDirectory(prefix="qlora_bench_") as model_dir, out.open("w") as jsonl:
        model = save_random_model(args.shape, model_dir, args.seed, device)
        warm_up_process(device)
        extra = PROFILE_STEPS if args.profile else 0
        kept = args.uncheckpointed_blocks
        if kept is None:
            kept = max(1, SHAPES[args.shape]["num_hidden_layers"] // 4)
        meta = {
            "shape": args.shape,
            "batch": args.batch,
            "warmup": args.warmup,
            "steps": args.steps,
            "uncheckpointed_blocks": kept,
            "memory_cap_gb": args.memory_cap,
        }
        jsonl.write(
            json.dumps({"type": "environment", **env, **meta, "seq": args.seq, "model": model}) + "\n"
        )
        for seq in args.seq:
            batches = random_batches(
                model["vocab_size"], args.warmup + args.steps + extra, args.batch, seq, device, args.seed
            )
            setup = Setup(
                model_dir,
                device,
                batches,
                args.warmup,
                args.steps,
                args.lora_r,
                kept,
                profile_dir=args.profile,
            )
            for repeat in range(args.repeats):
                # Interleaved: every configuration once, then all again, so drift hits all alike.
                configurations = [
                    (recipe, bits) for bits in args.bits for recipe in args.recipes if recipe != "bf16_lora"
                ]
                if "bf16_lora" in args.recipes:
                    configurations.append(("bf16_lora", None))
                for recipe, bits in configurations:
                    result = measure(recipe, bits, repeat, setup)
                    result.seq = seq
                    results.append(result)
                    jsonl.write(json.dumps({"type": "measurement", **meta, **asdict(result)}) + "\n")
                    jsonl.flush()
                    print(
                        f"[{repeat}] seq {seq} {recipe} {bits or 'bf16'}: {result.status} {result.reason} "
                        f"tok/s={result.tokens_per_s} peak={result.train_peak_bytes}",
                        flush=True,
                    )
    table = markdown(results, env, model, args)
    print(table)
    Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
    Path(args.markdown).write_text(table)
    return results


if __name__ == "__main__":
    main()
