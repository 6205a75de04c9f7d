"""A restore point: put a model back as it was, for a preparation step that fails halfway."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

# Per-module dicts that hold a module's structure and hooks, restored in place by `restore_point`.
_MODULE_DICTS = (
    "_modules",
    "_parameters",
    "_buffers",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def restore_point(model: nn.Module) -> Callable[[], None]:
    """A function that puts ``model`` back as it is now, for a preparation step that fails halfway.

    It restores every module's class (layer subclasses), attributes (an instance ``forward``, a
    compiled call, PEFT's ``peft_config``, checkpointing flags), children (PEFT's adapter wrappers),
    parameters, buffers and hooks, and every parameter's data and ``requires_grad`` (casts, freezing).
    Tensors are kept by reference, so taking a restore point copies no weights.
    """
    modules = list(model.modules())
    saved_modules = [
        (
            module,
            type(module),
            dict(vars(module)),
            {name: dict(getattr(module, name)) for name in _MODULE_DICTS if name in vars(module)},
        )
        for module in modules
    ]
    saved_parameters = [(p, p.data, p.requires_grad) for p in model.parameters()]

    def restore() -> None:
        for module, cls, attributes, dicts in saved_modules:
            module.__class__ = cls
            vars(module).clear()
            vars(module).update(attributes)
            for name, content in dicts.items():
                getattr(module, name).clear()
                getattr(module, name).update(content)
        for parameter, data, requires_grad in saved_parameters:
            if parameter.data.dtype != data.dtype or parameter.data.data_ptr() != data.data_ptr():
                parameter.data = data
            parameter.requires_grad_(requires_grad)

    return restore
