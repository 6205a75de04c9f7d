"""Helpers shared by the tests: tiny real models (transformers models built from configs, plain modules),
quantized versions of them, LoRA configs, and a tiny LightningModule with the Trainer that fits it."""

from __future__ import annotations

import warnings
from pathlib import Path

import bitsandbytes as bnb
import lightning.pytorch as pl
import pytest
import torch
from peft import LoraConfig
from torch import nn
from torch.utils.data import DataLoader

from bnb_lightning import QuantizationConfig, inject_adapters, quantize_model
from bnb_lightning.backend import is_bnb_linear

warnings.filterwarnings("ignore", message=".*kernels.*")

VOCAB = 256


def tiny_llama(
    tie: bool = True,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    hidden: int = 64,
    layers: int = 2,
    vocab: int = VOCAB,
):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
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


# -- quantized models and their comparison --------------------------------------------------------------

BNB_LAYERS = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
Q_PROJ = "model.layers.0.self_attn.q_proj"
# Tiny models whose weights come from ``seed`` (two of the same architecture differ, then load each other).
ARCHITECTURES = {
    "llama-tied": lambda seed: tiny_llama(tie=True, seed=seed),
    "llama-untied": lambda seed: tiny_llama(tie=False, seed=seed),
    "gpt2-conv1d": lambda seed: tiny_gpt2(seed=seed),
}
QUANTIZATIONS = {
    "nf4": QuantizationConfig(bits=4, quant_type="nf4", double_quant=False),
    "nf4-double-quant": QuantizationConfig(bits=4, quant_type="nf4", double_quant=True),
    "fp4": QuantizationConfig(bits=4, quant_type="fp4", double_quant=False),
    "fp4-double-quant": QuantizationConfig(bits=4, quant_type="fp4", double_quant=True),
    "int8": QuantizationConfig(bits=8),
}


def quantized(architecture: str, quantization: str, seed: int):
    """A tiny model with weights from ``seed``, quantized on the CPU (eval mode, as conftest builds it)."""
    model = ARCHITECTURES[architecture](seed)
    quantize_model(model, QUANTIZATIONS[quantization], device="cpu")
    return model


def quantized_llama(bits: int = 4, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A tiny tied Llama in training mode, quantized on the CPU."""
    model = tiny_llama(dtype=dtype).train()
    quantize_model(model, QuantizationConfig(bits=bits), device="cpu")
    return model


def bnb_layer_names(module: nn.Module) -> list[str]:
    """Names of the bitsandbytes layers of ``module``, sorted."""
    return sorted(name for name, m in module.named_modules() if is_bnb_linear(m))


def model_structure(model: nn.Module) -> dict:
    """Module types, parameter objects with their dtype and requires_grad, and module attributes."""
    return {
        "types": {name: type(m) for name, m in model.named_modules()},
        "parameters": {n: (p, p.dtype, p.requires_grad) for n, p in model.named_parameters()},
        "attributes": {name: set(vars(m)) for name, m in model.named_modules()},
    }


def logits(model, tokens) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


def seeded_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """Under no_grad and in eval mode, bitsandbytes repacks 4-bit weights on CPUs with AVX512-BF16."""
    torch.manual_seed(0)  # same dropout masks in training mode
    with torch.no_grad():
        return model(tokens).logits


# -- LoRA ------------------------------------------------------------------------------------------------


def lora(**kwargs) -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **kwargs)


def trained_model(bits: int, tie: bool = True, dtype: torch.dtype = torch.float32, steps: int = 3):
    """A quantized tiny Llama whose LoRA adapters took a few optimizer steps (so B is not zero)."""
    model = tiny_llama(tie=tie, dtype=dtype).train()
    quantize_model(model, QuantizationConfig(bits=bits), device="cpu")
    inject_adapters(model, lora(task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tokens = torch.arange(32).remainder(7).view(2, 16)
    for _ in range(steps):
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    return model.eval()


# -- exports ---------------------------------------------------------------------------------------------

# The manifest every export writes (its name is in the README and the docstrings).
MANIFEST = "bnb_lightning_export.json"
# The quantizations of exported adapters' bases, as transformers' BitsAndBytesConfig arguments.
BNB_CONFIGS = {
    4: dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    8: dict(load_in_8bit=True),
}
TIE = pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
BITS = pytest.mark.parametrize("bits", [4, 8])


def file_bytes(directory: Path) -> dict[str, bytes]:
    """The bytes of each entry of ``directory``, by name."""
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def leftovers(parent: Path) -> list[str]:
    """Temporary entries an atomic write left in ``parent``."""
    return sorted(p.name for p in parent.iterdir() if p.name.endswith((".partial", ".previous", ".tmp")))


# -- Lightning -------------------------------------------------------------------------------------------


class CausalLM(pl.LightningModule):
    """A tiny Llama trained on a fixed batch of tokens; `build` says where the model is created."""

    def __init__(self, build: str = "init", lr: float = 1e-2, **model_size):
        super().__init__()
        self.build, self.lr, self.losses, self.model_size = build, lr, [], model_size
        self.model = tiny_llama(**model_size).train() if build == "init" else None

    def setup(self, stage: str) -> None:
        if self.build == "setup" and self.model is None:
            self.model = tiny_llama(**self.model_size).train()

    def configure_model(self) -> None:
        if self.build == "configure_model" and self.model is None:
            self.model = tiny_llama(**self.model_size).train()

    def training_step(self, batch, batch_idx):
        self.packed_devices = {p.device.type for p in self.parameters() if p.dtype == torch.uint8}
        loss = self.model(input_ids=batch, labels=batch).loss
        self.losses.append(loss.item())
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.model(input_ids=batch, labels=batch).loss)

    def test_step(self, batch, batch_idx):
        self.log("test_loss", self.model(input_ids=batch, labels=batch).loss)

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def batches(n: int = 4, seq: int = 16):
    # A repeated pattern, so the loss can fall within a few steps.
    data = torch.arange(n * seq).remainder(7).view(n, seq)
    return DataLoader(list(data), batch_size=2)


def trainer(tmp_path, callbacks, **kwargs) -> pl.Trainer:
    options = dict(
        accelerator="cpu",
        devices=1,
        max_steps=12,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


def fit(tmp_path, module, callbacks, ckpt_path=None, **kwargs) -> pl.Trainer:
    """``trainer(...)`` fitting ``module`` on 8 sequences, resuming from ``ckpt_path`` if given."""
    run = trainer(tmp_path, callbacks, **kwargs)
    run.fit(module, batches(n=8), ckpt_path=ckpt_path)
    return run


def lora_step(model: nn.Module, tokens: torch.Tensor, fused: bool, compiled: bool = True) -> tuple:
    """One training step of a quantized ``model`` with checkpointed blocks and random-init LoRA (every
    adapter gets a gradient), its blocks compiled with ``aot_eager`` if ``compiled``: the loss, the
    adapter gradients and how many graphs were compiled."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from bnb_lightning import prepare_for_kbit_training, use_fused_4bit_dequantize
    from bnb_lightning.training.blocks import transformer_blocks

    prepare_for_kbit_training(model, gradient_checkpointing=True)
    torch.manual_seed(0)
    inject_adapters(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    if fused:
        use_fused_4bit_dequantize(model)
    counter = CompileCounterWithBackend("aot_eager")
    if compiled:
        for block in transformer_blocks(model):
            block.compile(backend=counter)
    model.train()
    loss = model(tokens, labels=tokens).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, counter.frame_count


def markdown_rows(path: Path, header: str) -> list[tuple[str, str]]:
    """(first cell without backticks, the rest) per row of the two-column Markdown table under ``header``."""
    lines = path.read_text().splitlines()
    start = lines.index(header) + 2  # past the header and its |---| line
    rows = []
    for line in lines[start:]:
        if not line.startswith("| "):
            break
        name, description = line.removeprefix("| ").removesuffix(" |").split(" | ", 1)
        rows.append((name.strip("`"), description))
    return rows
