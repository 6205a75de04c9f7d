"""Causal attention as transformers' Llama calls it: which SDPA kernel runs, and how fast.

transformers' "sdpa" attention passes ``enable_gqa=True`` for models with fewer key/value heads
than query heads (Llama 3: 8 for 32) when there is no mask; Unsloth repeats the key/value heads
first. This times forward + backward of both ways on torch's own choice of kernel, and of each way
forced onto cuDNN's and FlashAttention's kernels, on random inputs, and checks they agree with the
first way. On torch 2.11 and an H200 both calls run cuDNN's kernel (``benchmarks/RESULTS.md``).

    python benchmarks/attention_bench.py --lengths 4096 32768 --out benchmarks/results/h200-attention.jsonl
    python benchmarks/attention_bench.py --device cpu --lengths 64 --heads 4 --kv-heads 2 --dim 16  # smoke
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# way -> (grouped-query call, forced kernel or None for torch's choice)
WAYS = {
    "gqa_default": (True, None),  # transformers' call
    "expanded_default": (False, None),  # key/value heads repeated first
    "gqa_flash": (True, SDPBackend.FLASH_ATTENTION),
    "expanded_cudnn": (False, SDPBackend.CUDNN_ATTENTION),
    "expanded_flash": (False, SDPBackend.FLASH_ATTENTION),
}
KERNEL_WORDS = ("attention", "sdpa", "flash", "fmha")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gqa: bool) -> torch.Tensor:
    if gqa:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def kernel_names(step, device: torch.device) -> list[str]:
    """The attention kernels (or, on the CPU, operators) one step runs."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        step()
        synchronize(device)
    names = {event.key for event in profiler.key_averages()}
    return sorted(name for name in names if any(word in name.lower() for word in KERNEL_WORDS))


def run(args: argparse.Namespace, seq: int) -> list[dict]:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    generator = torch.Generator(device=device).manual_seed(0)

    def tensor(heads: int) -> torch.Tensor:
        shape = (args.batch, heads, seq, args.dim)
        return torch.randn(shape, device=device, dtype=dtype, generator=generator)

    q, k, v, grad = tensor(args.heads), tensor(args.kv_heads), tensor(args.kv_heads), tensor(args.heads)
    rows, reference = [], None
    for way, (gqa, backend) in WAYS.items():
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]

        def step(leaves=leaves, gqa=gqa):
            for leaf in leaves:
                leaf.grad = None
            out = attention(*leaves, gqa)
            out.backward(grad)
            return out

        row = {"way": way, "batch": args.batch, "seq": seq, "heads": args.heads, "kv_heads": args.kv_heads}
        row.update(dim=args.dim, dtype=args.dtype, device=args.device)
        try:
            with sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext():
                step()  # warm-up (and cuDNN's plan)
                synchronize(device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                    base = torch.cuda.memory_allocated(device)
                start = time.perf_counter()
                for _ in range(args.repeats):
                    out = step()
                synchronize(device)
                row["ms"] = 1e3 * (time.perf_counter() - start) / args.repeats
                if device.type == "cuda":
                    row["extra_peak_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
                row["kernels"] = kernel_names(step, device)
        except RuntimeError as error:  # the forced kernel cannot run here
            row["status"], row["reason"] = "unavailable", str(error).strip().splitlines()[0][:200]
        else:
            outputs = [out.float()] + [leaf.grad.float() for leaf in leaves]
            reference = reference or outputs
            row["status"] = "ok"
            row["max_abs_diff"] = max(
                (a - b).abs().max().item() for a, b in zip(outputs, reference, strict=True)
            )
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 32768])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=None, help="JSON lines, one per way and length")
    args = parser.parse_args(argv)
    if args.heads % args.kv_heads:
        parser.error(f"--heads {args.heads} must be a multiple of --kv-heads {args.kv_heads}")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here: pass --device cpu for a smoke run")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    print(f"torch {torch.__version__}, {args.device}, cuDNN {cudnn}", flush=True)
    rows = [row for seq in args.lengths for row in run(args, seq)]
    if args.out:
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text("".join(json.dumps(row) + "\n" for row in rows))
        temporary.replace(path)
    return rows


if __name__ == "__main__":
    main()
