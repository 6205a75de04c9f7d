"""The chunked causal-LM loss: same loss and gradients as transformers', without the full logits."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, tiny_gpt2, tiny_llama, tiny_opt
from peft import LoraConfig

from bnb_lightning import QuantizationConfig, inject_adapters, quantize_model
from bnb_lightning.training.loss import (
    ChunkedLossForward,
    linear_cross_entropy,
    remove_chunked_loss,
    use_chunked_loss,
)


def reference_loss(hidden, weight, bias, targets, num_items=None):
    logits = F.linear(hidden, weight, bias).float()
    reduction = "mean" if num_items is None else "sum"
    loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1), reduction=reduction)
    return loss if num_items is None else loss / num_items


def leaves(dtype, with_bias):
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 11, 16, generator=generator).to(dtype).requires_grad_()
    weight = (torch.randn(40, 16, generator=generator) / 4).to(dtype).requires_grad_()
    bias = torch.randn(40, generator=generator).to(dtype).requires_grad_() if with_bias else None
    targets = torch.randint(0, 40, (3, 11), generator=generator)
    targets[0, :4] = -100
    return hidden, weight, bias, targets


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("num_items", [None, 50])
@pytest.mark.parametrize("chunk_tokens", [1, 7, None])
def test_linear_cross_entropy_matches_full_logits(dtype, tol, with_bias, num_items, chunk_tokens):
    hidden, weight, bias, targets = leaves(dtype, with_bias)
    expected = reference_loss(hidden, weight, bias, targets, num_items)
    expected.backward()
    expected_grads = [t.grad.clone() for t in (hidden, weight, bias) if t is not None]
    for t in (hidden, weight, bias):
        if t is not None:
            t.grad = None

    actual = linear_cross_entropy(
        hidden, weight, targets, bias=bias, num_items_in_batch=num_items, chunk_tokens=chunk_tokens
    )
    (actual * 3).backward()  # the upstream gradient scales every result

    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)
    actual_grads = [t.grad for t in (hidden, weight, bias) if t is not None]
    for got, want in zip(actual_grads, expected_grads, strict=True):
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), 3 * want.float(), rtol=tol, atol=tol)


def test_linear_cross_entropy_follows_autocast():
    hidden, weight, _, targets = leaves(torch.float32, False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = reference_loss(hidden, weight, None, targets)
        actual = linear_cross_entropy(hidden, weight, targets)
    # Both project in bfloat16, so they agree far more closely than float32 and bfloat16 would.
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(actual, reference_loss(hidden, weight, None, targets), rtol=1e-6, atol=1e-6)


def test_auto_kernel_on_the_cpu_is_the_torch_kernel():
    hidden, weight, bias, targets = leaves(torch.float32, True)
    results = []
    for kernel in ("auto", "torch"):
        loss = linear_cross_entropy(hidden, weight, targets, bias=bias, kernel=kernel)
        loss.backward()
        results.append([loss.detach(), *(t.grad.clone() for t in (hidden, weight, bias))])
        for t in (hidden, weight, bias):
            t.grad = None
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


def test_liger_kernel_where_it_cannot_run_and_unknown_kernels_are_clear_errors():
    hidden, weight, _, targets = leaves(torch.float32, False)
    with pytest.raises(RuntimeError, match="loss_kernel='liger'.*(CUDA device|not importable)"):
        linear_cross_entropy(hidden, weight, targets, kernel="liger")
    with pytest.raises(ValueError, match="loss_kernel='fast' is not understood; expected 'auto'"):
        linear_cross_entropy(hidden, weight, targets, kernel="fast")
    with pytest.raises(ValueError, match="loss_kernel='fast'"):
        use_chunked_loss(tiny_llama(), kernel="fast")


def test_applying_the_chunked_loss_again_takes_the_new_kernel():
    model = tiny_llama()
    assert use_chunked_loss(model) == use_chunked_loss(model, kernel="torch") == [""]
    assert vars(model)["forward"].kernel == "torch"


def test_linear_cross_entropy_rejects_mismatched_targets():
    hidden, weight, _, targets = leaves(torch.float32, False)
    with pytest.raises(ValueError, match="targets hold 32 tokens but hidden states hold 33"):
        linear_cross_entropy(hidden, weight, targets.view(-1)[:32])


def quantized_lora(build):
    model = build()
    quantize_model(model, QuantizationConfig(bits=4))
    inject_adapters(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():  # LoRA B starts at zero; give the adapters a say in the loss
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    return model.train()


def loss_and_grads(model, tokens, **kwargs):
    model.zero_grad()
    output = model(input_ids=tokens, labels=tokens, **kwargs)
    output.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return output, grads


@pytest.mark.parametrize(
    "build",
    [tiny_llama, lambda: tiny_llama(tie=False), tiny_gpt2, tiny_opt],
    # OPT's forward calls its decoder, not its base model.
    ids=["llama", "llama-untied", "gpt2", "opt"],
)
def test_quantized_lora_model_trains_on_the_same_loss_without_logits(build, tokens):
    model = quantized_lora(build)
    for module in model.modules():  # GPT-2 and OPT have dropout: compare like with like
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in vars(module).items():
            if name.endswith("dropout") and isinstance(value, float):
                setattr(module, name, 0.0)
    labels = tokens.clone()
    labels[1, :5] = -100
    expected = model(input_ids=tokens, labels=labels)
    expected.loss.backward()
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    assert use_chunked_loss(model) == [""]
    assert isinstance(vars(model)["forward"], ChunkedLossForward)
    actual = model(input_ids=tokens, labels=labels)
    actual.loss.backward()

    assert actual.logits is None
    torch.testing.assert_close(actual.loss, expected.loss, rtol=1e-5, atol=1e-5)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-6)

    # Without labels, in eval mode or without gradients, the model's own forward runs: logits come back.
    assert model(input_ids=tokens).logits.shape == (2, 16, VOCAB)
    with torch.no_grad():
        assert model(input_ids=tokens, labels=labels).logits is not None
    model.eval()
    assert model(input_ids=tokens, labels=labels).logits is not None

    remove_chunked_loss(model)
    assert "forward" not in vars(model)


def test_num_items_in_batch_is_honoured(tokens):
    model = quantized_lora(tiny_llama)
    expected = model(input_ids=tokens, labels=tokens, num_items_in_batch=7).loss
    use_chunked_loss(model)
    actual = model(input_ids=tokens, labels=tokens, num_items_in_batch=7).loss
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_model_with_soft_capped_logits_keeps_its_own_loss():
    model = tiny_causal_lm("Gemma2", head_dim=16, final_logit_softcapping=1.0)
    with torch.no_grad():  # logits far beyond the cap, so capped and plain losses differ clearly
        model.lm_head.weight.mul_(100)
    with pytest.warns(UserWarning, match="chunked loss is off for Gemma2ForCausalLM"):
        assert use_chunked_loss(model) == []
    assert "forward" not in vars(model)


def tiny_causal_lm(name: str, **config):
    """A one-layer transformers ``<name>ForCausalLM`` in training mode, e.g. ``tiny_causal_lm("Gemma2")``."""
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, f"{name}Config")(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        **config,
    )
    return getattr(transformers, f"{name}ForCausalLM")(config).train()


# (transformers name, extra config, whether the chunked loss applies): models whose logits are
# transformed after the output layer keep their own loss.
FAMILIES = [
    ("Llama", {}, True),
    ("Mistral", {}, True),
    ("Qwen2", {}, True),
    ("Phi3", {"pad_token_id": 0}, True),
    ("Gemma", {"head_dim": 16}, True),
    ("Olmo2", {}, True),
    ("StableLm", {}, True),
    ("Starcoder2", {}, True),
    ("Phi", {}, True),
    ("Falcon", {}, True),
    ("GPTNeoX", {}, True),
    ("Mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}, True),
    # Soft-capped logits, found even at initialization, where the logits are too small to be capped.
    ("Gemma2", {"head_dim": 16}, False),
    ("Cohere", {}, False),  # logits times logit_scale
    ("Granite", {"logits_scaling": 8.0}, False),  # logits divided by logits_scaling
]


@pytest.mark.parametrize("name, config, applies", FAMILIES, ids=[family[0] for family in FAMILIES])
def test_families_train_on_their_own_loss_chunked_or_not(name, config, applies, tokens):
    model = tiny_causal_lm(name, **config)
    expected = model(input_ids=tokens, labels=tokens).loss
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert use_chunked_loss(model) == ([""] if applies else [])
    output = model(input_ids=tokens, labels=tokens)
    assert (output.logits is None) == applies
    torch.testing.assert_close(output.loss, expected, rtol=1e-5, atol=1e-5)


def test_the_setup_check_runs_no_decoder_layer_and_leaves_the_base_as_it_was():
    model = quantized_lora(tiny_llama)
    base = model.base_model
    calls = []
    base.layers[0].register_forward_hook(lambda module, args, output: calls.append(output))
    assert use_chunked_loss(model) == [""]
    assert calls == []
    assert "forward" not in vars(base)
    # A forward someone already put on the base instance (e.g. a hook library's) is put back.
    remove_chunked_loss(model)
    instance_forward = base.forward
    base.forward = instance_forward
    assert use_chunked_loss(model) == [""]
    assert vars(base)["forward"] is instance_forward


def test_a_model_needing_more_than_hidden_states_gets_one_real_base_forward(tokens):
    # With router logits requested, Mixtral's forward reads them from its base output.
    model = tiny_causal_lm("Mixtral", num_local_experts=4, num_experts_per_tok=2, output_router_logits=True)
    calls = []
    model.model.layers[0].register_forward_hook(lambda module, args, output: calls.append(output))
    assert use_chunked_loss(model) == [""]
    assert len(calls) == 1
    assert "forward" not in vars(model.model)


def test_router_load_balancing_loss_keeps_the_models_own_forward(tokens):
    model = tiny_causal_lm("Mixtral", num_local_experts=4, num_experts_per_tok=2, output_router_logits=True)
    expected = model(input_ids=tokens, labels=tokens)
    use_chunked_loss(model)
    # The router's loss is part of the training loss: the model's own forward computes it.
    output = model(input_ids=tokens, labels=tokens)
    assert output.logits is not None
    torch.testing.assert_close(output.loss, expected.loss)
    assert output.loss > model(input_ids=tokens, labels=tokens, output_router_logits=False).loss
    # Without it, the loss is chunked.
    model.config.output_router_logits = False
    assert model(input_ids=tokens, labels=tokens).logits is None


def test_copies_of_the_model_use_their_own_weights(tokens):
    model = quantized_lora(tiny_llama)
    use_chunked_loss(model)
    clone = copy.deepcopy(model)
    assert vars(clone)["forward"].model is clone
    with torch.no_grad():
        for name, parameter in clone.named_parameters():
            if "lora_B" in name:
                parameter.zero_()
    with torch.enable_grad():
        assert not torch.allclose(
            clone(input_ids=tokens, labels=tokens).loss, model(input_ids=tokens, labels=tokens).loss
        )


def test_models_without_transformers_structure_are_left_alone():
    from conftest import TiedMLP

    model = TiedMLP()
    assert use_chunked_loss(model) == []
    assert "forward" not in vars(model)


def test_a_forward_replaced_by_someone_else_is_left_alone(tokens):
    model = quantized_lora(tiny_llama)
    replaced = model.forward  # e.g. accelerate's hooks put a wrapped forward on the instance
    model.forward = replaced
    with pytest.warns(UserWarning, match="already replaced on the instance"):
        assert use_chunked_loss(model) == []
    assert vars(model)["forward"] is replaced
