"""Activation memory: one policy per transformer block, chosen to fit a memory budget.

Between a block's forward and its backward pass, its activations can stay on the device (``keep``:
fastest, most memory), be dropped and recomputed from the block's input (``recompute``: a third more
matmul work for that block), or be recomputed from an input that waits in pinned CPU memory
(``offload``: for long sequences). Which mix fits depends on the batch shape, which only the first
training batch tells: the planner measures what one block saves for its backward pass on that batch
(a real forward of the first block, its result thrown away) and picks the fastest mix under the
budget: keep as many blocks as fit, recompute the rest, offload blocks when recomputing alone does not
fit, and, past that, run each block's MLP over sequence tiles. Where an offloaded block's attention
output can wait in CPU memory too (``training/attention.py``), its recompute skips the attention
kernel, so offloading is faster than recomputing: the blocks not kept are then offloaded first. A
longer batch later is measured and planned again before it runs; a shorter one fits the plan it has.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import ACTIVATION_MODES, check_activation_memory, format_bytes
from .attention import AttentionStash, attention_modules, kernel_for, saved_bytes, set_saved_attention
from .blocks import checkpointable_blocks, transformers_models
from .host_embedding import HostEmbedding, movable_embedding
from .liger import uses_liger
from .loss import ChunkedLossForward
from .offload import _Offload, pinned_bytes, pinned_page, release_cached_pinned_memory
from .sharded_loss import gather_bytes, head_shard, loss_bytes, vocab_shard
from .tiled_mlp import Tiled, block_mlp, remove_tiled_mlp, set_mlp_tile_tokens, tile_module, use_tiled_mlp

logger = logging.getLogger("bnb_lightning")

# The planner of a model, as an attribute of the module it was installed on.
_PLANNER = "_bnb_lightning_activation_planner"
# Names transformers gives the norm after the last block; what the step saves from there on is offloaded too.
_FINAL_NORMS = ("norm", "final_layernorm", "ln_f", "final_layer_norm")
_MODE_WORDS = {"keep": "kept", "recompute": "recomputed", "offload": "offloaded"}


@dataclass(frozen=True)
class BlockCost:
    """What one block saves for its backward pass at one batch shape, measured on a real forward.

    ``saved``: every tensor it saves when its activations are kept (parameters excluded);
    ``input``: its input, which a recomputed block keeps instead; ``mlp``: the share of ``saved``
    made inside its MLP (what sequence tiles shrink); ``largest``: the largest saved tensor (its
    gradient exists in the block's backward pass too); ``largest_outside_mlp``: the largest one made
    outside the MLP, when the block was measured with its MLP over tiles (``0``: not measured).
    """

    tokens: int
    saved: int
    input: int
    mlp: int
    largest: int
    largest_outside_mlp: int = 0


@dataclass(frozen=True)
class ActivationPlan:
    """The mode of each block, and, when the planner chose it, what it was chosen for.

    ``modes`` has one of ``"keep"``, ``"recompute"``, ``"offload"`` per block in model order.
    ``tokens`` is the largest batch (in tokens) the plan was made for; ``budget`` the device bytes it
    fits in and ``predicted_peak`` the peak it expects; ``mlp_tile_tokens``, if set, the sequence
    tile each block's MLP runs over; ``saved_attention``: offloaded blocks keep their attention output
    in CPU memory too, and their recompute does not run the attention kernel.
    """

    modes: tuple[str, ...]
    tokens: int | None = None
    budget: int | None = None
    predicted_peak: int | None = None
    cost: BlockCost | None = None
    mlp_tile_tokens: int | None = None
    static: int | None = None
    fits: bool = True
    host_embeddings: bool = False
    saved_attention: bool = False

    def count(self, mode: str) -> int:
        return sum(1 for m in self.modes if m == mode)

    def summary(self) -> str:
        """One line, e.g. ``activations: 20 blocks kept, 12 recomputed; predicted peak 61.2 GiB ...``."""
        if not self.modes:
            return "bnb_lightning: activations: no blocks."
        counts = [(self.count(mode), _MODE_WORDS[mode]) for mode in ACTIVATION_MODES if self.count(mode)]
        parts = [f"{count} {word}" for count, word in counts]
        parts[0] = (
            f"{counts[0][0]} block{'' if counts[0][0] == 1 else 's'} {counts[0][1]}"  # "1 block kept, 3 ..."
        )
        text = "bnb_lightning: activations: " + ", ".join(parts)
        if self.saved_attention and self.count("offload"):
            text += "; offloaded blocks' attention outputs in CPU memory too, not recomputed"
        if self.mlp_tile_tokens:
            text += f"; MLPs over tiles of {self.mlp_tile_tokens:,} tokens"
        if self.host_embeddings:
            text += "; input embeddings in CPU memory"
        if self.predicted_peak is not None and self.budget is not None:
            text += (
                f"; predicted peak {format_bytes(self.predicted_peak)} of a {format_bytes(self.budget)} budget "
                f"at {self.tokens:,} tokens a batch"
            )
        return text + "."


def _storage(tensor: torch.Tensor) -> tuple[int, int]:
    """A key of the memory behind ``tensor`` (shared by its views) and that memory's bytes."""
    try:
        storage = tensor.untyped_storage()
        return storage.data_ptr(), storage.nbytes()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a storage of their own
        return id(tensor), tensor.numel() * tensor.element_size()


def _hidden_states(args: tuple, kwargs: dict) -> torch.Tensor | None:
    for value in (*args, kwargs.get("hidden_states")):
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() >= 2:
            return value
    return None


# Past this many tokens a sequence, a block is measured with its MLP over tiles of this size and the
# MLP alone on one tile, scaled up: measuring the untiled MLP would itself need its whole working set.
PROBE_TILE_TOKENS = 4096


def measure_block(block: nn.Module, args: tuple, kwargs: dict) -> BlockCost:
    """What ``block`` saves for its backward pass when it runs on ``args``/``kwargs`` with its activations kept.

    Calls the block once (compiled if it is), uncheckpointed and with gradients, counting the distinct
    storages autograd saves (parameters excluded); the call's result is thrown away. The MLP's share
    is measured apart, on a stand-in for its input (the hidden states after a norm): a compiled block
    runs its MLP inside its graph. A tiled MLP (``use_tiled_mlp``) is measured on one tile of
    :data:`PROBE_TILE_TOKENS` and scaled to the sequence, as the block around it runs tiled: an MLP
    acts on each token alone.
    """
    hidden = _hidden_states(args, kwargs)
    if hidden is None:
        raise TypeError(
            f"{type(block).__name__} got no hidden-states tensor to measure a block's activations on."
        )
    parameters = {t.data_ptr() for t in (*block.parameters(), *block.buffers())}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        # Kept until the call's graph goes, so no storage counted is freed and its address reused
        # by another; the call then holds what a kept block holds, no more than its recompute will.
        if tensor.data_ptr() not in parameters:
            key, size = _storage(tensor)
            seen.setdefault(key, size)
        return tensor

    def unpack(_: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("bnb_lightning measured a block's activations; its forward has no backward pass.")

    mlp = block_mlp(block)
    length = hidden.shape[-2]
    tiled = isinstance(mlp, Tiled) and length > PROBE_TILE_TOKENS
    sample = min(length, PROBE_TILE_TOKENS) if tiled else length
    flag, tile = (
        getattr(block, "gradient_checkpointing", False),
        vars(mlp).get("tile_tokens") if mlp else None,
    )
    try:
        block.gradient_checkpointing = False
        if mlp is not None:
            mlp.tile_tokens = PROBE_TILE_TOKENS if tiled else None
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            _call_unhooked_if_sharded(block)(*args, **kwargs)
            saved, largest = sum(seen.values()), max(seen.values(), default=0)
            seen.clear()
            if mlp is not None:
                mlp.tile_tokens = None
                mlp(torch.zeros_like(hidden[..., :sample, :]).requires_grad_())
    finally:
        block.gradient_checkpointing = flag
        if mlp is not None:
            if tile is None:
                vars(mlp).pop("tile_tokens", None)
            else:
                mlp.tile_tokens = tile
    scale = length / sample
    mlp_saved = int(sum(seen.values()) * scale)
    mlp_largest = int(max(seen.values(), default=0) * scale)
    return BlockCost(
        tokens=hidden.numel() // hidden.shape[-1],
        saved=saved + mlp_saved if tiled else saved,
        input=hidden.numel() * hidden.element_size(),
        mlp=mlp_saved if tiled else min(saved, mlp_saved),
        largest=max(largest, mlp_largest) if tiled else largest,
        # Over tiles, the MLP's intermediates are inside the tiles' checkpoints, not among the saved.
        largest_outside_mlp=largest if tiled else 0,
    )


def _call_unhooked_if_sharded(block: nn.Module) -> Callable[..., Any]:
    """How to call ``block`` from inside its own forward pre-hook.

    An FSDP2 unit has gathered its parameters in a pre-hook that ran before the planner's; calling it
    again would run that unit's hooks a second time, and its post-hook would shard the parameters again
    under the forward still to come. Its ``forward`` alone runs on the gathered parameters.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without distributed support
        return block
    return block.forward if isinstance(block, FSDPModule) else block


def device_budget(device: torch.device) -> int:
    """The bytes this process may use on ``device``: its memory cap (``set_per_process_memory_fraction``),
    at most what is free plus what the process holds. For the CPU: the memory available plus what the
    process holds."""
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        total = torch.cuda.get_device_properties(device).total_memory
        fraction = torch.cuda.get_per_process_memory_fraction(device)
        free, _ = torch.cuda.mem_get_info(device)
        return min(int(total * fraction), free + torch.cuda.memory_reserved(device))
    return host_available() + _process_rss()


def host_available() -> int:
    """Memory the host can still give (Linux's MemAvailable), or a large number where it is not known."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 50


def local_world_size() -> int:
    """The processes on this host, as torchrun sets ``LOCAL_WORLD_SIZE`` (1 where it is unset)."""
    value = os.environ.get("LOCAL_WORLD_SIZE") or "1"
    try:
        return max(1, int(value))
    except ValueError:
        raise ValueError(
            f"LOCAL_WORLD_SIZE={value!r} is not a whole number: it should count the processes on this host "
            "(torchrun sets it). Unset it or set it to that count; the activation planner splits host "
            "memory between them."
        ) from None


def _process_rss() -> int:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def _storage_bytes(tensors) -> int:
    """The bytes of the distinct storages behind ``tensors`` (views and ties counted once)."""
    return sum(dict(_storage(tensor) for tensor in tensors).values())


def margin_for(budget: int) -> int:
    """What a plan leaves free of its budget: 5% and 256 MiB, for the allocator's fragmentation and estimates."""
    return budget // 20 + (256 << 20)


def choose_plan(
    blocks: int,
    cost: BlockCost,
    static: int,
    budget: int,
    allow_offload: bool = True,
    can_tile: bool = False,
    host_bytes: int | None = None,
    vocab: int = 0,
    expandable_segments: bool = False,
    head_bytes: int = 0,
    fused_loss: bool = False,
    attention: int = 0,
) -> ActivationPlan:
    """The fastest modes for ``blocks`` blocks of ``cost`` each that fit ``budget`` above ``static`` bytes.

    Peak = static + what each block holds until its backward pass (keep: all it saves; recompute:
    its input; offload: nothing) + the largest transient: one block recomputed and its gradients
    (the largest saved tensor's three times: an MLP's backward holds that many at once), or the loss
    after the last block. With blocks recomputed, the budget also leaves the allocator room for two
    of the largest tensors, which it cannot always fit in the gaps between others (one with CUDA's
    ``expandable_segments``, which maps freed memory where the next tensor needs it). Keep the last
    blocks, recompute the middle ones, offload the first ones (whose inputs wait longest, so their
    copies have the most time). If even offloading every block does not fit, MLPs run over sequence
    tiles. The plan still predicts its peak when nothing fits; the caller warns. ``head_bytes``: what
    the loss adds on top of ``static`` over an output layer FSDP2 shards as a unit of its own (the
    hidden states it exchanges, or the layer gathered). ``fused_loss``: the loss runs on Liger-Kernel's
    kernel, whose logits chunk holds about as many values as the hidden states. ``attention``: the bytes
    of one block's attention output and log-sum-exp, when an offloaded block can keep them in CPU memory
    (``training/attention.py``; 0: it cannot). Offloading then costs the host that much more a block and
    saves the recompute its attention kernel, so the blocks not kept are offloaded (as many as the host
    holds) before any is recomputed; the device holds a block's group and the one prefetched before it.
    The host's share is counted as the pinned memory it takes (``offload.pinned_bytes``).
    """
    host_bytes = host_available() if host_bytes is None else host_bytes
    limit = budget - margin_for(budget)
    # After the last block: the final norm's input (its float32 work is over tiles), the loss's hidden
    # gradient and the one coming back, and a logits chunk: the torch kernel's float32 one (near 2**26
    # values) with its softmax and gradient, or Liger's (hidden-state sized, its gradient in place; 2.0x
    # the hidden states with their gradient in benchmarks/loss_bench.py).
    chunk = 2 * cost.input if fused_loss else 3 * 4 * min(cost.tokens * vocab, 1 << 26)
    loss = 3 * cost.input + chunk + head_bytes

    # What an offloaded block sends to the host, and (twice: its own and the one prefetched) brings back;
    # and what that takes of pinned host memory.
    group = cost.input + attention
    page = pinned_page(cost.input)
    host_group = pinned_bytes(cost.input, page) + pinned_bytes(attention, page)

    def peak(keep: int, recompute: int, offload: int, saved: int, largest: int) -> int:
        transient = 2 * cost.input + 3 * largest + (saved if keep < blocks else 0)
        held = keep * saved + recompute * cost.input + (2 * group if offload else 0)
        return static + held + max(transient, loss)

    def fits(keep: int, recompute: int, offload: int, saved: int, largest: int) -> bool:
        fragmentation = (1 if expandable_segments else 2) * largest if keep < blocks else 0
        return peak(keep, recompute, offload, saved, largest) + fragmentation <= limit

    def plan(keep: int, offload: int, tile: int | None, saved: int, largest: int) -> ActivationPlan:
        recompute = blocks - keep - offload
        modes = ("offload",) * offload + ("recompute",) * recompute + ("keep",) * keep
        predicted = peak(keep, recompute, offload, saved, largest)
        fitting = fits(keep, recompute, offload, saved, largest)
        return ActivationPlan(
            modes, cost.tokens, budget, predicted, cost, tile, static, fitting, saved_attention=attention > 0
        )

    variants: list[tuple[int | None, int, int]] = [(None, cost.saved, cost.largest)]
    if can_tile and cost.mlp and cost.tokens > 1:
        count = max(2, math.ceil(cost.mlp / max(1, cost.input)))
        saved = cost.saved - cost.mlp + math.ceil(cost.mlp / count)
        # Left the largest: the largest tensor outside the MLP as measured (a compiled block's are the
        # size of its input; an eager norm's float32 copy is twice that, assumed when not measured), or
        # a tile's MLP tensor.
        outside = cost.largest_outside_mlp or 2 * cost.input
        variants.append((math.ceil(cost.tokens / count), saved, max(outside, cost.largest // count)))
    if attention and allow_offload:
        # As many kept blocks as fit, the others offloaded with their attention while the host holds
        # them (the rest recomputed); failing that, every block offloaded so with its MLP over tiles.
        most_offloaded = max(0, min(blocks, int(0.8 * host_bytes) // max(1, host_group)))
        for keep in range(blocks, -1, -1):
            offload = min(blocks - keep, most_offloaded)
            if fits(keep, blocks - keep - offload, offload, cost.saved, cost.largest):
                return plan(keep, offload, None, cost.saved, cost.largest)
        for tile, saved, largest in variants[1:]:
            if fits(0, blocks - most_offloaded, most_offloaded, saved, largest):
                return plan(0, most_offloaded, tile, saved, largest)
        # Not even that: offloaded blocks recompute their attention, and the host holds more of them.
        attention, group = 0, cost.input
    for keep in range(blocks, -1, -1):  # as many kept blocks as fit, the others recomputed
        if fits(keep, blocks - keep, 0, cost.saved, cost.largest):
            return plan(keep, 0, None, cost.saved, cost.largest)
    if not allow_offload:
        return plan(0, 0, None, cost.saved, cost.largest)
    # Offload the fewest blocks that fit (the host must hold their inputs), then tile the MLPs if needed.
    most_offloaded = max(0, min(blocks, int(0.8 * host_bytes) // max(1, pinned_bytes(cost.input, page))))
    for tile, saved, largest in variants:
        for offload in range(1, most_offloaded + 1):
            if fits(0, blocks - offload, offload, saved, largest):
                return plan(0, offload, tile, saved, largest)
    return plan(0, most_offloaded, *variants[-1])


def _recompute(function: Callable, *args: Any) -> Any:
    """What transformers' own checkpointing of a block calls (inside a compiled block, when it is)."""
    if torch.compiler.is_compiling():  # the recompute is part of the compiled graph's backward pass
        return checkpoint(function, *args, use_reentrant=False)
    return checkpoint(function, *args, use_reentrant=False, context_fn=_recompute_in_forward_default_dtype())


def _recompute_in_forward_default_dtype() -> Callable[[], tuple[Any, Any]]:
    """``checkpoint``'s ``context_fn``: the recompute runs under the default dtype its forward had.

    Lightning's ``"bf16-true"`` sets the default dtype for the forward pass only. A compiled block
    recomputed by an eager ``checkpoint`` (an offloaded block) under another default dtype failed its
    guards and compiled again; past torch.compile's recompile limit it ran eagerly, saved other
    tensors than its compiled forward had, and ``checkpoint`` failed ("A different number of tensors
    was saved").
    """
    dtype = torch.get_default_dtype()
    return lambda: (contextlib.nullcontext(), _default_dtype(dtype))


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


class ActivationPlanner:
    """Sets each block's mode from a plan, and, with a budget, plans on the first (and any longer) batch.

    Made by :func:`plan_activations`; ``plan`` is the plan in force (``None`` before the first
    training batch under a budget); ``on_plan`` is called with each new plan (logs it by default).
    """

    def __init__(
        self,
        model: nn.Module,
        blocks: Sequence[nn.Module],
        setting: str | int | tuple[str, ...],
        device: torch.device,
    ) -> None:
        self.model, self.blocks, self.setting, self.device = model, list(blocks), setting, device
        self.allow_offload = True
        self.plan: ActivationPlan | None = None
        self.plans = 0  # plans made from a measured batch
        self.on_plan: Callable[[str], None] = logger.info
        self.offload = _Offload()
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._outside: list[_Offload | None] = []
        self._measuring = False
        self._host_embedding: HostEmbedding | None = None
        self._hf_models = transformers_models(model)
        heads = [hf_model.get_output_embeddings() for hf_model in self._hf_models]
        self.vocab = max((head.weight.shape[0] for head in heads if head is not None), default=0)
        self._liger_loss = any(
            isinstance(forward, ChunkedLossForward) and uses_liger(forward.kernel, device)
            for forward in (vars(hf_model).get("forward") for hf_model in self._hf_models)
        )
        self._can_tile = bool(self._hf_models) and any(block_mlp(block) is not None for block in self.blocks)
        self._attention = attention_modules(self._hf_models)
        self._attention_kernel = kernel_for(device) if self._attention else None
        self._host_tokens = 0  # explicit modes: the longest batch checked
        # Processes on this host whose offloads share its memory (DDP/FSDP ranks): torchrun says so in
        # LOCAL_WORLD_SIZE, the callback from the Trainer's devices. Each plans with its share.
        self.host_share = local_world_size()

    @property
    def budget(self) -> int | None:
        """The device bytes plans must fit in (``None`` for explicit modes)."""
        if isinstance(self.setting, tuple):
            return None
        return device_budget(self.device) if self.setting == "auto" else self.setting

    @property
    def checkpointing(self) -> bool:
        """Whether any block is (or, before the first plan, may be) checkpointed."""
        return self.plan is None or any(mode != "keep" for mode in self.plan.modes)

    def describe(self) -> str:
        """The setup summary's line: the plan, or what the planner will plan for."""
        if self.plan is not None:
            return self.plan.summary()
        return (
            f"bnb_lightning: activations planned on the first training batch, for a budget of "
            f"{format_bytes(self.budget)} ({'this device' if self.setting == 'auto' else 'as asked'})."
        )

    def install(self) -> None:
        first = self.blocks[0]
        self._handles.append(first.register_forward_pre_hook(self._before_first_block, with_kwargs=True))
        if self._can_tile:
            # Tiled classes from the start, off until a plan needs them: a long first batch is measured
            # with its MLPs over tiles, and later plans only change the tile size.
            use_tiled_mlp(self.model, PROBE_TILE_TOKENS)
            set_mlp_tile_tokens(self.model, None)
        for hf_model in self._hf_models:
            norms = [
                module for name, module in hf_model.named_modules() if name.rsplit(".", 1)[-1] in _FINAL_NORMS
            ]
            if norms:
                # Over tiles: in one piece, its float32 backward pass would hold several copies of the
                # hidden states in float32, more than a recomputed block does at long contexts.
                tile_module(norms[-1], PROBE_TILE_TOKENS)
                self._handles.append(norms[-1].register_forward_pre_hook(self._offload_from_here))
                self._handles.append(hf_model.register_forward_hook(self._end_offload, always_call=True))
        if isinstance(self.setting, tuple):
            plan = ActivationPlan(self.setting, saved_attention=self._attention_kernel is not None)
            self.apply(plan, announce=False)  # the setup summary says it
        else:
            # Until the first training batch is measured: every block recomputed, as checkpointing does.
            self.apply(ActivationPlan(("recompute",) * len(self.blocks)), announce=False)
            self.plan = None
        setattr(self.model, _PLANNER, self)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for block in self.blocks:
            block.gradient_checkpointing = True
            block._gradient_checkpointing_func = _recompute
        set_saved_attention(self._attention, None)
        remove_tiled_mlp(self.model)
        if self._host_embedding is not None:
            self._host_embedding.remove()
            self._host_embedding = None
        vars(self.model).pop(_PLANNER, None)

    def apply(self, plan: ActivationPlan, announce: bool = True) -> None:
        """Give each block its mode (and MLP tile) from ``plan``."""
        if len(plan.modes) != len(self.blocks):
            raise ValueError(
                f"an activation plan needs one mode per block: {len(self.blocks)} modes, got {len(plan.modes)}."
            )
        saving = plan.saved_attention and bool(plan.count("offload"))
        saving = set_saved_attention(self._attention, self._attention_kernel if saving else None)
        if plan.saved_attention and not saving:
            plan = dataclasses.replace(plan, saved_attention=False)
        offloaded = functools.partial(_offloaded_checkpoint, self.offload, saving)
        for block, mode in zip(self.blocks, plan.modes, strict=True):
            block.gradient_checkpointing = mode != "keep"
            block._gradient_checkpointing_func = offloaded if mode == "offload" else _recompute
        if self._can_tile:
            set_mlp_tile_tokens(self.model, plan.mlp_tile_tokens)
        self.plan = plan
        if announce:
            self.plans += 1
            self.on_plan(plan.summary())

    def static_bytes(self) -> int:
        """What the device holds outside the activations: now, and the gradients and optimizer state to come."""
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        grads_to_come = sum(p.numel() * p.element_size() for p in trainable if p.grad is None)
        # Adam-like state (two tensors a parameter) is made by the first optimizer step, after this forward.
        state_to_come = 2 * sum(p.numel() * p.element_size() for p in trainable) if self.plans == 0 else 0
        if self.device.type == "cuda":
            now = torch.cuda.memory_allocated(self.device)
        else:
            now = _storage_bytes([*self.model.parameters(), *self.model.buffers()])
        return now + grads_to_come + state_to_come

    # Hooks of a compiled block run inside its compiled call: measuring and planning stay eager.
    @torch.compiler.disable
    def _before_first_block(self, block: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._measuring or not (block.training and torch.is_grad_enabled()):
            return
        hidden = _hidden_states(args, kwargs)
        if hidden is None:
            return
        tokens = hidden.numel() // hidden.shape[-1]
        if isinstance(self.setting, tuple):
            self._host_room(hidden, tokens)
            return
        if self.plan is not None and self.plan.tokens is not None and tokens <= self.plan.tokens:
            return  # the offload's pages stay sized for the plan's batch, the longest
        if self.plan is not None and self.plan.count("offload"):
            # Its pinned blocks, cached by torch, are sized for the last plan: the host gets them back.
            release_cached_pinned_memory()
        # Pinned pages sized for this batch's block input, the longest planned: every shorter batch reuses them.
        self.offload.page = pinned_page(hidden.numel() * hidden.element_size())
        self._measuring = True
        try:
            cost = measure_block(block, args, kwargs)
        finally:
            self._measuring = False
        budget, attention = self.budget, self._attention_bytes(hidden, tokens)
        plan = self._choose(cost, budget, attention)
        if plan.count("offload") and self._host_embedding is None:
            self._host_embedding = self._embeddings_to_host()
            if self._host_embedding is not None:
                plan = self._choose(cost, budget, attention)  # with the room the embeddings left
        self.apply(plan)
        if plan.count("keep") < len(self.blocks):
            _avoid_fragmentation(self.device, self.on_plan)
        if not plan.fits:
            logger.warning(
                "bnb_lightning: a batch of %s tokens is predicted to need %s of the %s activation budget even with "
                "%s; it may run out of memory. Train on shorter sequences or smaller batches, or give a larger "
                "budget (activation_memory=...).",
                f"{tokens:,}",
                format_bytes(plan.predicted_peak),
                format_bytes(budget),
                "every block offloaded"
                if self.allow_offload
                else "every block recomputed (offload is off here)",
            )

    def _host_room(self, hidden: torch.Tensor, tokens: int) -> None:
        """Explicit modes: what the offloaded blocks send to CPU memory must fit there (a budget's plan
        counts it itself). Their attention outputs wait there only while the host holds them with the
        inputs; inputs it cannot hold at all are an error here, not a process the kernel ends later."""
        plan = self.plan
        if plan is None or not plan.count("offload"):
            return
        if tokens <= self._host_tokens:
            return  # the offload's pages stay sized for the longest batch checked
        release_cached_pinned_memory()  # what the last batch freed, sized for it: the host has it back
        blocks = plan.count("offload")
        each = hidden.numel() * hidden.element_size()
        page = pinned_page(each)
        inputs = blocks * pinned_bytes(each, page)
        attention = (
            blocks * pinned_bytes(self._attention_bytes(hidden, tokens), page) if plan.saved_attention else 0
        )
        available = self._host_bytes()
        if inputs > available:
            raise MemoryError(
                f"activation_memory offloads {blocks} blocks, whose inputs at {tokens:,} tokens need "
                f"{format_bytes(inputs)} of CPU memory; the host has {format_bytes(available)} available. Use "
                "activation_memory='auto' or a size (the planner offloads only what the host holds), offload "
                "fewer blocks, or train on shorter sequences."
            )
        if attention and inputs + attention > 0.8 * available:
            self.apply(dataclasses.replace(plan, saved_attention=False), announce=False)
            self.on_plan(
                f"bnb_lightning: offloaded blocks recompute their attention: with their outputs, their inputs "
                f"at {tokens:,} tokens would need {format_bytes(inputs + attention)} of CPU memory, "
                f"{format_bytes(available)} available."
            )
            attention = 0
        self._host_tokens, self.offload.page = tokens, page

    def _attention_bytes(self, hidden: torch.Tensor, tokens: int) -> int:
        """What one block's saved attention holds for this batch (0: it cannot be saved); the attention
        runs in the autocast dtype, if any, else in the hidden states'."""
        if self._attention_kernel is None:
            return 0
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        return saved_bytes(self._attention, tokens, dtype.itemsize)

    def _host_bytes(self) -> int:
        """This process's share of the host memory still available."""
        return host_available() // self.host_share

    def _choose(self, cost: BlockCost, budget: int, attention: int) -> ActivationPlan:
        head_bytes = self._sharded_head_bytes(cost.tokens)  # then the loss runs the torch kernel
        plan = choose_plan(
            len(self.blocks),
            cost,
            self.static_bytes(),
            budget,
            self.allow_offload,
            self._can_tile,
            vocab=self.vocab,
            expandable_segments=_expandable_segments(self.device),
            head_bytes=head_bytes,
            fused_loss=self._liger_loss and not head_bytes,
            attention=attention if self.allow_offload else 0,
            host_bytes=self._host_bytes(),
        )
        return dataclasses.replace(plan, host_embeddings=self._host_embedding is not None)

    def _sharded_head_bytes(self, tokens: int) -> int:
        """What the loss adds on the device for ``tokens`` a rank over an output layer FSDP2 shards as a
        unit of its own (``fsdp2.frozen_ends``), which is still sharded while the blocks run: the ranks'
        hidden states it exchanges, or the layer gathered whole (2 GiB for a 70B's), whichever it does
        (``training/sharded_loss.py``); 0 for a layer not sharded so."""
        try:
            from torch.distributed.fsdp import FSDPModule
        except ImportError:  # a torch without FSDP2
            return 0
        total = 0
        for hf_model in self._hf_models:
            head = hf_model.get_output_embeddings()
            if not isinstance(head, FSDPModule) or vocab_shard(head.weight) is None:
                continue
            total += (
                loss_bytes(tokens, head.weight) if head_shard(head) is not None else gather_bytes(head.weight)
            )
        return total

    def _embeddings_to_host(self) -> HostEmbedding | None:
        """When blocks are offloaded anyway, the frozen input embeddings go to CPU memory too (as Unsloth's do)."""
        reference = next((p for p in self.blocks[0].parameters() if p.device.type != "cpu"), None)
        if reference is None:
            return None
        for hf_model in self._hf_models:
            embedding = movable_embedding(self.model, hf_model.get_input_embeddings())
            if embedding is not None:
                return HostEmbedding(embedding, reference)
        return None

    @torch.compiler.disable
    def _offload_from_here(self, module: nn.Module, args: tuple) -> None:
        # After the last block: what the final norm and the loss save waits in CPU memory too.
        if (
            self.plan is not None
            and self.plan.count("offload")
            and module.training
            and torch.is_grad_enabled()
        ):
            self.offload.__enter__()
            self._outside.append(self.offload)

    def _end_offload(self, module: nn.Module, args: tuple, output: object) -> None:
        while self._outside:
            self._outside.pop().__exit__(None, None, None)


_ALLOCATOR_SETTINGS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


def _allocator_setter() -> Callable[[str], None] | None:
    return getattr(torch._C, "_accelerator_setAllocatorSettings", None) or getattr(
        torch.cuda.memory, "_set_allocator_settings", None
    )


def _expandable_segments(device: torch.device) -> bool:
    """Whether CUDA's allocator uses (or, once blocks are recomputed, will use) expandable segments."""
    if device.type != "cuda":
        return False
    configured = [os.environ[name] for name in _ALLOCATOR_SETTINGS if os.environ.get(name)]
    if configured:
        return any("expandable_segments:true" in value.replace(" ", "").lower() for value in configured)
    return _allocator_setter() is not None  # _avoid_fragmentation turns them on


def _avoid_fragmentation(device: torch.device, say: Callable[[str], None]) -> None:
    """Let CUDA's caching allocator grow segments in place, unless the user configured it.

    Recomputed and offloaded blocks allocate and free tensors of a block's size over and over; in
    fixed segments the gaps between them add up to gigabytes the next large tensor cannot use (4.4 GiB
    at 65,536 tokens on an 8B shape). Expandable segments (what Unsloth sets on import) avoid it.
    """
    configured = any(os.environ.get(name) for name in _ALLOCATOR_SETTINGS)
    setter = _allocator_setter()
    if device.type != "cuda" or configured or setter is None or getattr(_avoid_fragmentation, "done", False):
        return
    setter("expandable_segments:True")
    _avoid_fragmentation.done = True
    say(
        "bnb_lightning: CUDA's allocator now uses expandable segments, so recomputed activations do not "
        "fragment memory (set PYTORCH_ALLOC_CONF yourself to choose otherwise)."
    )


@torch.compiler.disable(recursive=False)
def _offloaded_checkpoint(offload: _Offload, save_attention: bool, function: Callable, *args: Any) -> Any:
    """A checkpointed block whose saved input waits in CPU memory: ``checkpoint`` saves it as the hooks see it.

    With ``save_attention``, its attention results wait there too and its recompute takes them back.
    """
    contexts = _recompute_in_forward_default_dtype()
    if save_attention:
        stash, dtype_contexts = AttentionStash(offload._pack, offload._unpack), contexts

        def contexts() -> tuple[Any, Any]:
            forward, recompute = dtype_contexts()
            return _both(forward, stash.active(replaying=False)), _both(
                recompute, stash.active(replaying=True)
            )

    with offload:
        offload.group.whole = save_attention
        # `checkpoint` itself, not `_recompute`: dynamo compiles a frame of ours called from here, the
        # checkpoint with it, which is not how offloaded blocks were measured and tested.
        return checkpoint(_compiled_forward(function), *args, use_reentrant=False, context_fn=contexts)


_COMPILED_FORWARD = "_bnb_lightning_compiled_forward"


@torch.compiler.disable
def _compiled_forward(function: Callable) -> Callable:
    """``function`` compiled as its compiled block is, where the block's checkpoint runs inside its ``forward``.

    transformers 5.24 (not 5.17, which checkpoints around the compiled call) and :class:`ActivationBlock`
    checkpoint from a block's ``forward``, which a compiled block runs inside its compiled call: the
    offloaded checkpoint is a graph break there, and ``checkpoint`` runs what it wraps with dynamo off,
    so the block would run eagerly. Its forward (``partial(forward, block, ...)``) is compiled here with
    the block's own ``torch.compile`` settings; a checkpoint around the compiled call is left as it is.
    """
    block = function.args[0] if isinstance(function, functools.partial) and function.args else None
    compiled_call = getattr(block, "_compiled_call_impl", None) if isinstance(block, nn.Module) else None
    if compiled_call is None:
        return function
    cached = vars(block).get(_COMPILED_FORWARD)
    if cached is None or cached[0] is not function.func:
        contexts = [cell.cell_contents for cell in compiled_call.__closure__ or ()]
        compile_like_block = next(
            (c for c in contexts if isinstance(c, torch._dynamo.eval_frame._TorchDynamoContext)), None
        )
        if compile_like_block is None:  # not a torch.compile wrapper this torch version makes: run eagerly
            return function
        cached = (function.func, compile_like_block(function.func))
        vars(block)[_COMPILED_FORWARD] = cached
    return functools.partial(cached[1], *function.args, **function.keywords)


@contextlib.contextmanager
def _both(first: Any, second: Any):
    with first, second:
        yield


def resolve_setting(activation_memory: Any, blocks: int) -> str | int | tuple[str, ...]:
    """``"auto"``, a budget in bytes, or one mode per block, from ``activation_memory``."""
    activation_memory = check_activation_memory(activation_memory)
    if isinstance(activation_memory, str) and activation_memory in ACTIVATION_MODES:
        return (activation_memory,) * blocks
    if isinstance(activation_memory, tuple) and len(activation_memory) != blocks:
        raise ValueError(
            f"activation_memory lists {len(activation_memory)} modes, but the model has {blocks} blocks; give one "
            f"mode per block ('keep', 'recompute' or 'offload'), a single mode for all, or a budget such as '24GB'."
        )
    return activation_memory


def asks_offload(activation_memory: Any) -> bool:
    """Whether ``activation_memory`` asks for offloaded blocks explicitly (a budget may also lead to some)."""
    modes = (activation_memory,) if isinstance(activation_memory, str) else activation_memory
    return isinstance(modes, tuple) and "offload" in modes


def setting_for(options: Any, blocks: int) -> str | int | tuple[str, ...]:
    """The planner's setting from :class:`~bnb_lightning.TrainingOptions`: its explicit switches first."""
    kept = options.uncheckpointed_blocks
    if kept:
        return ("recompute",) * (blocks - kept) + ("keep",) * kept
    if options.gradient_checkpointing is not None:
        return ("recompute" if options.gradient_checkpointing else "keep",) * blocks
    return resolve_setting(options.activation_memory, blocks)


def plan_activations(
    model: nn.Module,
    activation_memory: str | int | Sequence[str] = "auto",
    device: torch.device | str | None = None,
) -> ActivationPlanner | None:
    """Give each transformer block of ``model`` an activation mode, now or by a budget on the first batch.

    ``activation_memory``: ``"auto"`` (what ``device`` lets this process use), a budget (``"24GB"``,
    ``"20GiB"`` or bytes) for the whole process on the device, one mode for every block
    (``"keep"``, ``"recompute"``, ``"offload"``) or a list of one mode per block. Blocks are
    transformers' decoder layers (``GradientCheckpointingLayer``) and :class:`ActivationBlock`
    subclasses. Returns the planner (``None`` when ``model`` has no block); undo with
    :func:`remove_activation_plan`.
    """
    blocks = checkpointable_blocks(model)
    if not blocks:
        return None
    setting = resolve_setting(activation_memory, len(blocks))
    weights = _storage_bytes([*model.parameters(), *model.buffers()])
    if isinstance(setting, int) and setting <= weights:
        raise ValueError(
            f"activation_memory={setting} bytes ({format_bytes(setting)}) is less than the model itself "
            f"({format_bytes(weights)} of weights): it is the budget of the whole process on the device, model "
            "included. Give a larger one (e.g. '24GB') or 'auto' (what the device has)."
        )
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    remove_activation_plan(model)
    planner = ActivationPlanner(model, blocks, setting, torch.device(device))
    planner.install()
    return planner


def use_activation_offload(model: nn.Module) -> list[nn.Module]:
    """Offload every block of ``model``: :func:`plan_activations` with ``"offload"``; returns the models changed.

    Each block is checkpointed and its input waits in pinned CPU memory for the backward pass, as does
    what the step saves after the last block (the final norm, the loss). Only training forwards with
    gradients are affected. Undo with :func:`remove_activation_offload`.
    """
    return transformers_models(model) if plan_activations(model, "offload") is not None else []


def remove_activation_offload(model: nn.Module) -> None:
    """Undo :func:`use_activation_offload` (and any :func:`plan_activations`)."""
    remove_activation_plan(model)


def activation_planner(model: nn.Module) -> ActivationPlanner | None:
    """The planner :func:`plan_activations` installed in ``model``, if any."""
    return next((vars(m)[_PLANNER] for m in model.modules() if _PLANNER in vars(m)), None)


def remove_activation_plan(model: nn.Module) -> None:
    """Undo :func:`plan_activations`: every block is recomputed (checkpointed) again, with no offload."""
    planner = activation_planner(model)
    if planner is not None:
        planner.remove()


__all__ = [
    "ActivationPlan",
    "ActivationPlanner",
    "BlockCost",
    "activation_planner",
    "choose_plan",
    "measure_block",
    "plan_activations",
    "remove_activation_offload",
    "remove_activation_plan",
    "setting_for",
    "use_activation_offload",
]
