"""Input embeddings in CPU memory (bnb_lightning.training.host_embedding): which embeddings may move, and
that a model looking tokens up on the host computes what it did, on CPU. The move to host memory
itself, from a CUDA device, is tested in tests/test_gpu.py."""

from __future__ import annotations

import torch
from conftest import tiny_llama
from torch import nn

from bnb_lightning.training.host_embedding import HostEmbedding, movable_embedding


def test_embeddings_that_must_stay_are_not_moved():
    """The positive case needs a CUDA device (tests/test_gpu.py); here, each reason to stay."""
    untied = tiny_llama(tie=False).requires_grad_(False)
    tied = tiny_llama(tie=True).requires_grad_(False)
    assert movable_embedding(untied, untied.get_input_embeddings()) is None  # on the CPU: nothing to free
    assert movable_embedding(tied, tied.get_input_embeddings()) is None  # the output layer shares it
    assert movable_embedding(untied, nn.Linear(2, 2)) is None  # not an embedding
    assert movable_embedding(untied, nn.Embedding(4, 2, max_norm=1.0)) is None  # max_norm rewrites the weight


def test_lookups_on_the_host_give_the_same_outputs_and_the_weight_keeps_its_parameter():
    model = tiny_llama(tie=False).requires_grad_(False)
    embedding = model.get_input_embeddings()
    weight = embedding.weight
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    expected = model(input_ids=ids).logits
    reference = model.model.layers[0].self_attn.q_proj.weight
    host = HostEmbedding(embedding, reference)
    assert host.nbytes == weight.numel() * weight.element_size()
    assert embedding.weight is weight and "forward" in vars(embedding)
    assert torch.equal(model(input_ids=ids).logits, expected)
    host.remove()
    assert embedding.weight is weight and "forward" not in vars(embedding)
    assert torch.equal(model(input_ids=ids).logits, expected)
