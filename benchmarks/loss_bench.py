"""The loss alone: bnb_lightning's chunked linear cross-entropy against Liger-Kernel's and cut-cross-entropy's.

``bnb_lightning.training.loss.linear_cross_entropy`` is hand-written: a ``torch.autograd.Function``
that computes the gradients chunk by chunk during the forward pass. Liger-Kernel and Apple's
cut-cross-entropy ship maintained Triton kernels for the same job; this measures whether ours is as
fast and as lean, so the project can take the winner as an optional dependency.

Every implementation (``IMPLS`` below, or ``--help``) runs in this one process on the same inputs:
Llama-3-8B's output layer (hidden 4096, vocabulary 128256), bfloat16 hidden states that need a
gradient, a frozen head as under QLoRA (``--train-head`` trains it too), random targets with about 1%
ignored. For each implementation and length: one warm-up, then the median milliseconds of
``--steps`` synchronized forward + backward passes, the peak memory above the inputs, the loss, and
how far the loss and the hidden states' gradient are from ``bnb``'s and from ``torch``'s (where that
ran). One JSON line per (implementation, length) goes to ``--out``; a Markdown table with ratios to
``bnb`` is printed and written to ``--markdown``::

    python benchmarks/loss_bench.py                          # H200: about 2 minutes
    python benchmarks/loss_bench.py --train-head --tokens 4096 16384
    python benchmarks/loss_bench.py --smoke --device cpu     # tiny head on CPU: Liger and CCE skipped
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

# The package under test, also from a checkout where it is not installed.
if str(Path(__file__).parent.parent) not in sys.path:
    sys.path.append(str(Path(__file__).parent.parent))
from bnb_lightning.training.loss import linear_cross_entropy  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from qlora_bench import cuda, free_memory, synchronize  # noqa: E402

IGNORE_INDEX = -100
# Share of targets set to IGNORE_INDEX (padding, prompt tokens).
IGNORED = 0.01
MIB = 1 << 20

# Name -> what it is, one line of Markdown.
IMPLS: dict[str, str] = {
    "bnb": '`bnb_lightning.training.loss.linear_cross_entropy(hidden, weight, targets, kernel="torch")`: '
    "the torch kernel, chunks of about 256 MiB of float32 logits, gradients computed in the forward pass "
    '(`kernel="auto"`, the default, runs Liger\'s where installed)',
    "torch": "`F.cross_entropy(F.linear(hidden, weight).float(), targets)`: the reference, all logits at "
    "once (up to `--torch-max-tokens`)",
    "liger": "Liger-Kernel's `liger_fused_linear_cross_entropy` (`LigerFusedLinearCrossEntropyFunction`), "
    "every option at its default (CUDA only)",
    "cce": "cut-cross-entropy's `linear_cross_entropy(embeddings, classifier, labels)`, every option at its "
    "default: the `cce` kernels, gradient filtering `filter_eps='high'` (CUDA only)",
}
# Distribution names whose versions each result records.
VERSIONS = ("torch", "triton", "liger-kernel", "cut-cross-entropy", "bnb-lightning")

SMOKE = dict(hidden_size=64, vocab_size=512, tokens=[64, 128], steps=2)

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------- implementations


def bnb_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return linear_cross_entropy(hidden, weight, targets, ignore_index=IGNORE_INDEX, kernel="torch")


def torch_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=IGNORE_INDEX)


def as_loss(output: Any) -> torch.Tensor:
    """The scalar loss out of what a library returns (a tensor, or an output object / tuple with extras)."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "loss"):
        return output.loss
    return output[0]


def liger_loss() -> LossFn:
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        # Older releases have only the module; it takes the weight first.
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        module = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX)
        return lambda hidden, weight, targets: as_loss(module(weight, hidden, targets))

    return lambda hidden, weight, targets: as_loss(
        liger_fused_linear_cross_entropy(hidden, weight, targets, ignore_index=IGNORE_INDEX)
    )


def cce_loss() -> LossFn:
    from cut_cross_entropy import linear_cross_entropy as cce_linear_cross_entropy

    return lambda hidden, weight, targets: cce_linear_cross_entropy(
        hidden, weight, targets, ignore_index=IGNORE_INDEX
    )


# Name -> a function that imports the implementation and returns its loss function.
LOADERS: dict[str, Callable[[], LossFn]] = {
    "bnb": lambda: bnb_loss,
    "torch": lambda: torch_loss,
    "liger": liger_loss,
    "cce": cce_loss,
}
# Those built on Triton kernels for CUDA.
CUDA_ONLY = ("liger", "cce")


# ---------------------------------------------------------------- measuring


def make_weight(args: argparse.Namespace, device: torch.device) -> torch.Tensor:
    generator = torch.Generator(device).manual_seed(args.seed)
    # Initialized as Llama's (std 0.02): logits of standard-normal hidden states have std about 1.3.
    weight = torch.randn(args.vocab_size, args.hidden_size, generator=generator, device=device) * 0.02
    return weight.to(torch.bfloat16).requires_grad_(args.train_head)


def make_inputs(
    tokens: int, args: argparse.Namespace, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator(device).manual_seed(args.seed + tokens)
    hidden = torch.randn(tokens, args.hidden_size, generator=generator, device=device, dtype=torch.bfloat16)
    targets = torch.randint(0, args.vocab_size, (tokens,), generator=generator, device=device)
    ignored = torch.rand(tokens, generator=generator, device=device) < IGNORED
    return hidden.requires_grad_(), targets.masked_fill(ignored, IGNORE_INDEX)


def clear_grads(*tensors: torch.Tensor) -> None:
    for tensor in tensors:
        tensor.grad = None


def measure(
    loss_fn: LossFn,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    steps: int,
    device: torch.device,
) -> dict[str, Any]:
    """One warm-up (Triton compiles and autotunes there), then ``steps`` timed forward + backward passes.

    The peak is taken over the timed steps, above what was allocated before them (the inputs, and
    what earlier implementations left for the comparison), so it is what the loss itself adds:
    logits, buffers, and the gradients it returns.
    """
    clear_grads(hidden, weight)
    loss_fn(hidden, weight, targets).backward()
    clear_grads(hidden, weight)
    synchronize(device)
    baseline = torch.cuda.memory_allocated(device) if cuda(device) else None
    if cuda(device):
        torch.cuda.reset_peak_memory_stats(device)
    times_ms = []
    for _ in range(steps):
        clear_grads(hidden, weight)
        synchronize(device)
        start = time.perf_counter()
        loss = loss_fn(hidden, weight, targets)
        loss.backward()
        synchronize(device)
        times_ms.append((time.perf_counter() - start) * 1e3)
    peak = torch.cuda.max_memory_allocated(device) - baseline if cuda(device) else None
    grad_hidden, grad_weight = hidden.grad, weight.grad
    clear_grads(hidden, weight)
    return {
        "status": "ok",
        "ms": statistics.median(times_ms),
        "step_ms": times_ms,
        "peak_mib": None if peak is None else peak / MIB,
        "loss": loss.item(),
        "grad_hidden": grad_hidden,
        "grad_weight": grad_weight,
    }


def run_impl(
    name: str,
    tokens: int,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    args: argparse.Namespace,
    device: torch.device,
) -> dict[str, Any]:
    """One implementation at one length: measured, or why not ("skipped", "oom", "error")."""
    if name in CUDA_ONLY and not cuda(device):
        return {"status": "skipped", "reason": f"{name} needs a CUDA device (Triton kernels)"}
    if name == "torch" and tokens > args.torch_max_tokens:
        gib = tokens * args.vocab_size * 4 / (1 << 30)
        return {
            "status": "skipped",
            "reason": f"above --torch-max-tokens {args.torch_max_tokens} (float32 logits alone: {gib:.3g} GiB)",
        }
    try:
        loss_fn = LOADERS[name]()
    except Exception as error:  # ImportError, or a library that fails on import
        return {"status": "skipped", "reason": f"cannot import: {type(error).__name__}: {error}"}
    result: dict[str, Any]
    try:
        result = measure(loss_fn, hidden, weight, targets, args.steps, device)
    except torch.OutOfMemoryError as error:
        result = {"status": "oom", "reason": str(error).splitlines()[0]}
    except Exception as error:
        traceback.print_exc()
        result = {"status": "error", "reason": f"{type(error).__name__}: {error}".splitlines()[0]}
    clear_grads(hidden, weight)
    free_memory(device)
    return result


def max_diff(
    tensor: torch.Tensor | None, reference: torch.Tensor | None
) -> tuple[float | None, float | None]:
    """(max |tensor - reference|, that over max |reference|), in float32; ``None`` where either is missing."""
    if tensor is None or reference is None:
        return None, None
    diff = (tensor.float() - reference.float()).abs().max().item()
    scale = reference.float().abs().max().item()
    return diff, (diff / scale if scale else None)


def compare(results: dict[str, dict[str, Any]]) -> None:
    """Add each measured result's distance from ``bnb`` and from ``torch`` (where those were measured)."""
    for reference in ("bnb", "torch"):
        ref = results.get(reference)
        for result in results.values():
            measured = result["status"] == "ok" and ref is not None and ref["status"] == "ok"
            result[f"loss_diff_{reference}"] = abs(result["loss"] - ref["loss"]) if measured else None
            for grad in ("grad_hidden", "grad_weight"):
                pair = (result[grad], ref[grad]) if measured else (None, None)
                result[f"{grad}_diff_{reference}"], result[f"{grad}_rel_diff_{reference}"] = max_diff(*pair)


# ---------------------------------------------------------------- report


def environment(device: torch.device, argv: Sequence[str]) -> dict[str, Any]:
    found: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if cuda(device) else "cpu",
        "cuda": torch.version.cuda,
    }
    for name in VERSIONS:
        try:
            found[name.replace("-", "_")] = version(name)
        except PackageNotFoundError:
            found[name.replace("-", "_")] = None
    found["command"] = shlex.join(["python", "benchmarks/loss_bench.py", *argv])
    return found


def number(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def scientific(value: float | None) -> str:
    return "–" if value is None else f"{value:.1e}"


def ratio(value: float | None, base: float | None) -> str:
    return "–" if value is None or not base else f"{value / base:.2f}"


def markdown(rows: list[dict[str, Any]], env: dict[str, Any], args: argparse.Namespace) -> str:
    versions = ", ".join(f"{name} {env[name.replace('-', '_')] or '(not installed)'}" for name in VERSIONS)
    head = "trained" if args.train_head else "frozen"
    lines = [
        f"## Linear cross-entropy: hidden {args.hidden_size}, vocabulary {args.vocab_size}, bfloat16, "
        f"{head} head",
        "",
        f"{env['device']}; {versions}. Median of {args.steps} forward + backward passes after one warm-up; "
        "peak: memory allocated above the inputs during them; Δ: max |difference| from `bnb`, the "
        "gradient's over max |`bnb`'s gradient|.",
        "",
        f"`{env['command']}`",
        "",
        "| tokens | impl | status | ms | ms ÷ bnb | peak MiB | peak ÷ bnb | loss | Δ loss | Δ grad_hidden |"
        + (" Δ grad_weight |" if args.train_head else ""),
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if args.train_head else ""),
    ]
    bnb = {row["tokens"]: row for row in rows if row["impl"] == "bnb" and row["status"] == "ok"}
    notes: dict[tuple[str, str, str], list[str]] = {}
    for row in rows:
        base = bnb.get(row["tokens"], {})
        cells = [
            str(row["tokens"]),
            row["impl"],
            row["status"],
            number(row.get("ms")),
            ratio(row.get("ms"), base.get("ms")),
            number(row.get("peak_mib"), 0),
            ratio(row.get("peak_mib"), base.get("peak_mib")),
            number(row.get("loss"), 5),
            scientific(row.get("loss_diff_bnb")),
            scientific(row.get("grad_hidden_rel_diff_bnb")),
        ]
        if args.train_head:
            cells.append(scientific(row.get("grad_weight_rel_diff_bnb")))
        lines.append("| " + " | ".join(cells) + " |")
        if row.get("reason"):
            notes.setdefault((row["impl"], row["status"], row["reason"]), []).append(str(row["tokens"]))
    if notes:
        lines.append("")
    for (impl, status, reason), tokens in notes.items():
        lines.append(f"- {impl} at {', '.join(tokens)} tokens, {status}: {reason}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- entry point


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="implementations:\n" + "\n".join(f"  {name}: {text}" for name, text in IMPLS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--tokens",
        type=int,
        nargs="+",
        default=[4096, 16384, 65536, 131072],
        help="tokens per batch (batch × sequence); several: one measurement each, shortest first",
    )
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--steps", type=int, default=5, help="timed forward + backward passes")
    parser.add_argument("--hidden-size", type=int, default=4096, help="Llama-3-8B's")
    parser.add_argument("--vocab-size", type=int, default=128256, help="Llama-3's")
    parser.add_argument(
        "--train-head",
        action="store_true",
        help="the output weight needs a gradient too (default: frozen, as under QLoRA)",
    )
    parser.add_argument(
        "--torch-max-tokens",
        type=int,
        default=32768,
        help="run `torch` up to this many tokens (its float32 logits take 16 GiB at 32K; an out-of-memory "
        "error below it is recorded, not raised)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", default="benchmarks/results/loss_bench.jsonl", help="JSON lines, one per (impl, tokens)"
    )
    parser.add_argument("--markdown", default="benchmarks/results/loss_bench.md", help="the Markdown table")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="hidden 64, vocabulary 512, 64 and 128 tokens, 2 steps (where not given): checks the code paths "
        "in seconds",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        for name, value in SMOKE.items():
            if getattr(args, name) == parser.get_default(name):  # what was given stays
                setattr(args, name, value)
    if min(args.tokens) < 1 or args.steps < 1:
        parser.error(
            f"--tokens and --steps must be at least 1, got --tokens {args.tokens} --steps {args.steps}."
        )
    args.tokens = sorted(args.tokens)
    return args


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device = torch.device(args.device)
    if cuda(device):
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        torch.cuda.set_device(device)
    env = environment(device, argv)
    # bnb first: the others are compared with it, and ratios taken against it.
    impls = sorted(args.impls, key=list(IMPLS).index)
    weight = make_weight(args, device)
    rows = []
    for tokens in args.tokens:
        hidden, targets = make_inputs(tokens, args, device)
        results = {}
        for name in impls:
            results[name] = run_impl(name, tokens, hidden, weight, targets, args, device)
            result = results[name]
            shown = f"{result['ms']:.1f} ms" if result["status"] == "ok" else result["reason"]
            print(f"{tokens:>7} tokens  {name:<6} {result['status']:<8} {shown}", flush=True)
        compare(results)
        for name, result in results.items():
            result.pop("grad_hidden", None)
            result.pop("grad_weight", None)
            rows.append(
                {
                    "impl": name,
                    "tokens": tokens,
                    "hidden_size": args.hidden_size,
                    "vocab_size": args.vocab_size,
                    "train_head": args.train_head,
                    "steps": args.steps,
                    **result,
                    **env,
                }
            )
        del hidden, targets, results
        free_memory(device)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    table = markdown(rows, env, args)
    Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
    Path(args.markdown).write_text(table)
    print(table)
    return rows


if __name__ == "__main__":
    main()
