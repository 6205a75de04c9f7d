"""`QuantizationConfig`: what to quantize and how, validated once, immutable afterwards."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
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


# Fields that apply to one bit width only, with their defaults there. Left unset (None), a field of
# the other width stays None, so a config says what it does and an option that would do nothing is refused.
FOUR_BIT_DEFAULTS: dict[str, Any] = {"quant_type": "nf4", "double_quant": True, "quant_storage": "uint8"}
EIGHT_BIT_DEFAULTS: dict[str, Any] = {"threshold": 6.0, "has_fp16_weights": False}
# compute_dtype is 4-bit only too, but its default is None (it follows the precision).
_FIELDS_OF_BITS = {4: (*FOUR_BIT_DEFAULTS, "compute_dtype"), 8: tuple(EIGHT_BIT_DEFAULTS)}


@dataclass(frozen=True)
class QuantizationConfig:
    """How to quantize a model with bitsandbytes.

    Args:
        bits: 4 (QLoRA: NF4/FP4 with ``Linear4bit``) or 8 (LLM.int8 with ``Linear8bitLt``).
        quant_type: 4-bit only: the data type, ``"nf4"`` (default; best for normally distributed
            weights) or ``"fp4"``.
        double_quant: 4-bit only: also quantize the per-block scales (about 0.4 bits per weight
            less). Default ``True``.
        compute_dtype: 4-bit only: dtype of the 4-bit matmuls. ``None`` follows the Trainer's
            precision (bf16 -> bfloat16, 16 -> float16), otherwise each layer's own weight dtype, so a
            half-precision model never silently computes in float32. (8-bit layers compute in the
            dtype of their input.)
        quant_storage: 4-bit only: dtype the packed weights are stored in. Default ``uint8``; keep it
            unless a sharding strategy needs it to match the other parameters.
        threshold: 8-bit only: outlier threshold of LLM.int8 (activations above it run in 16-bit).
            Default 6.0.
        has_fp16_weights: 8-bit only: keep 16-bit master weights (only for training the base
            itself). Default ``False``.
        skip_modules: module-name patterns kept in full precision *in addition to* the automatic
            ones (tied weights, output embeddings, last module).
        replace_default_skips: if ``True``, ``skip_modules`` replaces the automatic skips. Only for
            users who know the lm_head and tied weights should be quantized too.
        target_modules: if given, only modules matching one of these patterns are quantized.

    The options of one bit width are ``None`` in a config of the other, and setting one there is
    refused: it would do nothing.

    A pattern matches a module name from its start up to a ``.`` boundary (``"model.layers.1"``),
    as a regular expression with the same boundary (``"model.layers.*.mlp"``), or as a suffix
    (``"lm_head"``), the same rules as transformers' ``llm_int8_skip_modules``.

    Example::

        QuantizationConfig(bits=4, quant_type="nf4", compute_dtype="bf16", skip_modules=["router"])
    """

    bits: int = 4
    quant_type: str | None = None
    double_quant: bool | None = None
    compute_dtype: DTypeLike = None
    quant_storage: DTypeLike = None
    threshold: float | None = None
    has_fp16_weights: bool | None = None
    skip_modules: Sequence[str] = ()
    replace_default_skips: bool = False
    target_modules: Sequence[str] | None = None

    def __post_init__(self) -> None:
        if type(self.bits) is not int or self.bits not in (4, 8):
            raise ValueError(
                f"bits={self.bits!r} is not supported; expected 4 (NF4/FP4) or 8 (LLM.int8), as an int."
            )
        other = 8 if self.bits == 4 else 4
        for name in _FIELDS_OF_BITS[other]:
            if getattr(self, name) is not None:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} applies to {other}-bit quantization only, and this config "
                    f"has bits={self.bits}, so it would do nothing. Remove {name}, or set bits={other}."
                )
        set_field = object.__setattr__  # frozen dataclass: normalise once, here
        defaults = FOUR_BIT_DEFAULTS if self.bits == 4 else EIGHT_BIT_DEFAULTS
        for name, default in defaults.items():
            if getattr(self, name) is None:
                set_field(self, name, default)
        if self.bits == 4:
            self._normalise_4bit_fields()
        else:
            self._normalise_8bit_fields()
        set_field(self, "skip_modules", as_patterns(self.skip_modules, "skip_modules"))
        if self.target_modules is not None:
            targets = as_patterns(self.target_modules, "target_modules")
            if not targets:
                raise ValueError(
                    "target_modules=[] would quantize nothing; leave it None to quantize every linear layer."
                )
            set_field(self, "target_modules", targets)
        if not isinstance(self.replace_default_skips, bool):
            raise TypeError(
                f"replace_default_skips must be True or False, got {self.replace_default_skips!r}."
            )
        if self.replace_default_skips and not self.skip_modules:
            raise ValueError(
                "replace_default_skips=True without skip_modules would quantize the lm_head and tied "
                "weights too; pass the modules to keep in skip_modules, or leave replace_default_skips False."
            )

    def _normalise_4bit_fields(self) -> None:
        quant_type = self.quant_type.lower() if isinstance(self.quant_type, str) else self.quant_type
        if quant_type not in _QUANT_TYPES:
            raise ValueError(f"quant_type={self.quant_type!r} is not supported; expected 'nf4' or 'fp4'.")
        if not isinstance(self.double_quant, bool):
            raise TypeError(f"double_quant must be True or False, got {self.double_quant!r}.")
        object.__setattr__(self, "quant_type", quant_type)
        object.__setattr__(
            self, "compute_dtype", parse_dtype(self.compute_dtype, "compute_dtype", _COMPUTE_DTYPES)
        )
        object.__setattr__(
            self, "quant_storage", parse_dtype(self.quant_storage, "quant_storage", _STORAGE_DTYPES)
        )

    def _normalise_8bit_fields(self) -> None:
        if (
            not isinstance(self.threshold, (int, float))
            or isinstance(self.threshold, bool)
            or not self.threshold >= 0  # also rejects NaN
        ):
            raise ValueError(
                f"threshold={self.threshold!r} must be a number >= 0 (6.0 is LLM.int8's default)."
            )
        if not isinstance(self.has_fp16_weights, bool):
            raise TypeError(f"has_fp16_weights must be True or False, got {self.has_fp16_weights!r}.")
        object.__setattr__(self, "threshold", float(self.threshold))

    def replace(self, **changes: Any) -> QuantizationConfig:
        """A copy with some fields changed, validated again.

        Changing ``bits`` drops the options of the old bit width (unless ``changes`` sets them), so
        ``QuantizationConfig().replace(bits=8)`` is the 8-bit default.
        """
        if changes.get("bits", self.bits) != self.bits:
            for name in _FIELDS_OF_BITS.get(self.bits, ()):
                changes.setdefault(name, None)
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_bitsandbytes_config(cls, bnb_config: Any) -> QuantizationConfig:
        """Convert a transformers ``BitsAndBytesConfig`` (object or its ``to_dict()``).

        ``llm_int8_skip_modules`` is *added* to the automatic skips (transformers would replace
        them and quantize the lm_head). A compute dtype is taken as written, float32 included.
        The options of the other bit width, which transformers always writes and ignores, are
        ignored here too.
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
            got = "both" if load_in_4bit else "neither"
            raise ValueError(
                "the BitsAndBytesConfig must set exactly one of load_in_4bit=True (4-bit, QLoRA) or "
                f"load_in_8bit=True (LLM.int8), got {got}: set the one you want."
            )
        skip_modules = fields.get("llm_int8_skip_modules") or ()
        if load_in_8bit:
            return cls(
                bits=8,
                threshold=fields.get("llm_int8_threshold", 6.0),
                has_fp16_weights=bool(fields.get("llm_int8_has_fp16_weight", False)),
                skip_modules=skip_modules,
            )
        return cls(
            bits=4,
            quant_type=fields.get("bnb_4bit_quant_type", "fp4"),
            double_quant=bool(fields.get("bnb_4bit_use_double_quant", False)),
            compute_dtype=_dtype_field(fields.get("bnb_4bit_compute_dtype")),
            quant_storage=_dtype_field(fields.get("bnb_4bit_quant_storage")) or "uint8",
            skip_modules=skip_modules,
        )


def _from_fields(cls: type, fields: Mapping[str, Any], argument: str, alternatives: str = "") -> Any:
    """``cls(**fields)``, with a message naming unknown fields (and the closest known ones) and the
    fix for LightningCLI's ``class_path``/``init_args`` form."""
    names = {field.name for field in dataclasses.fields(cls)}
    if {"class_path", "init_args"} & set(fields):
        raise TypeError(
            f"{argument} got {dict(fields)!r}: a class_path/init_args dict is LightningCLI's YAML form, which the "
            f"CLI turns into an object. In Python, pass the object: {cls.__name__}(**init_args), or the init_args "
            "dict itself."
        )
    unknown = sorted(str(key) for key in set(fields) - names)
    if unknown:
        hints = "; ".join(
            f"{key!r}"
            + (
                f" (did you mean {match[0]!r}?)"
                if (match := difflib.get_close_matches(key, names, 1))
                else ""
            )
            for key in unknown
        )
        raise TypeError(
            f"{argument} has unknown fields {hints}. A {argument} dict holds the fields of {cls.__name__} "
            f"({', '.join(sorted(names))}){alternatives}."
        )
    return cls(**fields)


_BNB_KEY_PREFIXES = ("load_in_", "bnb_4bit_", "llm_int8_")


def as_quantization_config(config: Any) -> QuantizationConfig:
    """Our config from what users pass: a ``QuantizationConfig``, its fields as a dict, or a
    transformers ``BitsAndBytesConfig`` (object or dict); ``None`` gives the default (NF4).

    Raises:
        TypeError: anything else, or a dict that is neither, with what it looks like and the fix.
    """
    if config is None:
        return QuantizationConfig()
    if isinstance(config, QuantizationConfig):
        return config
    if isinstance(config, Mapping):
        if any(str(key).startswith(_BNB_KEY_PREFIXES) for key in config):
            return QuantizationConfig.from_bitsandbytes_config(config)
        return _from_fields(
            QuantizationConfig,
            config,
            "config",
            " or those of a transformers BitsAndBytesConfig (load_in_4bit, ...)",
        )
    if hasattr(config, "to_dict") and type(config).__name__ == "BitsAndBytesConfig":
        return QuantizationConfig.from_bitsandbytes_config(config)
    raise TypeError(
        f"quantization config must be a bnb_lightning.QuantizationConfig, a transformers BitsAndBytesConfig or a "
        f"dict of either's fields, got {type(config).__name__} ({config!r})."
    )


def check_block_count(count: Any, checkpointing: bool) -> None:
    """Refuse a ``count`` that is no number of blocks, or that asks for blocks without checkpointing."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"uncheckpointed_blocks must be an int >= 0, got {count!r}.")
    if count and not checkpointing:
        raise ValueError(
            f"uncheckpointed_blocks={count} only applies with gradient checkpointing on; "
            "pass gradient_checkpointing=True, or uncheckpointed_blocks=0."
        )


@dataclass(frozen=True)
class TrainingOptions:
    """How a quantized model trains: the switches of its preparation, validated once, immutable.

    Args:
        gradient_checkpointing: ``True``/``False`` checkpoints every transformer block or none
            (always non-reentrant), instead of ``activation_memory``'s planner; ``None`` (default):
            ``activation_memory`` decides.
        uncheckpointed_blocks: overrides the planner: the last this many transformer blocks keep
            their activations, the others are recomputed. 0 (default): the planner decides.
        upcast_to_float32: cast full-precision half parameters (norms, embeddings, adapters) to
            float32, like PEFT's ``prepare_model_for_kbit_training``. Off by default: it costs speed
            and memory.
        compile_blocks: ``torch.compile`` each transformer block. ``None`` (default): on for a CUDA
            device, off on the CPU and for 8-bit with ``dequantize_int8=False`` (the callback also
            turns it off under FSDP; DDP and FSDP2 compile).
        chunked_loss: compute a transformers causal LM's training loss chunk by chunk, without
            materializing the logits (see :func:`bnb_lightning.use_chunked_loss`).
        loss_kernel: which kernel computes the chunked loss. ``"auto"`` (default): Liger-Kernel's
            fused linear cross-entropy on a CUDA device where ``liger-kernel`` is installed (0.6x the
            torch kernel's time from 16k tokens on an H200), else the torch kernel; ``"liger"``: Liger's, an error
            without it; ``"torch"``: the torch kernel everywhere.
        dequantize_int8: train 8-bit layers through their dequantized weight in the compute dtype
            (see :func:`bnb_lightning.use_dequantized_int8`) instead of LLM.int8's matmul.
        fuse_4bit_dequantize: in compiled blocks, 4-bit layers dequantize in plain torch ops fused
            into the block's graph (see :func:`bnb_lightning.use_fused_4bit_dequantize`).
        activation_memory: where each transformer block's activations live between the forward and
            the backward pass, chosen per block by a planner (see :func:`bnb_lightning.plan_activations`).
            ``"auto"`` (default): fit the memory this process may use on the device, measured on the
            first training batch (and again on any longer one): keep as many blocks' activations as
            fit (fastest), recompute the others from their inputs, offload inputs to CPU memory and
            tile MLPs over the sequence when recomputing alone does not fit. On transformers' SDPA
            attention an offloaded block's attention output waits in CPU memory too and is not
            recomputed, which makes offloading faster than recomputing: the blocks not kept are then
            offloaded while host memory lasts (each process on the host planning with its share). A
            size (``"24GB"``, ``"20GiB"``, or bytes): the same, for that budget. Or explicit:
            ``"keep"`` (no checkpointing), ``"recompute"`` (checkpoint every block), ``"offload"``
            (checkpoint every block, its input, and attention output where it can, in CPU memory), or
            a list with one of these per block. On a batch whose offloaded inputs the host cannot
            hold, explicit modes raise ``MemoryError``; where it cannot hold their attention outputs
            too, those are recomputed.
            ``gradient_checkpointing=True/False`` is the same as ``"recompute"``/``"keep"``. A plan that
            recomputes or offloads turns on CUDA's expandable segments (less fragmentation), unless
            ``PYTORCH_ALLOC_CONF`` is set.

    Example::

        TrainingOptions(gradient_checkpointing=True, uncheckpointed_blocks=4)
    """

    gradient_checkpointing: bool | None = None
    uncheckpointed_blocks: int = 0
    upcast_to_float32: bool = False
    compile_blocks: bool | None = None
    chunked_loss: bool = True
    loss_kernel: str = "auto"
    dequantize_int8: bool = True
    fuse_4bit_dequantize: bool = True
    activation_memory: str | int | tuple[str, ...] = "auto"

    def __post_init__(self) -> None:
        for name in ("gradient_checkpointing", "compile_blocks"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True, False or None, got {getattr(self, name)!r}.")
        for name in ("upcast_to_float32", "chunked_loss", "dequantize_int8", "fuse_4bit_dequantize"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}.")
        check_loss_kernel(self.loss_kernel)
        object.__setattr__(self, "activation_memory", check_activation_memory(self.activation_memory))
        _check_activation_options(self)
        check_block_count(self.uncheckpointed_blocks, checkpointing=self.checkpointing is not False)

    @property
    def checkpointing(self) -> bool | None:
        """Whether blocks may be checkpointed: ``gradient_checkpointing``, or what ``activation_memory`` implies."""
        if self.gradient_checkpointing is not None:
            return self.gradient_checkpointing
        modes = self.activation_memory
        if isinstance(modes, str) and modes in ACTIVATION_MODES:
            modes = (modes,)
        return not (isinstance(modes, tuple) and all(mode == "keep" for mode in modes))

    def replace(self, **changes: Any) -> TrainingOptions:
        """A copy with some fields changed, validated again."""
        return dataclasses.replace(self, **changes)


LOSS_KERNELS = ("auto", "liger", "torch")


def check_loss_kernel(kernel: str) -> str:
    if kernel not in LOSS_KERNELS:
        raise ValueError(
            f"loss_kernel={kernel!r} is not understood; expected 'auto' (Liger-Kernel's fused linear "
            "cross-entropy on CUDA where it is installed), 'liger' (always; fail without it) or 'torch'."
        )
    return kernel


ACTIVATION_MODES = ("keep", "recompute", "offload")
_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([kmgt]i?b|b)\s*$", re.IGNORECASE)


def format_bytes(size: int | None) -> str:
    if size is None:
        return "an unknown amount"
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def check_activation_memory(value: Any) -> str | int | tuple[str, ...]:
    """``value`` as the planner takes it: ``"auto"``, a mode, a budget in bytes, or a tuple of modes."""
    expected = (
        "expected 'auto', a memory budget such as '24GB', '20GiB' or a number of bytes, one of 'keep', "
        "'recompute', 'offload' for every block, or a list with one of those per block"
    )
    if isinstance(value, str):
        if value in ("auto", *ACTIVATION_MODES):
            return value
        match = _SIZE.match(value)
        if match is None:
            raise ValueError(f"activation_memory={value!r} is not understood; {expected}.")
        value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if isinstance(value, (list, tuple)):
        unknown = [mode for mode in value if mode not in ACTIVATION_MODES]
        if unknown or not value:
            raise ValueError(f"activation_memory={list(value)!r} has unknown modes {unknown!r}; {expected}.")
        return tuple(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"activation_memory={value!r} is not understood; {expected}.")
    if value < 2**20:
        raise ValueError(
            f"activation_memory={value!r} is a budget of {value} bytes, less than 1 MiB: too small for any model. "
            "Give the budget for the whole process on the device, e.g. '24GB'."
        )
    return value


def _check_activation_options(options: TrainingOptions) -> None:
    memory = options.activation_memory
    if options.gradient_checkpointing is not None and memory != "auto":
        raise ValueError(
            f"activation_memory={memory!r} and gradient_checkpointing={options.gradient_checkpointing!r} both say "
            "whether blocks are checkpointed; set one of them (gradient_checkpointing=False is "
            "activation_memory='keep', True is 'recompute')."
        )
    if options.uncheckpointed_blocks and memory not in ("auto", "recompute"):
        raise ValueError(
            f"uncheckpointed_blocks={options.uncheckpointed_blocks} keeps the last blocks' activations and "
            f"recomputes the others, which activation_memory={memory!r} says otherwise; pass one or the other "
            "(a list of modes, one per block, says both)."
        )


def as_training_options(options: Any, **switches: Any) -> TrainingOptions:
    """``TrainingOptions`` from what users pass: the object, a dict of its fields, or ``None`` (defaults).

    ``switches`` are the same fields passed one by one (``None``: not given), as the callback's flat
    keyword arguments and LightningCLI's flat YAML give them; they go either there or in ``options``.
    """
    given = {name: value for name, value in switches.items() if value is not None}
    if given:
        if options is not None:
            raise TypeError(
                "training switches go either in options= or as keyword arguments, not both; got options and "
                f"{', '.join(f'{name}={value!r}' for name, value in given.items())}. Move them into options."
            )
        return TrainingOptions(**given)
    if options is None:
        return TrainingOptions()
    if isinstance(options, TrainingOptions):
        return options
    if isinstance(options, Mapping):
        return _from_fields(TrainingOptions, options, "options")
    raise TypeError(
        f"options must be a bnb_lightning.TrainingOptions or a dict of its fields, got {type(options).__name__} "
        f"({options!r})."
    )


def check_flag(name: str, value: Any) -> bool:
    """``value``, once it is a bool."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}.")
    return value


def check_directory(name: str, value: Any) -> str | os.PathLike | None:
    """``value``, once it is a directory path or ``None``."""
    if value is not None and not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a directory path or None, got {value!r}.")
    return value


def check_merge_tolerance(value: Any) -> float | None:
    """``value``, once it is a finite number >= 0 or ``None`` (the largest accepted max |logits difference|)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            "merge_tolerance must be a number (the largest accepted max |logits difference|) or None, "
            f"got {type(value).__name__} {value!r}; write e.g. merge_tolerance=0.1."
        )
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(
            f"merge_tolerance={value!r} must be a finite number >= 0, or None (the default: 5% of the largest |logit|)."
        )
    return value


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


def parameter_dtype_for_precision(precision: str | None) -> torch.dtype | None:
    """The dtype a ``*-true`` precision converts parameters to; ``None`` where they keep their own."""
    return {"bf16-true": torch.bfloat16, "16-true": torch.float16}.get(str(precision))
