"""Causal-LM loss without materializing the logits.

Over a 128k vocabulary the logits of one 4k-token batch take 1 GiB in bfloat16 and 2 GiB more
once the loss upcasts them to float32, a large share of a QLoRA step's peak memory. The loss here
runs the output projection and cross-entropy chunk by chunk and computes the gradient of the
hidden states in the same pass, so at most one chunk of logits exists at a time.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import check_loss_kernel
from .blocks import transformers_models
from .liger import liger_linear_cross_entropy, uses_liger
from .sharded_loss import flat_loss_inputs, head_shard, prefers_sharded, sharded_linear_cross_entropy

logger = logging.getLogger("bnb_lightning")


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean (or sum / ``num_items``) cross-entropy of ``hidden @ weight.T + bias`` against ``targets``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index, divisor, chunk_tokens):
        compute_dtype = hidden.dtype
        valid = targets != ignore_index
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
        grad_bias = (
            torch.zeros_like(bias, dtype=torch.float32) if bias is not None and bias.requires_grad else None
        )
        for start in range(0, hidden.shape[0], chunk_tokens):
            end = min(start + chunk_tokens, hidden.shape[0])
            chunk = hidden[start:end]
            chunk_targets = targets[start:end]
            chunk_valid = valid[start:end]
            logits = F.linear(chunk, weight, bias).float()
            log_norm = torch.logsumexp(logits, dim=-1)
            safe_targets = chunk_targets.masked_fill(~chunk_valid, 0)
            target_logits = logits.gather(1, safe_targets.unsqueeze(1)).squeeze(1)
            total += ((log_norm - target_logits) * chunk_valid).sum()
            if grad_hidden is None and grad_weight is None and grad_bias is None:
                continue
            # d(loss)/d(logits) = softmax - one_hot, zero on ignored tokens, over the divisor.
            grad_logits = logits.sub_(log_norm.unsqueeze(1)).exp_()
            grad_logits[torch.arange(end - start, device=hidden.device), safe_targets] -= 1.0
            grad_logits.mul_((chunk_valid.float() / divisor).unsqueeze(1))
            grad_logits = grad_logits.to(compute_dtype)
            if grad_hidden is not None:
                grad_hidden[start:end] = grad_logits @ weight
            if grad_weight is not None:
                grad_weight += (grad_logits.t() @ chunk).float()
            if grad_bias is not None:
                grad_bias += grad_logits.float().sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        return total / divisor

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        grads = [
            None if g is None else (g * grad_loss.to(g.dtype)) for g in (grad_hidden, grad_weight, grad_bias)
        ]
        return grads[0], grads[1], grads[2], None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_tokens: int | None = None,
    kernel: str = "auto",
) -> torch.Tensor:
    """``cross_entropy(F.linear(hidden, weight, bias).float(), targets)`` without holding all logits.

    Args:
        hidden: ``(..., hidden_size)`` activations before the output projection.
        weight: the output projection's ``(vocab_size, hidden_size)`` weight (e.g. ``lm_head.weight``).
        targets: token ids, ``hidden.shape[:-1]``; ``ignore_index`` marks tokens without a loss.
        num_items_in_batch: divide the summed loss by this instead of the number of valid tokens
            (what transformers does under gradient accumulation).
        chunk_tokens: tokens per chunk of the torch kernel; default: as many as keep a chunk's float32
            logits near 256 MiB.
        kernel: ``"auto"`` (default): Liger-Kernel's fused linear cross-entropy on a CUDA device where
            it is installed, else this module's torch kernel; ``"liger"`` or ``"torch"`` for that one.

    Matches transformers' causal-LM loss on the same (already shifted) targets: the projection runs
    in the activations' dtype (the autocast dtype under mixed precision), the softmax in float32.
    The gradients are computed during the forward pass, one chunk at a time.
    """
    device_type = hidden.device.type
    hidden, targets, divisor, chunk_tokens = flat_loss_inputs(
        hidden, targets, weight.shape[0], ignore_index, num_items_in_batch, chunk_tokens
    )
    dtype = hidden.dtype
    bias = None if bias is None else bias.to(dtype)
    with torch.autocast(device_type, enabled=False):
        if uses_liger(kernel, hidden.device):
            items = None if num_items_in_batch is None else divisor
            return liger_linear_cross_entropy(hidden, weight.to(dtype), bias, targets, ignore_index, items)
        return _LinearCrossEntropy.apply(
            hidden, weight.to(dtype), bias, targets, ignore_index, divisor, chunk_tokens
        )


@contextlib.contextmanager
def gathered(layer: nn.Module) -> Iterator[None]:
    """``layer``'s whole weights while the context is open, if it is an FSDP2 unit of its own.

    The chunked loss reads the output layer's weight without calling the layer, so FSDP2's hooks do
    not gather it. It is gathered here and sharded again as soon as the loss and its gradients are
    computed: the backward pass does not read it. A frozen layer only (``fsdp2.frozen_ends``):
    a trainable one would need FSDP2 to reduce its gradient, which its hooks do when it is called.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        FSDPModule = ()  # noqa: N806
    if not isinstance(layer, FSDPModule):
        yield
        return
    layer.unshard()
    try:
        yield
    finally:
        layer.reshard()


class ChunkedLossForward:
    """Replacement ``forward`` of one transformers causal LM: with ``labels`` while training with
    gradients, the loss comes from :func:`linear_cross_entropy` and ``logits`` is ``None``;
    otherwise (and for a mixture-of-experts call that adds its router's load-balancing loss) the
    model's own forward runs unchanged.

    A plain object holding the model (not a closure), so ``copy.deepcopy`` and pickling of the
    model keep working and point at the copy.
    """

    def __init__(self, model: nn.Module, kernel: str = "auto") -> None:
        self.model = model
        self.kernel = kernel
        self.announced_sharded = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        model = self.model
        if not self.applies(args, kwargs):
            return type(model).forward(model, *args, **kwargs)
        return self.loss_forward(*args, **kwargs)

    def applies(self, args: tuple, kwargs: dict[str, Any]) -> bool:
        return (
            kwargs.get("labels") is not None
            and self.model.training
            and torch.is_grad_enabled()
            and len(args) <= 1
            and not kwargs.get("logits_to_keep")
            and kwargs.get("return_dict") is not False
            and not self.adds_router_loss(kwargs)
        )

    def adds_router_loss(self, kwargs: dict[str, Any]) -> bool:
        """Whether a mixture-of-experts model adds its router's load-balancing loss to this call's loss."""
        wanted = kwargs.get("output_router_logits")
        if wanted is None:
            wanted = getattr(getattr(self.model, "config", None), "output_router_logits", False)
        return bool(wanted)

    def loss_forward(self, *args: Any, **kwargs: Any) -> Any:
        from transformers.modeling_outputs import CausalLMOutputWithPast

        model = self.model
        if args:
            kwargs["input_ids"] = args[0]
        labels = kwargs.pop("labels")
        kwargs.pop("logits_to_keep", None)
        shift_labels = kwargs.pop("shift_labels", None)
        ignore_index = kwargs.pop("ignore_index", -100)
        outputs = model.base_model(**kwargs)
        hidden = outputs[0]
        if shift_labels is None:
            # Tokens < n predict n, as in transformers' ForCausalLMLoss.
            shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        head = model.get_output_embeddings()
        items = kwargs.get("num_items_in_batch")
        shard = head_shard(head)
        if shard is not None and prefers_sharded(hidden.numel() // hidden.shape[-1], head.weight, shard[2]):
            # FSDP2 shards the output layer by vocabulary rows: the ranks exchange hidden states instead
            # of gathering it, which takes less memory up to long sequences.
            if not self.announced_sharded:
                self.announced_sharded = True
                logger.info(
                    "bnb_lightning: the loss exchanges hidden states between the ranks that shard the output "
                    "layer, instead of gathering it (in torch ops: Liger-Kernel's loss needs the whole layer)."
                )
            loss = sharded_linear_cross_entropy(
                hidden, shard, shift_labels, ignore_index=ignore_index, num_items_in_batch=items
            )
        else:
            with gathered(head):
                loss = linear_cross_entropy(
                    hidden,
                    head.weight,
                    shift_labels,
                    bias=head.bias,
                    ignore_index=ignore_index,
                    num_items_in_batch=items,
                    kernel=self.kernel,
                )
        return CausalLMOutputWithPast(
            loss=loss,
            logits=None,
            hidden_states=getattr(outputs, "hidden_states", None),
            attentions=getattr(outputs, "attentions", None),
        )


def use_chunked_loss(model: nn.Module, check: bool = True, kernel: str = "auto") -> list[str]:
    """Make each transformers causal LM inside ``model`` compute its training loss in chunks.

    Applies where the model has a plain ``nn.Linear`` output layer and a base model
    (``model.base_model``); with ``check``, only where the chunked loss matches the model's own on a
    short random sequence (so models that transform logits, e.g. with soft-capping, keep their own
    loss). ``kernel`` as :func:`linear_cross_entropy` takes it. Returns the names of the models
    changed (``""`` for ``model`` itself). Undo with :func:`remove_chunked_loss`.

    While training with ``labels``, those models return ``logits=None``: a training step that needs
    the logits should call the model without ``labels`` and compute its own loss.
    """
    check_loss_kernel(kernel)
    changed = []
    names = {id(module): name for name, module in model.named_modules()}
    for hf_model in transformers_models(model):
        if isinstance(vars(hf_model).get("forward"), ChunkedLossForward):
            vars(hf_model)["forward"].kernel = kernel
            changed.append(names[id(hf_model)])
            continue
        reason = _unsupported_reason(hf_model)
        if reason is None and check:
            # "auto" where Liger is required: the head may wait in CPU memory until FSDP2 moves it.
            reason = _mismatch_reason(hf_model, "auto" if kernel == "liger" else kernel)
        if reason is not None:
            warnings.warn(
                f"bnb_lightning: the chunked loss is off for {type(hf_model).__name__} ({reason}); "
                "it computes its usual full-vocabulary loss.",
                stacklevel=2,
            )
            continue
        # An instance attribute, not a class change; `remove_chunked_loss` deletes it.
        hf_model.forward = ChunkedLossForward(hf_model, kernel)
        changed.append(names[id(hf_model)])
    return changed


def remove_chunked_loss(model: nn.Module) -> None:
    """Undo :func:`use_chunked_loss` on every model inside ``model``."""
    for module in model.modules():
        if isinstance(vars(module).get("forward"), ChunkedLossForward):
            del module.forward


def _unsupported_reason(hf_model: nn.Module) -> str | None:
    if "forward" in vars(hf_model):
        # E.g. accelerate's hooks for a model dispatched with device_map: replacing them would skip them.
        return "its forward is already replaced on the instance, e.g. by accelerate's hooks"
    head = hf_model.get_output_embeddings() if hasattr(hf_model, "get_output_embeddings") else None
    if type(head) is not nn.Linear:
        return "its output layer is not a plain nn.Linear"
    base = getattr(hf_model, "base_model", hf_model)
    if base is hf_model:
        return "it has no separate base model"
    if "labels" not in inspect.signature(type(hf_model).forward).parameters:
        return "its forward takes no labels"
    return None


def _mismatch_reason(hf_model: nn.Module, kernel: str) -> str | None:
    """Why the chunked loss would differ from the model's own, or ``None`` if it matches.

    Both losses run on the same base-model output, so what is compared is what the model does after
    its base: the head and the loss. That output is first synthetic hidden states, which saves a
    forward of the quantized base at setup (time, and a dequantized weight's memory). A model whose
    forward needs more of the base output than its hidden states, or does not call its base model
    (OPT calls its decoder), gets one real base forward instead.
    """
    head = hf_model.get_output_embeddings().weight
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, head.shape[0], (1, 8), generator=generator).to(head.device)
    hidden = torch.randn(1, 8, head.shape[1], generator=generator).to(head.device, head.dtype)
    # Logits spread about +-20, whatever the head's scale: a transform of large logits (Gemma-2's
    # soft-capping at 30, say) then changes the loss clearly. Measured on these 8 tokens' logits,
    # so no copy of the (vocabulary-sized) head is made.
    with torch.no_grad():
        spread = F.linear(hidden, head).float().std().clamp_min(1e-6)
    hidden *= (20 / spread).to(head.dtype)
    try:
        return _compare_losses(hf_model, input_ids, _synthetic_base_output(hidden), kernel)
    except Exception:  # noqa: BLE001 - the forward needs a real base output
        pass
    try:
        return _compare_losses(hf_model, input_ids, None, kernel)
    except Exception as error:  # noqa: BLE001 - any failure means: keep the model's own loss
        return f"a test forward failed: {type(error).__name__}: {error}"


def _synthetic_base_output(hidden: torch.Tensor) -> Any:
    from transformers.modeling_outputs import BaseModelOutputWithPast

    return BaseModelOutputWithPast(last_hidden_state=hidden)


def _compare_losses(
    hf_model: nn.Module, input_ids: torch.Tensor, base_output: Any, kernel: str
) -> str | None:
    """Compare the two losses with the base model's output fixed to ``base_output`` (or its own, once)."""
    devices = [input_ids.device] if input_ids.device.type == "cuda" else []
    base = hf_model.base_model
    own_forward = vars(base).get("forward")
    base_forward = base.forward
    outputs: list[Any] = [] if base_output is None else [base_output]
    calls: list[None] = []

    def base_forward_once(*args: Any, **kwargs: Any) -> Any:
        calls.append(None)
        if not outputs:
            outputs.append(base_forward(*args, **kwargs))
        return outputs[0]

    def loss(forward) -> torch.Tensor:
        # The model's current mode, so nothing is switched behind the user's back.
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(0)
            return forward(input_ids=input_ids, labels=input_ids).loss

    base.forward = base_forward_once
    try:
        expected = loss(lambda **kw: type(hf_model).forward(hf_model, **kw))
        if base_output is not None and not calls:
            # The model's forward reaches its hidden states past the base's forward (OPT calls
            # `model.decoder`): the synthetic output never reached its loss.
            raise LookupError("the model's forward does not call its base model")
        actual = loss(ChunkedLossForward(hf_model, kernel).loss_forward)
    finally:
        if own_forward is None:
            del base.forward
        else:
            base.forward = own_forward
    if expected is None or not torch.allclose(actual.float(), expected.float(), rtol=1e-3, atol=1e-3):
        return f"its own loss on a test sequence is {expected} and the chunked one {actual.item():.6g}"
    return None
