"""FSDP2 over a quantized model: torch's ``fully_shard``, as Lightning's ``ModelParallelStrategy`` runs it.

FSDP2 shards each parameter on its own (a ``DTensor`` split along its first dimension), whatever its
dtype, instead of flattening a unit's parameters into one tensor of one dtype as FSDP1 does. So:

- packed 4-bit weights shard as they are, in ``uint8``: no floating ``quant_storage`` is needed, and
  none of FSDP1's casting hazards exist;
- frozen parameters get no gradient memory (FSDP1 allocates a flat gradient for a unit that mixes
  frozen and trainable parameters), so a block's quantized weights and its adapters can share one
  unit: one unit per transformer block, one each for untied input embeddings and output layer (which
  the loss need not gather: ``training/sharded_loss.py``), and the model's root for the rest;
- a 4-bit layer's quantization statistics (its ``quant_state``: absmax, code, shape) are not
  parameters: they stay whole on every rank, on the layer, where bitsandbytes' ``Linear4bit`` (and
  the fused training layer) read them once FSDP2 has gathered the packed weight for the forward.

LLM.int8 weights keep their row statistics on the parameter itself, which a gathered weight lacks:
8-bit is refused under FSDP2, as under FSDP1.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .backend import is_bnb_linear
from .training.blocks import checkpointable_blocks, shares_parameter, transformer_blocks, transformers_models


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a ``DTensor`` already (FSDP2 or tensor parallelism applied)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(parameter, DTensor) for parameter in model.parameters())


def shard_model(
    model: nn.Module,
    mesh: Any,
    device: torch.device | None = None,
    reshard_after_forward: bool = True,
    offload_params: bool = False,
) -> int:
    """``fully_shard`` each transformer block of ``model``, then each outermost model around them; returns
    how many blocks became units.

    Frozen input embeddings and output layer that share no weight (not tied) are units too, gathered
    only while they run: the embeddings for their lookup, the output layer while the chunked loss
    computes the loss and its gradients (``training/loss.py``). Neither is whole on the device through
    the forward and backward passes of the blocks (1 GiB each for an 8B, 2 GiB each for a 70B). The
    outer models (the transformers models inside ``model``, else ``model`` itself) hold what is left:
    the final norm, and tied embeddings, sharded too rather than copied on every rank. A model kept in
    CPU memory (``quantize_model(..., keep_on_host=True)``) reaches ``device`` this way: ``fully_shard`` moves each
    unit's parameters and buffers to the mesh's device and keeps this rank's shard of them; the 4-bit
    statistics, outside any parameter, are moved to ``device`` after.

    ``offload_params``: each rank's shards stay in (pinned) CPU memory instead (FSDP2's
    ``CPUOffloadPolicy``), copied to the device for each unit's all-gather; the adapters' gradients
    and optimizer step are then on the CPU too. For when the shards do not fit the devices.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    pinned = device is not None and device.type == "cuda"
    policy = CPUOffloadPolicy(pin_memory=pinned) if offload_params else OffloadPolicy()
    blocks = checkpointable_blocks(model) or transformer_blocks(model)
    with integer_parameters_shardable():
        for unit in [*blocks, *frozen_ends(model)]:
            fully_shard(unit, mesh=mesh, reshard_after_forward=reshard_after_forward, offload_policy=policy)
        for outer in transformers_models(model) or [model]:
            fully_shard(outer, mesh=mesh, reshard_after_forward=reshard_after_forward, offload_policy=policy)
    # Each block's forward starts gathering the next block's weights (as torchtitan does): issued from
    # the host one block ahead, the gathering overlaps the block's compute even when the host is behind.
    for block, following in zip(blocks[:-1], blocks[1:], strict=True):
        block.set_modules_to_forward_prefetch([following])
    if device is not None:
        for module in model.modules():
            quant_state = getattr(module, "quant_state", None)
            if is_bnb_linear(module) and quant_state is not None:
                quant_state.to(device)  # in place: the layer and its weight share this object
    return len(blocks)


def frozen_ends(model: nn.Module) -> list[nn.Module]:
    """The input embeddings and output layers of the transformers models in ``model`` that can be FSDP2
    units of their own: a plain ``nn.Embedding`` or ``nn.Linear``, frozen, its weight shared with no
    other module (tied ones stay in the model's own unit)."""
    ends = []
    for hf_model in transformers_models(model):
        for getter, kind in (("get_input_embeddings", nn.Embedding), ("get_output_embeddings", nn.Linear)):
            end = getattr(hf_model, getter, lambda: None)()
            plain_and_frozen = type(end) is kind and not any(p.requires_grad for p in end.parameters())
            if plain_and_frozen and not shares_parameter(model, end.weight):
                ends.append(end)
    return ends


class _FrozenIntegerParameters:
    """``torch.nn`` as FSDP2's parameter module sees it, except that ``Parameter(data)`` without
    ``requires_grad`` makes an integer tensor a frozen parameter instead of failing."""

    def __getattr__(self, name: str) -> Any:
        return getattr(nn, name)

    @staticmethod
    def Parameter(data: torch.Tensor | None = None, requires_grad: bool | None = None) -> nn.Parameter:  # noqa: N802
        if requires_grad is None:
            requires_grad = data is None or data.is_floating_point() or data.is_complex()
        return nn.Parameter(data, requires_grad=requires_grad)


@contextlib.contextmanager
def integer_parameters_shardable() -> Iterator[None]:
    """Let ``fully_shard`` shard the packed ``uint8`` weights on every torch that has FSDP2.

    Up to torch 2.11, ``fully_shard`` wraps each shard as ``nn.Parameter(shard)`` and sets its
    ``requires_grad`` after, and ``nn.Parameter`` defaults to requiring gradients, which only floating
    tensors can: every integer parameter fails with "only Tensors of floating point dtype can require
    gradients" (pytorch/pytorch#177844; later versions pass the flag). While this context is open, that
    call makes an integer shard a frozen parameter, which is what it was; nothing else changes.
    """
    try:
        from torch.distributed.fsdp._fully_shard import _fsdp_param
    except ImportError:  # a torch without this module: nothing to mend
        yield
        return
    if getattr(_fsdp_param, "nn", None) is not nn:
        yield
        return
    _fsdp_param.nn = _FrozenIntegerParameters()
    try:
        yield
    finally:
        _fsdp_param.nn = nn


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters of a sharded ``model``, whole and in CPU memory on rank zero (the other
    ranks get an empty dict), without gathering the frozen base: what an adapter-only checkpoint needs."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return get_model_state_dict(model, options=options)
