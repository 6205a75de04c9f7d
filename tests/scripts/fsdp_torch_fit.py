"""A LoRA fit of a tiny 4-bit Llama under torch's own FSDP on CPU processes (gloo).

Lightning's FSDPStrategy runs on CUDA only; torch's FSDP also runs on the CPU when given
``device_id=cpu``. This script wraps the model with the pieces ``BnbQuantization`` sets up under
FSDP (``quant_storage`` from :func:`config_for_fsdp`, :func:`fsdp_auto_wrap_policy`, the 4-bit
pre-hook that hands FSDP's weight views their quant state, the chunked loss) and trains. Each rank writes its losses,
its adapters (gathered) and the sizes of its frozen shards to ``--out``/rank<N>.pt.

    python tests/scripts/fsdp_torch_fit.py --out /tmp/run --world-size 2 --port 29600
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from peft import LoraConfig

sys.path.insert(0, str(Path(__file__).parents[1]))
from conftest import tiny_llama  # noqa: E402  (the tests' tiny Llama)


def fit(rank: int, args: argparse.Namespace) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel

    from bnb_lightning import QuantizationConfig, inject_adapters, quantize_model, use_chunked_loss
    from bnb_lightning.distributed import (
        config_for_fsdp,
        fsdp_auto_wrap_policy,
        share_quant_state_with_weight_views,
    )

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(args.port)
    dist.init_process_group("gloo", rank=rank, world_size=args.world_size)
    model = tiny_llama().train()  # seed 0: the same base on every rank
    config = config_for_fsdp(QuantizationConfig(bits=4), model, "32-true")
    quantize_model(model, config)
    inject_adapters(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    share_quant_state_with_weight_views(model)
    chunked = use_chunked_loss(model)
    wrapped = FullyShardedDataParallel(
        model,
        device_id=torch.device("cpu"),
        use_orig_params=True,
        auto_wrap_policy=fsdp_auto_wrap_policy(model),
    )
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    # A repeated pattern, so the loss falls within a few steps; each rank its own half of the batch.
    data = torch.arange(4 * 16).remainder(7).view(4, 16)[rank::2]
    losses = []
    for _ in range(args.steps):
        loss = wrapped(input_ids=data, labels=data).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    frozen_local = sum(p.numel() for p in wrapped.parameters() if not p.requires_grad)
    with FullyShardedDataParallel.summon_full_params(wrapped, writeback=False):
        adapters = {n: p.detach().clone() for n, p in wrapped.named_parameters() if "lora_" in n}
        frozen_total = sum(p.numel() for p in wrapped.parameters() if not p.requires_grad)
    torch.save(
        {
            "losses": losses,
            "adapters": adapters,
            "frozen_local": frozen_local,
            "frozen_total": frozen_total,
            "chunked_loss": chunked,
            "quant_storage": str(config.quant_storage),
        },
        Path(args.out) / f"rank{rank}.pt",
    )
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    mp.spawn(fit, args=(args,), nprocs=args.world_size)


if __name__ == "__main__":
    main()
