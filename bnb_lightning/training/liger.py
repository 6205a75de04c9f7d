"""Liger-Kernel's fused linear cross-entropy, when it is installed: the chunked loss's CUDA kernel.

Measured on an H200 (``benchmarks/loss_bench.py``, Llama-3's 128k vocabulary, frozen head), Liger's
Triton kernel took 0.60x the time of the chunked loss written in torch ops at 16k-64k tokens, in
half its memory, with the same loss; cut-cross-entropy took 1.9x. The torch version stays for the
CPU, for a CUDA machine without Liger, and under FSDP2 where the ranks share the output layer.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import torch

from ..config import check_loss_kernel

_INSTALL = "pip install 'bnb-lightning[liger]' (liger-kernel >= 0.6)"


@functools.cache
def _liger_function() -> tuple[Callable | None, str | None]:
    """``(liger_fused_linear_cross_entropy, None)``, or ``(None, why it cannot be used)``."""
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except Exception as error:  # noqa: BLE001 - not installed, or Triton fails to import
        return None, f"liger-kernel is not importable ({type(error).__name__}: {error})"
    if "accum_dtype" not in inspect.signature(liger_fused_linear_cross_entropy).parameters:
        # Without it a trained output layer's gradient would be summed in bfloat16.
        return None, "the installed liger-kernel is older than 0.6"
    return liger_fused_linear_cross_entropy, None


def uses_liger(kernel: str, device: torch.device | str) -> bool:
    """Whether the loss runs Liger's kernel on ``device``; raises where ``kernel="liger"`` cannot."""
    if check_loss_kernel(kernel) == "torch":
        return False
    function, reason = _liger_function()
    on_cuda = torch.device(device).type == "cuda"
    if kernel == "liger" and (function is None or not on_cuda):
        why = reason if function is None else f"its kernels need a CUDA device, and the model is on {device}"
        raise RuntimeError(
            f"loss_kernel='liger' asks for Liger-Kernel's fused linear cross-entropy, but {why}. "
            f"Install it with {_INSTALL}, or pass loss_kernel='auto' to use it only where it can run."
        )
    return function is not None and on_cuda


def liger_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    ignore_index: int,
    num_items_in_batch: torch.Tensor | None,
) -> torch.Tensor:
    """The chunked loss's contract on Liger's kernel: flat ``hidden`` and ``targets``, the mean over
    valid tokens or the sum over ``num_items_in_batch``; a trained head's gradient summed in float32."""
    function, reason = _liger_function()
    if function is None:
        raise RuntimeError(f"Liger-Kernel's loss cannot run: {reason}. Install it with {_INSTALL}.")
    trains_head = weight.requires_grad or (bias is not None and bias.requires_grad)
    loss = function(
        hidden,
        weight,
        targets,
        bias=bias,
        ignore_index=ignore_index,
        reduction="mean" if num_items_in_batch is None else "sum",
        accum_dtype=torch.float32 if trains_head else None,
    )
    return loss if num_items_in_batch is None else loss / num_items_in_batch
