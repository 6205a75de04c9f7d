"""`BnbQuantization`: the Lightning callback that quantizes the model during ``setup``.

It adds only what a Trainer decides to :func:`~bnb_lightning.prepare_model`: the device, the
precision, the strategy's needs, checkpoints that leave the frozen base out, and exports at the end.
"""

from __future__ import annotations

import functools
import os
import weakref
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from peft import PeftConfig
from torch import nn

from .adapters import require_peft_config
from .backend import is_bnb_linear, is_plain_linear
from .config import (
    QuantizationConfig,
    TrainingOptions,
    as_quantization_config,
    as_training_options,
    check_directory,
    check_flag,
    check_merge_tolerance,
)
from .distributed import (
    FSDP,
    FSDP2,
    base_memory_for,
    check_same_base_on_all_ranks,
    check_trainer,
    config_for_fsdp,
    configure_fsdp,
)
from .fsdp2 import adapter_state_dict, is_sharded, shard_model
from .io.checkpoint import BaseRecord, FileNamingCheckpointIO
from .io.export import base_record, export_adapters
from .io.merge import MergedExport, export_merged
from .io.shards import check_weights
from .prepare import cast_for_training, prepare_model
from .report import QuantizationReport
from .training.plan import ActivationPlan, ActivationPlanner, asks_offload

# Marks the hooks this callback wraps on a LightningModule instance, so only those are removed again.
_WRAPPER_MARK = "_bnb_lightning_wrapper"


class BnbQuantization(Callback):
    r"""Quantize the LightningModule's linear layers with bitsandbytes when the Trainer sets up.

    The model is quantized layer by layer on ``trainer.strategy.root_device``, before the strategy
    moves or wraps it (right after ``configure_model`` if the module builds it there), by
    :func:`~bnb_lightning.prepare_model`; the lm_head and tied weights stay in full precision and,
    with ``peft_config``, only the adapters train. With ``weights``, the module's model can be built on
    the meta device and is filled from that checkpoint while quantizing: the full-precision model is
    never in memory.

    Args:
        config: a :class:`~bnb_lightning.QuantizationConfig`, a dict of its fields or a transformers
            ``BitsAndBytesConfig``. Default: NF4, double quantization, compute dtype from the precision.
        peft_config: a PEFT config, e.g. ``peft.LoraConfig(r=16, target_modules="all-linear")``.
        options: a :class:`~bnb_lightning.TrainingOptions` or a dict of its fields; or pass its fields
            as keyword arguments (``BnbQuantization(gradient_checkpointing=True)``), not both.
        save_base_weights: write the frozen base into checkpoints too. By default they hold what
            trains, the training state and a record of the base (config, fingerprint).
        check_base_on_resume: refuse a checkpoint of another quantization config or base model.
        export_adapters_to: at the end of ``fit``, write the adapters here in PEFT's format (rank zero, atomic).
        export_merged_to: at the end of ``fit``, write the model with the adapters merged here, in full
            precision, if its logits on a training batch are within ``merge_tolerance`` (rank zero, atomic).
        merge_tolerance: the largest accepted max |logits difference| (default: 5% of the largest |logit|).
        weights: a checkpoint to fill the model from while quantizing: a ``save_pretrained`` directory
            (full precision or bitsandbytes-quantized) or one ``.safetensors`` file. Weights the model
            already has are replaced; on a refused checkpoint the model stays as it was (on meta).
        offload_params: under ``ModelParallelStrategy`` (FSDP2), keep each rank's shards of the
            parameters in CPU memory (FSDP2's ``CPUOffloadPolicy``): a device then holds one block's
            gathered weights at a time, and the adapters' optimizer step runs on the CPU. For a model
            whose shards do not fit the devices; slower. Refused under other strategies.

    Example::

        lora = LoraConfig(r=16, target_modules="all-linear")
        trainer = Trainer(precision="bf16-mixed", callbacks=[BnbQuantization(peft_config=lora)])

        # The model built empty, filled from `path` while quantizing, right after configure_model:
        class LitModel(LightningModule):
            def configure_model(self):
                with torch.device("meta"):
                    self.model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))

        trainer = Trainer(callbacks=[BnbQuantization(peft_config=lora, weights=path)])
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
        loss_kernel: str | None = None,
        dequantize_int8: bool | None = None,
        fuse_4bit_dequantize: bool | None = None,
        activation_memory: str | int | list[str] | None = None,
        weights: str | None = None,
        offload_params: bool = False,
    ) -> None:
        self.config = as_quantization_config(config)
        self.peft_config = require_peft_config(peft_config) if peft_config is not None else None
        self.options = as_training_options(
            options,
            gradient_checkpointing=gradient_checkpointing,
            uncheckpointed_blocks=uncheckpointed_blocks,
            upcast_to_float32=upcast_to_float32,
            compile_blocks=compile_blocks,
            chunked_loss=chunked_loss,
            loss_kernel=loss_kernel,
            dequantize_int8=dequantize_int8,
            fuse_4bit_dequantize=fuse_4bit_dequantize,
            activation_memory=activation_memory,
        )
        self.save_base_weights = check_flag("save_base_weights", save_base_weights)
        self.check_base_on_resume = check_flag("check_base_on_resume", check_base_on_resume)
        self.export_adapters_to = check_directory("export_adapters_to", export_adapters_to)
        self.export_merged_to = check_directory("export_merged_to", export_merged_to)
        if (export_adapters_to or export_merged_to) and peft_config is None:
            raise ValueError(
                "export_adapters_to / export_merged_to need adapters to export; pass a peft_config too."
            )
        self.merge_tolerance = check_merge_tolerance(merge_tolerance)
        self.weights = check_weights(weights)
        self.offload_params = check_flag("offload_params", offload_params)
        self._forget()

    def _forget(self) -> None:
        """Drop what the callback knows of a prepared module, so the next module is prepared anew."""
        self._prepared: weakref.ref[pl.LightningModule] | None = None
        self._base: BaseRecord | None = None
        self._restored_trainables: dict[str, torch.Tensor] = {}
        self.merged_export: MergedExport | None = None
        self.report: QuantizationReport | None = None
        self.activations: ActivationPlanner | None = None
        # The base record an adapter export of a model FSDP2 sharded writes (taken in `_shard`).
        self._sharded_base: dict[str, Any] | None = None

    @property
    def activation_plan(self) -> ActivationPlan | None:
        """The activation mode of each transformer block in force (``None`` before the first training batch)."""
        return None if self.activations is None else self.activations.plan

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
        # Another module than the one prepared before (or none yet): nothing of a previous one applies,
        # not even the adapter-only state an FSDP2 run gave the strategy (see `_shard`).
        for name in ("lightning_module_state_dict", "model_to_device"):
            vars(trainer.strategy).pop(name, None)
        self._forget()
        kind = check_trainer(
            trainer,
            self.config,
            adapter_only=not self.save_base_weights,
            exports=bool(self.export_adapters_to or self.export_merged_to),
            offload=asks_offload(self.options.activation_memory),
            merged_export=bool(self.export_merged_to),
        )
        if self.offload_params and kind != FSDP2:
            raise RuntimeError(
                f"offload_params=True keeps FSDP2's parameter shards in CPU memory, but the strategy is "
                f"{type(trainer.strategy).__name__}. Use ModelParallelStrategy(data_parallel_size=N, "
                "tensor_parallel_size=1, save_distributed_checkpoint=False), or drop offload_params."
            )
        if any(is_plain_linear(m) or is_bnb_linear(m) for m in pl_module.modules()):
            self._prepare(trainer, pl_module, kind)
            return

        # The model does not exist yet: Lightning calls this hook before the module's own `setup`
        # and `configure_model`. Quantize right after `configure_model` built it.
        def prepare(*args: Any) -> None:
            if not self._prepared_for(pl_module):
                self._prepare(trainer, pl_module, kind)

        _call_after(pl_module, "configure_model", prepare, once=True)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        _remove_wrappers(pl_module)
        self._restored_trainables = {}

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        # Lightning does not call `teardown` hooks when a run fails, only this one.
        _remove_wrappers(pl_module)
        self._restored_trainables = {}
        if any(p.device.type == "meta" for p in pl_module.parameters()):
            # The failure was (most likely) our refusal of a model without weights. Lightning's own
            # teardown would next move the model to the CPU, which fails on meta tensors, and that
            # error would replace ours: the strategy lets go of the model it could not have used.
            trainer.strategy._lightning_module = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Runs after the precision plugin converted the module, which would undo a cast made in
        # `setup`. The optimizer holds these same Parameter objects and has no state yet.
        cast_for_training(pl_module, str(trainer.precision), self.options.upcast_to_float32)
        # A resumed run continues from the checkpoint's exact values, not from their round trip
        # through the precision plugin's cast (16-true would round float32 adapters to float16).
        _copy_into(pl_module, self._restored_trainables)
        self._restored_trainables = {}

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Under FSDP2 each rank holds pieces of the adapters: every rank takes part in gathering them.
        gathered = (
            adapter_state_dict(pl_module) if self.export_adapters_to and is_sharded(pl_module) else None
        )
        if trainer.is_global_zero:
            self.merged_export = _export(
                trainer,
                pl_module,
                self.export_adapters_to,
                self.export_merged_to,
                self.merge_tolerance,
                gathered,
                self._sharded_base,
            )
        # No rank goes on (and reads an export, say) before rank zero has written it.
        trainer.strategy.barrier("bnb_lightning_export")

    def state_dict(self) -> dict[str, Any]:
        return {} if self._base is None else self._base.record()

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._prepared_for(pl_module):
            checkpoint["state_dict"] = self._base.saved_state(checkpoint["state_dict"], pl_module)

    def _watch_checkpoint_restore(self, pl_module: pl.LightningModule) -> None:
        # Lightning loads the module's weights (strictly) right after the module's own
        # `on_load_checkpoint` hook and before any callback hears of the checkpoint: an adapter-only
        # checkpoint gets the frozen base from memory there.
        def restore(checkpoint: dict[str, Any]) -> None:
            record = checkpoint.get("callbacks", {}).get(self.state_key) or {}
            self._restored_trainables = self._base.restore(
                checkpoint, record, pl_module, self.check_base_on_resume
            )

        _call_after(pl_module, "on_load_checkpoint", restore, once=False)

    def _prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule, kind: str) -> None:
        """:func:`~bnb_lightning.prepare_model` for this Trainer. Only once it returned does the module
        count as prepared: after a failure (which it takes back), the next ``fit`` prepares it again."""
        config, options = self.config, self.options
        if options.compile_blocks is None and kind == FSDP:
            # Not measured under FSDP1's flat parameters. DDP and FSDP2 compile as one device does: 1.7x as
            # fast on two H200s at 8B (benchmarks/RESULTS.md, "Two GPUs").
            options = options.replace(compile_blocks=False)
        if kind == FSDP:
            config = config_for_fsdp(config, pl_module, str(trainer.precision))
        if kind == FSDP2 and is_sharded(pl_module):
            raise RuntimeError(
                f"{type(pl_module).__name__}'s parameters are sharded already (DTensors): BnbQuantization quantizes "
                "the model first and then shards it itself under ModelParallelStrategy (one FSDP2 unit per block). "
                "Build the model in configure_model (or __init__) without fully_shard or parallelize_module."
            )
        prepared = prepare_model(
            pl_module,
            config,
            options,
            trainer.strategy.root_device,
            peft_config=self.peft_config,
            precision=str(trainer.precision),
            check_base=functools.partial(check_same_base_on_all_ranks, trainer.strategy),
            weights=self.weights,
            # Under FSDP2 no rank holds the whole quantized model on its device: the model waits in CPU
            # memory, and sharding puts each rank's shard on its device. Pre-quantized weights wait as
            # views of the checkpoint's files, which the ranks of a host share; sharding copies them.
            keep_on_host=kind == FSDP2,
            mapped_weights=kind == FSDP2 and self.weights is not None,
            # And of each layer it quantizes, a rank keeps only the rows its shard will hold.
            host_shard=_data_parallel_rank(trainer.strategy) if kind == FSDP2 else None,
        )
        adapter_only = not self.save_base_weights
        if kind == FSDP:
            configure_fsdp(trainer.strategy, pl_module, prepared.config, adapter_only=adapter_only)
        memory = str(base_memory_for(trainer.strategy, pl_module))  # as planned, before FSDP2 shards it
        for line in (prepared.report.compact(), memory):
            rank_zero_info(line)
        if kind == FSDP2:
            self._shard(trainer, pl_module, adapter_only)
        for line in prepared.messages():
            rank_zero_info(line)
        warning = prepared.what_trains_without_adapters()
        if warning is not None:
            rank_zero_warn(warning)
        self.report = prepared.report
        self.activations = prepared.activations
        if self.activations is not None:
            self.activations.on_plan = rank_zero_info
            # FSDP1's flat parameters are gathered and freed around each block, which the offload was not checked
            # with; FSDP2 gathers per parameter and trains offloaded blocks exactly as DDP does.
            self.activations.allow_offload = kind != FSDP
            # The ranks on this machine share its memory for offloaded activations.
            self.activations.host_share = max(1, trainer.num_devices)
        self._base = BaseRecord(
            prepared.config, prepared.fingerprint, frozenset(prepared.frozen_keys), adapter_only
        )
        self._prepared = weakref.ref(pl_module)
        self._watch_checkpoint_restore(pl_module)

    def _shard(self, trainer: pl.Trainer, pl_module: pl.LightningModule, adapter_only: bool) -> None:
        """FSDP2 under ModelParallelStrategy: one unit per block, over the data-parallel ranks."""
        strategy = trainer.strategy
        # What an adapter export records of the base, which the sharded layers can no longer tell.
        self._sharded_base = base_record(pl_module) if self.export_adapters_to else None
        blocks = shard_model(
            pl_module,
            strategy.device_mesh["data_parallel"],
            strategy.root_device,
            offload_params=self.offload_params,
        )
        where = "only its shards"
        if self.offload_params:
            # The strategy moves the whole module to the device after this hook; the shards stay where FSDP2 keeps them.
            strategy.model_to_device = _shards_stay
            where = "no shards: they stay in CPU memory (offload_params), gathered to the device unit by unit"
        rank_zero_info(
            f"bnb_lightning: sharded with FSDP2 over {strategy.world_size} devices: {blocks} blocks, each a unit of "
            "its own, and the model around them; quantized layer by layer on the device and kept in CPU memory "
            f"until then, so each device holds {where}."
        )
        if adapter_only:
            # The strategy loads a checkpoint into the module itself, before any hook, with the module's
            # strict_loading: an adapter-only one lacks the frozen base, which is in memory already (and
            # checked by its fingerprint). Its state for a checkpoint: the adapters, gathered without the base.
            pl_module.strict_loading = False
            strategy.lightning_module_state_dict = functools.partial(adapter_state_dict, pl_module)


def _data_parallel_rank(strategy: Any) -> tuple[int, int]:
    """(rank, world) of this process in the data-parallel mesh FSDP2 shards over (see ``_shard``)."""
    mesh = strategy.device_mesh["data_parallel"]
    return mesh.get_local_rank(), mesh.size()


def _shards_stay() -> None:
    """``ModelParallelStrategy.model_to_device`` for a model FSDP2 sharded with CPU offload: nothing to move."""


def _call_after(module: pl.LightningModule, hook: str, then: Callable[..., Any], once: bool) -> None:
    """Wrap ``module``'s ``hook`` on this instance (not its class) to call ``then`` with its arguments after it.

    ``once``: the wrapper removes itself when it runs; otherwise `teardown` removes it. A hook the user
    set on the instance is wrapped too, and put back when the wrapper goes.
    """
    if hasattr(vars(module).get(hook), _WRAPPER_MARK):
        return
    original = getattr(module, hook)

    def wrapper(*args: Any) -> None:
        if once:
            _unwrap(module, hook)
        original(*args)
        then(*args)

    setattr(wrapper, _WRAPPER_MARK, vars(module).get(hook))
    setattr(module, hook, wrapper)


def _unwrap(module: pl.LightningModule, hook: str) -> None:
    """Take this callback's wrapper of ``hook`` off the instance, giving back what was there before."""
    wrapper = vars(module).get(hook)
    if not hasattr(wrapper, _WRAPPER_MARK):
        return
    own = getattr(wrapper, _WRAPPER_MARK)
    if own is None:
        del vars(module)[hook]
    else:
        vars(module)[hook] = own


def _remove_wrappers(module: pl.LightningModule) -> None:
    for hook in ("on_load_checkpoint", "configure_model"):
        _unwrap(module, hook)


def _copy_into(module: nn.Module, values: dict[str, torch.Tensor]) -> None:
    parameters = dict(module.named_parameters())
    with torch.no_grad():
        for name, value in values.items():
            parameters[name].copy_(value)


def _export(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    adapters_to: str | os.PathLike | None,
    merged_to: str | os.PathLike | None,
    tolerance: float | None,
    gathered: dict[str, torch.Tensor] | None = None,
    base: dict[str, Any] | None = None,
) -> MergedExport | None:
    """The exports asked for at the end of ``fit``; the merged one is checked on a training batch.

    ``gathered`` and ``base``: a sharded model's adapters, whole, and the record of its base, taken before sharding.
    """
    if adapters_to:
        path = export_adapters(pl_module, adapters_to, gathered=gathered, base=base)
        rank_zero_info(f"bnb_lightning: adapters exported in PEFT's format to {path}")
    if not merged_to:
        return None
    merged = export_merged(pl_module, merged_to, next(iter(trainer.train_dataloader)), tolerance=tolerance)
    rank_zero_info(
        f"bnb_lightning: merged {merged.dtype} model exported to {merged.path} "
        f"(max |logits difference| {merged.max_abs_diff:.3g})"
    )
    return merged
