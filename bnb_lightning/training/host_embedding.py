"""Input embeddings in CPU memory: tokens are looked up on the host and only their rows go to the device.

A QLoRA step never changes the input embeddings, yet they stay in full precision on the device: 1 GiB
for a 128k vocabulary at hidden size 4,096, room for about 8,000 more tokens of context at 24 GB. A
lookup reads one row per token, so on the host it costs a copy of the batch's hidden states to the
device (a few milliseconds a step at long contexts, where a step takes seconds). The activation
planner moves them when a plan offloads blocks (``training/plan.py``).
"""

from __future__ import annotations

import torch
from torch import nn

from .blocks import shares_parameter


def movable_embedding(model: nn.Module, embedding: nn.Module | None) -> nn.Embedding | None:
    """``embedding`` if it can live in CPU memory: a plain ``nn.Embedding`` on a CUDA device, frozen, and
    not shared with another module (a tied output layer still needs the weight on the device)."""
    if type(embedding) is not nn.Embedding or embedding.max_norm is not None:
        return None  # subclasses may scale on the device (Gemma); max_norm rewrites the weight
    from ..fsdp2 import is_sharded  # imported here: fsdp2 builds on this package

    weight = embedding.weight
    if weight.requires_grad or not weight.is_cuda or is_sharded(embedding):
        return None  # a sharded weight (FSDP2) is gathered where it is needed, by FSDP2
    return None if shares_parameter(model, weight) else embedding


class HostEmbedding:
    """Keeps ``embedding``'s weight in (pinned, where possible) CPU memory; its outputs go where
    ``reference`` (a parameter of the first block) lives. Undo with :meth:`remove`."""

    def __init__(self, embedding: nn.Embedding, reference: torch.Tensor) -> None:
        self.embedding, self.reference = embedding, reference
        weight = embedding.weight
        self.nbytes = weight.numel() * weight.element_size()
        host = weight.detach().cpu()
        try:
            host = host.pin_memory()
        except RuntimeError:  # no pinned memory to be had: pageable memory only slows the copy
            pass
        # The same Parameter object, so an optimizer or a state dict holding it still does.
        weight.data = host
        embedding.forward = self._lookup  # on this instance only; `remove` deletes it

    def _lookup(self, input: torch.Tensor) -> torch.Tensor:  # nn.Embedding.forward's signature
        """The rows of ``input``, gathered on the host into pinned memory and copied to the device without waiting."""
        weight = self.embedding.weight
        ids = input.to(weight.device)
        rows = torch.empty((*ids.shape, weight.shape[1]), dtype=weight.dtype, pin_memory=weight.is_pinned())
        torch.index_select(weight, 0, ids.reshape(-1), out=rows.view(-1, weight.shape[1]))
        return rows.to(self.reference.device, non_blocking=rows.is_pinned())

    def remove(self) -> None:
        """Put the weight back beside the first block and look tokens up there again."""
        vars(self.embedding).pop("forward", None)
        weight = self.embedding.weight
        weight.data = weight.data.to(self.reference.device)
