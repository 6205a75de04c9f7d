"""Training matmul for 4-bit layers inside compiled blocks: dequantize in torch ops the compiler fuses.

bitsandbytes runs a 4-bit training matmul (more than 1,536 rows) as its ``gemm_4bit`` op:
dequantize the weight, then ``F.linear``. Inside a ``torch.compile``'d block that op stays opaque,
and each call pays its Python dispatch on the host; a 1B model makes hundreds of such calls a step
and trains host-bound (benchmarks/RESULTS.md). Written as plain torch ops (a 16-entry table
lookup and a per-block scale), the same dequantization becomes one generated kernel in the block's
graph. The values are bitsandbytes' own: ``code[q] * absmax`` in float32, rounded once to the
compute dtype. Outside compiled code the layer runs bitsandbytes' forward unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..backend import layer_quant_state, require_bitsandbytes
from ..config import matmul_dtype
from .swap import find_layer_subclass, recomputed_weight, remove_layer_subclass, use_layer_subclass


def _blockwise_scale(values: torch.Tensor, absmax: torch.Tensor, blocksize: int, numel: int) -> torch.Tensor:
    """``values[i] * absmax[i // blocksize]`` for the first ``numel`` values (the last block may be short)."""
    padded = absmax.numel() * blocksize
    values = values[:numel]
    if padded != numel:
        values = F.pad(values, (0, padded - numel))
    return (values.view(-1, blocksize) * absmax.view(-1, 1)).view(-1)[:numel]


def _float_absmax(absmax, code2, absmax2, offset, blocksize2: int) -> torch.Tensor:
    """The per-block float32 scales; with double quantization (``code2`` given), decoded from 8 bits."""
    if code2 is None:
        return absmax.float()
    return _blockwise_scale(code2[absmax.long()], absmax2, blocksize2, absmax.numel()) + offset


def _dequantize(packed, absmax, code, code2, absmax2, offset, blocksize, blocksize2, shape, dtype):
    rows, cols = shape
    packed_bytes = packed.view(torch.uint8).view(-1, 1)
    # bitsandbytes packs two 4-bit indices a byte, the first one in the high nibble. A broadcast
    # shift (not a stack) so the compiler fuses the unpacking into the kernel that writes the weight.
    shifts = torch.arange(4, -1, -4, dtype=torch.uint8, device=packed.device)
    indices = ((packed_bytes >> shifts) & 0xF).view(-1)
    scales = _float_absmax(absmax, code2, absmax2, offset, blocksize2)
    values = _blockwise_scale(code[indices.long()], scales, blocksize, rows * cols)
    return values.view(rows, cols).to(dtype)


def _state_args(quant_state) -> tuple:
    """The quant state as the tensors and numbers :func:`_dequantize` takes after ``packed``."""
    code2 = absmax2 = offset = None
    blocksize2 = 0
    if quant_state.nested:
        state2 = quant_state.state2
        code2, absmax2, offset, blocksize2 = state2.code, state2.absmax, quant_state.offset, state2.blocksize
    return (
        quant_state.absmax,
        quant_state.code,
        code2,
        absmax2,
        offset,
        quant_state.blocksize,
        blocksize2,
        tuple(quant_state.shape),
    )


def dequantize_4bit(packed: torch.Tensor, quant_state, dtype: torch.dtype) -> torch.Tensor:
    """A ``Linear4bit`` weight as a ``dtype`` matrix, equal to bitsandbytes' ``dequantize_4bit``.

    Plain torch ops, so ``torch.compile`` can fuse them into one kernel.
    """
    return _dequantize(packed, *_state_args(quant_state), dtype)


class Fused:
    """Mixin for ``bnb.nn.Linear4bit``: under ``torch.compile``, dequantize in traceable torch ops."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        quant_state = layer_quant_state(self)  # a weight FSDP2 gathered is a plain tensor
        # Eager code keeps bitsandbytes' kernels (its forward restores a dropped state from the layer).
        if not torch.compiler.is_compiling() or quant_state is None:
            return super().forward(x)
        inp_dtype = x.dtype
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        dtype = matmul_dtype(x)
        bias = None if self.bias is None else self.bias.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            weight = recomputed_weight(_dequantize, self.weight.data, *_state_args(quant_state), dtype)
            out = F.linear(x.to(dtype), weight, bias)
        return out.to(inp_dtype)


def __getattr__(name: str) -> type:
    return find_layer_subclass(Fused, name)


def use_fused_4bit_dequantize(model: nn.Module) -> int:
    """Make every 4-bit layer of ``model`` dequantize in traceable torch ops when compiled; returns how many.

    Each ``bnb.nn.Linear4bit`` becomes a ``FusedLinear4bit`` (a subclass: same parameters, state
    dict and eager forward). Undo with :func:`remove_fused_4bit_dequantize`.
    """
    return use_layer_subclass(model, require_bitsandbytes().nn.Linear4bit, Fused, lambda module: True)


def remove_fused_4bit_dequantize(model: nn.Module) -> None:
    """Undo :func:`use_fused_4bit_dequantize`: 4-bit layers call bitsandbytes' op when compiled too."""
    remove_layer_subclass(model, Fused)
