"""bnb_lightning side by side with its peers (Unsloth, Liger-Kernel, plain transformers + PEFT) in one run.

Each recipe runs in its own child process: importing Unsloth patches transformers, PEFT and TRL for
the whole process, and a fresh process also gives each recipe a clean CUDA memory state. The parent
imports neither Unsloth nor Liger and makes no CUDA context; a first child makes the random
Llama once (``qlora_bench.save_random_model``, fixed seed, plus a tiny tokenizer, which Unsloth's
loader reads) into ``--model-dir``, and every recipe loads those same weights.

Two modes:

- throughput (default): ``--seq`` x ``--batch``, ``--warmup`` + ``--steps`` steps, ``--repeats``
  runs of each recipe, interleaved; tok/s and peak memory, with ratios to ``hf_compile``,
  ``bnb_lightning`` and ``unsloth`` where they ran.
- ``--long-context``: batch 1, LoRA r 32, under a GPU memory cap (``--cap-gb``, default 24: the
  child calls ``torch.cuda.set_per_process_memory_fraction``); each recipe climbs ``--lengths``
  with ``--lc-warmup`` + ``--lc-steps`` steps per length and stops at its first failure (out of
  memory, an error, or a loss that is not finite). The recipes that ``qlora_bench.py`` runs load
  the model again at every length (their Trainer owns it); the peers load it once per ladder.

``--precision bf16-true`` (default) runs the ``bnb`` recipes under ``Trainer(precision="bf16-true")``:
bfloat16 adapters, no autocast. ``bf16-mixed`` gives every recipe the numerics of transformers'
``Trainer(bf16=True)``: adapters in float32, the frozen base in bfloat16 as loaded, bf16 autocast
(``Trainer(precision="bf16-mixed")`` for the ``bnb`` recipes). The others train float32 adapters under
bf16 autocast whatever the flag: PEFT makes its adapters float32, and so does Unsloth's
``get_peft_model``, which has no switch for bfloat16 ones.

One JSON line per recipe and length (or repeat) goes to ``--out``, each with the recipe, seq,
batch, status (``ok``, ``oom``, ``error`` or ``skipped``), tok/s, peak bytes, loss, ``precision``,
``numerics`` (measured in training: the adapters' dtype, that of the base's unquantized rest, and
autocast's), library versions and GPU name; the Markdown tables are printed and written to
``--markdown``. A recipe whose library is not installed is recorded as skipped, not run. Each
child's log goes to the folder next to ``--out`` (``<out>_logs``)::

    python benchmarks/peers.py --shape 8b --long-context --cap-gb 24 --budget-s 540
    python benchmarks/peers.py --shape 8b --recipes bnb_lightning unsloth liger hf_compile
    python benchmarks/peers.py --shape 8b --recipes bnb_lightning unsloth hf_compile --precision bf16-mixed
    python benchmarks/peers.py --dry-cpu --long-context        # tiny model on the CPU, seconds
    python benchmarks/peers.py --report a.jsonl b.jsonl          # the tables of earlier runs
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from functools import partial
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent

# Recipe name -> what it is, one line of Markdown; benchmarks/README.md's table gives the same (tested).
RECIPES: dict[str, str] = {
    "bnb_lightning": "`qlora_bench`'s `bnb`: the package's defaults under `Trainer(precision=\"bf16-true\")` "
    '(`--precision bf16-mixed`: `"bf16-mixed"`)',
    "bnb_offload": '`qlora_bench`\'s `bnb_offload`: `bnb` with `activation_memory="offload"`',
    "bnb_recompute": '`qlora_bench`\'s `bnb_recompute`: `bnb` with `activation_memory="recompute"`',
    "bnb_torch_loss": "`qlora_bench`'s `bnb_torch_loss`: `bnb` with `loss_kernel=\"torch\"` (not Liger's loss)",
    "hf_noupcast": "`qlora_bench`'s `hf_noupcast`: transformers 4-bit + PEFT, no float32 upcast, gradient "
    "checkpointing",
    "hf_compile": "`qlora_bench`'s `hf_compile`: `hf_noupcast` with each decoder layer compiled",
    "hf_lora": "`qlora_bench`'s `bf16_lora`: a bfloat16 base (no quantization) with the same LoRA",
    "unsloth": '`FastLanguageModel` 4-bit + `get_peft_model(use_gradient_checkpointing="unsloth")`, '
    "float32 LoRA (Unsloth's own), bf16 autocast",
    "liger": "`hf_noupcast` with `apply_liger_kernel_to_llama` (RoPE, RMSNorm, SwiGLU, fused linear "
    "cross-entropy)",
}
# The recipes benchmarks/qlora_bench.py runs, by its names for them.
QLORA_BENCH = {
    "bnb_lightning": "bnb",
    "bnb_offload": "bnb_offload",
    "bnb_recompute": "bnb_recompute",
    "bnb_torch_loss": "bnb_torch_loss",
    "hf_noupcast": "hf_noupcast",
    "hf_compile": "hf_compile",
    "hf_lora": "bf16_lora",
}
# The peers: the module each needs. They run on CUDA only (Unsloth and Liger's kernels need a GPU).
PEERS = {"unsloth": "unsloth", "liger": "liger_kernel"}
DEFAULT_RECIPES = ("bnb_lightning", "unsloth", "liger", "hf_compile")
DEFAULT_LONG_CONTEXT_RECIPES = ("bnb_lightning", "unsloth", "bnb_offload", "liger")
DEFAULT_LENGTHS = (16384, 32768, 49152, 65536, 81920, 98304, 122880)
# Tok/s ratios are taken against these recipes, where they ran.
RATIO_BASELINES = ("hf_compile", "bnb_lightning", "unsloth")
# Unsloth's get_peft_model takes module names; for a Llama these are qlora_bench's "all-linear".
LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOKENIZER_WORDS = 256
MARKER = "peers_model.json"
RESULT = "RESULT "
PRECISIONS = ("bf16-true", "bf16-mixed")
GIB = 1024**3
VERSIONS = (
    "torch",
    "triton",
    "transformers",
    "accelerate",
    "peft",
    "bitsandbytes",
    "lightning",
    "bnb-lightning",
    "unsloth",
    "unsloth-zoo",
    "liger-kernel",
    "trl",
    "cut-cross-entropy",
)
# The children run offline (the GPU machine has no network): Unsloth's loader otherwise asks the Hub
# for a README to count its users, and transformers looks for newer files.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "UNSLOTH_DISABLE_STATISTICS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}


def qlora_bench() -> ModuleType:
    """benchmarks/qlora_bench.py, imported on first use rather than at the top: it imports torch,
    transformers and PEFT, and a child that runs Unsloth must import Unsloth before those."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    import qlora_bench as bench

    return bench


# ---------------------------------------------------------------- children: the model


def save_tokenizer(directory: str) -> None:
    """A word-level tokenizer of 256 entries: Unsloth's ``from_pretrained`` loads one from the folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>"]
    vocab = {token: i for i, token in enumerate(special)}
    vocab.update({f"w{i}": len(special) + i for i in range(TOKENIZER_WORDS - len(special))})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=special[0]))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=special[0],
        bos_token=special[1],
        eos_token=special[2],
        pad_token=special[3],
    )
    tokenizer.save_pretrained(directory)


def make_model(directory: Path, shape: str, seed: int, device: str) -> dict[str, Any]:
    """Save the random model of ``shape`` to ``directory``, or reuse the one there (same shape and seed).

    Written to ``DIR.partial`` and renamed when complete, so a run killed while saving leaves nothing
    a later run would take for a model.
    """
    import torch

    bench = qlora_bench()
    wanted = {"shape": shape, "seed": seed}
    marker = directory / MARKER
    if marker.exists():
        made = json.loads(marker.read_text())
        if {key: made.get(key) for key in wanted} != wanted:
            raise ValueError(
                f"{directory} holds a model made with {made}, not {wanted}; pick another --model-dir"
            )
        return {**made, "reused": True}
    if directory.exists() and any(directory.iterdir()):
        raise ValueError(f"{directory} is not empty and has no {MARKER}; pick another --model-dir")
    partial_dir = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial_dir, ignore_errors=True)  # a killed run's leftover
    partial_dir.mkdir(parents=True)
    start = time.perf_counter()
    made = bench.save_random_model(shape, str(partial_dir), seed, torch.device(device))
    save_tokenizer(str(partial_dir))
    made.update(wanted, seconds=time.perf_counter() - start)
    (partial_dir / MARKER).write_text(json.dumps(made))
    if directory.exists():
        directory.rmdir()
    partial_dir.rename(directory)
    return {**made, "reused": False}


# ---------------------------------------------------------------- children: the peers' recipes


def check_4bit(model) -> None:
    """The base linears must be bitsandbytes 4-bit: Unsloth falls back to 16-bit LoRA, with only a
    printed line, when bitsandbytes' native library does not load."""
    import bitsandbytes as bnb

    if not any(isinstance(module, bnb.nn.Linear4bit) for module in model.modules()):
        raise RuntimeError("no bitsandbytes Linear4bit after loading: the base is not 4-bit")


def load_unsloth(setup, result, max_seq_length: int):
    import torch
    from unsloth import FastLanguageModel

    model, _tokenizer = FastLanguageModel.from_pretrained(
        model_name=setup.model_dir, max_seq_length=max_seq_length, dtype=torch.bfloat16, load_in_4bit=True
    )
    return FastLanguageModel.get_peft_model(
        model,
        r=setup.lora_r,
        lora_alpha=2 * setup.lora_r,
        lora_dropout=0,
        target_modules=LLAMA_LINEARS,
        bias="none",
        use_gradient_checkpointing="unsloth",
        random_state=0,
    )


def load_liger(setup, result, max_seq_length: int):
    from liger_kernel.transformers import apply_liger_kernel_to_llama

    model = qlora_bench().noupcast_model(setup, 4, result, time.perf_counter())
    # On the instance: its norms, MLPs and forward (fused linear cross-entropy); LoRA layers stay in place.
    apply_liger_kernel_to_llama(model=model.get_base_model())
    return model


PEER_LOADERS = {"unsloth": load_unsloth, "liger": load_liger}


def load_peer(recipe: str, setup, result, max_seq_length: int):
    model = PEER_LOADERS[recipe](setup, result, max_seq_length)
    check_4bit(model)
    return model


def train_loaded(model, setup, bits: int, result) -> None:
    """A qlora_bench runner that trains a model loaded once, for a ladder."""
    qlora_bench().train_loop(model, setup, result)


def run_peer(recipe: str, max_seq_length: int, setup, bits: int, result) -> None:
    """A peer as a qlora_bench runner: load, note time and memory, train."""
    bench = qlora_bench()
    start = time.perf_counter()
    model = load_peer(recipe, setup, result, max_seq_length)
    bench.mark_ready(result, setup, start)
    bench.train_loop(model, setup, result)


# ---------------------------------------------------------------- children: runs


def emit(record: dict[str, Any]) -> None:
    print(RESULT + json.dumps(record, default=str), flush=True)


def describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {qlora_bench().first_line(error)}"


def out_of_memory(reason: str) -> bool:
    """Whether a failure's reason is an out-of-memory error: torch's (the GPU, and the cap) or the
    CPU allocator's (a length whose batch the host cannot hold)."""
    return reason.startswith("OutOfMemoryError") or "can't allocate memory" in reason


def outcome(record: dict[str, Any]) -> str:
    """``ok`` (measured, with a finite loss), ``oom``, ``error`` or ``skipped``."""
    if record["status"] == "measured":
        loss = record.get("final_loss")
        return "ok" if loss is not None and math.isfinite(loss) else "error"
    if record["status"] == "skipped":
        return "skipped"
    return "oom" if out_of_memory(record.get("reason") or "") else "error"


def measured(result, recipe: str, seq: int, batch: int, gpu: str) -> dict[str, Any]:
    """One result line from a qlora_bench ``Measurement``."""
    record = {
        **asdict(result),
        "runner": result.recipe,
        "recipe": recipe,
        "seq": seq,
        "batch": batch,
        "gpu": gpu,
    }
    record["outcome"] = outcome(record)
    if record["outcome"] == "error" and record["status"] == "measured":
        record["reason"] = f"loss {record['final_loss']} is not finite"
        record["final_loss"] = None  # JSON has no NaN
    return record


def prepare_device(spec: dict[str, Any]):
    import torch

    device = torch.device(spec["device"])
    if device.type == "cuda":
        torch.cuda.set_device(device)
        if spec.get("cap_gb"):
            # As on a smaller card: allocations past the cap fail with torch's out-of-memory error.
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, spec["cap_gb"] * 1e9 / total), device)
    else:
        # The tiny model gains nothing from intra-op threads; on a busy small machine, two threads per
        # small bitsandbytes op make it many times slower (as tests/conftest.py says).
        torch.set_num_threads(1)
    return device


def device_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def recipe_setup(spec: dict[str, Any], device, batches: list, warmup: int, steps: int):
    """qlora_bench's ``Setup`` for a child's recipe; ``precision`` is the bnb recipes' Trainer's, and
    under ``bf16-mixed`` its ``train_loop`` makes sure the adapters are float32."""
    return qlora_bench().Setup(
        spec["model_dir"],
        device,
        batches,
        warmup,
        steps,
        spec["lora_r"],
        profile_dir=spec.get("profile_dir"),
        precision=spec.get("precision", PRECISIONS[0]),
    )


def child_seconds(left: float | None, runs_left: int, child_timeout_s: float) -> float:
    """How long the next recipe's run may take: ``--child-timeout-s``, and under ``--budget-s`` (``left``
    seconds of it) no more than an equal share among the ``runs_left`` runs still to start, so one long
    ladder cannot take the budget of the recipes after it; what a run leaves unused goes to the later ones."""
    if left is None:
        return child_timeout_s
    return min(child_timeout_s, left / max(1, runs_left))


def profiled_steps(spec: dict[str, Any]) -> int:
    """Steps after the timed ones that qlora_bench's ``StepClock`` profiles (``--profile``)."""
    return qlora_bench().PROFILE_STEPS if spec.get("profile_dir") else 0


def run_throughput(spec: dict[str, Any], device) -> None:
    """One measurement of one recipe at ``seq`` x ``batch``, as qlora_bench measures its own recipes."""
    bench = qlora_bench()
    recipe = spec["recipe"]
    if recipe in PEERS:
        # qlora_bench.measure runs recipes by name from RUNNERS; a peer joins that table in its own
        # child, so it is measured as qlora_bench's recipes are (errors recorded, memory freed).
        bench.RUNNERS[recipe] = partial(run_peer, recipe, spec["seq"])
    vocab = bench.SHAPES[spec["shape"]]["vocab_size"]
    steps = spec["warmup"] + spec["steps"] + profiled_steps(spec)
    batches = bench.random_batches(vocab, steps, spec["batch"], spec["seq"], device, spec["seed"])
    setup = recipe_setup(spec, device, batches, spec["warmup"], spec["steps"])
    result = bench.measure(QLORA_BENCH.get(recipe, recipe), spec["bits"], spec["repeat"], setup)
    emit(measured(result, recipe, spec["seq"], spec["batch"], device_name(device)))


def climb(spec: dict[str, Any], device, runner: str) -> None:
    """Train at each of ``spec["lengths"]`` (ascending, batch 1) with qlora_bench's ``runner``, one
    result line per length, until the first length that is not ``ok``.

    A batch the device cannot even hold counts as that length's out of memory.
    """
    bench = qlora_bench()
    vocab = bench.SHAPES[spec["shape"]]["vocab_size"]
    steps = spec["warmup"] + spec["steps"] + profiled_steps(spec)
    gpu = device_name(device)
    for seq in spec["lengths"]:
        try:
            batches = bench.random_batches(vocab, steps, 1, seq, device, spec["seed"] + seq)
        except Exception as error:
            result = bench.Measurement(
                runner, spec["bits"], spec["repeat"], status="failed", reason=describe(error)
            )
        else:
            setup = recipe_setup(spec, device, batches, spec["warmup"], spec["steps"])
            result = bench.measure(runner, spec["bits"], spec["repeat"], setup)
            del batches, setup
        record = measured(result, spec["recipe"], seq, 1, gpu)
        record["load_s"] = record["load_s"] or spec.get("load_s")
        emit(record)
        if record["outcome"] != "ok":
            return


def run_long_context(spec: dict[str, Any], device) -> None:
    """The ladder of one recipe: qlora_bench's recipes load the model at each length (their Trainer
    owns it); a peer loads it once, then trains it at each length."""
    bench = qlora_bench()
    recipe = spec["recipe"]
    if recipe not in PEERS:
        climb(spec, device, QLORA_BENCH[recipe])
        return
    setup = recipe_setup(spec, device, [], 0, 0)
    result = bench.Measurement(recipe, spec["bits"], spec["repeat"])
    start = time.perf_counter()
    try:
        model = load_peer(recipe, setup, result, max(spec["lengths"]))
    except Exception as error:
        failed = bench.Measurement(
            recipe, spec["bits"], spec["repeat"], status="failed", reason=describe(error)
        )
        emit(measured(failed, recipe, spec["lengths"][0], 1, device_name(device)))
        return
    bench.mark_ready(result, setup, start)
    bench.RUNNERS[recipe] = partial(train_loaded, model)  # as in run_throughput
    climb({**spec, "load_s": result.load_s}, device, recipe)


def run_child(spec: dict[str, Any]) -> None:
    """A child: the model, or one recipe (one repeat, or one ladder); prints ``RESULT`` lines."""
    if spec.get("recipe") == "unsloth":
        import unsloth  # noqa: F401 - patches transformers, PEFT and TRL: must come before them
    if "make_model" in spec:
        made = make_model(Path(spec["make_model"]), spec["shape"], spec["seed"], spec["device"])
        import torch

        emit({"model": made, "gpu": device_name(torch.device(spec["device"]))})
        return
    device = prepare_device(spec)
    if spec["long_context"]:
        run_long_context(spec, device)
    else:
        run_throughput(spec, device)


# ---------------------------------------------------------------- parent


def versions() -> dict[str, str | None]:
    """Installed versions, from the packages' metadata (without importing Unsloth or Liger in the parent)."""
    found: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in VERSIONS:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def not_runnable(recipe: str, device: str) -> str | None:
    """Why ``recipe`` cannot run here, or None."""
    module = PEERS.get(recipe)
    if module is None:
        return None
    if importlib.util.find_spec(module) is None:
        return f"not installed: {module}"
    if not device.startswith("cuda"):
        return f"{recipe} needs a CUDA device"
    return None


class Child:
    """One child process in its own session; its output goes to a log file, read back for its results."""

    def __init__(self, spec: dict[str, Any], log: Path, cwd: Path, env: dict[str, str]) -> None:
        self.argv = [sys.executable, "-u", str(Path(__file__).resolve()), "--child", json.dumps(spec)]
        self.log, self.cwd, self.env = log, cwd, env
        self.returncode: int | None = None
        self.timed_out = False
        self.wall_s = 0.0

    def run(self, timeout_s: float | None) -> list[dict[str, Any]]:
        start = time.perf_counter()
        self.cwd.mkdir(parents=True, exist_ok=True)
        with self.log.open("w") as log:
            log.write(shlex.join(self.argv) + "\n")
            log.flush()
            process = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                env=self.env,
                start_new_session=True,
            )
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.timed_out = True
            finally:
                # Its whole session, whether it ran out of time, ended, or the parent was interrupted:
                # torch.compile's worker processes too, so none outlives its recipe.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.returncode = process.returncode
        self.wall_s = time.perf_counter() - start
        results = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith(RESULT):
                with contextlib.suppress(ValueError):  # a line cut short when the child was killed
                    results.append(json.loads(line[len(RESULT) :]))
        return results

    def failure(self) -> str:
        """Why the child ended without all its results: killed, or the last error line of its log."""
        if self.timed_out:
            return f"killed after {self.wall_s:.0f} s (--budget-s or --child-timeout-s)"
        lines = [line for line in self.log.read_text(errors="replace").splitlines() if line.strip()]
        errors = [line for line in lines if "Error" in line or "error" in line or "Killed" in line]
        last = (errors or lines or [""])[-1].strip()[:300]
        return f"child exited with code {self.returncode}: {last}"


def child_env(recipe: str | None, alloc_conf: str | None) -> dict[str, str]:
    env = {**os.environ, **OFFLINE_ENV}
    # This checkout's bnb_lightning, whatever is installed.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))
    if alloc_conf is not None and recipe != "unsloth":  # importing Unsloth sets its own
        env["PYTORCH_ALLOC_CONF"] = alloc_conf
    return env


def ladder_records(
    args: argparse.Namespace, recipe: str, results: list[dict[str, Any]], ended: str | None
) -> list[dict[str, Any]]:
    """One record per length of ``recipe``'s ladder: the child's results, then the lengths it did not try.

    Args:
        ended: why the child stopped before its ladder did (killed, crashed), if it did.
    """
    by_seq = {r["seq"]: r for r in results}
    records, stop = [], None
    for seq in args.lengths:
        if seq in by_seq:
            record = by_seq[seq]
            record["status"] = record.pop("outcome")
            if record["status"] != "ok":
                stop = f"not tried: seq {seq} ended {record['status']}"
        elif stop is None and ended is not None:
            record = {"recipe": recipe, "seq": seq, "status": "error", "reason": ended}
            stop = f"not tried: seq {seq} ended error"
        else:
            record = {"recipe": recipe, "seq": seq, "status": "skipped", "reason": stop or "not tried"}
        records.append({**record, "batch": 1})
    return records


def recipe_records(
    args: argparse.Namespace, recipe: str, results: list[dict[str, Any]], ended: str | None
) -> list[dict[str, Any]]:
    """The records of one child: a ladder's lengths, or one throughput run."""
    if args.long_context:
        return ladder_records(args, recipe, results, ended)
    if not results:
        return [{"recipe": recipe, "seq": args.seq, "batch": args.batch, "status": "error", "reason": ended}]
    record = results[0]
    record["status"] = record.pop("outcome")
    return [record]


def run_parent(args: argparse.Namespace) -> list[dict[str, Any]]:
    started = time.perf_counter()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    logs = out.with_name(out.stem + "_logs")
    logs.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    common = {
        "mode": "long_context" if args.long_context else "throughput",
        "shape": args.shape,
        "precision": args.precision,
        "lora_r": args.lora_r,
        "cap_gb": args.cap_gb,
        "warmup": args.lc_warmup if args.long_context else args.warmup,
        "steps": args.lc_steps if args.long_context else args.steps,
        "versions": versions(),
        "command": shlex.join(["python", "benchmarks/peers.py", *args.argv]),
        "stamp": stamp,
    }
    spec = {
        "shape": args.shape,
        "seed": args.seed,
        "device": args.device,
        "precision": args.precision,
        "lora_r": args.lora_r,
        "cap_gb": args.cap_gb,
        "long_context": args.long_context,
        "lengths": args.lengths,
        "seq": args.seq,
        "batch": args.batch,
        "warmup": common["warmup"],
        "steps": common["steps"],
        "profile_dir": args.profile,
    }
    records: list[dict[str, Any]] = []

    def remaining() -> float | None:
        return args.budget_s - (time.perf_counter() - started) if args.budget_s else None

    with tempfile.TemporaryDirectory(prefix="peers_") as scratch, out.open("w") as jsonl:

        def keep(record: dict[str, Any]) -> None:
            record = {**common, **record}
            records.append(record)
            jsonl.write(json.dumps(record, default=str) + "\n")
            jsonl.flush()
            print(
                f"{record['recipe']} seq {record.get('seq')} repeat {record.get('repeat', 0)}: "
                f"{record['status']} {record.get('reason') or ''} tok/s={record.get('tokens_per_s')} "
                f"peak={record.get('train_peak_bytes')}",
                flush=True,
            )

        model_dir = args.model_dir or str(Path(scratch, "model"))
        maker = Child(
            {**spec, "make_model": model_dir},
            logs / f"{stamp}_model.log",
            Path(scratch),
            child_env(None, None),
        )
        made = maker.run(args.child_timeout_s)
        if not made:
            keep({"recipe": "model", "status": "error", "reason": maker.failure()})
            return records
        common.update(gpu=made[0]["gpu"], parameters=made[0]["model"]["parameters"])
        spec["model_dir"] = model_dir
        runnable = [recipe for recipe in args.recipes if not_runnable(recipe, args.device) is None]
        runs_left = args.repeats * len(runnable)
        for repeat in range(args.repeats):
            for recipe in args.recipes:
                left = remaining()
                skip = not_runnable(recipe, args.device)
                if skip is None and left is not None and left < 30:
                    skip = f"--budget-s: {max(left, 0):.0f} s left"
                if skip is None:
                    child = Child(
                        {
                            **spec,
                            "recipe": recipe,
                            "repeat": repeat,
                            "bits": None if recipe == "hf_lora" else 4,
                        },
                        logs / f"{stamp}_{recipe}_{repeat}.log",
                        Path(scratch, "work_" + recipe),  # Unsloth writes its compiled-module cache here
                        child_env(recipe, args.alloc_conf),
                    )
                    results = child.run(child_seconds(left, runs_left, args.child_timeout_s))
                    runs_left -= 1
                    ended = child.failure() if child.timed_out or child.returncode or not results else None
                    for record in recipe_records(args, recipe, results, ended):
                        keep({**record, "repeat": repeat})
                else:
                    for seq in args.lengths if args.long_context else [args.seq]:
                        batch = 1 if args.long_context else args.batch
                        keep(
                            {
                                "recipe": recipe,
                                "seq": seq,
                                "batch": batch,
                                "repeat": repeat,
                                "status": "skipped",
                                "reason": skip,
                            }
                        )
    print(f"total {time.perf_counter() - started:.0f} s; results: {out}; logs: {logs}", flush=True)
    return records


# ---------------------------------------------------------------- report


def gib(value: float | None) -> str:
    return "–" if value is None else f"{value / GIB:.2f}"


def cell(record: dict[str, Any] | None) -> str:
    """A length's outcome for one recipe: tok/s and peak when it trained, else what happened."""
    if record is None:
        return "–"
    if record["status"] == "ok":
        tokens = record.get("tokens_per_s") or 0
        return f"{tokens:,.0f} tok/s, {gib(record.get('train_peak_bytes'))} GiB"
    if record["status"] == "oom":
        return "out of memory"
    reason = (record.get("reason") or "")[:80]
    if record["status"] == "skipped":
        return "–" if reason.startswith("not tried") else reason
    return f"{record['status']}: {reason}"


def longest(records: list[dict[str, Any]], recipe: str) -> dict[str, Any] | None:
    """The longest length ``recipe`` trained, or None."""
    trained = [r for r in records if r["recipe"] == recipe and r["status"] == "ok"]
    return max(trained, key=lambda r: r["seq"], default=None)


def long_context_tables(records: list[dict[str, Any]]) -> list[str]:
    recipes = list(dict.fromkeys(r["recipe"] for r in records))
    lengths = sorted({r["seq"] for r in records})
    lines = [
        "| recipe | longest seq trained | tok/s there | peak GiB there | stopped at |",
        "|---|---|---|---|---|",
    ]
    for recipe in recipes:
        rows = [r for r in records if r["recipe"] == recipe]
        best = longest(records, recipe)
        stop = next((r for r in rows if r["status"] in ("oom", "error")), None)
        if best is None and stop is None:
            stopped = f"{rows[0]['status']}: {rows[0].get('reason') or ''}"
        else:
            stopped = "–" if stop is None else f"{stop['seq']:,}: {cell(stop)}"
        cells = [recipe, "–", "–", "–", stopped]
        if best is not None:
            cells[1:4] = [
                f"{best['seq']:,}",
                f"{best['tokens_per_s']:,.0f}",
                gib(best.get("train_peak_bytes")),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    # What bnb_lightning's activation planner chose at the longest length (qlora_bench records it).
    bests = [(recipe, longest(records, recipe)) for recipe in recipes]
    plans = [
        f"- {recipe} at {best['seq']:,}: {best['plan']}"
        for recipe, best in bests
        if best and best.get("plan")
    ]
    lines += ["", *plans] if plans else []
    lines += ["", "| seq | " + " | ".join(recipes) + " |", "|---|" + "---|" * len(recipes)]
    for seq in lengths:
        by_recipe = {r["recipe"]: r for r in records if r["seq"] == seq}
        lines.append(f"| {seq:,} | " + " | ".join(cell(by_recipe.get(recipe)) for recipe in recipes) + " |")
    return lines


def throughput_table(records: list[dict[str, Any]]) -> list[str]:
    bench = qlora_bench()
    recipes = list(dict.fromkeys(r["recipe"] for r in records))

    def values(recipe: str, key: str) -> list[float]:
        return [
            r[key]
            for r in records
            if r["recipe"] == recipe and r["status"] == "ok" and r.get(key) is not None
        ]

    baselines = [b for b in RATIO_BASELINES if values(b, "tokens_per_s")]
    header = ["recipe", "status", "tok/s", "train peak GiB", "load s", *(f"tok/s ÷ {b}" for b in baselines)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for recipe in recipes:
        rows = [r for r in records if r["recipe"] == recipe]
        ok = [r for r in rows if r["status"] == "ok"]
        failed = next((r for r in rows if r["status"] != "ok"), None)
        status = f"{len(ok)} of {len(rows)} ok"
        if failed is not None:
            status += f"; {failed['status']}: {(failed.get('reason') or '')[:80]}"
        cells = [
            recipe,
            status,
            bench.median_range(values(recipe, "tokens_per_s"), digits=0),
            bench.median_range(values(recipe, "train_peak_bytes"), GIB),
            bench.median_range(values(recipe, "load_s"), digits=1),
            *(bench.ratio(values(recipe, "tokens_per_s"), values(b, "tokens_per_s")) for b in baselines),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def precision_lines(records: list[dict[str, Any]]) -> list[str]:
    """The ``--precision`` of the records' runs, and what each recipe trained with (``numerics``,
    measured in its first step), recipes alike in one line. Runs before the flag recorded neither."""
    precisions = list(dict.fromkeys(r.get("precision") for r in records))
    named = ", ".join(f"`{p}`" for p in precisions if p)
    if None in precisions:
        named += (", and " if named else "") + "not recorded (runs before `--precision`: `bf16-true`)"
    lines = [f"- precision: {named}"]
    alike: dict[str, list[str]] = {}
    for record in records:
        found = record.get("numerics")
        if record.get("status") == "ok" and found:
            autocast = f"{found['autocast']} autocast" if found.get("autocast") else "no autocast"
            what = f"{found.get('adapters')} adapters, {found.get('frozen')} rest of the base, {autocast}"
            recipes = alike.setdefault(what, [])
            if record["recipe"] not in recipes:
                recipes.append(record["recipe"])
    lines += [f"- trained with {what}: {', '.join(recipes)}" for what, recipes in alike.items()]
    return lines


def markdown(records: list[dict[str, Any]]) -> str:
    """The Markdown report of a run's records, or of several runs' of the same mode (``--report``)."""
    if not records:
        return "no records\n"
    first = records[0]
    runs = [r for r in records if r["recipe"] != "model"]
    long_context = first["mode"] == "long_context"
    if not long_context:
        what = f"seq {first.get('seq')} x batch {first.get('batch')}"
    elif first["cap_gb"]:
        what = f"long context, batch 1, GPU memory capped at {first['cap_gb']:g} GB"
    else:
        what = "long context, batch 1, no memory cap"
    steps = f"{first['warmup']} warm-up + {first['steps']} timed step" + ("" if first["steps"] == 1 else "s")
    steps += " per length" if long_context else " per run, median (min–max) over repeats"
    found = {name: v for name, v in first["versions"].items() if v}
    commands = "; ".join(f"`{command}`" for command in dict.fromkeys(r["command"] for r in records))
    gpus = ", ".join(dict.fromkeys(str(r["gpu"]) for r in records if r.get("gpu")))
    lines = [
        f"# Peers: {first['shape']} ({(first.get('parameters') or 0) / 1e9:.2f} B parameters), {what}, "
        f"LoRA r {first['lora_r']}, {steps}",
        "",
        f"- device: {gpus or 'unknown'}",
        *precision_lines(records),
        "- " + ", ".join(f"{name} {v}" for name, v in found.items()),
        f"- command: {commands}",
        "- peak: torch's peak allocated memory while training (after loading), GiB",
        "",
    ]
    if runs:
        lines += long_context_tables(runs) if long_context else throughput_table(runs)
    else:
        lines.append(f"{first['status']}: {first.get('reason')}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- entry point


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="recipes:\n" + "\n".join(f"  {name}: {text}" for name, text in RECIPES.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--shape", default=None, help="8b (default), 1b, or tiny (the one --dry-cpu runs)")
    parser.add_argument(
        "--recipes",
        nargs="+",
        choices=RECIPES,
        help=f"default: {' '.join(DEFAULT_RECIPES)}; "
        f"with --long-context {' '.join(DEFAULT_LONG_CONTEXT_RECIPES)}",
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=PRECISIONS[0],
        help="bf16-true: the bnb recipes under Trainer(precision='bf16-true'), bfloat16 adapters; "
        "bf16-mixed: every recipe with float32 adapters, the bfloat16 base and bf16 autocast, as "
        "transformers' Trainer(bf16=True) (the peers run so either way)",
    )
    parser.add_argument("--seq", type=int, default=2048, help="throughput: tokens per sequence")
    parser.add_argument("--batch", type=int, default=2, help="throughput: sequences per batch")
    parser.add_argument("--warmup", type=int, default=2, help="throughput: untimed steps first")
    parser.add_argument("--steps", type=int, default=5, help="throughput: timed steps")
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="runs of each recipe, interleaved (default 2, or 1 with --long-context)",
    )
    parser.add_argument("--lora-r", type=int, default=None, help="default 16, or 32 with --long-context")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--long-context", action="store_true", help="climb --lengths at batch 1 under --cap-gb"
    )
    parser.add_argument(
        "--lengths", type=int, nargs="+", default=None, help=f"default: {' '.join(map(str, DEFAULT_LENGTHS))}"
    )
    parser.add_argument(
        "--lc-warmup", type=int, default=1, help="--long-context: untimed steps at each length"
    )
    parser.add_argument(
        "--lc-steps",
        type=int,
        default=1,
        help="--long-context: timed steps at each length (one long step varies by under 1%%)",
    )
    parser.add_argument(
        "--cap-gb",
        type=float,
        default=None,
        help="cap each child's GPU memory at this many GB (1e9 bytes); default 24 with --long-context, "
        "else none (0: none)",
    )
    parser.add_argument(
        "--model-dir",
        help="make the random model here, or reuse the one already there (same shape and seed); "
        "default: a temporary folder",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=0.0,
        help="wall-clock seconds for the whole run: each recipe's run gets at most an equal share of "
        "what is left when it starts, no child starts with less than 30 s left (0: none)",
    )
    parser.add_argument("--child-timeout-s", type=float, default=900.0)
    parser.add_argument(
        "--alloc-conf",
        help="PYTORCH_ALLOC_CONF for every child but Unsloth's (importing Unsloth sets "
        "expandable_segments:True for itself); default: inherited",
    )
    parser.add_argument(
        "--out",
        default="benchmarks/results/peers.jsonl",
        help="JSON lines, one per recipe and length (or repeat)",
    )
    parser.add_argument("--markdown", default="benchmarks/results/peers.md", help="the Markdown tables")
    parser.add_argument(
        "--profile",
        metavar="DIR",
        help="also profile 2 steps after the timed ones of every recipe and length (torch.profiler "
        "tables in DIR, one file per recipe, length and repeat)",
    )
    parser.add_argument(
        "--dry-cpu",
        action="store_true",
        help="tiny model on the CPU (seq 32, lengths 32 64, 1 repeat): checks the plumbing; the peers "
        "are skipped",
    )
    parser.add_argument(
        "--report", nargs="+", metavar="JSONL", help="print the tables of earlier runs' --out files and exit"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = list(argv)
    long_context = args.long_context
    args.device = "cpu" if args.dry_cpu else "cuda:0"
    args.shape = args.shape or ("tiny" if args.dry_cpu else "8b")
    args.recipes = args.recipes or list(DEFAULT_LONG_CONTEXT_RECIPES if long_context else DEFAULT_RECIPES)
    args.lora_r = args.lora_r or (32 if long_context else 16)
    args.repeats = args.repeats or (1 if long_context or args.dry_cpu else 2)
    args.lengths = sorted(set(args.lengths or ([32, 64] if args.dry_cpu else DEFAULT_LENGTHS)))
    if args.cap_gb is None and long_context and not args.dry_cpu:
        args.cap_gb = 24.0
    args.cap_gb = args.cap_gb or None
    if args.dry_cpu:
        if args.shape != "tiny":
            parser.error(f"--dry-cpu runs the tiny shape only, not --shape {args.shape}")
        args.seq, args.batch, args.warmup, args.steps = min(args.seq, 32), min(args.batch, 2), 1, 2
    return args


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.child:
        run_child(json.loads(args.child))
        return []
    if args.report:
        records = [
            json.loads(line) for path in args.report for line in Path(path).read_text().splitlines() if line
        ]
        print(markdown(records))
        return records
    shapes = qlora_bench().SHAPES
    if args.shape not in shapes:
        raise SystemExit(f"--shape {args.shape}: expected one of {', '.join(shapes)}")
    records = run_parent(args)
    table = markdown(records)
    print(table)
    Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
    Path(args.markdown).write_text(table)
    return records


if __name__ == "__main__":
    main()
    if "--child" in sys.argv:
        # A child has printed all it measured: skip the interpreter's teardown, which with compile
        # workers and Unsloth's patches can take seconds or hang, and would count against the budget.
        sys.stdout.flush()
        os._exit(0)
