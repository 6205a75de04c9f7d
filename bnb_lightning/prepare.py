"""Preparing a model for QLoRA training: :func:`prepare_model`, the whole setup in its order, and its steps.

Unlike PEFT's ``prepare_model_for_kbit_training``, nothing is upcast to float32 by default:
norms and embeddings stay in the model's dtype, which keeps training at half-precision speed.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .adapters import adapter_root, check_peft_config, inject_checked_adapters
from .backend import is_quantized_parameter
from .config import (
    QuantizationConfig,
    TrainingOptions,
    as_quantization_config,
    as_training_options,
    compute_dtype_for_precision,
)
from .io.checkpoint import base_fingerprint, frozen_state_keys
from .quantize import quantize_model, quantized_with
from .report import QuantizationReport
from .restore import restore_point
from .training.blocks import (
    check_gradient_checkpointing,
    check_uncheckpointed_blocks,
    checkpointable_blocks,
    checkpointing_enabled,
    compile_blocks,
    set_checkpointing,
    transformers_models,
    wants_checkpointing,
    will_checkpoint,
)
from .training.int8 import use_dequantized_int8
from .training.liger import uses_liger
from .training.linear4bit import use_fused_4bit_dequantize
from .training.loss import use_chunked_loss
from .training.plan import ActivationPlanner, local_world_size, plan_activations, setting_for


@dataclass(frozen=True)
class ParameterCount:
    trainable: int
    total: int

    def __str__(self) -> str:
        share = 100 * self.trainable / self.total if self.total else 0.0
        return f"trainable parameters: {self.trainable:,} of {self.total:,} ({share:.4f}%)"


def _logical_numel(parameter: torch.Tensor) -> int:
    # A packed 4-bit weight holds two values per byte; count the weights it stands for.
    quant_state = getattr(parameter, "quant_state", None)
    if quant_state is not None and getattr(quant_state, "shape", None) is not None:
        return math.prod(quant_state.shape)
    return parameter.numel()


def count_parameters(model: nn.Module) -> ParameterCount:
    """Trainable and total parameters, counting each quantized weight by its unpacked size."""
    parameters = list(model.parameters())
    return ParameterCount(
        trainable=sum(_logical_numel(p) for p in parameters if p.requires_grad),
        total=sum(_logical_numel(p) for p in parameters),
    )


def cast_to_float32(model: nn.Module, trainable_only: bool = False) -> None:
    """Cast half-precision parameters that are not quantized to float32, keeping the Parameter objects."""
    for parameter in model.parameters():
        if trainable_only and not parameter.requires_grad:
            continue
        if not is_quantized_parameter(parameter) and parameter.dtype in (torch.float16, torch.bfloat16):
            parameter.data = parameter.data.float()


def cast_for_training(model: nn.Module, precision: str | None, upcast_to_float32: bool = False) -> None:
    """Put what trains in float32, except under ``"bf16-true"``; with ``upcast_to_float32``, all that is not quantized.

    Optimizer steps on half-precision parameters lose small updates (bfloat16) or turn to NaN
    (float16, where Adam's eps underflows): what trains is float32, as in PEFT. ``"bf16-true"`` asks
    for bfloat16 throughout, and gets it.
    """
    if upcast_to_float32:
        cast_to_float32(model)
    elif str(precision) != "bf16-true":
        cast_to_float32(model, trainable_only=True)


def prepare_for_kbit_training(
    model: nn.Module,
    gradient_checkpointing: bool | None = None,
    upcast_to_float32: bool = False,
    uncheckpointed_blocks: int = 0,
) -> bool:
    """Get a quantized model ready for adapter training, without the float32 upcast.

    Args:
        model: the quantized model (a LightningModule, a transformers model, any ``nn.Module``).
        gradient_checkpointing: ``True`` turns it on for the transformers models inside ``model``,
            ``False`` turns it off, ``None`` keeps the user's choice. When on, it is made
            non-reentrant, and the input embeddings' output requires grad so the frozen base
            still passes gradients to the adapters.
        upcast_to_float32: cast the full-precision half parameters (norms, embeddings) to float32,
            as PEFT's ``prepare_model_for_kbit_training`` does. Slower and larger; off by default.
        uncheckpointed_blocks: with checkpointing on, the last this many blocks keep their
            activations for the backward pass instead of recomputing their forward: faster, at the
            memory of those activations. 0 (default) checkpoints every block.

    Returns:
        Whether gradient checkpointing is on.
    """
    check_gradient_checkpointing(model, gradient_checkpointing)
    roots = transformers_models(model)
    wanted = {id(hf_model): wants_checkpointing(hf_model, gradient_checkpointing) for hf_model in roots}
    checkpointing = any(wanted.values())
    # Checked before anything changes, so a refused call leaves the model as it was.
    check_uncheckpointed_blocks(model, uncheckpointed_blocks, checkpointing)
    if upcast_to_float32:
        cast_to_float32(model)
    for hf_model in roots:
        if wanted[id(hf_model)]:
            set_checkpointing(hf_model, True)
            # The frozen base gives activations that need no grad; the adapters behind them do.
            hf_model.enable_input_require_grads()
        elif checkpointing_enabled(hf_model):
            set_checkpointing(hf_model, False)
    if uncheckpointed_blocks:
        for block in checkpointable_blocks(model)[-uncheckpointed_blocks:]:
            block.gradient_checkpointing = False
    return checkpointing


@dataclass
class PreparedModel:
    """What :func:`prepare_model` did to a model: the quantization and every decision after it.

    ``config`` and ``options`` are the ones applied (compute dtype and compile decision resolved);
    ``frozen_keys`` and ``fingerprint`` identify the frozen base, as adapter-only checkpoints record it.
    """

    model: nn.Module
    config: QuantizationConfig
    options: TrainingOptions
    report: QuantizationReport
    frozen_keys: set[str] = dataclasses.field(default_factory=set)
    fingerprint: str = ""
    checkpointing: bool = False
    adapters: nn.Module | None = None
    dequantized_int8_layers: int = 0
    fused_4bit_layers: int = 0
    chunked_loss: list[str] = dataclasses.field(default_factory=list)
    liger_loss: bool = False
    compiled_blocks: int = 0
    activations: ActivationPlanner | None = None

    def messages(self) -> list[str]:
        """One line for each decision, as the callback logs them after the quantization report."""
        lines = []
        if self.dequantized_int8_layers:
            lines.append("bnb_lightning: 8-bit layers train through their dequantized weights.")
        if self.chunked_loss:
            how = "by Liger-Kernel's fused linear cross-entropy" if self.liger_loss else "in chunks"
            lines.append(f"bnb_lightning: the causal-LM loss is computed {how}, without full logits.")
        if self.compiled_blocks:
            lines.append(
                f"bnb_lightning: compiled {self.compiled_blocks} transformer blocks with torch.compile."
            )
        if self.activations is not None:
            lines.append(self.activations.describe())
        elif self.checkpointing:
            lines.append("bnb_lightning: gradient checkpointing is on (non-reentrant).")
        lines.append(f"bnb_lightning: {count_parameters(self.model)}")
        return lines

    def what_trains_without_adapters(self) -> str | None:
        """Without adapters, what trains is whatever the model left trainable: a warning saying which."""
        if self.adapters is not None:
            return None
        groups: dict[str, int] = {}
        for name, parameter in self.model.named_parameters():
            if parameter.requires_grad:
                # "model.layers.3.input_layernorm.weight" -> "model.layers.*.input_layernorm.weight"
                group = ".".join("*" if part.isdigit() else part for part in name.split("."))
                groups[group] = groups.get(group, 0) + parameter.numel()
        if not groups:
            return "bnb_lightning: no peft_config and no trainable parameter: nothing will train."
        shown = ", ".join(f"{group} ({count:,})" for group, count in list(groups.items())[:6])
        more = f" and {len(groups) - 6} more groups" if len(groups) > 6 else ""
        return (
            f"bnb_lightning: no peft_config, so the parameters left in full precision train: {shown}{more}. "
            "To train adapters instead, pass peft_config=peft.LoraConfig(...)."
        )


def prepare_model(
    model: nn.Module,
    config: QuantizationConfig | Any = None,
    options: TrainingOptions | Mapping[str, Any] | None = None,
    device: torch.device | str | int | None = None,
    *,
    peft_config: Any = None,
    precision: str | None = None,
    check_base: Callable[[str], None] | None = None,
    weights: str | os.PathLike | None = None,
    keep_on_host: bool = False,
    mapped_weights: bool = False,
    host_shard: tuple[int, int] | None = None,
) -> PreparedModel:
    """Quantize ``model`` and get it ready to train adapters, in place: the whole setup, in its order.

    What ``BnbQuantization`` does in ``setup``, for Fabric and plain training loops. Validate, then
    mutate; on failure, leave everything as it was:

    1. Checked first, on the model as it is: the options against the model (checkpointing it does
       not have, more uncheckpointed blocks than it has), the PEFT config (a dry run on a meta-device
       copy of the module tree, so a model on the meta device is checked too); :func:`quantize_model`
       then checks its own input (meta or float64 weights, a model quantized with another config; with
       ``weights``, the checkpoint's headers against the model) before the first layer changes, and
       puts a CPU model back if a layer fails (with ``weights``: leaves the model as it was, on meta).
    2. Quantize, layer by layer, onto ``device``; with ``weights``, fill the model from that checkpoint
       while quantizing (:func:`quantize_model` with ``weights``).
    3. From a restore point, so that a failure puts the model back to its just-quantized state
       (quantized layers cannot turn back into the full-precision weights they freed; calling again
       with the same config continues from them): checkpointing; adapters; trainable parameters to
       float32, except under ``precision="bf16-true"``; the frozen base's keys and fingerprint (before
       any forward: bitsandbytes' CPU kernels rewrite 4-bit statistics on the first one), passed to
       ``check_base``; the training fast paths (dequantized int8 and fused 4-bit layer classes); the
       chunked loss (its check runs a short forward, so before compiling); the activation planner
       (:func:`~bnb_lightning.plan_activations`: a mode per block, planned on the first training batch);
       compiled blocks last.

    Args:
        model: the model, with its weights in memory (a LightningModule, a transformers model, any module),
            or, with ``weights``, built on the meta device.
        config: a :class:`QuantizationConfig` (or what :func:`quantize_model` accepts).
        options: a :class:`TrainingOptions` or a dict of its fields; default ``TrainingOptions()``.
        device: where the quantized model lives (``None``: where its weights are; with ``weights``, the CPU).
        peft_config: adapters to add, e.g. ``peft.LoraConfig(r=16, target_modules="all-linear")``.
        precision: the Trainer's or Fabric's precision (``"bf16-true"``, ``"bf16-mixed"``, ...): the
            compute dtype of 4-bit layers follows it unless ``config`` sets one, and trainable
            parameters are float32 except under ``"bf16-true"``.
        check_base: called with the base fingerprint before the training fast paths; raise to stop
            (e.g. when the ranks of a distributed run quantized different weights).
        weights: a checkpoint to fill ``model`` from while quantizing: a ``save_pretrained`` directory
            (``model.safetensors`` or shards with their index, full precision or bitsandbytes-quantized) or
            one ``.safetensors`` file, named as the transformers model inside ``model`` names its tensors.
            Weights ``model`` already has are replaced. A model bnb_lightning already quantized (by an
            earlier call that failed later on) continues from its quantized layers, as without ``weights``.
        keep_on_host: quantize on ``device`` but keep the model in CPU memory, for a strategy that puts
            each rank's shard on the device itself (FSDP2); activations are still planned for ``device``.
        mapped_weights: with ``keep_on_host``, a pre-quantized checkpoint's packed weights stay views of
            its files, shared by the processes of a host (:func:`quantize_model`'s), until the strategy
            copies each rank's shard.
        host_shard: with ``keep_on_host``, ``(rank, world)``: each quantized layer keeps only the rows
            FSDP2 will give ``rank`` in CPU memory (:func:`quantize_model`'s), for a strategy that
            shards the model over ``world`` ranks right after.

    Returns:
        A :class:`PreparedModel`: the report and every decision taken.

    Example::

        prepared = prepare_model(model, QuantizationConfig(bits=4), TrainingOptions(gradient_checkpointing=True),
                                 device="cuda", peft_config=LoraConfig(r=16, target_modules="all-linear"),
                                 precision="bf16-mixed")
        print(prepared.report.summary())

        # The full-precision model never in memory: built empty, filled while quantizing.
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
        prepared = prepare_model(model, device="cuda", peft_config=lora, precision="bf16-mixed", weights=path)
    """
    config = as_quantization_config(config)
    options = as_training_options(options)
    precision_dtype = compute_dtype_for_precision(precision)
    if config.bits == 4 and config.compute_dtype is None and precision_dtype is not None:
        config = config.replace(compute_dtype=precision_dtype)

    # With blocks to plan, the planner sets each one's checkpointing; without, only an explicit choice applies.
    blocks = checkpointable_blocks(model)
    budget = options.activation_memory == "auto" or isinstance(options.activation_memory, int)
    explicit = options.gradient_checkpointing is not None or options.uncheckpointed_blocks or not budget
    checkpointing = options.checkpointing if blocks or explicit else None
    check_uncheckpointed_blocks(model, options.uncheckpointed_blocks, will_checkpoint(model, checkpointing))
    asked = (
        f"gradient_checkpointing={options.gradient_checkpointing}"
        if options.gradient_checkpointing is not None
        else f"activation_memory={options.activation_memory!r}"
    )
    check_gradient_checkpointing(model, checkpointing and not blocks, asked)
    setting = setting_for(options, len(blocks)) if blocks else None
    if setting is not None:
        local_world_size()  # the planner's share of host memory: a malformed one is an error before any change
    if peft_config is not None:
        check_peft_config(model, peft_config)
    if options.chunked_loss and device is not None:
        uses_liger(options.loss_kernel, device)  # loss_kernel="liger" where it cannot run: an error now

    # A model quantized by an earlier call continues from its layers; its full-precision weights are gone.
    if quantized_with(model) is not None:
        weights, mapped_weights = None, False
    report = quantize_model(
        model,
        config,
        device,
        weights=weights,
        keep_on_host=keep_on_host,
        mapped_weights=mapped_weights,
        host_shard=host_shard,
    )
    prepared = PreparedModel(model, config, options, report)

    restore = restore_point(model)
    try:
        prepared.checkpointing = prepare_for_kbit_training(
            model,
            gradient_checkpointing=checkpointing if transformers_models(model) else None,
            upcast_to_float32=options.upcast_to_float32,
        )
        if peft_config is not None:
            inject_checked_adapters(model, peft_config)  # checked above, on the same module names
        prepared.adapters = adapter_root(model)
        cast_for_training(model, precision, options.upcast_to_float32)
        prepared.frozen_keys = frozen_state_keys(model)
        prepared.fingerprint = base_fingerprint(model, prepared.frozen_keys)
        if check_base is not None:
            check_base(prepared.fingerprint)
        if config.bits == 8 and options.dequantize_int8:
            prepared.dequantized_int8_layers = use_dequantized_int8(model)
        if config.bits == 4 and options.fuse_4bit_dequantize:
            prepared.fused_4bit_layers = use_fused_4bit_dequantize(model)
        if options.chunked_loss:
            prepared.liger_loss = uses_liger(options.loss_kernel, prepared.report.device)
            prepared.chunked_loss = use_chunked_loss(model, kernel=options.loss_kernel)
        if setting is not None:
            prepared.activations = plan_activations(model, setting, prepared.report.device)
            prepared.checkpointing = prepared.activations.checkpointing
        if options.compile_blocks is None:
            # Measured faster on one GPU (benchmarks/RESULTS.md); on the CPU compiling costs more than it
            # brings for short runs; 8-bit was measured compiled with the dequantized matmul only.
            compiled = torch.device(prepared.report.device).type == "cuda" and (
                config.bits == 4 or options.dequantize_int8
            )
            prepared.options = options.replace(compile_blocks=compiled)
        if prepared.options.compile_blocks:
            prepared.compiled_blocks = compile_blocks(model)
    except BaseException:
        restore()
        raise
    return prepared
