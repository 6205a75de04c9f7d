"""Where the transformer blocks are: the transformers models inside a module and their blocks.

Checkpointing, compiling, FSDP wrapping and adapter injection all start from these lookups.
"""

from __future__ import annotations

from torch import nn


def transformers_models(model: nn.Module) -> list[nn.Module]:
    """The outermost transformers ``PreTrainedModel`` instances inside ``model`` (or ``model`` itself)."""
    found: list[nn.Module] = []
    prefixes: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in prefixes):
            continue
        if hasattr(module, "gradient_checkpointing_enable") and hasattr(module, "enable_input_require_grads"):
            found.append(module)
            prefixes.append(f"{name}." if name else "")
    return found


def block_class_names(model: nn.Module) -> set[str]:
    """Transformer block classes of the transformers models in ``model`` (their ``_no_split_modules``)."""
    names: set[str] = set()
    for hf_model in transformers_models(model):
        names.update(getattr(hf_model, "_no_split_modules", None) or ())
    return names


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` whose class is a transformer block class (:func:`block_class_names`)."""
    names = block_class_names(model)
    return [module for module in model.modules() if type(module).__name__ in names]


def checkpointable_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks of the transformers models in ``model`` that checkpoint themselves, in model order.

    These are transformers' ``GradientCheckpointingLayer`` instances (decoder layers since
    transformers 4.53); older versions checkpoint from the model's own loop and list none.
    """
    return [
        module
        for module in model.modules()
        if any(cls.__name__ == "GradientCheckpointingLayer" for cls in type(module).__mro__)
    ]
