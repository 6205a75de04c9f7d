"""Tiny real models shared by the tests: transformers models built from configs and plain modules."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

warnings.filterwarnings("ignore", message=".*kernels.*")

VOCAB = 256


def tiny_llama(
    tie: bool = True, dtype: torch.dtype = torch.float32, seed: int = 0, hidden: int = 64, layers: int = 2
):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def tiny_gpt2(dtype: torch.dtype = torch.float32, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    return GPT2LMHeadModel(config).to(dtype).eval()


class TiedMLP(nn.Module):
    """A plain nn.Module language model whose output layer shares the embedding matrix."""

    def __init__(self, vocab: int = VOCAB, hidden: int = 64):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.up = nn.Linear(hidden, 4 * hidden)
        self.down = nn.Linear(4 * hidden, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(tokens)
        hidden = hidden + self.down(torch.relu(self.up(hidden)))
        return self.head(self.norm(hidden))


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models gain nothing from intra-op threads; on a busy 2-core machine, handing each small
    bitsandbytes op to two threads makes it about ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))


def tiny_opt(dtype: torch.dtype = torch.float32, seed: int = 0):
    """OPT: linears with biases, tied embeddings, a LayerNorm as last module."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    # word_embed_proj_dim=hidden_size: no project_in/out. bitsandbytes 0.50's CPU repacking of 4-bit
    # weights (eval, no grad, AVX512-BF16 CPUs) fails on a 32-wide project_in (in_features % 64 != 0).
    config = OPTConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        word_embed_proj_dim=64,
        max_position_embeddings=128,
    )
    return OPTForCausalLM(config).to(dtype).eval()


def assert_weight_recomputed(layer: nn.Module, weight: torch.Tensor, backend: str) -> None:
    """Run ``layer`` compiled on a bfloat16 input, forward and backward: its compiled graph saves the
    stored weight, not ``weight`` (its dequantized form), for the backward pass, and the input gets
    the gradient of ``F.linear(x, weight)``. A saved dequantized weight of each layer of a block
    would live from the block's forward to its backward."""
    x = torch.randn(4, 5, layer.in_features, dtype=torch.bfloat16, requires_grad=True)
    torch._dynamo.reset()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = torch.compile(layer, backend=backend, fullgraph=True)(x)
    out.float().square().sum().backward()

    assert [t.shape for t in saved if t.is_floating_point() and t.shape == weight.shape] == []
    assert any(t.data_ptr() == layer.weight.data_ptr() for t in saved)
    reference_x = x.detach().clone().requires_grad_()
    nn.functional.linear(reference_x, weight).float().square().sum().backward()
    torch.testing.assert_close(x.grad, reference_x.grad)


def assert_same_loss_and_grads(expected: tuple, actual: tuple) -> None:
    """``(loss, grads by name)`` of two training steps agree, within the rounding of 4-bit compute."""
    (expected_loss, expected_grads), (loss, grads) = expected, actual
    torch.testing.assert_close(loss, expected_loss)
    assert grads.keys() == expected_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], expected_grads[name], rtol=0.02, atol=1e-3, msg=name)
