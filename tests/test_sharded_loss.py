"""The loss over an output layer sharded by vocabulary rows equals the gathered layer's loss.

Each case runs in real gloo processes (``torch.multiprocessing``): every rank computes, for its own
tokens, :func:`linear_cross_entropy` with the whole weight and :func:`sharded_linear_cross_entropy`
with its ``torch.chunk`` of the rows, and returns both losses and hidden-state gradients.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bnb_lightning.training.loss import linear_cross_entropy
from bnb_lightning.training.sharded_loss import sharded_linear_cross_entropy

HIDDEN = 16


def _rank(rank: int, world: int, store: str, case: dict, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.manual_seed(0)
    weight = torch.randn(case["vocab"], HIDDEN, dtype=torch.float64)  # the same on every rank
    torch.manual_seed(1 + rank)
    tokens = case["tokens"][rank]
    hidden = torch.randn(tokens, HIDDEN, dtype=torch.float64) * 3
    targets = torch.randint(0, case["vocab"], (tokens,))
    targets[::3] = -100  # ignored positions
    results = {}
    for name in ("gathered", "sharded"):
        h = hidden.clone().requires_grad_(True)
        if name == "gathered":
            loss = linear_cross_entropy(h, weight, targets, num_items_in_batch=case.get("items"))
        else:
            rows = weight.chunk(world)
            start = sum(r.shape[0] for r in rows[:rank])
            local = rows[rank] if rank < len(rows) else weight[:0]
            loss = sharded_linear_cross_entropy(
                h,
                (local, start, dist.group.WORLD),
                targets,
                num_items_in_batch=case.get("items"),
                chunk_tokens=case.get("chunk"),
            )
        loss.backward()
        results[name] = (loss.detach(), h.grad)
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize(
    "case",
    [
        {"vocab": 12, "tokens": [7, 7]},
        {"vocab": 13, "tokens": [9, 4], "chunk": 3},  # uneven rows and tokens, several chunks
        {"vocab": 5, "tokens": [6, 2, 5], "items": 11},  # 3 ranks of 2, 2, 1 rows; a fixed divisor
        {"vocab": 2, "tokens": [4, 4, 4]},  # the last rank holds no row
    ],
)
def test_sharded_loss_equals_the_gathered_one(case):
    world = len(case["tokens"])
    with tempfile.TemporaryDirectory() as out:
        store = os.path.join(out, "store")
        mp.spawn(_rank, args=(world, store, case, out), nprocs=world)
        ranks = [torch.load(f"{out}/rank{r}.pt") for r in range(world)]
    for results in ranks:
        gathered, sharded = results["gathered"], results["sharded"]
        # Both take the softmax in float32: equal to its rounding.
        torch.testing.assert_close(sharded[0], gathered[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(sharded[1], gathered[1], rtol=1e-5, atol=1e-6)
        assert gathered[1].abs().sum() > 0
