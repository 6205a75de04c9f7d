"""Saved attention: an offloaded block's recompute does not run its attention kernel again.

A checkpointed block runs its whole forward pass again in the backward pass, attention kernel
included: at 32,768 tokens on a Llama-3-8B shape that is 14.5 ms of cuDNN's kernel for each of 32
blocks, about 9% of the step, and the share grows with the length. The kernel's backward needs its
inputs (the recompute makes them anyway), its output and its log-sum-exp. An offloaded block sends
those two to pinned CPU memory with its input, on the offload's side stream, and its recompute takes
them back instead of running the kernel: the recomputed attention is bitwise what the forward made.

It applies to transformers models on SDPA attention (``attn_implementation="sdpa"``, their default)
for causal self-attention without a mask (padding, packing, a sliding window), dropout or
soft-capping, on torch's cuDNN (compute capability 9.0 and up) or FlashAttention (8.0 and up)
kernels in float16 or bfloat16, and on the CPU's; any other call runs transformers' own SDPA
function, as before.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

# Set on an attention module whose calls go through the saved attention: the kernel it runs.
_KERNEL = "_bnb_lightning_attention_kernel"
# transformers' keyword arguments to an attention function that change nothing here (its SDPA function
# ignores them too: a sliding window, say, is in the mask, and a masked call is not served here).
_IGNORED = {
    "dropout",
    "scaling",
    "is_causal",
    "position_ids",
    "use_cache",
    "cache_position",
    "past_key_values",
    "sliding_window",
}

_active = threading.local()  # the stash of the checkpointed block running now, and whether it replays
_original_sdpa: Any = None


class AttentionStash:
    """The attention results of one checkpointed block call: its forward keeps them, its recompute takes them.

    ``pack``/``unpack`` move each kept tensor out and back (the offload's, so they wait in CPU memory
    with the block's input and come back with it).
    """

    def __init__(self, pack, unpack) -> None:
        self.pack, self.unpack = pack, unpack
        self.kept: list[tuple[Any, Any]] = []

    @contextlib.contextmanager
    def active(self, replaying: bool) -> Iterator[None]:
        previous = getattr(_active, "state", None)
        _active.state = (self, replaying)
        try:
            yield
        finally:
            _active.state = previous

    def keep(self, out: torch.Tensor, lse: torch.Tensor) -> None:
        self.kept.append((self.pack(out), self.pack(lse)))

    def take(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self.kept:
            return None
        out, lse = self.kept.pop(0)
        return self.unpack(out), self.unpack(lse)


def kernel_for(device: torch.device) -> str | None:
    """The kernel whose results can be saved on ``device`` (``None``: none; the attention is recomputed)."""
    aten = torch.ops.aten
    if not hasattr(torch.library, "custom_op"):
        return None
    if device.type == "cpu":
        return "cpu" if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward") else None
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) >= (9, 0) and torch.backends.cuda.cudnn_sdp_enabled():
        if hasattr(aten, "_scaled_dot_product_cudnn_attention_backward"):
            return "cudnn"
    if (major, minor) >= (8, 0) and torch.backends.cuda.flash_sdp_enabled():
        if hasattr(aten, "_scaled_dot_product_flash_attention_backward"):
            return "flash"
    return None


def attention_modules(hf_models: list[nn.Module]) -> list[nn.Module]:
    """The self-attention modules of transformers models on SDPA attention (those the saved attention can serve)."""
    modules = []
    for hf_model in hf_models:
        config = getattr(hf_model, "config", None)
        if getattr(config, "_attn_implementation", None) != "sdpa":
            continue
        modules += [
            module
            for module in hf_model.modules()
            if type(module).__name__.endswith("Attention") and hasattr(module, "head_dim")
        ]
    return modules


def saved_bytes(modules: list[nn.Module], tokens: int, element_size: int) -> int:
    """What one block's saved attention holds for ``tokens`` tokens: its output and float32 log-sum-exp."""
    module = modules[0]
    heads = getattr(module.config, "num_attention_heads", 1)
    return tokens * heads * (module.head_dim * element_size + 4)


def set_saved_attention(modules: list[nn.Module], kernel: str | None) -> bool:
    """Route the calls of ``modules`` through the saved attention (``kernel``), or back (``None``).

    Returns whether they now go through it: it needs transformers' ``AttentionInterface``.
    """
    if kernel is not None and not _install():
        kernel = None
    for module in modules:
        if kernel is None:
            vars(module).pop(_KERNEL, None)
        else:
            setattr(module, _KERNEL, kernel)
    return kernel is not None and bool(modules)


def _install() -> bool:
    """Register the saved attention as transformers' ``"sdpa"`` function, which calls the one it replaces
    for every module not routed here."""
    global _original_sdpa
    if _original_sdpa is not None:
        return True
    try:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
    except ImportError:
        return False
    _original_sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    _define_op()
    AttentionInterface.register("sdpa", _sdpa_or_saved)
    return True


def _sdpa_or_saved(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *args: Any,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    kernel = getattr(module, _KERNEL, None)
    if kernel is None:
        return _original_sdpa(module, query, key, value, attention_mask, *args, **kwargs)
    if torch.is_autocast_enabled(query.device.type):  # autocast runs SDPA in its dtype; a custom op it leaves
        dtype = torch.get_autocast_dtype(query.device.type)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    if not _can_save(module, query, key, value, attention_mask, args, kwargs, kernel):
        return _original_sdpa(module, query, key, value, attention_mask, *args, **kwargs)
    scale = kwargs.get("scaling")
    scale = float(query.shape[-1] ** -0.5 if scale is None else scale)
    out, _ = torch.ops.bnb_lightning.saved_attention(query, key, value, scale, kernel)
    return out, None  # (batch, sequence, heads, head size), as transformers' SDPA function gives it


def _can_save(module, query, key, value, attention_mask, args, kwargs, kernel: str) -> bool:
    if args or attention_mask is not None or not (module.training and torch.is_grad_enabled()):
        return False
    if any(
        given is not None and given is not False for name, given in kwargs.items() if name not in _IGNORED
    ):
        return False  # soft-capping, sinks, a position bias, ...: transformers' function
    if (
        kwargs.get("dropout", 0.0)
        or kwargs.get("is_causal", True) is False
        or not getattr(module, "is_causal", True)
    ):
        return False
    if (
        query.dim() != 4
        or query.shape[2] < 2
        or key.shape[2] != query.shape[2]
        or query.shape[1] % key.shape[1]
    ):
        return False
    head = query.shape[-1]
    if key.shape[-1] != head or value.shape[-1] != head or head % 8:
        return False
    if kernel == "cpu":
        return query.device.type == "cpu"
    return (
        query.is_cuda
        and query.dtype in (torch.float16, torch.bfloat16)
        and head <= (128 if kernel == "cudnn" else 256)
    )


def _forward(query, key, value, scale: float, kernel: str) -> tuple[torch.Tensor, torch.Tensor]:
    aten = torch.ops.aten
    if kernel == "cudnn":
        result = aten._scaled_dot_product_cudnn_attention(
            query, key, value, None, True, 0.0, True, False, scale=scale
        )
    elif kernel == "flash":
        result = aten._scaled_dot_product_flash_attention(query, key, value, 0.0, True, False, scale=scale)
    else:
        result = aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, True, scale=scale)
    out, lse = result[0], result[1]
    return out.transpose(1, 2).contiguous(), lse.contiguous()


def _backward(grad, query, key, value, out, lse, scale: float, kernel: str):
    aten = torch.ops.aten
    grad, out = grad.transpose(1, 2), out.transpose(1, 2)  # back to (batch, heads, sequence, head size)
    if kernel == "cpu":
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad, query, key, value, out, lse, 0.0, True, scale=scale
        )
    # No dropout and no packed (nested) sequences: the random state and cumulative lengths stay undefined.
    length_q, length_k = query.shape[2], key.shape[2]
    if kernel == "cudnn":
        return aten._scaled_dot_product_cudnn_attention_backward(
            grad,
            query,
            key,
            value,
            out,
            lse,
            None,
            None,
            None,
            None,
            None,
            length_q,
            length_k,
            0.0,
            True,
            scale=scale,
        )
    return aten._scaled_dot_product_flash_attention_backward(
        grad, query, key, value, out, lse, None, None, length_q, length_k, 0.0, True, None, None, scale=scale
    )


def _define_op() -> None:
    """``bnb_lightning::saved_attention``: opaque to torch.compile, so a compiled block calls it on every run
    (and its recompute takes the stash there)."""

    @torch.library.custom_op("bnb_lightning::saved_attention", mutates_args=())
    def saved_attention(
        query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, kernel: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        state = getattr(_active, "state", None)
        if state is not None and state[1]:
            taken = state[0].take()
            if taken is not None:
                return taken
        out, lse = _forward(query, key, value, scale, kernel)
        if state is not None:
            state[0].keep(out, lse)
        return out, lse

    @saved_attention.register_fake
    def _(query, key, value, scale, kernel):
        batch, heads, length, _ = query.shape
        out = query.new_empty(batch, length, heads, value.shape[-1])
        lse_shape = (batch, heads, length, 1) if kernel == "cudnn" else (batch, heads, length)
        return out, query.new_empty(lse_shape, dtype=torch.float32)

    # The backward kernel is an op of its own too: traced into a compiled block's backward graph,
    # aten's takes the undefined (dropout and packing) arguments for defined ones and fails.
    @torch.library.custom_op("bnb_lightning::saved_attention_backward", mutates_args=())
    def saved_attention_backward(
        grad: torch.Tensor,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        scale: float,
        kernel: str,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        grads = _backward(grad.contiguous(), query, key, value, out, lse, scale, kernel)
        # In the layout of the inputs, as the fake implementation says (compiled graphs rely on it).
        return tuple(
            g if g.stride() == x.stride() else torch.empty_like(x).copy_(g)
            for g, x in zip(grads, (query, key, value), strict=True)
        )

    @saved_attention_backward.register_fake
    def _(grad, query, key, value, out, lse, scale, kernel):
        return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)

    def setup_context(ctx, inputs, output) -> None:
        query, key, value, ctx.scale, ctx.kernel = inputs
        ctx.save_for_backward(query, key, value, *output)

    def backward(ctx, grad_out, grad_lse):
        query, key, value, out, lse = ctx.saved_tensors
        grads = saved_attention_backward(grad_out, query, key, value, out, lse, ctx.scale, ctx.kernel)
        return grads[0], grads[1], grads[2], None, None

    saved_attention.register_autograd(backward, setup_context=setup_context)
