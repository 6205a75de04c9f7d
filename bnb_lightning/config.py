"""`QuantizationConfig`: what to quantize and how, validated once, immutable afterwards."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch

_DTYPE_NAMES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "uint8": torch.uint8,
    "int8": torch.int8,
}
_COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_STORAGE_DTYPES = (torch.uint8, torch.int8, torch.bfloat16, torch.float16, torch.float32)
_QUANT_TYPES = ("nf4", "fp4")

DTypeLike = Union[str, torch.dtype, None]  # noqa: UP007 -- evaluated at runtime on Python 3.10


def parse_dtype(value: DTypeLike, field: str, allowed: Sequence[torch.dtype]) -> torch.dtype | None:
    """Turn ``"bf16"``, ``"torch.bfloat16"`` or ``torch.bfloat16`` into a dtype, so configs work from YAML."""
    if value is None or isinstance(value, torch.dtype):
        dtype = value
    elif isinstance(value, str):
        key = value.strip().lower().removeprefix("torch.")
        dtype = _DTYPE_NAMES.get(key)
        if dtype is None:
            raise ValueError(
                f"{field}={value!r} is not a dtype name; expected one of "
                f"{sorted(k for k, v in _DTYPE_NAMES.items() if v in allowed)} or a torch.dtype."
            )
    else:
        raise TypeError(f"{field} must be a string or a torch.dtype, got {type(value).__name__} ({value!r}).")
    if dtype is not None and dtype not in allowed:
        raise ValueError(f"{field}={dtype} is not supported; expected one of {[str(d) for d in allowed]}.")
    return dtype


def as_patterns(value: Any, field: str) -> tuple[str, ...]:
    """Module-name patterns from a string or a sequence of strings, each a valid regular expression."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Sequence) or not all(isinstance(v, str) and v for v in value):
        raise TypeError(f"{field} must be a list of module-name patterns (non-empty strings), got {value!r}.")
    for pattern in value:
        # A pattern is also a regular expression; a broken one would silently match by suffix only.
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(
                f"{field} pattern {pattern!r} is not a valid regular expression ({error}); escape special "
                "characters, e.g. 'layers\\.1' or a plain module name such as 'lm_head'."
            ) from None
    return tuple(value)


@dataclass(frozen=True)
class QuantizationConfig:
    """How to quantize a model with bitsandbytes.

    Args:
        bits: 4 (QLoRA: NF4/FP4 with ``Linear4bit``) or 8 (LLM.int8 with ``Linear8bitLt``).
        quant_type: 4-bit data type, ``"nf4"`` (best for normally distributed weights) or ``"fp4"``.
        double_quant: 4-bit only: also quantize the per-block scales (about 0.4 bits per weight less).
        compute_dtype: dtype of the 4-bit matmuls. ``None`` follows the Trainer's precision
            (bf16 -> bfloat16, 16 -> float16), otherwise each layer's own weight dtype, so a
            half-precision model never silently computes in float32.
        quant_storage: dtype the packed 4-bit weights are stored in. Keep ``uint8`` unless a
            sharding strategy needs it to match the other parameters.
        threshold: 8-bit only: outlier threshold of LLM.int8 (activations above it run in 16-bit).
        has_fp16_weights: 8-bit only: keep 16-bit master weights (only for training the base itself).
        skip_modules: module-name patterns kept in full precision *in addition to* the automatic
            ones (tied weights, output embeddings, last module).
        replace_default_skips: if ``True``, ``skip_modules`` replaces the automatic skips. Only for
            users who know the lm_head and tied weights should be quantized too.
        target_modules: if given, only modules matching one of these patterns are quantized.

    A pattern matches a module name from its start up to a ``.`` boundary (``"model.layers.1"``),
    as a regular expression with the same boundary (``"model.layers.*.mlp"``), or as a suffix
    (``"lm_head"``), the same rules as transformers' ``llm_int8_skip_modules``.

    Example::

        QuantizationConfig(bits=4, quant_type="nf4", compute_dtype="bf16", skip_modules=["router"])
    """

    bits: int = 4
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: DTypeLike = None
    quant_storage: DTypeLike = "uint8"
    threshold: float = 6.0
    has_fp16_weights: bool = False
    skip_modules: Sequence[str] = ()
    replace_default_skips: bool = False
    target_modules: Sequence[str] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or self.bits not in (4, 8):
            raise ValueError(f"bits={self.bits!r} is not supported; expected 4 (NF4/FP4) or 8 (LLM.int8).")
        quant_type = self.quant_type.lower() if isinstance(self.quant_type, str) else self.quant_type
        if quant_type not in _QUANT_TYPES:
            raise ValueError(f"quant_type={self.quant_type!r} is not supported; expected 'nf4' or 'fp4'.")
        if (
            not isinstance(self.threshold, (int, float))
            or isinstance(self.threshold, bool)
            or not self.threshold >= 0  # also rejects NaN
        ):
            raise ValueError(
                f"threshold={self.threshold!r} must be a number >= 0 (6.0 is LLM.int8's default)."
            )
        for flag in ("double_quant", "has_fp16_weights", "replace_default_skips"):
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"{flag} must be True or False, got {getattr(self, flag)!r}.")
        set_field = object.__setattr__  # frozen dataclass: normalise once, here
        set_field(self, "quant_type", quant_type)
        set_field(self, "threshold", float(self.threshold))
        set_field(self, "compute_dtype", parse_dtype(self.compute_dtype, "compute_dtype", _COMPUTE_DTYPES))
        set_field(self, "quant_storage", parse_dtype(self.quant_storage, "quant_storage", _STORAGE_DTYPES))
        if self.quant_storage is None:
            raise ValueError(
                "quant_storage=None is not supported; expected a dtype such as 'uint8' (the default)."
            )
        set_field(self, "skip_modules", as_patterns(self.skip_modules, "skip_modules"))
        if self.target_modules is not None:
            targets = as_patterns(self.target_modules, "target_modules")
            if not targets:
                raise ValueError(
                    "target_modules=[] would quantize nothing; leave it None to quantize every linear layer."
                )
            set_field(self, "target_modules", targets)
        if self.replace_default_skips and not self.skip_modules:
            raise ValueError(
                "replace_default_skips=True without skip_modules would quantize the lm_head and tied "
                "weights too; pass the modules to keep in skip_modules, or leave replace_default_skips False."
            )

    def replace(self, **changes: Any) -> QuantizationConfig:
        """A copy with some fields changed, validated again."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_bitsandbytes_config(cls, bnb_config: Any) -> QuantizationConfig:
        """Convert a transformers ``BitsAndBytesConfig`` (object or its ``to_dict()``).

        ``llm_int8_skip_modules`` is *added* to the automatic skips (transformers would replace
        them and quantize the lm_head). A compute dtype is taken as written, float32 included.
        """
        if isinstance(bnb_config, Mapping):
            fields = dict(bnb_config)
        elif hasattr(bnb_config, "to_dict"):
            fields = bnb_config.to_dict()
        else:
            raise TypeError(
                f"expected a transformers BitsAndBytesConfig or a dict, got {type(bnb_config).__name__}."
            )
        load_in_4bit = bool(fields.get("load_in_4bit", False))
        load_in_8bit = bool(fields.get("load_in_8bit", False))
        if load_in_4bit == load_in_8bit:
            raise ValueError(
                "the BitsAndBytesConfig must set exactly one of load_in_4bit=True or load_in_8bit=True, "
                f"got load_in_4bit={load_in_4bit}, load_in_8bit={load_in_8bit}."
            )
        return cls(
            bits=4 if load_in_4bit else 8,
            quant_type=fields.get("bnb_4bit_quant_type", "fp4"),
            double_quant=bool(fields.get("bnb_4bit_use_double_quant", False)),
            compute_dtype=_dtype_field(fields.get("bnb_4bit_compute_dtype")),
            quant_storage=_dtype_field(fields.get("bnb_4bit_quant_storage")) or "uint8",
            threshold=fields.get("llm_int8_threshold", 6.0),
            has_fp16_weights=bool(fields.get("llm_int8_has_fp16_weight", False)),
            skip_modules=fields.get("llm_int8_skip_modules") or (),
        )


def _dtype_field(value: Any) -> DTypeLike:
    return value if value is None or isinstance(value, (str, torch.dtype)) else str(value)


def matmul_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on ``tensor`` runs in here: autocast's, where it is on for the device."""
    device_type = tensor.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else tensor.dtype


def compute_dtype_for_precision(precision: str | None) -> torch.dtype | None:
    """The compute dtype a Trainer precision implies: its half dtype, or ``None`` (the weights' own)."""
    precision = str(precision or "")
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return None
