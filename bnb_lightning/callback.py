"""`BnbQuantization`: the Lightning callback that quantizes the model during ``setup``."""

from __future__ import annotations

import math
import os
import weakref
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from peft import PeftConfig
from torch import nn

from .adapters import check_peft_config, inject_checked_adapters
from .backend import check_device_supported, is_bnb_linear, is_plain_linear
from .checkpoint import (
    FileNamingCheckpointIO,
    adapter_state_dict,
    add_frozen_base,
    base_fingerprint,
    check_record_base,
    check_record_config,
    check_trainables,
    frozen_state_keys,
    quantization_record,
)
from .config import QuantizationConfig, as_quantization_config, compute_dtype_for_precision
from .distributed import (
    FSDP,
    SINGLE_DEVICE,
    base_memory_for,
    check_same_base_on_all_ranks,
    check_strategy,
    config_for_fsdp,
    configure_fsdp,
    fsdp_mixed_precision,
    is_fsdp_wrapped,
    strategy_kind,
)
from .export import adapter_root, export_adapters
from .int8 import use_dequantized_int8
from .linear4bit import use_fused_4bit_dequantize
from .loss import use_chunked_loss
from .merge import MergedExport, export_merged
from .prepare import (
    cast_to_float32,
    check_block_count,
    check_gradient_checkpointing,
    check_uncheckpointed_blocks,
    compile_blocks,
    count_parameters,
    prepare_for_kbit_training,
    will_checkpoint,
)
from .quantize import quantize_model
from .report import QuantizationReport
from .restore import restore_point

_REFUSED_PRECISION_PLUGINS = {
    "BitsandbytesPrecision": "it quantizes every linear layer itself (the lm_head too); remove the plugin "
    "and let BnbQuantization do the quantization",
    "TransformerEnginePrecision": "it replaces linear layers with Transformer Engine layers; use "
    "precision='bf16-true' or 'bf16-mixed' instead",
    "DoublePrecision": "bitsandbytes does not quantize float64 weights; use precision='32-true', "
    "'bf16-true' or 'bf16-mixed'",
}


# Marks the hooks this callback wraps on a LightningModule instance, so only those are removed again.
_WRAPPER_MARK = "_bnb_lightning_wrapper"


class BnbQuantization(Callback):
    r"""Quantize the LightningModule's linear layers with bitsandbytes when the Trainer sets up.

    The model is quantized once, on ``trainer.strategy.root_device``, layer by layer, before the
    strategy moves it or builds optimizers. If the module builds its model in ``setup`` or
    ``configure_model``, quantization happens right after that. The lm_head, output embeddings and
    tied weights stay in full precision. With ``peft_config``, adapters are injected afterwards and
    only they train.

    Args:
        config: a :class:`~bnb_lightning.QuantizationConfig` (a dict of its fields or a
            transformers ``BitsAndBytesConfig`` are accepted too). Default: NF4 with double quantization, compute
            dtype from the Trainer's precision.
        peft_config: a PEFT config, e.g. ``peft.LoraConfig(r=16, target_modules="all-linear")``.
        gradient_checkpointing: ``True``/``False`` turns checkpointing of the transformers model on
            or off (always non-reentrant); ``None`` keeps the model's own setting.
        upcast_to_float32: cast full-precision half parameters (norms, embeddings, adapters) to
            float32 when training starts, like PEFT's ``prepare_model_for_kbit_training``. Off by
            default: it costs speed and memory. The trainable parameters (adapters) are float32
            anyway, except under ``precision="bf16-true"``.
        save_base_weights: write the frozen quantized base into checkpoints too. By default
            checkpoints hold the trainable parameters, the training state and a record of the
            quantization (config and a fingerprint of the base); the base is re-created on resume.
        check_base_on_resume: refuse a checkpoint made with another quantization config or another
            base model (compared by fingerprint).
        export_adapters_to: at the end of ``fit``, write the adapters in PEFT's format here
            (``PeftModel.from_pretrained(base, directory)`` loads them). Rank zero, atomic.
        export_merged_to: at the end of ``fit``, write a full-precision model with the adapters
            merged here, if its logits on a training batch stay within ``merge_tolerance`` of the
            quantized model's. Rank zero, atomic.
        merge_tolerance: largest accepted max |logits difference| for ``export_merged_to``
            (default: 5% of the largest |logit| on that batch).
        compile_blocks: ``torch.compile`` each transformer block after quantization. ``None``
            (default): on for a single CUDA device, where it was measured faster; off on CPU,
            under DDP or FSDP, and for 8-bit with ``dequantize_int8=False``.
        chunked_loss: compute a transformers causal LM's training loss chunk by chunk, without
            materializing the logits (``logits`` is ``None`` when the model is called with
            ``labels`` while training; see :func:`bnb_lightning.use_chunked_loss`). On by default;
            ``False`` keeps the model's own loss and logits.
        dequantize_int8: train 8-bit layers by multiplying with their dequantized weight in the
            compute dtype (see :func:`bnb_lightning.use_dequantized_int8`): faster than
            bitsandbytes' LLM.int8 matmul and without its activation rounding; the stored int8
            weights are the same. ``False`` keeps the LLM.int8 matmul. No effect on 4-bit.
        fuse_4bit_dequantize: in compiled code, 4-bit layers dequantize their weights in plain
            torch ops that ``torch.compile`` fuses into the block's graph (same values; see
            :func:`bnb_lightning.use_fused_4bit_dequantize`), instead of calling bitsandbytes'
            op, whose Python dispatch makes small models host-bound. Eager forwards use
            bitsandbytes' kernels either way. ``False`` keeps bitsandbytes' op. No effect on 8-bit.
        uncheckpointed_blocks: with gradient checkpointing on, the last this many transformer
            blocks keep their activations instead of recomputing their forward in the backward
            pass: each one saves a third of its matmul work per step and holds its activations
            (measured: 0.49 GiB per Llama-3-8B block at 4,096 tokens a step) until its backward. 0
            (default) checkpoints every block: QLoRA is chosen for memory first.

    Example::

        trainer = Trainer(
            precision="bf16-true",
            callbacks=[BnbQuantization(peft_config=LoraConfig(r=16, target_modules="all-linear"))],
        )
    """

    def __init__(
        self,
        config: QuantizationConfig | None = None,
        peft_config: PeftConfig | None = None,
        gradient_checkpointing: bool | None = None,
        upcast_to_float32: bool = False,
        save_base_weights: bool = False,
        check_base_on_resume: bool = True,
        export_adapters_to: str | None = None,
        export_merged_to: str | None = None,
        merge_tolerance: float | None = None,
        compile_blocks: bool | None = None,
        chunked_loss: bool = True,
        dequantize_int8: bool = True,
        uncheckpointed_blocks: int = 0,
        fuse_4bit_dequantize: bool = True,
    ) -> None:
        self.config = as_quantization_config(config)
        if peft_config is not None and not isinstance(peft_config, PeftConfig):
            hint = (
                " A class_path/init_args dict is LightningCLI's YAML form; in Python, pass the object, e.g. "
                "peft.LoraConfig(**init_args)."
                if isinstance(peft_config, dict) and "class_path" in peft_config
                else ""
            )
            raise TypeError(
                f"peft_config must be a PEFT config such as peft.LoraConfig(...), got {type(peft_config).__name__}."
                + hint
            )
        if compile_blocks not in (None, True, False):
            raise TypeError(f"compile_blocks must be True, False or None, got {compile_blocks!r}.")
        self.compile_blocks = compile_blocks
        if gradient_checkpointing not in (None, True, False):
            raise TypeError(
                f"gradient_checkpointing must be True, False or None, got {gradient_checkpointing!r}."
            )
        for name, flag in (
            ("upcast_to_float32", upcast_to_float32),
            ("save_base_weights", save_base_weights),
            ("check_base_on_resume", check_base_on_resume),
            ("chunked_loss", chunked_loss),
            ("dequantize_int8", dequantize_int8),
            ("fuse_4bit_dequantize", fuse_4bit_dequantize),
        ):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, got {flag!r}.")
        self.peft_config = peft_config
        self.gradient_checkpointing = gradient_checkpointing
        self.upcast_to_float32 = upcast_to_float32
        self.save_base_weights = save_base_weights
        self.check_base_on_resume = check_base_on_resume
        self.chunked_loss = chunked_loss
        self.dequantize_int8 = dequantize_int8
        self.fuse_4bit_dequantize = fuse_4bit_dequantize
        check_block_count(uncheckpointed_blocks, checkpointing=gradient_checkpointing is not False)
        self.uncheckpointed_blocks = uncheckpointed_blocks
        for name, target in (
            ("export_adapters_to", export_adapters_to),
            ("export_merged_to", export_merged_to),
        ):
            if target is not None and not isinstance(target, (str, os.PathLike)):
                raise TypeError(f"{name} must be a directory path or None, got {target!r}.")
        if (export_adapters_to or export_merged_to) and peft_config is None:
            raise ValueError(
                "export_adapters_to / export_merged_to need adapters to export; pass a peft_config too."
            )
        if merge_tolerance is not None:
            if isinstance(merge_tolerance, bool) or not isinstance(merge_tolerance, (int, float)):
                raise TypeError(
                    "merge_tolerance must be a number (the largest accepted max |logits difference|) or None, "
                    f"got {type(merge_tolerance).__name__} {merge_tolerance!r}; write e.g. merge_tolerance=0.1."
                )
            if not (math.isfinite(merge_tolerance) and merge_tolerance >= 0):
                raise ValueError(
                    f"merge_tolerance={merge_tolerance!r} must be a finite number >= 0, or None (the default: 5% of "
                    "the largest |logit|)."
                )
        self.export_adapters_to = export_adapters_to
        self.export_merged_to = export_merged_to
        self.merge_tolerance = merge_tolerance
        self.merged_export: MergedExport | None = None
        self.report: QuantizationReport | None = None
        self._forget()

    def _forget(self) -> None:
        """Drop what the callback knows of a prepared module, so the next module is prepared anew."""
        self._prepared: weakref.ref[pl.LightningModule] | None = None
        self._config: QuantizationConfig | None = None
        self._fingerprint: str | None = None
        self._frozen_keys: set[str] | None = None
        self._restored_trainables: dict[str, torch.Tensor] = {}
        self.merged_export = None
        self.report = None

    def _prepared_for(self, pl_module: pl.LightningModule) -> bool:
        return self._prepared is not None and self._prepared() is pl_module

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not isinstance(trainer.strategy.checkpoint_io, FileNamingCheckpointIO):
            # Checkpoints are written atomically beside their target and checked on reading. Kept for
            # the Trainer's life: `trainer.save_checkpoint(...)` after `fit` goes through it too.
            trainer.strategy.checkpoint_io = FileNamingCheckpointIO(trainer.strategy.checkpoint_io)
        if self._prepared_for(pl_module):
            self._watch_checkpoint_restore(pl_module)
            return
        # Another module than the one prepared before (or none yet): nothing of a previous one applies.
        self._forget()
        config = self._config_for(trainer)
        if _has_linear_layers(pl_module):
            self._prepare(trainer, pl_module, config)
            return
        # The model does not exist yet: Lightning calls this hook before the module's own `setup`
        # and `configure_model`. Wrap this instance's `configure_model` (not the class) so the
        # model is quantized right after it is built; the wrapper removes itself when it runs.
        original = pl_module.configure_model

        def configure_model_then_quantize() -> None:
            del pl_module.configure_model
            original()
            if not self._prepared_for(pl_module):
                self._prepare(trainer, pl_module, config)

        setattr(configure_model_then_quantize, _WRAPPER_MARK, True)
        pl_module.configure_model = configure_model_then_quantize

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_wrappers(pl_module)
        self._restored_trainables = {}

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        # Lightning does not call `teardown` hooks when a run fails, only this one.
        self._remove_wrappers(pl_module)
        self._restored_trainables = {}
        if any(p.device.type == "meta" for p in pl_module.parameters()):
            # The failure was (most likely) our refusal of a model without weights. Lightning's own
            # teardown would next move the model to the CPU, which fails on meta tensors, and that
            # error would replace ours: the strategy lets go of the model it could not have used.
            trainer.strategy._lightning_module = None

    def _remove_wrappers(self, pl_module: pl.LightningModule) -> None:
        """Take this callback's wrappers of the module's hooks off the instance again."""
        for hook in ("on_load_checkpoint", "configure_model"):
            if getattr(vars(pl_module).get(hook), _WRAPPER_MARK, False):
                del vars(pl_module)[hook]

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Runs after the precision plugin converted the module, which would undo a cast made in
        # `setup`. The optimizer holds these same Parameter objects and has no state yet.
        if self.upcast_to_float32:
            cast_to_float32(pl_module)
        elif str(trainer.precision) != "bf16-true":
            # Optimizer steps on half-precision parameters lose small updates (bfloat16) or turn
            # to NaN (float16, where Adam's eps underflows): what trains stays in float32, as in
            # PEFT. Under bf16-true the user asked for bfloat16 throughout, and gets it.
            cast_to_float32(pl_module, trainable_only=True)
        # A resumed run continues from the checkpoint's exact values, not from their round trip
        # through the precision plugin's cast (16-true would round float32 adapters to float16).
        parameters = dict(pl_module.named_parameters())
        with torch.no_grad():
            for name, value in self._restored_trainables.items():
                parameters[name].copy_(value)
        self._restored_trainables = {}

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self._export(trainer, pl_module)
        # No rank goes on (and reads an export, say) before rank zero has written it.
        trainer.strategy.barrier("bnb_lightning_export")

    def _export(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.export_adapters_to:
            path = export_adapters(pl_module, self.export_adapters_to)
            rank_zero_info(f"bnb_lightning: adapters exported in PEFT's format to {path}")
        if self.export_merged_to:
            # The merged model is checked against the quantized one on a real training batch.
            sample = next(iter(trainer.train_dataloader))
            self.merged_export = export_merged(
                pl_module, self.export_merged_to, sample, tolerance=self.merge_tolerance
            )
            rank_zero_info(
                f"bnb_lightning: merged {self.merged_export.dtype} model exported to {self.merged_export.path} "
                f"(max |logits difference| {self.merged_export.max_abs_diff:.3g})"
            )

    def state_dict(self) -> dict[str, Any]:
        if self._config is None:
            return {}
        return quantization_record(self._config, self._fingerprint, adapter_only=not self.save_base_weights)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._prepared_for(pl_module) and not self.save_base_weights:
            checkpoint["state_dict"] = adapter_state_dict(
                checkpoint["state_dict"], pl_module, frozen_keys=self._frozen_keys
            )

    def _watch_checkpoint_restore(self, pl_module: pl.LightningModule) -> None:
        # Lightning loads the module's weights (strictly) right after the module's own
        # `on_load_checkpoint` hook and before any callback hears of the checkpoint. Wrap this
        # instance's hook so an adapter-only checkpoint gets the frozen base from memory first;
        # `teardown` removes the wrapper.
        if "on_load_checkpoint" in vars(pl_module):
            return
        original = pl_module.on_load_checkpoint

        def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
            original(checkpoint)
            self._complete_checkpoint(pl_module, checkpoint)

        setattr(on_load_checkpoint, _WRAPPER_MARK, True)
        pl_module.on_load_checkpoint = on_load_checkpoint

    def _complete_checkpoint(self, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        record = checkpoint.get("callbacks", {}).get(self.state_key) or {}
        if self.check_base_on_resume:
            check_record_config(record, self._config)
        if "state_dict" not in checkpoint or is_fsdp_wrapped(pl_module):
            # The strategy loads the state itself: FSDP's `load_checkpoint` puts a full checkpoint's
            # state into its shards (not strictly) and removes it before any hook runs. The names
            # of the wrapped module's parameters are not the checkpoint's either, and 16-true,
            # whose rounding the copy below undoes, is refused under FSDP.
            if self.check_base_on_resume:
                check_record_base(record, self._fingerprint)
            return
        state = checkpoint["state_dict"]
        # Other adapters (or none) are said as such before they could look like another base.
        check_trainables(state, pl_module, self._frozen_keys, strict=pl_module.strict_loading)
        if self.check_base_on_resume:
            check_record_base(record, self._fingerprint)
        if record.get("adapter_only"):
            add_frozen_base(state, pl_module)
        trainable = {name for name, p in pl_module.named_parameters() if p.requires_grad}
        self._restored_trainables = {name: state[name] for name in trainable if name in state}

    def _should_compile(self, config: QuantizationConfig, trainer: pl.Trainer) -> bool:
        if self.compile_blocks is None:
            # 8-bit blocks were measured compiled with the dequantized matmul only, not LLM.int8's.
            return _default_compile(trainer.strategy) and (config.bits == 4 or self.dequantize_int8)
        return self.compile_blocks

    def _config_for(self, trainer: pl.Trainer) -> QuantizationConfig:
        plugin = type(trainer.precision_plugin).__name__
        if plugin in _REFUSED_PRECISION_PLUGINS:
            raise RuntimeError(
                f"BnbQuantization cannot work with the {plugin} precision plugin: "
                f"{_REFUSED_PRECISION_PLUGINS[plugin]}."
            )
        config = self.config
        check_strategy(
            trainer.strategy,
            config,
            str(trainer.precision),
            adapter_only=not self.save_base_weights,
            exports=bool(self.export_adapters_to or self.export_merged_to),
        )
        check_device_supported(trainer.strategy.root_device)
        precision_dtype = compute_dtype_for_precision(trainer.precision)
        storage = config.quant_storage
        if config.bits == 4 and storage.is_floating_point and "true" in str(trainer.precision):
            if storage != (precision_dtype or storage):
                raise ValueError(
                    f"quant_storage={storage} would be cast to {precision_dtype} by precision "
                    f"'{trainer.precision}', corrupting the packed 4-bit weights. Use quant_storage='uint8' "
                    "or a quant_storage equal to the precision's dtype."
                )
        if config.bits == 4 and config.compute_dtype is None and precision_dtype is not None:
            config = config.replace(compute_dtype=precision_dtype)
        if strategy_kind(trainer.strategy) == FSDP and config.bits == 4:
            # Refused here, before anything changes, rather than when FSDP is configured.
            fsdp_mixed_precision(trainer.strategy, config.quant_storage)
        return config

    def _prepare(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, config: QuantizationConfig
    ) -> None:
        """Quantize ``pl_module`` and get it ready to train, or change nothing.

        Validate, then mutate; on failure, leave everything as it was. Every choice that can be
        refused (strategy, precision, config, checkpointing, the PEFT config, a model without weights
        or already quantized another way) is checked first, on the model as it is. Quantization then
        checks its own input before the first layer changes and puts a CPU model back if a layer
        fails. The steps after it run from a restore point: if one fails, the model is put back to
        its just-quantized state (quantized weights cannot turn back into the freed full-precision
        ones), which a new ``fit`` with the same config takes up again. The callback counts the
        module as prepared only once every step has run.
        """
        check_uncheckpointed_blocks(
            pl_module, self.uncheckpointed_blocks, will_checkpoint(pl_module, self.gradient_checkpointing)
        )
        check_gradient_checkpointing(pl_module, self.gradient_checkpointing)
        if self.peft_config is not None:
            check_peft_config(pl_module, self.peft_config)
        fsdp = strategy_kind(trainer.strategy) == FSDP
        if fsdp:
            config = config_for_fsdp(config, pl_module, str(trainer.precision))
        report = quantize_model(pl_module, config, device=trainer.strategy.root_device)
        rank_zero_info(report.compact())
        restore = restore_point(pl_module)
        try:
            frozen_keys, fingerprint = self._prepare_quantized(trainer, pl_module, config)
        except BaseException:
            restore()
            rank_zero_warn(
                "bnb_lightning: preparing the quantized model failed (see the error); the model keeps its quantized "
                "layers and nothing else of the preparation. A new fit with the same quantization config continues "
                "from them."
            )
            raise
        self.report = report
        self._config = config
        self._frozen_keys = frozen_keys
        self._fingerprint = fingerprint
        self._prepared = weakref.ref(pl_module)
        self._watch_checkpoint_restore(pl_module)

    def _prepare_quantized(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, config: QuantizationConfig
    ) -> tuple[set[str], str]:
        """The steps after quantization, in their order; returns the frozen keys and the base fingerprint."""
        checkpointing = prepare_for_kbit_training(
            pl_module,
            gradient_checkpointing=self.gradient_checkpointing,
            uncheckpointed_blocks=self.uncheckpointed_blocks,
        )
        if self.peft_config is not None:
            inject_checked_adapters(pl_module, self.peft_config)  # checked in `_prepare`
        if str(trainer.precision) != "bf16-true":
            # Already here, so a checkpoint's float32 adapters are restored without rounding.
            cast_to_float32(pl_module, trainable_only=True)
        # Before the strategy wraps the module: FSDP flattens the parameters these names come from.
        frozen_keys = frozen_state_keys(pl_module)
        # Taken before any forward: bitsandbytes' CPU kernels rewrite 4-bit statistics on the first one.
        fingerprint = base_fingerprint(pl_module, frozen_keys)
        check_same_base_on_all_ranks(trainer.strategy, fingerprint)
        if config.bits == 8 and self.dequantize_int8 and use_dequantized_int8(pl_module):
            rank_zero_info("bnb_lightning: 8-bit layers train through their dequantized weights.")
        if config.bits == 4 and self.fuse_4bit_dequantize:
            use_fused_4bit_dequantize(pl_module)
        if self.chunked_loss and use_chunked_loss(pl_module):
            # Before compiling: the check runs one short forward of each model.
            rank_zero_info("bnb_lightning: the causal-LM loss is computed in chunks, without full logits.")
        if self._should_compile(config, trainer):
            rank_zero_info(
                f"bnb_lightning: compiled {compile_blocks(pl_module)} transformer blocks with torch.compile."
            )
        if strategy_kind(trainer.strategy) == FSDP:
            configure_fsdp(trainer.strategy, pl_module, config, adapter_only=not self.save_base_weights)
        rank_zero_info(str(base_memory_for(trainer.strategy, pl_module)))
        if checkpointing:
            kept = (
                f", except the last {self.uncheckpointed_blocks} blocks" if self.uncheckpointed_blocks else ""
            )
            rank_zero_info(f"bnb_lightning: gradient checkpointing is on (non-reentrant){kept}.")
        rank_zero_info(f"bnb_lightning: {count_parameters(pl_module)}")
        if self.peft_config is None and adapter_root(pl_module) is None:
            _say_what_trains(pl_module)
        return frozen_keys, fingerprint


def _default_compile(strategy: Any) -> bool:
    # Measured on an H100 (benchmarks/RESULTS.md): compiled blocks train 4-bit and 8-bit models
    # faster on one GPU. A 1B-shape DDP run on one GPU once failed checkpoint recomputation. On the
    # CPU, compiling costs more than it brings for short runs.
    return strategy.root_device.type == "cuda" and strategy_kind(strategy) == SINGLE_DEVICE


def _has_linear_layers(module: nn.Module) -> bool:
    return any(is_plain_linear(m) or is_bnb_linear(m) for m in module.modules())


def _say_what_trains(module: nn.Module) -> None:
    """Without adapters, what trains is whatever the model left trainable: say which, in a few groups."""
    groups: dict[str, int] = {}
    for name, parameter in module.named_parameters():
        if parameter.requires_grad:
            # "model.layers.3.input_layernorm.weight" -> "model.layers.*.input_layernorm.weight"
            group = ".".join("*" if part.isdigit() else part for part in name.split("."))
            groups[group] = groups.get(group, 0) + parameter.numel()
    if not groups:
        rank_zero_warn("bnb_lightning: no peft_config and no trainable parameter: nothing will train.")
        return
    shown = ", ".join(f"{group} ({count:,})" for group, count in list(groups.items())[:6])
    more = f" and {len(groups) - 6} more groups" if len(groups) > 6 else ""
    rank_zero_warn(
        f"bnb_lightning: no peft_config, so the parameters left in full precision train: {shown}{more}. "
        "To train adapters instead, pass peft_config=peft.LoraConfig(...)."
    )
