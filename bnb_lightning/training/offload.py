"""Activation offload: what the backward pass needs from outside the checkpointed blocks waits in CPU memory.

With every transformer block checkpointed, a training step keeps each block's input until that
block's backward pass (sequence x hidden size per block: 8 KiB a token for each of the 32 blocks of a
Llama-3-8B shape). At long sequences those inputs, not the quantized weights, fill the device.
Offloaded, every tensor the step saves outside the checkpointed regions (the block inputs, mainly)
goes to pinned CPU memory as the forward pass makes it and comes back when the backward pass needs
it; inside a block, checkpointing still recomputes the rest on the device. Unlike torch's
``save_on_cpu``, the copies run on a side stream, overlapping the compute, and each tensor brought
back starts bringing back the one saved before it, which the backward pass needs next.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from .blocks import transformers_models

# Attributes of a model with offload on: its hook handles, and the contexts of forward calls in progress.
_HANDLES = "_bnb_lightning_offload_handles"
_CONTEXTS = "_bnb_lightning_offload_contexts"


class _Saved:
    """One saved tensor while it waits in CPU memory: where it came from, its copy, and when that is ready."""

    def __init__(
        self, device: torch.device | None, host: torch.Tensor, ready: torch.cuda.Event | None
    ) -> None:
        self.device, self.host, self.ready = device, host, ready
        self.on_device: torch.Tensor | None = None  # brought back ahead of its use
        self.previous: weakref.ref[_Saved] | None = None  # the tensor saved before this one


class _Offload(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks that keep saved tensors in pinned CPU memory, copied on a side stream."""

    def __init__(self) -> None:
        self.streams: dict[torch.device, torch.cuda.Stream] = {}
        self.last: weakref.ref[_Saved] | None = None
        super().__init__(self._pack, self._unpack)

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self.streams:
            self.streams[device] = torch.cuda.Stream(device)
        return self.streams[device]

    def _pack(self, tensor: torch.Tensor) -> _Saved:
        host = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout, pin_memory=tensor.is_cuda)
        if not tensor.is_cuda:
            host.copy_(tensor)  # on the CPU, a second buffer: the same round trip, without streams
            saved = _Saved(None, host, None)
        else:
            stream = self._stream(tensor.device)
            stream.wait_stream(torch.cuda.current_stream(tensor.device))
            with torch.cuda.stream(stream):
                host.copy_(tensor, non_blocking=True)
            tensor.record_stream(stream)  # its memory is not reused before the copy is done
            saved = _Saved(tensor.device, host, stream.record_event())
        saved.previous, self.last = self.last, weakref.ref(saved)
        return saved

    def _fetch(self, saved: _Saved) -> None:
        stream = self._stream(saved.device)
        with torch.cuda.stream(stream):
            saved.on_device = saved.host.to(saved.device, non_blocking=True)
        saved.ready = stream.record_event()

    def _unpack(self, saved: _Saved) -> torch.Tensor:
        if saved.device is None:
            return saved.host
        if saved.on_device is None:
            self._fetch(saved)
        tensor, saved.on_device = saved.on_device, None
        current = torch.cuda.current_stream(saved.device)
        current.wait_event(saved.ready)
        tensor.record_stream(current)
        previous = saved.previous() if saved.previous is not None else None
        if previous is not None and previous.device is not None and previous.on_device is None:
            self._fetch(previous)  # the backward pass goes through the saved tensors in reverse
        return tensor


def _enter(module: nn.Module, args: tuple) -> None:
    context = None
    if module.training and torch.is_grad_enabled():
        context = _Offload()
        context.__enter__()
    module.__dict__.setdefault(_CONTEXTS, []).append(context)


def _exit(module: nn.Module, args: tuple, output: object) -> None:
    contexts = module.__dict__.get(_CONTEXTS)
    context = contexts.pop() if contexts else None
    if context is not None:
        context.__exit__(None, None, None)


def use_activation_offload(model: nn.Module) -> list[nn.Module]:
    """Offload what each transformers model inside ``model`` saves for its backward pass while it trains.

    Only training forwards with gradients are affected; evaluation and generation are not. Meant for
    models whose blocks are checkpointed (``TrainingOptions(activation_memory="offload")`` turns both on):
    without checkpointing every activation would cross to the CPU. Returns the models changed. Undo
    with :func:`remove_activation_offload`.
    """
    changed = []
    for hf_model in transformers_models(model):
        if _HANDLES not in vars(hf_model):
            # Called even when the forward raises, so the saved-tensor hooks never outlive the call.
            handles = [
                hf_model.register_forward_pre_hook(_enter),
                hf_model.register_forward_hook(_exit, always_call=True),
            ]
            setattr(hf_model, _HANDLES, handles)
        changed.append(hf_model)
    return changed


def remove_activation_offload(model: nn.Module) -> None:
    """Undo :func:`use_activation_offload`: activations stay on the device again."""
    for module in model.modules():
        for handle in vars(module).pop(_HANDLES, ()):
            handle.remove()
        vars(module).pop(_CONTEXTS, None)
