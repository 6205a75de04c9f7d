"""Causal-LM loss over an output layer sharded by vocabulary rows, without gathering it.

Under FSDP2 an untied, frozen output layer is a unit of its own, each rank holding a slice of its
vocabulary rows (``fsdp2.frozen_ends``). Gathering it for the loss costs its whole size on every
device at the moment the step's activations peak (1 GiB for an 8B, 2 GiB for a 70B, at a 128k
vocabulary). Here the ranks exchange hidden states instead (at 2,048 tokens a rank, 64 MiB in all
for an 8B on two ranks, gradients included), whenever that is the smaller: every rank computes the
logits of every rank's tokens over its own rows, the ranks combine each token's log-normalizer and
target logit with two small all-reduces a chunk, and each token's hidden-state gradient, summed over
the ranks' rows, goes back to the rank it came from. The work per rank is that of the gathered
layer; the loss equals it up to float32 rounding.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..config import matmul_dtype

# Float32 logits of one chunk stay near this size (64 Mi elements = 256 MiB).
_CHUNK_ELEMENTS = 1 << 26


def flat_loss_inputs(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    rows: int,
    ignore_index: int,
    num_items_in_batch: int | torch.Tensor | None,
    chunk_tokens: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The chunked losses' common inputs: ``(tokens, hidden_size)`` hidden states in the matmul dtype,
    flat targets, the loss's divisor (the valid tokens, or ``num_items_in_batch``) and the tokens per
    chunk that keep a chunk's float32 logits over ``rows`` output rows near 256 MiB."""
    hidden = hidden.reshape(-1, hidden.shape[-1]).to(matmul_dtype(hidden))
    targets = targets.reshape(-1).to(hidden.device)
    if targets.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"targets hold {targets.shape[0]} tokens but hidden states hold {hidden.shape[0]}; "
            "pass one target per position."
        )
    if num_items_in_batch is None:
        divisor = (targets != ignore_index).sum().float()
    else:
        divisor = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=hidden.device)
    if chunk_tokens is None:
        chunk_tokens = max(1, _CHUNK_ELEMENTS // max(1, rows))
    return hidden, targets, divisor, chunk_tokens


def vocab_shard(weight: Any) -> tuple[torch.Tensor, int, Any] | None:
    """``(local rows, first row, process group)`` of an output-layer weight FSDP2 shards by rows over a
    one-dimensional mesh; ``None`` for any other weight (gathered or not sharded that way)."""
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # a torch without DTensor
        return None
    if not isinstance(weight, DTensor) or weight.device_mesh.ndim != 1:
        return None
    if tuple(weight.placements) != (Shard(0),):
        return None
    mesh = weight.device_mesh
    rank, world = mesh.get_local_rank(), mesh.size()
    # FSDP2 splits rows as torch.chunk does: the first ranks get ceil(rows / world), the last fewer or none.
    per_rank = -(-weight.shape[0] // world)
    return weight.to_local(), min(rank * per_rank, weight.shape[0]), mesh.get_group()


def _offloaded(weight: Any) -> bool:
    """Whether this rank's shard of ``weight`` is in CPU memory (FSDP2's CPU offload) off a device mesh."""
    return weight.to_local().device.type != weight.device_mesh.device_type


def exchange_bytes(tokens: int, weight: Any) -> int:
    """Device bytes the sharded loss adds for ``tokens`` a rank over ``weight`` (a DTensor): every rank's
    hidden states and their gradients before they go back, and this rank's rows if they come from CPU
    memory."""
    local = weight.to_local()
    world = weight.device_mesh.size()
    copied = local.numel() * local.element_size() if _offloaded(weight) else 0
    return 2 * world * tokens * weight.shape[1] * weight.element_size() + copied


def gather_bytes(weight: Any) -> int:
    """Device bytes gathering ``weight`` whole adds (a DTensor's other ranks' rows, or all of them when
    its shard is in CPU memory)."""
    local = weight.to_local()
    full = weight.numel() * weight.element_size()
    return full - (0 if _offloaded(weight) else local.numel() * local.element_size())


def head_shard(head: Any) -> tuple[torch.Tensor, int, Any] | None:
    """:func:`vocab_shard` of an output layer the sharded loss can take: one without a bias."""
    return vocab_shard(head.weight) if getattr(head, "bias", None) is None else None


def loss_bytes(tokens: int, weight: Any) -> int:
    """Device bytes the loss adds over ``weight`` (sharded by :func:`vocab_shard`) for ``tokens`` a rank:
    the exchange where it is the smaller (the loss exchanges then), else the layer gathered."""
    return min(exchange_bytes(tokens, weight), gather_bytes(weight))


def prefers_sharded(tokens: int, weight: Any, group: Any) -> bool:
    """Whether the sharded loss adds less device memory than gathering ``weight`` for this batch, the
    same answer on every rank (decided on the longest rank's tokens; one small all-reduce)."""
    longest = torch.tensor([tokens], device=weight.device_mesh.device_type)
    dist.all_reduce(longest, op=dist.ReduceOp.MAX, group=group)
    return exchange_bytes(int(longest), weight) < gather_bytes(weight)


def _gather_padded(tensor: torch.Tensor, length: int, group: Any, fill: float = 0) -> torch.Tensor:
    """Every rank's ``tensor`` (first dimension padded to ``length``), concatenated rank by rank."""
    padded = tensor.new_full((length, *tensor.shape[1:]), fill)
    padded[: tensor.shape[0]] = tensor
    world = dist.get_world_size(group)
    out = tensor.new_empty((world * length, *tensor.shape[1:]))
    dist.all_gather_into_tensor(out, padded.contiguous(), group=group)
    return out


class _ShardedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, row_start, targets, ignore_index, divisor, group, chunk_tokens):
        device, world = hidden.device, dist.get_world_size(group)
        rank = dist.get_rank(group)
        tokens = hidden.shape[0]
        # Float32 whatever the default dtype (bfloat16 under Lightning's "bf16-true" counts 257 as 256).
        counts = torch.stack(
            [torch.tensor(float(tokens), dtype=torch.float32, device=device), divisor.float().reshape(())]
        )
        every = torch.empty(world * 2, dtype=torch.float32, device=device)
        dist.all_gather_into_tensor(every, counts, group=group)
        every = every.view(world, 2)
        length = int(every[:, 0].max())  # the longest rank's tokens: every rank pads to it
        divisors = every[:, 1].repeat_interleave(length)  # each token's own rank's divisor
        all_hidden = _gather_padded(hidden, length, group)
        all_targets = _gather_padded(targets, length, group, fill=ignore_index)
        valid = all_targets != ignore_index
        local = all_targets - row_start
        here = valid & (local >= 0) & (local < weight.shape[0])
        local = local.masked_fill(~here, 0)
        losses = torch.zeros(world * length, dtype=torch.float32, device=device)
        grad_all = torch.empty_like(all_hidden) if hidden.requires_grad else None
        for start in range(0, world * length, chunk_tokens):
            end = min(start + chunk_tokens, world * length)
            logits = F.linear(all_hidden[start:end], weight).float()
            rows = torch.arange(end - start, device=device)
            if weight.shape[0]:
                chunk_max = logits.max(dim=-1).values
            else:  # a rank that holds no rows (more ranks than rows): the others' maximum decides
                chunk_max = logits.new_full((end - start,), -torch.inf)
            dist.all_reduce(chunk_max, op=dist.ReduceOp.MAX, group=group)
            logits.sub_(chunk_max.unsqueeze(1))
            # Each rank's target logit (less the max) where it holds the target's row, and sum of exps.
            target = torch.zeros_like(chunk_max)
            if weight.shape[0]:
                target = torch.where(here[start:end], logits[rows, local[start:end]], target)
            sums = torch.stack([logits.exp_().sum(dim=-1), target])
            dist.all_reduce(sums, group=group)
            losses[start:end] = (sums[0].log() - sums[1]) * valid[start:end]
            if grad_all is None:
                continue
            # d(loss)/d(logits) = softmax - one_hot on this rank's rows, over the owner's divisor.
            grad_logits = logits.div_(sums[0].unsqueeze(1))
            grad_logits[rows[here[start:end]], local[start:end][here[start:end]]] -= 1.0
            grad_logits.mul_((valid[start:end].float() / divisors[start:end]).unsqueeze(1))
            grad_all[start:end] = grad_logits.to(hidden.dtype) @ weight
        own = slice(rank * length, rank * length + tokens)
        grad_hidden = None
        if grad_all is not None:
            # Each token's gradient, summed over every rank's rows, back to the rank it came from.
            grad_hidden = torch.empty((length, hidden.shape[1]), dtype=hidden.dtype, device=device)
            dist.reduce_scatter_tensor(grad_hidden, grad_all, group=group)
            grad_hidden = grad_hidden[:tokens]
        ctx.save_for_backward(grad_hidden)
        return losses[own].sum() / divisor.to(device)

    @staticmethod
    def backward(ctx, grad_loss):
        (grad_hidden,) = ctx.saved_tensors
        grad = None if grad_hidden is None else grad_hidden * grad_loss.to(grad_hidden.dtype)
        return grad, None, None, None, None, None, None, None


def sharded_linear_cross_entropy(
    hidden: torch.Tensor,
    shard: tuple[torch.Tensor, int, Any],
    targets: torch.Tensor,
    ignore_index: int = -100,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """:func:`~bnb_lightning.training.loss.linear_cross_entropy` of this rank's ``hidden`` states, the
    output weight being ``shard`` (:func:`vocab_shard`: this rank's rows of it). Every rank of the
    shard's group calls it together; each gets the loss of its own tokens over the whole vocabulary,
    divided as the gathered loss divides it. The output weight is frozen: no gradient for it."""
    weight, row_start, group = shard
    hidden, targets, divisor, chunk_tokens = flat_loss_inputs(
        hidden, targets, weight.shape[0], ignore_index, num_items_in_batch, chunk_tokens
    )
    dtype = hidden.dtype
    # An offloaded shard (FSDP2's CPU offload) comes to the device for the matmuls; its rows only.
    weight = weight.to(hidden.device, dtype, non_blocking=True)
    with torch.autocast(hidden.device.type, enabled=False):
        return _ShardedLinearCrossEntropy.apply(
            hidden, weight, row_start, targets, ignore_index, divisor, group, chunk_tokens
        )
