"""Training matmul for 8-bit layers: dequantize the int8 weight, multiply in the activations' dtype.

bitsandbytes' LLM.int8 matmul quantizes every activation to int8 (with a float16 side path for
outlier columns) and runs each layer as a chain of small custom kernels driven from Python. For
training with frozen weights, multiplying by the dequantized weight instead is faster, on tensor
cores in the compute dtype, traceable by ``torch.compile``, and closer to the stored weights (no
activation quantization). The stored int8 weights, their statistics and the state dict are those of
``bnb.nn.Linear8bitLt``; only the arithmetic of the forward and backward pass differs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..backend import require_bitsandbytes
from ..config import matmul_dtype
from .swap import find_layer_subclass, recomputed_weight, remove_layer_subclass, use_layer_subclass

# bitsandbytes stores one absmax per output row (SCB); int8 value * SCB / 127 is the weight.
_INV_127 = 1.0 / 127.0


def dequantize_int8(weight: torch.Tensor, row_absmax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight * row_absmax / 127`` computed in float32 and rounded once to ``dtype``.

    One kernel writing only the ``dtype`` result: no float32 copy of the weight is materialized
    (for an 8B model's largest layer that would be 235 MB, twice, at every matmul).
    """
    scale = (row_absmax.float() * _INV_127).unsqueeze(1)
    if torch.compiler.is_compiling():
        return (weight * scale).to(dtype)  # the compiler fuses this into one kernel itself
    return torch.mul(weight, scale, out=torch.empty(weight.shape, dtype=dtype, device=weight.device))


class _DequantizedInt8Linear(torch.autograd.Function):
    """``F.linear(x, dequantize(weight), bias)`` saving only the int8 weight for the backward pass."""

    @staticmethod
    def forward(ctx, x, weight, row_absmax, bias):
        ctx.save_for_backward(weight, row_absmax)
        ctx.bias_needs_grad = bias is not None and bias.requires_grad
        return F.linear(x, dequantize_int8(weight, row_absmax, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_output):
        weight, row_absmax = ctx.saved_tensors
        grad_x = grad_output @ dequantize_int8(weight, row_absmax, grad_output.dtype)
        grad_bias = grad_output.flatten(0, -2).sum(0) if ctx.bias_needs_grad else None
        return grad_x, None, None, grad_bias


class Dequantized:
    """Mixin for ``bnb.nn.Linear8bitLt`` (``has_fp16_weights=False``): multiply by the dequantized weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Where the row statistics live depends on whether bitsandbytes' own forward ran yet.
        row_absmax = self.weight.SCB if self.weight.SCB is not None else self.state.SCB
        dtype = matmul_dtype(x)
        bias = None if self.bias is None else self.bias.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            # Compiled, the compiler's autograd recomputes the weight; eager, the function below saves
            # only the int8 weight for the backward pass.
            if torch.compiler.is_compiling():
                weight = recomputed_weight(dequantize_int8, self.weight.data, row_absmax, dtype)
                return F.linear(x.to(dtype), weight, bias)
            return _DequantizedInt8Linear.apply(x.to(dtype), self.weight.data, row_absmax, bias)


def __getattr__(name: str) -> type:
    return find_layer_subclass(Dequantized, name)


def use_dequantized_int8(model: nn.Module) -> int:
    """Make every 8-bit layer of ``model`` multiply by its dequantized weight; returns how many.

    Each ``bnb.nn.Linear8bitLt`` becomes a ``DequantizedLinear8bitLt`` (a subclass: same parameters
    and state dict). Layers that keep float weights (``has_fp16_weights=True``) are left alone.
    Undo with :func:`remove_dequantized_int8`.
    """
    return use_layer_subclass(
        model,
        require_bitsandbytes().nn.Linear8bitLt,
        Dequantized,
        lambda module: not module.state.has_fp16_weights,
    )


def remove_dequantized_int8(model: nn.Module) -> None:
    """Undo :func:`use_dequantized_int8`: 8-bit layers use bitsandbytes' LLM.int8 matmul again."""
    remove_layer_subclass(model, Dequantized)
