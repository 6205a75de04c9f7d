"""Which modules stay in full precision, and the name patterns that select modules."""

from __future__ import annotations

import re
from collections.abc import Iterable

from accelerate.utils import find_tied_parameters
from torch import nn

# Reasons a module is kept in full precision, as shown in the quantization report.
TIED = "tied weights"
OUTPUT_EMBEDDINGS = "output embeddings"
LAST_MODULE = "last module"
USER_SKIP = "skip_modules"
KEEP_IN_FP32 = "model keeps it in fp32"
NOT_TARGETED = "not in target_modules"
ADAPTER = "PEFT adapter"

_BOUNDARY = r"(?:(?<=\.)|(?=\.|$))"


def matches_pattern(module_name: str, pattern: str) -> bool:
    """Whether ``pattern`` selects ``module_name``: a prefix or regex up to a ``.`` boundary, or a suffix.

    ``"model.layers.1"`` selects ``model.layers.1.mlp`` but not ``model.layers.11.mlp``;
    ``"layers.*.mlp"`` is a regex; ``"lm_head"`` selects ``model.lm_head`` as a suffix.
    """
    if module_name.endswith(pattern):
        return True
    try:
        return re.match(rf"(?:{pattern}){_BOUNDARY}", module_name) is not None
    except re.error:
        return False


def matches_any(module_name: str, patterns: Iterable[str]) -> bool:
    return any(matches_pattern(module_name, pattern) for pattern in patterns)


def _module_name(parameter_name: str) -> str:
    for suffix in (".weight", ".bias"):
        if parameter_name.endswith(suffix):
            return parameter_name[: -len(suffix)]
    return parameter_name


def default_skips(model: nn.Module) -> dict[str, str]:
    """The modules to keep in full precision, each with the reason.

    Tied or shared weights are found by parameter identity (so any ``nn.Module`` works), output
    embeddings through ``get_output_embeddings()`` on every submodule that has it, and the module
    of the model's last parameter as a fallback for heads that declare nothing.
    """
    reasons: dict[str, str] = {}
    named = list(model.named_parameters())
    if named:
        reasons[_module_name(named[-1][0])] = LAST_MODULE
    module_names = {id(module): name for name, module in model.named_modules()}
    for module in model.modules():
        get_output_embeddings = getattr(module, "get_output_embeddings", None)
        if not callable(get_output_embeddings):
            continue
        try:
            output_embeddings = get_output_embeddings()
        except (AttributeError, NotImplementedError):
            continue
        if isinstance(output_embeddings, nn.Module) and id(output_embeddings) in module_names:
            reasons[module_names[id(output_embeddings)]] = OUTPUT_EMBEDDINGS
    for group in find_tied_parameters(model):
        for parameter_name in group:
            reasons[_module_name(parameter_name)] = TIED
    return reasons


def get_keys_to_not_convert(model: nn.Module) -> list[str]:
    """Names of the modules to keep in full precision: tied weights, output embeddings, last module.

    Names are module paths (no ``.weight``/``.bias``), usable as ``modules_to_not_convert``.
    On transformers models these are the same modules as transformers' own ``get_keys_to_not_convert``
    names; where the last parameter is a bias, transformers keeps its ``.bias`` (``transformer.ln_f.bias``
    for GPT-2) and this returns the module (``transformer.ln_f``).

    Example::

        >>> get_keys_to_not_convert(llama_with_tied_embeddings)
        ['lm_head', 'model.embed_tokens', 'model.norm']
    """
    return sorted(default_skips(model))


def adapter_module_names(model: nn.Module) -> set[str]:
    """Names of the modules that belong to PEFT adapters (LoRA's ``lora_A``/``lora_B``, ...), not to the base.

    They are the trainable part: quantizing them (a model prepared earlier, passed through again)
    would freeze the adapters into 4-bit weights.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    names: set[str] = set()
    for name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        for child_name, child in module.named_children():
            if child_name == "base_layer":
                continue
            prefix = f"{name}.{child_name}" if name else child_name
            names.update(f"{prefix}.{inner}" if inner else prefix for inner, _ in child.named_modules())
    return names


def keep_in_fp32_patterns(model: nn.Module) -> list[str]:
    """Patterns a transformers model asks to keep in float32 (``_keep_in_fp32_modules``)."""
    patterns: set[str] = set()
    for module in model.modules():
        patterns.update(getattr(module, "_keep_in_fp32_modules", None) or ())
    return sorted(patterns)
