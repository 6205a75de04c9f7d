"""Activation offload: what the backward pass needs from outside the checkpointed blocks waits in CPU memory.

With every transformer block checkpointed, a training step keeps each block's input until that
block's backward pass (sequence x hidden size per block: 8 KiB a token for each of the 32 blocks of a
Llama-3-8B shape). At long sequences those inputs, not the quantized weights, fill the device.
Offloaded, every tensor the step saves outside the checkpointed regions (the block inputs, mainly)
goes to pinned CPU memory as the forward pass makes it and comes back when the backward pass needs
it, by torch's ``save_on_cpu``; inside a block, checkpointing still recomputes the rest on the device.
"""

from __future__ import annotations

import torch
from torch import nn

from .blocks import transformers_models

# Attributes of a model with offload on: its hook handles, and the contexts of forward calls in progress.
_HANDLES = "_bnb_lightning_offload_handles"
_CONTEXTS = "_bnb_lightning_offload_contexts"


def _enter(module: nn.Module, args: tuple) -> None:
    context = None
    if module.training and torch.is_grad_enabled():
        context = torch.autograd.graph.save_on_cpu(pin_memory=True)
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
