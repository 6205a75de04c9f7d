"""Training preparation as plain functions: prepare_for_kbit_training, count_parameters, and
prepare_model, the whole setup (adapter injection: test_adapters.py; restore points: test_restore.py)."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from conftest import TiedMLP, model_structure, quantized_llama, tiny_llama
from peft import LoraConfig
from torch import nn

from bnb_lightning import count_parameters, inject_adapters, prepare_for_kbit_training


def test_gradient_checkpointing_on_off_and_kept():
    model = quantized_llama()
    assert prepare_for_kbit_training(model) is False
    assert prepare_for_kbit_training(model, gradient_checkpointing=True) is True
    layer = model.model.layers[0]
    assert (
        layer.gradient_checkpointing and layer._gradient_checkpointing_func.keywords["use_reentrant"] is False
    )
    # None keeps it on (non-reentrant); False turns it off.
    assert prepare_for_kbit_training(model) is True
    assert prepare_for_kbit_training(model, gradient_checkpointing=False) is False
    assert not layer.gradient_checkpointing


def test_checkpointed_training_reaches_the_adapters():
    model = quantized_llama()
    prepare_for_kbit_training(model, gradient_checkpointing=True)
    inject_adapters(model, LoraConfig(r=4, target_modules="all-linear"))
    tokens = torch.arange(32).remainder(5).view(2, 16)
    model(input_ids=tokens, labels=tokens).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def saved_activation_bytes(model: nn.Module, tokens: torch.Tensor) -> int:
    """Bytes the autograd graph keeps from one forward outside checkpointed blocks."""
    saved = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    return saved


def test_uncheckpointed_blocks_keep_their_activations_and_train_the_same():
    tokens = torch.arange(64).remainder(7).view(2, 32)
    config = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    runs = {}
    for kept in (0, 1, 2):
        torch.manual_seed(0)
        model = quantized_llama()
        assert prepare_for_kbit_training(model, gradient_checkpointing=True, uncheckpointed_blocks=kept)
        inject_adapters(model, config)
        flags = [layer.gradient_checkpointing for layer in model.model.layers]
        assert flags == [True] * (len(flags) - kept) + [False] * kept
        saved = saved_activation_bytes(model, tokens)
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        runs[kept] = saved, grads
    # Each block left out of checkpointing keeps more for the backward pass ...
    assert runs[0][0] < runs[1][0] < runs[2][0]
    # ... and the adapters get the same gradients as with recomputation.
    for kept in (1, 2):
        for name, grad in runs[0][1].items():
            torch.testing.assert_close(runs[kept][1][name], grad, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"gradient_checkpointing": True, "uncheckpointed_blocks": 3}, r"has 2\. Pass a number from 0 to 2"),
        ({"gradient_checkpointing": True, "uncheckpointed_blocks": -1}, "must be an int >= 0"),
        ({"gradient_checkpointing": True, "uncheckpointed_blocks": True}, "must be an int >= 0"),
        (
            {"gradient_checkpointing": False, "uncheckpointed_blocks": 1},
            "only applies with gradient checkpointing on",
        ),
        ({"uncheckpointed_blocks": 1}, "only applies with gradient checkpointing on"),
    ],
)
def test_uncheckpointed_blocks_refused_leave_the_model_unchanged(kwargs, message):
    model = quantized_llama(dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=message):
        prepare_for_kbit_training(model, upcast_to_float32=True, **kwargs)
    assert not any(layer.gradient_checkpointing for layer in model.model.layers)
    assert model.model.norm.weight.dtype == torch.bfloat16


def test_gradient_checkpointing_needs_a_transformers_model():
    model = TiedMLP()
    with pytest.raises(ValueError, match="gradient_checkpointing=True needs a transformers model"):
        prepare_for_kbit_training(model, gradient_checkpointing=True)


@pytest.mark.parametrize("upcast", [False, True])
def test_upcast_only_when_asked_and_never_the_quantized_weights(upcast):
    model = quantized_llama(dtype=torch.bfloat16)
    prepare_for_kbit_training(model, upcast_to_float32=upcast)
    expected = torch.float32 if upcast else torch.bfloat16
    assert model.model.norm.weight.dtype == expected
    assert model.model.embed_tokens.weight.dtype == expected
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.uint8


def test_count_parameters_counts_packed_weights_by_their_unpacked_size():
    reference = tiny_llama()
    total = sum(p.numel() for p in reference.parameters())
    model = quantized_llama()
    assert isinstance(model.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    counts = count_parameters(model)
    assert counts.total == total and counts.trainable < total
    inject_adapters(model, LoraConfig(r=4, target_modules=["q_proj"]))
    counts = count_parameters(model)
    assert counts.trainable == 2 * 4 * (64 + 64)  # two layers, A (4x64) and B (64x4)
    assert "trainable parameters: 1,024 of" in str(counts)


# -- prepare_model: the whole setup --------------------------------------------------------------------


def test_prepare_model_reports_every_decision(tokens):
    from bnb_lightning import PreparedModel, TrainingOptions, prepare_model
    from bnb_lightning.io.checkpoint import base_fingerprint

    model = tiny_llama().train()
    options = TrainingOptions(gradient_checkpointing=True, uncheckpointed_blocks=1)
    prepared = prepare_model(
        model,
        None,
        options,
        "cpu",
        peft_config=LoraConfig(r=4, target_modules="all-linear"),
        precision="bf16-mixed",
    )

    assert isinstance(prepared, PreparedModel) and prepared.model is model
    assert len(prepared.report.converted) == 14
    assert prepared.config.compute_dtype is torch.bfloat16  # from the precision
    assert prepared.options == options.replace(compile_blocks=False)  # compiled blocks: CUDA only
    assert prepared.checkpointing and model.is_gradient_checkpointing
    assert not model.model.layers[-1].gradient_checkpointing
    assert prepared.adapters is model
    assert (prepared.fused_4bit_layers, prepared.dequantized_int8_layers, prepared.compiled_blocks) == (
        14,
        0,
        0,
    )
    assert prepared.chunked_loss == [""] and not prepared.liger_loss  # Liger's kernels: CUDA only
    assert "the causal-LM loss is computed in chunks" in " ".join(prepared.messages())
    assert prepared.fingerprint == base_fingerprint(model, prepared.frozen_keys)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert "activations: 1 block kept, 1 recomputed." in " ".join(prepared.messages())
    assert prepared.what_trains_without_adapters() is None
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()


def test_prepare_model_refuses_before_quantizing():
    from bnb_lightning import prepare_model

    model = tiny_llama()
    before = model_structure(model)
    with pytest.raises(ValueError, match="'v_prj' matches no module"):
        prepare_model(model, peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_prj"]))
    assert model_structure(model) == before
    with pytest.raises(ValueError, match="gradient_checkpointing=True needs a transformers model"):
        prepare_model(TiedMLP(), options={"gradient_checkpointing": True})


def test_a_failure_after_quantizing_leaves_the_model_just_quantized_and_a_new_call_continues():
    from bnb_lightning import prepare_model

    model = tiny_llama().train()
    lora = LoraConfig(r=4, target_modules="all-linear")

    def other_ranks_differ(fingerprint: str) -> None:
        raise RuntimeError("the ranks quantized different base weights")

    with pytest.raises(RuntimeError, match="different base weights"):
        prepare_model(
            model, None, {"gradient_checkpointing": True}, peft_config=lora, check_base=other_ranks_differ
        )
    # The quantized layers stay (their full-precision weights are gone), nothing else of the preparation.
    layers = [m for m in model.modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]
    assert len(layers) == 14 and {type(m) for m in layers} == {bnb.nn.Linear4bit}
    assert not any("lora_" in name for name, _ in model.named_parameters())
    assert not model.is_gradient_checkpointing and "forward" not in vars(model)

    prepared = prepare_model(model, None, {"gradient_checkpointing": True}, peft_config=lora)
    assert prepared.report.converted == [] and len(prepared.report.already_quantized) == 14
    assert prepared.adapters is model and prepared.checkpointing


def test_a_loss_kernel_that_cannot_run_is_refused_before_any_layer_changes():
    from bnb_lightning import TrainingOptions, prepare_model

    model = tiny_llama()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(
        RuntimeError, match="loss_kernel='liger'.*(CUDA device|not importable).*loss_kernel='auto'"
    ):
        prepare_model(model, None, TrainingOptions(loss_kernel="liger"), "cpu")
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
