"""Where a training step's peak GPU memory goes: torch's allocator history, replayed to the peak.

Set ``BNB_BENCH_MEMORY_TRACE=DIR`` and ``qlora_bench``'s ``bnb`` recipes (and ``peers.py``, whose
children inherit the environment) record the CUDA caching allocator's history while training, then
write ``DIR/<label>.txt``: the tensors alive at the peak (or at an out-of-memory error), summed by the
code that allocated them. It slows training; use it to find what to shrink, not to time.
"""

from __future__ import annotations

import contextlib
import os
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

ENV = "BNB_BENCH_MEMORY_TRACE"
# Frames from these paths say little about which activation a tensor is; the first frame outside
# them names the model or package code that asked for it.
_PLUMBING = ("/torch/", "/triton/", "<frozen", "/contextlib.py", "/functools.py", "memory_trace.py")


def _site(frames: list[dict[str, Any]], depth: int = 2) -> str:
    named = [f for f in frames if not any(part in f["filename"] for part in _PLUMBING)]
    picked = named[:depth] or frames[:1]
    return " < ".join(f"{Path(f['filename']).name}:{f['line']} {f['name']}" for f in picked)


def peak_breakdown(snapshot: dict[str, Any], device: int = 0, top: int = 30) -> str:
    """The allocations alive at the trace's highest point (or its out-of-memory error), by site."""
    events = snapshot["device_traces"][device]
    live: dict[int, dict[str, Any]] = {}
    current = highest = 0
    at = -1
    oom = None
    for index, event in enumerate(events):
        action = event["action"]
        if action == "alloc":
            live[event["addr"]] = event
            current += event["size"]
            if current > highest:
                highest, at = current, index
        elif action == "free_completed" and event["addr"] in live:
            current -= live.pop(event["addr"])["size"]
        elif action == "oom":
            oom = event
            at = index
            break
    # Replay again up to the peak to know which allocations were alive there.
    live.clear()
    for event in events[: at + 1]:
        if event["action"] == "alloc":
            live[event["addr"]] = event
        elif event["action"] == "free_completed":
            live.pop(event["addr"], None)
    sites: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for event in live.values():
        entry = sites[_site(event.get("frames", []))]
        entry[0] += event["size"]
        entry[1] += 1
    total = sum(size for size, _ in sites.values())
    lines = [
        f"alive at the {'out-of-memory error' if oom else 'peak'} (allocated during the trace): "
        f"{total / 2**30:.2f} GiB in {len(live)} blocks"
    ]
    if oom is not None:
        lines.append(f"the failed request: {oom.get('size', 0) / 2**30:.2f} GiB")
    for site, (size, count) in sorted(sites.items(), key=lambda item: -item[1][0])[:top]:
        lines.append(f"{size / 2**30:8.3f} GiB {count:5d}x  {site}")
    return "\n".join(lines)


@contextlib.contextmanager
def recording(device: torch.device, label: str) -> Iterator[None]:
    """Record the allocator's history inside the block when ``BNB_BENCH_MEMORY_TRACE`` names a folder."""
    folder = os.environ.get(ENV)
    if not folder or device.type != "cuda":
        yield
        return
    baseline = torch.cuda.memory_allocated(device)
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    try:
        yield
    finally:
        snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        text = f"{label}: allocated before the trace {baseline / 2**30:.2f} GiB\n"
        text += peak_breakdown(snapshot, device.index or 0)
        Path(folder).mkdir(parents=True, exist_ok=True)
        Path(folder, f"{label}.txt").write_text(text + "\n")
