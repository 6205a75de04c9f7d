"""Loading a checkpoint to a quantized model, ready to train: time, host memory and device memory.

Each recipe loads the same checkpoint directory (``--model-dir``, transformers' layout; bf16 or
pre-quantized, e.g. from ``make_checkpoint.py``) in a process of its own, so each one's host-memory
peak is its own:

- ``bnb_lightning``: the model built on the meta device from its ``config.json``, then
  ``quantize_model(model, config, device, weights=DIR)``: each tensor read and quantized as it arrives;
- ``transformers``: ``from_pretrained(DIR, quantization_config=BitsAndBytesConfig(...), device_map=...)``
  (a pre-quantized directory brings its own quantization config).

Reported per recipe: seconds from the first file read to the model on the device (after the
imports and, unless ``--cold``, a warm-up of what any process pays once whatever it loads: the
device's context, bitsandbytes' first kernels, the model's code; the pinned and device memory caches
stay empty); the process's peak resident memory, that peak less what the imports alone took (the
loading's own host memory) and, when the model is loaded to the CPU, less the loaded model too (what
loading needed beyond its result), against the largest shard; the device's peak allocated memory.

    python benchmarks/loading.py --model-dir /tmp/llama-8b-bf16 --device cuda
    python benchmarks/loading.py --model-dir /tmp/llama-1b-bf16 --device cpu --bits 4
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RECIPES = ("bnb_lightning", "transformers")


def _rss_bytes() -> int:
    """This process's resident memory now (Linux), in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def warm_up(device: Any, directory: Path) -> None:
    """Pay the once-per-process costs outside the timing, as ``qlora_bench`` does: the device's context,
    bitsandbytes' first kernel launches, and the model's code (transformers imports an architecture's
    module the first time one is built: half a second). Every recipe gets the same; memory caches stay
    empty."""
    import safetensors.torch  # noqa: F401
    import torch
    import transformers.integrations.bitsandbytes  # noqa: F401 - transformers' quantizer path
    from qlora_bench import warm_up_bitsandbytes  # a neighbour: this file's folder is on the path
    from transformers import AutoConfig, AutoModelForCausalLM

    warm_up_bitsandbytes(device)
    with torch.device("meta"):
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def checkpoint_facts(directory: Path) -> dict[str, Any]:
    """Its files' sizes and the quantization its config.json declares (``None``: full precision)."""
    files = sorted(directory.glob("*.safetensors"))
    config = json.loads((directory / "config.json").read_text())
    return {
        "files": len(files),
        "total_bytes": sum(f.stat().st_size for f in files),
        "largest_shard_bytes": max((f.stat().st_size for f in files), default=0),
        "prequantized": config.get("quantization_config"),
    }


def load(recipe: str, directory: Path, device: str, bits: int, cold: bool = False) -> dict[str, Any]:
    """Load ``directory`` with ``recipe`` in this process; the figures of one measurement."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

    from bnb_lightning import QuantizationConfig, quantize_model

    target = torch.device(device)
    facts = checkpoint_facts(directory)
    declared = facts["prequantized"]
    if not cold:
        warm_up(target, directory)
    after_imports = _rss_bytes()
    if target.type == "cuda":
        torch.cuda.reset_peak_memory_stats(target)
    start = time.perf_counter()
    if recipe == "bnb_lightning":
        config = (
            QuantizationConfig.from_bitsandbytes_config(declared)
            if declared
            else QuantizationConfig(bits=bits, compute_dtype=torch.bfloat16)
        )
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory))
        quantize_model(model, config, target, weights=directory)
    elif recipe == "transformers":
        # A pre-quantized directory's config.json says how; passing quantization_config=None would not.
        extra = {}
        if not declared:
            extra["quantization_config"] = (
                BitsAndBytesConfig(
                    load_in_4bit=True,
                    bnb_4bit_quant_type="nf4",
                    bnb_4bit_use_double_quant=True,
                    bnb_4bit_compute_dtype=torch.bfloat16,
                )
                if bits == 4
                else BitsAndBytesConfig(load_in_8bit=True)
            )
        model = AutoModelForCausalLM.from_pretrained(
            directory, device_map={"": str(target)}, dtype=torch.bfloat16, **extra
        )
    else:
        raise ValueError(f"unknown recipe {recipe!r}; expected one of {RECIPES}")
    if target.type == "cuda":
        torch.cuda.synchronize(target)
    seconds = time.perf_counter() - start
    peak = _peak_rss_bytes()
    quantized = sum(1 for m in model.modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt"))
    storages = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for t in (*model.parameters(), *model.buffers())
    }
    model_bytes = sum(storages.values())
    return {
        "recipe": recipe,
        "device": str(target),
        "seconds": seconds,
        "peak_rss_bytes": peak,
        "rss_after_imports_bytes": after_imports,
        "loading_rss_bytes": peak - after_imports,
        "model_bytes": model_bytes,
        # On the CPU the loaded model itself is host memory: what loading took beyond it.
        "overhead_rss_bytes": peak - after_imports - (model_bytes if target.type == "cpu" else 0),
        "device_peak_bytes": torch.cuda.max_memory_allocated(target) if target.type == "cuda" else None,
        "quantized_layers": quantized,
        **{key: value for key, value in facts.items() if key != "prequantized"},
        "prequantized": bool(declared),
        "warmed_up": not cold,
    }


def gib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**30:.2f}"


def markdown(rows: list[dict[str, Any]], command: str) -> str:
    measured = [row for row in rows if "seconds" in row]
    lines = [
        f"# Loading to a quantized model: `{command}`",
        "",
        "| recipe | seconds | peak RSS GiB | loading's own RSS GiB | beyond the model (on CPU) GiB | ÷ largest shard "
        "| device peak GiB | model GiB | layers quantized |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in measured:
        shard = row["largest_shard_bytes"] or 1
        lines.append(
            f"| {row['recipe']} | {row['seconds']:.1f} | {gib(row['peak_rss_bytes'])} | "
            f"{gib(row['loading_rss_bytes'])} | {gib(row['overhead_rss_bytes'])} | "
            f"{row['overhead_rss_bytes'] / shard:.2f} | {gib(row['device_peak_bytes'])} | {gib(row['model_bytes'])} | "
            f"{row['quantized_layers']} |"
        )
    for row in rows:
        if "seconds" not in row:
            lines.append(f"| {row['recipe']} | failed: {row.get('error', '')[:200]} | | | | | | | |")
    by = {row["recipe"]: row for row in measured}
    if {"bnb_lightning", "transformers"} <= by.keys():
        ratio = by["bnb_lightning"]["seconds"] / by["transformers"]["seconds"]
        lines += ["", f"Time, bnb_lightning ÷ transformers: {ratio:.2f}x."]
    if measured:
        facts = measured[0]
        lines.append(
            f"Checkpoint: {facts['files']} file(s), {gib(facts['total_bytes'])} GiB, largest "
            f"{gib(facts['largest_shard_bytes'])} GiB, {'pre-quantized' if facts['prequantized'] else 'full precision'}."
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--bits", type=int, choices=(4, 8), default=4, help="for a full-precision checkpoint")
    parser.add_argument("--recipes", nargs="+", choices=RECIPES, default=list(RECIPES))
    parser.add_argument(
        "--cold", action="store_true", help="no warm-up: time the process's first-use costs too"
    )
    parser.add_argument("--out", type=Path, help="JSON lines, appended")
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--child", choices=RECIPES, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.child:
        print(
            "RESULT " + json.dumps(load(args.child, args.model_dir, args.device, args.bits, args.cold)),
            flush=True,
        )
        return []
    rows = []
    for recipe in args.recipes:
        command = [sys.executable, __file__, "--child", recipe, "--model-dir", str(args.model_dir)]
        command += ["--device", args.device, "--bits", str(args.bits)] + (["--cold"] if args.cold else [])
        done = subprocess.run(command, capture_output=True, text=True)
        results = [line[len("RESULT ") :] for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode == 0 and results:
            rows.append(json.loads(results[-1]))
        else:
            rows.append(
                {"recipe": recipe, "error": done.stderr.strip().splitlines()[-1] if done.stderr else ""}
            )
        print(json.dumps(rows[-1]), flush=True)
    shown = " ".join(["python benchmarks/loading.py", *(argv if argv is not None else sys.argv[1:])])
    text = markdown(rows, shown)
    print(text)
    if args.out:
        with args.out.open("a") as out:
            for row in rows:
                out.write(json.dumps({**row, "command": shown}) + "\n")
    if args.markdown:
        args.markdown.write_text(text)
    return rows


if __name__ == "__main__":
    main()
