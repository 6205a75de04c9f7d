"""`BnbQuantization`: the Lightning callback that quantizes the model during ``setup``."""

from __future__ import annotations

import functools
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

from .adapters import require_peft_config
from .backend import check_device_supported, is_bnb_linear, is_plain_linear
from .config import (
    QuantizationConfig,
    TrainingOptions,
    as_quantization_config,
    as_training_options,
    compute_dtype_for_precision,
)
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
from .io.checkpoint import (
    FileNamingCheckpointIO,
    adapter_state_dict,
    add_frozen_base,
    check_record_base,
    check_record_config,
    check_trainables,
    quantization_record,
)
from .io.export import export_adapters
from .io.merge import MergedExport, export_merged
from .prepare import cast_to_float32, prepare_model
from .report import QuantizationReport

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
        options: the training switches, a :class:`~bnb_lightning.TrainingOptions` or a dict of its
            fields (checkpointing, uncheckpointed blocks, float32 upcast, compiled blocks, chunked
            loss, dequantized int8, fused 4-bit dequantization). They are also accepted as keyword
            arguments of the same names (``BnbQuantization(gradient_checkpointing=True)``), one way
            or the other. Compiled blocks default to on for a single CUDA device only.
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
        options: TrainingOptions | None = None,
        save_base_weights: bool = False,
        check_base_on_resume: bool = True,
        export_adapters_to: str | None = None,
        export_merged_to: str | None = None,
        merge_tolerance: float | None = None,
        gradient_checkpointing: bool | None = None,
        uncheckpointed_blocks: int | None = None,
        upcast_to_float32: bool | None = None,
        compile_blocks: bool | None = None,
        chunked_loss: bool | None = None,
        dequantize_int8: bool | None = None,
        fuse_4bit_dequantize: bool | None = None,
    ) -> None:
        self.config = as_quantization_config(config)
        if peft_config is not None:
            require_peft_config(peft_config)
        switches = {
            "gradient_checkpointing": gradient_checkpointing,
            "uncheckpointed_blocks": uncheckpointed_blocks,
            "upcast_to_float32": upcast_to_float32,
            "compile_blocks": compile_blocks,
            "chunked_loss": chunked_loss,
            "dequantize_int8": dequantize_int8,
            "fuse_4bit_dequantize": fuse_4bit_dequantize,
        }
        given = {name: value for name, value in switches.items() if value is not None}
        if options is not None and given:
            raise TypeError(
                f"training switches go either in options= or as keyword arguments, not both; got options and "
                f"{', '.join(f'{name}={value!r}' for name, value in given.items())}. Move them into options."
            )
        self.options = as_training_options(options) if options is not None else TrainingOptions(**given)
        self.peft_config = peft_config
        self.save_base_weights = save_base_weights
        self.check_base_on_resume = check_base_on_resume
        for name, flag in (
            ("save_base_weights", save_base_weights),
            ("check_base_on_resume", check_base_on_resume),
        ):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, got {flag!r}.")
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
        if self.options.upcast_to_float32:
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
        if strategy_kind(trainer.strategy) == FSDP and config.bits == 4:
            # Refused here, before anything changes, rather than when FSDP is configured.
            fsdp_mixed_precision(trainer.strategy, config.quant_storage)
        return config

    def _prepare(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, config: QuantizationConfig
    ) -> None:
        """Quantize and prepare ``pl_module`` with :func:`~bnb_lightning.prepare.prepare_model`, adding what
        the Trainer decides: the device, the precision, the strategy's needs.

        ``prepare_model`` validates, then mutates; on failure it leaves everything as it was (or, after
        quantization, the model just quantized). The callback counts the module as prepared only once
        it returned, so a failed setup is prepared again by the next ``fit``.
        """
        options = self.options
        if options.compile_blocks is None and not _single_cuda_device(trainer.strategy):
            # A 1B-shape DDP run on one GPU once failed checkpoint recomputation; not measured faster there.
            options = options.replace(compile_blocks=False)
        fsdp = strategy_kind(trainer.strategy) == FSDP
        if fsdp:
            config = config_for_fsdp(config, pl_module, str(trainer.precision))
        prepared = prepare_model(
            pl_module,
            config,
            options,
            trainer.strategy.root_device,
            peft_config=self.peft_config,
            precision=str(trainer.precision),
            check_base=functools.partial(check_same_base_on_all_ranks, trainer.strategy),
        )
        if fsdp:
            configure_fsdp(
                trainer.strategy, pl_module, prepared.config, adapter_only=not self.save_base_weights
            )
        rank_zero_info(prepared.report.compact())
        rank_zero_info(str(base_memory_for(trainer.strategy, pl_module)))
        for line in prepared.messages():
            rank_zero_info(line)
        warning = prepared.what_trains_without_adapters()
        if warning is not None:
            rank_zero_warn(warning)
        self.report = prepared.report
        self._config = prepared.config
        self._frozen_keys = prepared.frozen_keys
        self._fingerprint = prepared.fingerprint
        self._prepared = weakref.ref(pl_module)
        self._watch_checkpoint_restore(pl_module)


def _single_cuda_device(strategy: Any) -> bool:
    return strategy.root_device.type == "cuda" and strategy_kind(strategy) == SINGLE_DEVICE


def _has_linear_layers(module: nn.Module) -> bool:
    return any(is_plain_linear(m) or is_bnb_linear(m) for m in module.modules())
