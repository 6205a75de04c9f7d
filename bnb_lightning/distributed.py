"""Training a quantized model on several devices: which Lightning strategies work, and what each needs.

- **DDP** needs nothing special. Each rank quantizes its own replica on its own device before the
  model is wrapped; the quantized weights are frozen, so DDP leaves them out of its gradient
  buckets, and it broadcasts rank zero's adapters at wrapping, so they start (and stay) equal. What
  must hold is that every rank quantized the *same* base: DDP's initial broadcast would copy rank
  zero's packed weights but not their statistics. :func:`check_same_base_on_all_ranks` says so.
- **FSDP** (Lightning's ``FSDPStrategy``) flattens the parameters of each wrapped unit into one
  tensor of one dtype. 4-bit weights therefore use a floating ``quant_storage`` equal to the dtype
  of the other parameters (:func:`fsdp_quant_storage`), each transformer block and each trainable
  leaf (LoRA ``A``/``B``) is its own unit (:func:`fsdp_auto_wrap_policy`, as PEFT's
  ``fsdp_auto_wrap_policy``), and FSDP's mixed precision must not cast the packed bytes
  (:func:`fsdp_mixed_precision`). LLM.int8 weights (int8 data, row statistics on the layer) cannot
  be flattened: 8-bit is refused.
- **FSDP2** (Lightning's ``ModelParallelStrategy`` with ``tensor_parallel_size=1``) shards each
  parameter on its own, packed ``uint8`` weights included; one unit per block, no gradient memory
  for the frozen base (:mod:`bnb_lightning.fsdp2`). 4-bit only; tensor parallelism is refused (it
  would split packed weights along the rows and columns of the unpacked matrix).
- **Other strategies** (DeepSpeed, XLA) shard or cast parameters their own way, which breaks
  packed bitsandbytes weights: refused with a message.
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn

from .backend import check_device_supported, is_bnb_linear, is_quantized_parameter, statistics_nbytes
from .config import QuantizationConfig, parameter_dtype_for_precision
from .fsdp2 import is_sharded
from .training.blocks import block_class_names

SINGLE_DEVICE, DDP, FSDP, FSDP2 = "single device", "DDP", "FSDP", "FSDP2"

SUPPORTED = (
    "a single device and DDP (strategy='auto', 'ddp', 'ddp_spawn', ...; 4-bit and 8-bit), and FSDP "
    "(strategy='fsdp' or FSDPStrategy(...); 4-bit), and FSDP2 (ModelParallelStrategy(tensor_parallel_size=1, "
    "data_parallel_size=<devices>); 4-bit)"
)

_REFUSED_STRATEGIES = {
    "DeepSpeedStrategy": "DeepSpeed partitions and casts every parameter itself (ZeRO), which breaks the packed "
    "bitsandbytes weights",
}

_FSDP_WRAPPED_PREFIX = "_fsdp_wrapped_module."


def strategy_kind(strategy: Any) -> str:
    """``SINGLE_DEVICE``, ``DDP``, ``FSDP`` or ``FSDP2`` for a Lightning strategy; others raise.

    Raises:
        RuntimeError: the strategy cannot train a bitsandbytes-quantized model; the message says
            why and which strategies can.
    """
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy

    name = type(strategy).__name__
    why = next((reason for refused, reason in _REFUSED_STRATEGIES.items() if _is_a(strategy, refused)), None)
    if why is None:
        # DeepSpeed subclasses DDPStrategy: the refusals above are checked first.
        if isinstance(strategy, FSDPStrategy):
            return FSDP
        if _is_a(strategy, "ModelParallelStrategy"):
            return FSDP2
        if isinstance(strategy, DDPStrategy):
            return DDP
        if isinstance(strategy, SingleDeviceStrategy) and strategy.root_device.type != "xla":
            return SINGLE_DEVICE
        why = "bitsandbytes has no support for how it places or shards parameters"
    raise RuntimeError(
        f"BnbQuantization does not support strategy {name}: {why}. It supports {SUPPORTED}. "
        "Pass one of those to the Trainer, e.g. Trainer(strategy='ddp')."
    )


def _is_a(strategy: Any, class_name: str) -> bool:
    return any(cls.__name__ == class_name for cls in type(strategy).__mro__)


def check_strategy(
    strategy: Any,
    config: QuantizationConfig,
    precision: str,
    adapter_only: bool,
    exports: bool = False,
    offload: bool = False,
    merged_export: bool = False,
) -> str:
    """The strategy's kind (``SINGLE_DEVICE``, ``DDP``, ``FSDP``, ``FSDP2``), once it is known to work with ``config``.

    ``exports``: any export at the end of fit is asked for; ``merged_export``: a merged one is.

    Raises:
        RuntimeError: an unsupported strategy (see :func:`strategy_kind`); under FSDP, sharded
            adapter-only checkpoints, exports at the end of fit, ``precision='16-true'``, or a single
            device; under FSDP2, tensor parallelism, distributed checkpoints, a merged export.
        ValueError: 8-bit under FSDP, or a ``quant_storage`` FSDP cannot flatten with the precision.
    """
    kind = strategy_kind(strategy)
    if kind == FSDP2:
        _check_fsdp2(strategy, config, precision, adapter_only, merged_export)
        return kind
    if kind != FSDP:
        return kind
    if str(precision) == "16-true":
        # The float16 adapters are cast back to float32 when fit starts, after FSDP flattened them.
        raise RuntimeError(
            "BnbQuantization under FSDP does not support precision='16-true': the adapters train in float32, "
            "which FSDP cannot change once it has flattened them to float16. Use precision='bf16-true' (the "
            "usual QLoRA + FSDP setup), 'bf16-mixed' or '32-true'."
        )
    if exports:
        raise RuntimeError(
            "export_adapters_to / export_merged_to are not supported under FSDP yet: rank zero holds only its "
            "shard of the adapters when fit ends. Export from the adapter-only checkpoint after training, on "
            "one device, or train with strategy='ddp'."
        )
    if offload:
        raise RuntimeError(
            "activation_memory='offload' is not supported under FSDP yet (its sharded parameters are gathered and "
            "freed around each block, which the offload has not been checked with). Use 'recompute' with FSDP, or "
            "strategy='ddp'."
        )
    if config.bits == 8:
        raise ValueError(
            "8-bit (LLM.int8) weights cannot be sharded by FSDP: they are int8 with per-row statistics kept "
            "outside the parameter. Use QuantizationConfig(bits=4) with FSDP, or strategy='ddp' for 8-bit."
        )
    check_quant_storage(config, precision, fsdp=True)
    # Lightning loads a sharded checkpoint with torch.distributed.checkpoint, which requires every key of the
    # model, frozen base included, to be in the file; an adapter-only checkpoint leaves the base out.
    if adapter_only and getattr(strategy, "_state_dict_type", "full") == "sharded":
        raise RuntimeError(
            "FSDPStrategy(state_dict_type='sharded') cannot resume from adapter-only checkpoints: Lightning loads "
            "sharded checkpoints strictly, base weights included. Use state_dict_type='full' (the default: rank zero "
            "gathers the state and writes the adapters only)."
        )
    # Checked last, so a configuration with a specific problem hears about that one first.
    if strategy.num_nodes * strategy.num_processes < 2:
        # Found on an H100 and reproduced on CPU with torch's FSDP alone (no quantization needed):
        # torch's fallback for one device (NO_SHARD) fails to reshard a frozen tied weight.
        raise RuntimeError(
            "FSDP on one device shards nothing, and torch's FSDP fails there on tied weights (the lm_head sharing "
            "the embedding: 'as_params=True type(prim_param)=Tensor'). Use the default strategy on one device, "
            "or FSDP on 2 or more devices."
        )
    return kind


def _check_fsdp2(
    strategy: Any,
    config: QuantizationConfig,
    precision: str,
    adapter_only: bool,
    merged_export: bool,
) -> None:
    if strategy._tensor_parallel_size != 1:
        raise RuntimeError(
            f"BnbQuantization under ModelParallelStrategy shards data-parallel only (FSDP2): got "
            f"tensor_parallel_size={strategy._tensor_parallel_size!r}. Tensor parallelism would split the packed "
            "4-bit weights along the unpacked matrix's rows and columns. Use ModelParallelStrategy("
            "data_parallel_size=<devices>, tensor_parallel_size=1)."
        )
    if config.bits == 8:
        raise ValueError(
            "8-bit (LLM.int8) weights cannot be sharded by FSDP2: their row statistics live on the parameter, which "
            "a gathered weight does not carry. Use QuantizationConfig(bits=4) with ModelParallelStrategy, or "
            "strategy='ddp' for 8-bit."
        )
    if str(precision) == "16-true":
        # Found on 2 CPU processes: Adam then steps float32 adapters with float16 gradients.
        raise RuntimeError(
            "BnbQuantization under ModelParallelStrategy does not support precision='16-true': the adapters train "
            "in float32, cast when fit starts, after FSDP2 set up their float16 gradients. Use precision='bf16-true', "
            "'bf16-mixed' or '32-true'."
        )
    if merged_export:
        raise RuntimeError(
            "export_merged_to is not supported under ModelParallelStrategy yet: merging needs the whole quantized "
            "base on one device, which FSDP2 keeps in shards. Export the adapters (export_adapters_to) and merge "
            "them on one device with bnb_lightning.export_merged."
        )
    if adapter_only and getattr(strategy, "_save_distributed_checkpoint", False):
        raise RuntimeError(
            "ModelParallelStrategy(save_distributed_checkpoint=True) (its default) writes and loads every key of "
            "the model, the frozen base included; BnbQuantization writes adapter-only checkpoints. Pass "
            "ModelParallelStrategy(save_distributed_checkpoint=False, ...): rank zero gathers and writes the "
            "adapters only."
        )


def check_quant_storage(config: QuantizationConfig, precision: str, fsdp: bool) -> None:
    """Refuse a floating 4-bit ``quant_storage`` that the precision would cast (the packed bytes with it)."""
    storage, wanted = config.quant_storage, parameter_dtype_for_precision(precision)
    if config.bits != 4 or not storage.is_floating_point or wanted is None or storage == wanted:
        return
    if fsdp:
        raise ValueError(
            f"quant_storage={storage} cannot be sharded by FSDP under precision '{precision}': FSDP flattens each "
            f"block's parameters into one {wanted} tensor. Leave quant_storage unset (BnbQuantization then uses "
            f"{wanted}) or set quant_storage='{str(wanted).removeprefix('torch.')}'."
        )
    raise ValueError(
        f"quant_storage={storage} would be cast to {wanted} by precision '{precision}', corrupting the packed "
        "4-bit weights. Use quant_storage='uint8' or a quant_storage equal to the precision's dtype."
    )


_REFUSED_PRECISION_PLUGINS = {
    "BitsandbytesPrecision": "it quantizes every linear layer itself (the lm_head too); remove the plugin "
    "and let BnbQuantization do the quantization",
    "TransformerEnginePrecision": "it replaces linear layers with Transformer Engine layers; use "
    "precision='bf16-true' or 'bf16-mixed' instead",
    "DoublePrecision": "bitsandbytes does not quantize float64 weights; use precision='32-true', "
    "'bf16-true' or 'bf16-mixed'",
}


def check_trainer(
    trainer: Any,
    config: QuantizationConfig,
    adapter_only: bool,
    exports: bool,
    offload: bool = False,
    merged_export: bool = False,
) -> str:
    """The strategy's kind, once the Trainer's precision plugin, strategy and device work with ``config``.

    Everything here is checked before anything changes, the strategy's needs too (FSDP's mixed
    precision settings are checked now, not when FSDP is configured after quantization).
    """
    plugin = type(trainer.precision_plugin).__name__
    if plugin in _REFUSED_PRECISION_PLUGINS:
        raise RuntimeError(
            f"BnbQuantization cannot work with the {plugin} precision plugin: {_REFUSED_PRECISION_PLUGINS[plugin]}."
        )
    precision = str(trainer.precision)
    kind = check_strategy(
        trainer.strategy,
        config,
        precision,
        adapter_only=adapter_only,
        exports=exports,
        offload=offload,
        merged_export=merged_export,
    )
    check_device_supported(trainer.strategy.root_device)
    check_quant_storage(config, precision, fsdp=kind == FSDP)
    if kind == FSDP:
        fsdp_mixed_precision(trainer.strategy, config.quant_storage)
    return kind


def fsdp_quant_storage(model: nn.Module, precision: str) -> torch.dtype:
    """The ``quant_storage`` FSDP can flatten together with ``model``'s other parameters.

    That is the dtype they will have when FSDP wraps the model: the precision's half dtype under
    ``bf16-true`` / ``16-true``, otherwise the most common floating dtype of ``model``'s
    parameters (float32 for a model built in float32).
    """
    wanted = parameter_dtype_for_precision(precision)
    if wanted is not None:
        return wanted
    dtypes = Counter(p.dtype for p in model.parameters() if p.dtype.is_floating_point)
    return dtypes.most_common(1)[0][0] if dtypes else torch.float32


def config_for_fsdp(config: QuantizationConfig, model: nn.Module, precision: str) -> QuantizationConfig:
    """``config`` with the ``quant_storage`` FSDP needs; the default ``uint8`` is replaced.

    Raises:
        ValueError: the user set a floating ``quant_storage`` other than the one FSDP needs.
    """
    storage = fsdp_quant_storage(model, precision)
    if config.quant_storage == torch.uint8:
        return config.replace(quant_storage=storage)
    if config.quant_storage != storage:
        raise ValueError(
            f"quant_storage={config.quant_storage} cannot be sharded by FSDP together with the model's {storage} "
            f"parameters: FSDP flattens each block into one tensor of one dtype. Leave quant_storage unset "
            f"(BnbQuantization then uses {storage}) or set quant_storage='{str(storage).removeprefix('torch.')}'."
        )
    return config


def _wrap_as_unit(module: nn.Module, block_names: frozenset[str]) -> bool:
    if type(module).__name__ in block_names:
        return True
    # A trainable leaf (a LoRA A or B): its own unit, so its float parameters are sharded apart from the
    # frozen block around it and may have another dtype (float32 adapters on a half base).
    weight = getattr(module, "weight", None)
    return next(module.children(), None) is None and isinstance(weight, nn.Parameter) and weight.requires_grad


def fsdp_auto_wrap_policy(model: nn.Module) -> Any:
    """An FSDP ``auto_wrap_policy``: one unit per transformer block and one per trainable leaf module.

    Quantized weights are sharded with the rest of their block; what is left (embeddings, final norm,
    lm_head) goes to the root unit. Like PEFT's ``fsdp_auto_wrap_policy``, for models quantized here.
    """
    from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

    names = frozenset(block_class_names(model))
    return functools.partial(
        lambda_auto_wrap_policy, lambda_fn=functools.partial(_wrap_as_unit, block_names=names)
    )


def fsdp_mixed_precision(strategy: Any, storage: torch.dtype) -> Any | None:
    """A ``MixedPrecision`` for ``strategy`` that leaves packed weights alone, or ``None`` if its own does.

    Lightning derives FSDP's mixed precision from the Trainer's precision; under ``*-mixed`` it
    casts every parameter to half for the forward, packed bytes included. Then parameters keep
    their dtype (autocast does the half compute) and only gradients are reduced in half.

    Raises:
        ValueError: the user passed ``FSDPStrategy(mixed_precision=...)`` with a ``param_dtype``
            that would cast the packed weights.
    """
    from torch.distributed.fsdp import MixedPrecision

    current = strategy.mixed_precision_config
    if current is None or current.param_dtype in (None, storage):
        return None
    if strategy.mixed_precision is not None:
        raise ValueError(
            f"FSDPStrategy(mixed_precision=MixedPrecision(param_dtype={current.param_dtype})) would cast the packed "
            f"4-bit weights (stored as {storage}) and corrupt them. Use param_dtype=None or {storage}, or leave "
            "mixed_precision unset."
        )
    return MixedPrecision(param_dtype=None, reduce_dtype=current.reduce_dtype, buffer_dtype=None)


def _give_weight_view_its_quant_state(layer: nn.Module, args: tuple) -> None:
    if getattr(layer.weight, "quant_state", None) is None:
        layer.weight.quant_state = layer.quant_state


def share_quant_state_with_weight_views(model: nn.Module) -> int:
    """Let every 4-bit layer of ``model`` run on the weight views FSDP gives it; returns how many.

    FSDP replaces each weight with a plain view of its flat parameter, without the ``quant_state``
    attribute. bitsandbytes' forward would then re-register a new ``Params4bit`` as the weight, which
    FSDP (``use_orig_params=True``, Lightning's default) rejects. A forward pre-hook hands the view the
    quant state bitsandbytes keeps on the module, so its own forward runs unchanged.
    """
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.register_forward_pre_hook(_give_weight_view_its_quant_state)
    return len(layers)


def configure_fsdp(strategy: Any, model: nn.Module, config: QuantizationConfig, adapter_only: bool) -> None:
    """Set what ``strategy`` (an ``FSDPStrategy``) needs to wrap the quantized ``model``, before it does.

    The auto-wrap policy of :func:`fsdp_auto_wrap_policy`, unless the user passed one; a mixed
    precision that keeps the packed weights (:func:`fsdp_mixed_precision`); and, for adapter-only
    checkpoints, ``strict_loading=False`` on the LightningModule, as Lightning documents for
    checkpoints holding only part of a model (FSDP loads them before any hook could add the base).
    """
    if strategy.kwargs.get("auto_wrap_policy") is None:
        strategy.kwargs["auto_wrap_policy"] = fsdp_auto_wrap_policy(model)
        blocks = ", ".join(sorted(block_class_names(model))) or "YourBlockClass"
        # On two GPUs the block-class policy trained faster at more memory (benchmarks/RESULTS.md).
        rank_zero_info(
            "bnb_lightning: FSDP wraps each transformer block and each trainable (LoRA) module as a unit, which "
            f"needs the least memory per GPU. FSDPStrategy(auto_wrap_policy={{{blocks}}}) trains faster but "
            "allocates gradient memory for the frozen base; see benchmarks/RESULTS.md, Two GPUs."
        )
    share_quant_state_with_weight_views(model)
    mixed_precision = fsdp_mixed_precision(strategy, config.quant_storage)
    if mixed_precision is not None:
        strategy.mixed_precision = mixed_precision
    if adapter_only:
        model.strict_loading = False


def base_memory_for(strategy: Any, model: nn.Module) -> BaseMemory:
    """:func:`base_memory` of ``model`` under a Lightning ``strategy``."""
    kind = strategy_kind(strategy)
    devices = getattr(strategy, "world_size", 1)
    shards = 1
    if kind == FSDP:
        shards = fsdp_shard_count(strategy)
    elif kind == FSDP2:
        shards = strategy._data_parallel_size
    return base_memory(model, kind, devices, shards)


def unwrapped_name(name: str) -> str:
    """A parameter name as the model had it before FSDP wrapped some of its modules."""
    return name.replace(_FSDP_WRAPPED_PREFIX, "")


def is_fsdp_wrapped(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return any(isinstance(m, FullyShardedDataParallel) for m in module.modules())


@dataclass(frozen=True)
class BaseMemory:
    """Bytes of the frozen base (quantized weights, their statistics, frozen full-precision parameters)."""

    strategy: str
    devices: int
    shards: int
    sharded_bytes: int
    replicated_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.sharded_bytes + self.replicated_bytes

    @property
    def per_device_bytes(self) -> int:
        """What each device holds at rest: its share of the sharded bytes plus the replicated ones."""
        return -(-self.sharded_bytes // self.shards) + self.replicated_bytes

    def __str__(self) -> str:
        from .report import _format_bytes

        total = _format_bytes(self.total_bytes)
        each = _format_bytes(self.per_device_bytes)
        if self.shards == 1:
            where = (
                "on the device"
                if self.devices == 1
                else f"on each of {self.devices} devices ({self.strategy})"
            )
            return f"bnb_lightning: frozen base weights {total} {where}."
        return (
            f"bnb_lightning: frozen base weights {total} in all, about {each} per device under {self.strategy} over "
            f"{self.devices} devices ({_format_bytes(self.sharded_bytes)} sharded {self.shards} ways, "
            f"{_format_bytes(self.replicated_bytes)} of 4-bit statistics on every device), plus one block "
            "gathered at a time."
        )


def base_memory(
    model: nn.Module, strategy: str = SINGLE_DEVICE, devices: int = 1, shards: int = 1
) -> BaseMemory:
    """Expected memory of ``model``'s frozen base per device, before FSDP wraps it.

    Under FSDP and FSDP2 the frozen parameters (packed weights included) are sharded ``shards`` ways; the
    4-bit statistics (absmax, code) live on the layer, outside any parameter, so every device has
    them all. Under DDP and on a single device each device holds everything.
    """
    sharded = replicated = 0
    for parameter in model.parameters():
        if not parameter.requires_grad:
            sharded += parameter.numel() * parameter.element_size()  # a DTensor's numel is its whole size
    for module in model.modules():
        if is_bnb_linear(module) and (is_quantized_parameter(module.weight) or is_sharded(module)):
            replicated += statistics_nbytes(module)
    return BaseMemory(strategy, devices, shards if strategy in (FSDP, FSDP2) else 1, sharded, replicated)


def fsdp_shard_count(strategy: Any) -> int:
    """How many ways FSDP splits each parameter: the world size, one node's devices under hybrid sharding."""
    from torch.distributed.fsdp import ShardingStrategy

    sharding = strategy.sharding_strategy
    if sharding == ShardingStrategy.NO_SHARD:
        return 1
    if sharding in (ShardingStrategy.HYBRID_SHARD, ShardingStrategy._HYBRID_SHARD_ZERO2):
        return strategy.num_processes
    return strategy.world_size


def check_same_base_on_all_ranks(strategy: Any, fingerprint: str) -> None:
    """Fail on every rank if the ranks quantized different base weights.

    Raises:
        RuntimeError: some rank's base fingerprint differs from rank zero's.
    """
    if getattr(strategy, "world_size", 1) <= 1:
        return
    reference = strategy.broadcast(fingerprint, src=0)
    if not strategy.reduce_boolean_decision(fingerprint == reference, all=True):
        raise RuntimeError(
            "the ranks quantized different base weights (base fingerprints differ from rank zero's). DDP and FSDP "
            "need the same model on every rank: seed the model's initialization the same way on all ranks "
            "(lightning.seed_everything(...) before building it) or load the same pretrained weights."
        )
