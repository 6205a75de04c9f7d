"""Activation offload (bnb_lightning.training.offload, run by the planner's "offload" mode), on CPU."""

from __future__ import annotations

import pytest
import torch
from conftest import CausalLM, TiedMLP, fit, lora, tiny_llama
from peft import LoraConfig
from torch import nn

from bnb_lightning import BnbQuantization, QuantizationConfig, TrainingOptions, prepare_model
from bnb_lightning.training.plan import activation_planner, remove_activation_offload, use_activation_offload


def step(mode: str, bits: int, tokens: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and adapter gradients of one training step of a tiny Llama prepared with ``mode``."""
    model = tiny_llama().train()
    prepare_model(
        model,
        QuantizationConfig(bits=bits),
        TrainingOptions(activation_memory=mode),
        peft_config=LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
    )
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("bits", [4, 8])
def test_keep_recompute_and_offload_give_bitwise_the_same_loss_and_gradients(tokens, bits):
    # On the CPU the offload copies each saved tensor to another CPU buffer and back.
    keep_loss, keep_grads = step("keep", bits, tokens)
    for mode in ("recompute", "offload"):
        loss, grads = step(mode, bits, tokens)
        assert loss == keep_loss, mode
        assert grads.keys() == keep_grads.keys()
        assert all(torch.equal(grads[name], keep_grads[name]) for name in grads), mode


@pytest.mark.parametrize(("mode", "checkpointing"), [("keep", False), ("recompute", True), ("offload", True)])
def test_each_mode_sets_checkpointing_and_the_offload(mode, checkpointing):
    model = tiny_llama().train()
    prepared = prepare_model(
        model, QuantizationConfig(bits=4), {"activation_memory": mode}, peft_config=lora()
    )
    assert prepared.checkpointing is checkpointing
    assert [block.gradient_checkpointing for block in model.model.layers] == [checkpointing] * 2
    assert prepared.activations.plan.modes == (mode, mode)
    word = {"keep": "kept", "recompute": "recomputed", "offload": "offloaded"}[mode]
    # An offloaded block's attention output waits in CPU memory too (a tiny Llama's SDPA attention).
    tail = (
        "; offloaded blocks' attention outputs in CPU memory too, not recomputed."
        if mode == "offload"
        else "."
    )
    assert f"activations: 2 blocks {word}{tail}" in " ".join(prepared.messages())


def test_offload_hooks_only_training_forwards_with_gradients_and_comes_off(tokens):
    model = tiny_llama().train()
    prepare_model(
        model, QuantizationConfig(bits=4), TrainingOptions(activation_memory="offload"), peft_config=lora()
    )
    planner = activation_planner(model)
    hooks = [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()]
    assert use_activation_offload(model) == [model]  # a second call replaces the first
    assert activation_planner(model) is not planner
    assert [len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()] == hooks

    model.eval()
    with torch.no_grad():
        expected = model(input_ids=tokens).logits
    with pytest.raises(RuntimeError, match="Expected tensor for argument #1 'indices'"):
        model.train()(input_ids=tokens.float(), labels=tokens)  # a forward that fails
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None  # no hooks left active
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(input_ids=tokens).logits, expected, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(input_ids=tokens).logits, expected, rtol=0, atol=0)
    model.train()(input_ids=tokens, labels=tokens).loss.backward()
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None

    remove_activation_offload(model)
    assert activation_planner(model) is None
    # Its three hooks are gone: the first block's, the final norm's and the model's.
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == sum(hooks) - 3


def test_offload_of_a_model_without_blocks_to_checkpoint_is_refused_before_anything_changes():
    model = TiedMLP()
    before = {name: p.clone() for name, p in model.named_parameters()}
    with pytest.raises(
        ValueError, match="activation_memory='offload' needs a transformers model inside TiedMLP"
    ):
        prepare_model(model, QuantizationConfig(bits=4), TrainingOptions(activation_memory="offload"))
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert type(model.up) is torch.nn.Linear


def test_the_callback_trains_with_offload_exactly_as_with_recompute(tmp_path):
    losses = {}
    for mode in ("recompute", "offload"):
        module = CausalLM()
        fit(tmp_path / mode, module, [BnbQuantization(peft_config=lora(), activation_memory=mode)])
        losses[mode] = module.losses
    assert losses["offload"] == losses["recompute"] and len(losses["offload"]) == 12


def test_offload_is_refused_under_fsdp():
    from lightning.pytorch.strategies import FSDPStrategy

    from bnb_lightning.distributed import check_strategy

    with pytest.raises(RuntimeError, match="activation_memory='offload' is not supported under FSDP yet"):
        check_strategy(FSDPStrategy(), QuantizationConfig(), "bf16-true", adapter_only=True, offload=True)


def test_a_run_resumed_with_offload_continues_exactly_as_one_straight_run(tmp_path):
    import lightning.pytorch as pl

    straight = CausalLM()
    fit(
        tmp_path / "straight",
        straight,
        [BnbQuantization(peft_config=lora(), activation_memory="recompute")],
        max_steps=8,
    )

    first, resumed = CausalLM(), CausalLM()
    saving = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4)
    offload = {"peft_config": lora(), "activation_memory": "offload"}
    fit(
        tmp_path / "first",
        first,
        [BnbQuantization(**offload), saving],
        max_steps=4,
        enable_checkpointing=True,
    )
    (path,) = (tmp_path / "ckpt").glob("*.ckpt")
    fit(tmp_path / "resumed", resumed, [BnbQuantization(**offload)], ckpt_path=path, max_steps=8)

    assert first.losses + resumed.losses == straight.losses
    expected = {n: p for n, p in straight.named_parameters() if p.requires_grad}
    got = {n: p for n, p in resumed.named_parameters() if p.requires_grad}
    assert expected.keys() == got.keys() and all(torch.equal(expected[n], got[n]) for n in expected)


def test_saved_tensors_go_through_the_offload_while_training_only(tokens):
    model = tiny_llama().train()
    prepare_model(
        model, QuantizationConfig(bits=4), TrainingOptions(activation_memory="offload"), peft_config=lora()
    )
    offload = activation_planner(model).offload
    inputs = []
    for block in model.model.layers:
        block.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    loss = model(input_ids=tokens, labels=tokens).loss
    # The last group saved is the step's after the blocks (the final norm's), in CPU memory, copies;
    # before it, one group a block: its input, and its attention's output and log-sum-exp.
    group, groups = offload.group, []
    while group is not None:
        groups.append([member().host for member in group.members])
        group = group.previous() if group.previous is not None else None
    assert len(groups) == 3 and not any(c.data_ptr() == t.data_ptr() for c in groups[0] for t in inputs)
    for copies, block_input in zip(groups[:0:-1], inputs, strict=True):
        # The input, the attention's output (4 heads of 16) and its log-sum-exp (a float a head and token).
        assert [tuple(c.shape) for c in copies] == [(2, 16, 64), (2, 16, 4, 16), (2, 4, 16)]
        assert torch.equal(copies[0], block_input) and copies[2].dtype == torch.float32
    loss.backward()
    last = offload.group
    with torch.no_grad():
        model(input_ids=tokens)
    model.eval()(input_ids=tokens)
    assert offload.group is last  # nothing saved outside training forwards with gradients


def test_the_offload_keeps_a_copy_and_gives_it_back_for_the_backward_pass():
    from bnb_lightning.training.offload import _Offload, _Saved

    x = torch.randn(4, 8, requires_grad=True)
    offload = _Offload()
    with offload:
        y = (x * x).sum()
    saved = offload.group.members[0]()
    assert isinstance(saved, _Saved) and saved.device is None
    assert torch.equal(saved.host, x) and saved.host.data_ptr() != x.data_ptr()
    y.backward()
    assert torch.equal(x.grad, 2 * x)


def test_large_saved_tensors_wait_in_pinned_pages_of_one_size_an_eighth_of_a_block_input():
    from bnb_lightning.training.offload import pinned_bytes, pinned_page

    # torch's pinned cache hands a freed block out again only for a request of its size: pages of one size
    # serve batches of any length. A 3 GiB block input (393K tokens of an 8B) waits in 12 pages of 256 MiB.
    assert pinned_page(3 << 30) == 1 << 28 and pinned_bytes(3 << 30, 1 << 28) == 3 << 30
    assert pinned_page(128 << 20) == 16 << 20 and pinned_page(12 << 20) == pinned_page(1000) == 2 << 20
    assert pinned_page(1 << 40) == 1 << 28  # at most 256 MiB
    assert pinned_bytes((12 << 20) + 2, 2 << 20) == 14 << 20  # whole pages
    assert pinned_bytes(1000, 2 << 20) == 1024 and pinned_bytes(0, 2 << 20) == 0  # one buffer, rounded up
    generator = torch.Generator().manual_seed(0)
    for size in torch.randint(16 << 20, 1 << 40, (200,), generator=generator).tolist():
        page = pinned_page(size)
        assert page & (page - 1) == 0 and (2 << 20) <= page <= (1 << 28)
        assert size <= pinned_bytes(size, page) < size * 9 / 8 or page == 1 << 28  # a last page's waste
        assert pinned_bytes(size, page) - size < page


def test_parameters_are_saved_as_they_are_not_copied():
    from bnb_lightning.training.offload import _Offload

    # A parameter (or a view of one) is on the device for the whole step: it is saved as it is, not copied.
    hooks = _Offload()
    weight = nn.Parameter(torch.randn(64))
    inputs = torch.randn(64, requires_grad=True)
    with hooks:
        loss = (inputs * weight).sum() + (inputs[:32] * weight[:32]).sum()
    assert len(hooks.group.members) == 2  # the inputs and a view of them
    loss.backward()
    twice_the_first_half = torch.cat([torch.full((32,), 2.0), torch.ones(32)])
    torch.testing.assert_close(inputs.grad, weight.detach() * twice_the_first_half)
    torch.testing.assert_close(weight.grad, inputs.detach() * twice_the_first_half)
