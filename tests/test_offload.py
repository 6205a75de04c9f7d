"""Activation offload (bnb_lightning.training.offload) and TrainingOptions.activation_memory, on CPU."""

from __future__ import annotations

import pytest
import torch
from conftest import CausalLM, TiedMLP, fit, lora, tiny_llama
from peft import LoraConfig

from bnb_lightning import BnbQuantization, QuantizationConfig, TrainingOptions, prepare_model
from bnb_lightning.training.offload import _HANDLES, remove_activation_offload, use_activation_offload


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


@pytest.mark.parametrize(
    ("mode", "checkpointing", "offloaded"), [("keep", False, 0), ("recompute", True, 0), ("offload", True, 1)]
)
def test_each_mode_sets_checkpointing_and_the_offload(mode, checkpointing, offloaded):
    model = tiny_llama().train()
    prepared = prepare_model(
        model, QuantizationConfig(bits=4), {"activation_memory": mode}, peft_config=lora()
    )
    assert prepared.checkpointing is checkpointing and model.is_gradient_checkpointing is checkpointing
    assert prepared.offloaded_models == offloaded and (_HANDLES in vars(model)) == bool(offloaded)
    assert any("activation offload" in line for line in prepared.messages()) == bool(offloaded)


def test_offload_hooks_only_training_forwards_with_gradients_and_comes_off(tokens):
    model = tiny_llama().train()
    prepare_model(
        model, QuantizationConfig(bits=4), TrainingOptions(activation_memory="offload"), peft_config=lora()
    )
    hooks = dict(model._forward_pre_hooks), dict(model._forward_hooks)
    assert use_activation_offload(model) == [model]  # a second call adds nothing
    assert (dict(model._forward_pre_hooks), dict(model._forward_hooks)) == hooks

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
    assert _HANDLES not in vars(model) and not model._forward_pre_hooks and not model._forward_hooks


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        (
            {"activation_memory": "24GB"},
            ValueError,
            "activation_memory='24GB' is not supported; expected one of",
        ),
        (
            {"activation_memory": "offload", "gradient_checkpointing": True},
            ValueError,
            "both say whether blocks are checkpointed; set one of them",
        ),
        (
            {"activation_memory": "offload", "uncheckpointed_blocks": 2},
            ValueError,
            "pass uncheckpointed_blocks=0 with it",
        ),
        ({"activation_memory": "keep", "uncheckpointed_blocks": 2}, ValueError, "only applies with gradient"),
    ],
)
def test_bad_activation_memory_is_refused_with_the_fix(options, error, match):
    with pytest.raises(error, match=match):
        TrainingOptions(**options)


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
    seen = []
    model.model.layers[0].register_forward_pre_hook(
        lambda module, args: seen.append(
            torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
        )
    )
    model(input_ids=tokens, labels=tokens).loss.backward()
    with torch.no_grad():
        model(input_ids=tokens)
    model.eval()(input_ids=tokens)
    # Checkpointing runs the block's forward again in the backward pass, under its own hooks.
    assert seen[0] is True and seen[-2:] == [False, False]


def test_the_offload_keeps_a_copy_and_gives_it_back_for_the_backward_pass():
    from bnb_lightning.training.offload import _Offload, _Saved

    x = torch.randn(4, 8, requires_grad=True)
    offload = _Offload()
    with offload:
        y = (x * x).sum()
    saved = offload.last()
    assert isinstance(saved, _Saved) and saved.device is None
    assert torch.equal(saved.host, x) and saved.host.data_ptr() != x.data_ptr()
    y.backward()
    assert torch.equal(x.grad, 2 * x)
