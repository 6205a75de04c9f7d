"""Saved attention (bnb_lightning.training.attention): an offloaded block's recompute skips its attention kernel."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import tiny_llama
from peft import LoraConfig
from test_plan import GIB, budget_for, cost, same

from bnb_lightning import QuantizationConfig, TrainingOptions, activation_planner, prepare_model
from bnb_lightning.training.offload import pinned_bytes, pinned_page
from bnb_lightning.training.plan import choose_plan, margin_for

CPU_KERNEL = "aten::_scaled_dot_product_flash_attention_for_cpu"


def prepared(mode, bits: int = 4, attn: str = "sdpa", layers: int = 2):
    model = tiny_llama(layers=layers).train()
    model.config._attn_implementation = attn
    prepare_model(
        model,
        QuantizationConfig(bits=bits),
        TrainingOptions(activation_memory=mode),
        peft_config=LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
    )
    return model


def kernel_runs(model, tokens: torch.Tensor, **kwargs) -> tuple[tuple, int]:
    """One training step's loss and adapter gradients, and how often the CPU's attention kernel ran forward."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        result = _step(model, tokens, **kwargs)
    return result, sum(event.count for event in profile.key_averages() if event.key == CPU_KERNEL)


def _step(model, tokens, **kwargs):
    """``test_plan.step`` with the model's other arguments (an attention mask)."""
    loss = model(input_ids=tokens, labels=tokens, **kwargs).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


@pytest.mark.parametrize("bits", [4, 8])
def test_an_offloaded_block_runs_its_attention_kernel_once_and_trains_bitwise_as_a_kept_one(tokens, bits):
    kept, kept_runs = kernel_runs(prepared("keep", bits), tokens)
    recomputed, recomputed_runs = kernel_runs(prepared("recompute", bits), tokens)
    offloaded, offloaded_runs = kernel_runs(prepared("offload", bits), tokens)
    assert (kept_runs, recomputed_runs, offloaded_runs) == (2, 4, 2)  # 2 blocks; recompute runs each again
    assert same(offloaded, kept) and same(recomputed, kept)


def test_compiled_offloaded_blocks_take_the_saved_attention_too(tokens):
    from torch._dynamo.testing import CompileCounterWithBackend

    from bnb_lightning.training.blocks import transformer_blocks

    reference, runs = kernel_runs(prepared("keep"), tokens)
    model = prepared("offload")
    counter = CompileCounterWithBackend("aot_eager")
    for block in transformer_blocks(model):
        block.compile(backend=counter)
    torch._dynamo.reset()
    result, compiled_runs = kernel_runs(model, tokens)
    assert counter.frame_count >= 1 and compiled_runs == runs == 2
    assert same(result, reference)
    again, _ = kernel_runs(model, tokens)  # a second step: the same graph, the stash of that step
    assert same(again, reference)


def test_what_the_saved_attention_cannot_serve_is_recomputed_as_before(tokens):
    # A padding mask: transformers' own SDPA function, recomputed with the block.
    mask = torch.ones_like(tokens)
    mask[0, :3] = 0
    masked, runs = kernel_runs(prepared("offload"), tokens, attention_mask=mask)
    reference, _ = kernel_runs(prepared("recompute"), tokens, attention_mask=mask)
    assert runs == 4 and same(masked, reference)
    # Eager attention: nothing to save, and the summary says nothing of it.
    model = prepared("offload", attn="eager")
    plan = activation_planner(model).plan
    assert plan.count("offload") == 2 and not plan.saved_attention
    assert "attention" not in plan.summary()
    # Evaluation and no-grad forwards run transformers' function.
    model = prepared("offload")
    with torch.no_grad():
        expected = prepared("keep")(input_ids=tokens).logits
        assert torch.equal(model(input_ids=tokens).logits, expected)
    # Taken off with the plan: back to transformers' function.
    activation_planner(model).remove()
    _, runs = kernel_runs(model, tokens)
    assert runs == 4 and not any("_bnb_lightning_attention_kernel" in vars(m) for m in model.modules())


def test_with_saved_attention_the_blocks_not_kept_are_offloaded_before_any_is_recomputed():
    c = cost(saved=1000, input=100, mlp=800, largest=200)
    attention = c.input  # a Llama's attention output is its block input's size
    transient = c.saved + 2 * c.input + 3 * c.largest + 2 * c.largest
    # Room for 2 kept blocks and the offloaded groups in flight (2 inputs and 2 attention outputs).
    budget = budget_for(GIB + 2 * c.saved + 2 * (c.input + attention) + transient)
    plan = choose_plan(8, c, static=GIB, budget=budget, attention=attention)
    assert plan.modes == ("offload",) * 6 + ("keep",) * 2 and plan.saved_attention and plan.fits
    assert plan.predicted_peak <= budget - margin_for(budget)
    # Without it, the same budget keeps as many and recomputes the rest: an offloaded block costs
    # its recompute plus the copies, which recomputing does without.
    plain = choose_plan(8, c, static=GIB, budget=budget)
    assert plain.count("offload") < plan.count("offload") and not plain.saved_attention
    # A host with room for 3 blocks' input and attention: 3 offloaded, the others recomputed.
    host = int(3.5 * (c.input + attention) / 0.8)
    plan = choose_plan(8, c, static=GIB, budget=100 * GIB // 10, attention=attention, host_bytes=host)
    assert (
        plan.count("offload") == 3
        and plan.count("offload") + plan.count("recompute") + plan.count("keep") == 8
    )
    # Where that does not fit the device, offloaded blocks recompute their attention and the host
    # holds more of them (the inputs alone).
    tight = budget_for(GIB + 2 * c.input + transient)
    plan = choose_plan(8, c, static=GIB, budget=tight, attention=attention, host_bytes=host)
    assert not plan.saved_attention and plan.count("offload") > 3
    # The host's share is the pinned memory it takes, in whole pages: an input of 1 GiB + 256 MiB +
    # 64 MiB + 16 MiB + 2 bytes takes 11 pages of 128 MiB, which a host with room for just under 2 such
    # groups does not have.
    big = cost(saved=100 << 10, input=3 << 10, mlp=50 << 10, largest=12 << 10)  # in MiB: none kept
    big = dataclasses.replace(big, input=(1 << 30) + (1 << 28) + (1 << 26) + (1 << 24) + 2)
    pinned_group = 2 * pinned_bytes(big.input, pinned_page(big.input))
    assert pinned_group > 2 * big.input
    host = int((2 * pinned_group - 1) / 0.8)
    plan = choose_plan(8, big, static=GIB, budget=250 * GIB, attention=big.input, host_bytes=host)
    assert plan.modes == ("offload",) + ("recompute",) * 7 and plan.saved_attention and plan.fits


def test_with_saved_attention_a_tight_budget_tiles_the_mlps_of_blocks_offloaded_so():
    c = cost(saved=1000, input=100, mlp=800, largest=200)
    attention = c.input
    tiled = dict(static=GIB, attention=attention, can_tile=True, expandable_segments=True)
    # Every block offloaded with its attention (2 groups in flight), a tiled block's recompute and its
    # gradients: only with the MLP over tiles.
    budget = budget_for(GIB + 2 * (c.input + attention) + c.saved // 2 + 2 * c.input + 3 * c.largest)
    plan = choose_plan(8, c, budget=budget, **tiled)
    assert plan.modes == ("offload",) * 8 and plan.saved_attention and plan.mlp_tile_tokens and plan.fits
    assert plan.predicted_peak <= budget - margin_for(budget)
    # Where the groups in flight do not fit either, the attention is recomputed: inputs only in flight.
    plan = choose_plan(8, c, budget=budget_for(GIB + 2 * c.input + c.saved // 2 + 3 * c.input), **tiled)
    assert not plan.saved_attention and plan.count("offload") and plan.mlp_tile_tokens


@pytest.mark.parametrize("architecture", ["Qwen2", "Qwen3", "Mistral"])
def test_other_decoders_on_sdpa_save_their_attention_too(tokens, architecture):
    """Qwen3's heads are wider than hidden / heads; Mistral passes its sliding window (in the mask, none here)."""
    import transformers

    def build(mode):
        config = getattr(transformers, f"{architecture}Config")(
            vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, **({"head_dim": 32} if architecture == "Qwen3" else {}),
        )  # fmt: skip
        torch.manual_seed(0)
        model = getattr(transformers, f"{architecture}ForCausalLM")(config).train()
        prepare_model(
            model,
            QuantizationConfig(bits=4),
            TrainingOptions(activation_memory=mode),
            peft_config=LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
        )
        return model

    kept, kept_runs = kernel_runs(build("keep"), tokens)
    offloaded_model = build("offload")
    offloaded, runs = kernel_runs(offloaded_model, tokens)
    assert activation_planner(offloaded_model).plan.saved_attention
    assert (kept_runs, runs) == (2, 2) and same(offloaded, kept)


def test_under_autocast_the_saved_attention_runs_in_autocasts_dtype_as_sdpa_does(tokens):
    # 4-bit layers give float32 queries here; autocast runs SDPA on their bfloat16 casts (a custom
    # op it leaves alone), so the saved attention casts them as autocast would.
    results = {}
    for mode in ("keep", "offload"):
        model = prepared(mode)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results[mode] = kernel_runs(model, tokens)
    assert results["offload"][1] == results["keep"][1] == 2
    assert same(results["offload"][0], results["keep"][0])


def test_explicit_offload_recomputes_the_attention_where_the_host_cannot_hold_it(tokens, monkeypatch, caplog):
    import logging

    from bnb_lightning.training import plan as planning

    model = prepared("offload")
    # Room for the inputs of 2 blocks (2 sequences of 16 tokens, 64 float32 values each), not their
    # attention outputs too.
    monkeypatch.setattr(planning, "host_available", lambda: int(2 * 2 * 16 * 64 * 4 / 0.8) + 1)
    with caplog.at_level(logging.INFO, logger="bnb_lightning"):
        result, runs = kernel_runs(model, tokens)
    assert runs == 4 and not activation_planner(model).plan.saved_attention
    assert "offloaded blocks recompute their attention" in caplog.text and "CPU memory" in caplog.text
    reference, _ = kernel_runs(prepared("recompute"), tokens)
    assert same(result, reference)


def test_explicit_offload_refuses_a_batch_whose_inputs_the_host_cannot_hold(tokens, monkeypatch):
    from bnb_lightning.training import plan as planning

    model = prepared("offload")
    planner = activation_planner(model)
    before = planner.plan
    # Room for 1 block's input (2 sequences of 16 tokens, 64 float32 values each), 2 blocks offloaded:
    # a clear error before the step, where the kernel would otherwise end the process.
    monkeypatch.setattr(planning, "host_available", lambda: 2 * 16 * 64 * 4)
    with pytest.raises(
        MemoryError,
        match=r"offloads 2 blocks, whose inputs at 32 tokens need .* of CPU memory.*activation_memory='auto'",
    ):
        model(input_ids=tokens, labels=tokens).loss.backward()
    assert planner.plan is before and model.model.layers[0].gradient_checkpointing
    # Room for 3 inputs is enough for the 2 offloaded blocks, unless another process on the host shares it.
    monkeypatch.setattr(planning, "host_available", lambda: 3 * 2 * 16 * 64 * 4)
    planner.host_share = 2
    with pytest.raises(MemoryError, match="offloads 2 blocks"):
        model(input_ids=tokens, labels=tokens).loss.backward()
    planner.host_share = 1
    model(input_ids=tokens, labels=tokens).loss.backward()


def test_a_budget_plans_the_offload_within_this_processs_share_of_host_memory(tokens, monkeypatch):
    from bnb_lightning.training import plan as planning
    from bnb_lightning.training.attention import saved_bytes

    offloaded = {}
    for share in (1, 2):
        model = prepared(
            4 * 2**20, layers=4
        )  # a budget nothing fits: as many blocks offloaded as the host holds
        planner = activation_planner(model)
        # Room for 2.5 blocks' inputs and attention outputs (2 sequences of 16 tokens, float32).
        page = pinned_page(2 * 16 * 64 * 4)
        group = pinned_bytes(2 * 16 * 64 * 4, page) + pinned_bytes(
            saved_bytes(planner._attention, 32, 4), page
        )
        monkeypatch.setattr(planning, "host_available", lambda group=group: int(2.5 * group / 0.8))
        planner.host_share = share  # as the callback sets it for two ranks on one machine
        model(input_ids=tokens, labels=tokens).loss.backward()
        offloaded[share] = planner.plan.count("offload")
    assert offloaded[2] < offloaded[1]


@pytest.mark.parametrize("mode", ["offload", 4 * 2**20])
def test_shorter_batches_offload_into_pages_sized_for_the_longest_batch_planned(mode, monkeypatch):
    """Explicit modes and a budget alike: the offload's pinned pages are sized for the longest batch so
    far, so that a shorter batch asks for the pages the longer one left in torch's cache."""
    from conftest import VOCAB

    from bnb_lightning.training import offload

    monkeypatch.setattr(offload, "_SMALLEST_PAGE", 1)  # pages as small as the tiny model's inputs
    model = prepared(mode)
    planner = activation_planner(model)
    generator = torch.Generator().manual_seed(0)
    seen = []
    for length in (16, 8, 40, 12):
        batch = torch.randint(0, VOCAB, (2, length), generator=generator)
        model(input_ids=batch, labels=batch).loss.backward()
        seen.append(planner.offload.page)
    assert planner.plan.count("offload")
    # A block's input: 32 tokens of 64 float32 values, 8 KiB (pages of 1 KiB); 80 tokens, 20 KiB (2 KiB).
    assert seen == [1024, 1024, 2048, 2048]


def test_a_local_world_size_that_is_not_a_count_is_refused_by_name(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "two")
    model = tiny_llama()
    with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE='two' is not a whole number.*torchrun"):
        prepare_model(model, QuantizationConfig(bits=4), TrainingOptions(activation_memory="offload"))
    assert type(model.model.layers[0].mlp.up_proj) is torch.nn.Linear  # refused before anything changed
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert activation_planner(prepared("offload")).host_share == 2
