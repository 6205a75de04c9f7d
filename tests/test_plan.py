"""The activation planner (bnb_lightning.training.plan): budgets, per-block modes, re-planning, on CPU."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from conftest import CausalLM, TiedMLP, fit, lora, quantized_llama, tiny_llama
from peft import LoraConfig
from torch import nn

from bnb_lightning import (
    ActivationBlock,
    BnbQuantization,
    QuantizationConfig,
    TrainingOptions,
    activation_planner,
    plan_activations,
    prepare_model,
)
from bnb_lightning.training.loss import use_chunked_loss
from bnb_lightning.training.plan import BlockCost, choose_plan, margin_for, measure_block
from bnb_lightning.training.tiled_mlp import Tiled

GIB = 2**30


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("auto", "auto"),
        ("24GB", 24 * 10**9),
        ("20GiB", 20 * GIB),
        ("1.5gb", 1_500_000_000),
        ("512 MiB", 512 * 2**20),
        (8 * GIB, 8 * GIB),
        ("offload", "offload"),
        (["keep", "offload"], ("keep", "offload")),
    ],
)
def test_activation_memory_takes_auto_a_budget_or_modes(value, expected):
    assert TrainingOptions(activation_memory=value).activation_memory == expected


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (
            {"activation_memory": "24 gigs"},
            "activation_memory='24 gigs' is not understood; expected 'auto', a",
        ),
        ({"activation_memory": "fast"}, "is not understood"),
        ({"activation_memory": ["keep", "fast"]}, r"has unknown modes \['fast'\]"),
        ({"activation_memory": []}, "has unknown modes"),
        ({"activation_memory": 1000}, "less than 1 MiB"),
        ({"activation_memory": True}, "is not understood"),
        ({"activation_memory": "offload", "gradient_checkpointing": True}, "set one of them"),
        ({"activation_memory": "offload", "uncheckpointed_blocks": 2}, "pass one or the other"),
        ({"activation_memory": "keep", "uncheckpointed_blocks": 2}, "pass one or the other"),
        ({"gradient_checkpointing": False, "uncheckpointed_blocks": 2}, "only applies with gradient"),
    ],
)
def test_bad_activation_memory_is_refused_with_the_fix(options, match):
    with pytest.raises(ValueError, match=match):
        TrainingOptions(**options)


def cost(
    tokens: int = 1000, saved: int = 100, input: int = 10, mlp: int = 60, largest: int = 20
) -> BlockCost:
    return BlockCost(
        tokens=tokens, saved=saved * 2**20, input=input * 2**20, mlp=mlp * 2**20, largest=largest * 2**20
    )


def budget_for(peak: int) -> int:
    """The budget whose margin leaves ``peak`` bytes: budget - budget/20 - 256 MiB = peak."""
    return int((peak + (256 << 20)) * 20 / 19) + 1


def test_a_large_budget_keeps_every_block():
    plan = choose_plan(8, cost(), static=GIB, budget=100 * GIB, vocab=128256)
    assert plan.modes == ("keep",) * 8 and plan.mlp_tile_tokens is None
    # Kept blocks: all they save, plus the loss after the last block (larger here than a block's gradients).
    assert plan.predicted_peak == GIB + 8 * cost().saved + 3 * cost().input + (768 << 20)


def test_the_fused_loss_counts_a_hidden_state_sized_logits_chunk():
    """Liger's kernel bounds its logits chunk by the hidden states' size, not the torch kernel's 2**26
    float32 values: with every block kept, the loss after the last block adds that much less."""
    c = cost()
    plan = choose_plan(8, c, static=GIB, budget=100 * GIB, vocab=128256, fused_loss=True)
    assert plan.modes == ("keep",) * 8
    # The loss (3 hidden-state copies and a chunk of 2) is now below a block's gradient transient.
    assert plan.predicted_peak == GIB + 8 * c.saved + max(2 * c.input + 3 * c.largest, 5 * c.input)
    unfused = choose_plan(8, c, static=GIB, budget=100 * GIB, vocab=128256)
    assert unfused.predicted_peak == GIB + 8 * c.saved + 3 * c.input + (768 << 20) > plan.predicted_peak


def test_the_planner_counts_the_fused_loss_only_where_it_runs():
    """On the CPU (or with loss_kernel="torch") the loss runs the torch kernel: the planner counts it."""
    model = quantized_llama()
    use_chunked_loss(model)
    assert not plan_activations(model, "auto", torch.device("cpu"))._liger_loss


def test_an_output_layer_gathered_for_the_loss_counts_in_the_peak_and_leaves_room_for_fewer_kept_blocks():
    """FSDP2 gathers an output layer that is a unit of its own only for the loss, after every kept block saved
    its activations, which then hold the most: the gathered layer comes on top of them (2 GiB for a 70B)."""
    c, head = cost(), 256 << 20  # cost() is in MiB: a head 2.5 blocks of activations large
    alone = choose_plan(8, c, static=GIB, budget=100 * GIB, vocab=128256)
    gathered = choose_plan(8, c, static=GIB, budget=100 * GIB, vocab=128256, head_bytes=head)
    assert gathered.predicted_peak == alone.predicted_peak + head
    budget = budget_for(alone.predicted_peak)  # room for every block kept, not for the gathered layer too
    assert choose_plan(8, c, static=GIB, budget=budget, vocab=128256).modes == ("keep",) * 8
    tight = choose_plan(8, c, static=GIB, budget=budget, vocab=128256, head_bytes=head)
    assert tight.count("keep") < 8 and tight.fits
    assert tight.predicted_peak <= budget - margin_for(budget)


def test_a_middle_budget_keeps_the_last_blocks_and_recomputes_the_others():
    c = cost()
    # Room for 3 kept blocks and 5 inputs, with a recomputed block's transient.
    transient = max(c.saved + 2 * c.input + 3 * c.largest, 3 * c.input + (768 << 20))
    fragmentation = 2 * c.largest
    budget = budget_for(GIB + 3 * c.saved + 5 * c.input + transient + fragmentation)
    plan = choose_plan(8, c, static=GIB, budget=budget, vocab=128256)
    assert plan.modes == ("recompute",) * 5 + ("keep",) * 3
    assert plan.predicted_peak <= plan.budget - margin_for(plan.budget)


def test_a_tight_budget_offloads_the_first_blocks_and_then_tiles_the_mlp():
    c = cost(saved=1000, input=100, mlp=800, largest=200)
    transient = c.saved + 2 * c.input + 3 * c.largest + 2 * c.largest  # with room for fragmentation
    # Recomputing all 8 does not fit; with 3 inputs on the device (and 2 in flight) it does.
    plan = choose_plan(8, c, static=GIB, budget=budget_for(GIB + 3 * c.input + 2 * c.input + transient))
    assert plan.modes == ("offload",) * 5 + ("recompute",) * 3 and plan.mlp_tile_tokens is None
    # Even with every block offloaded a block's recompute does not fit: its MLP runs in tiles.
    plan = choose_plan(8, c, static=GIB, budget=budget_for(GIB + transient), can_tile=True)
    assert plan.count("offload") and plan.mlp_tile_tokens == 1000 // 8 and plan.fits
    assert plan.predicted_peak <= plan.budget - margin_for(plan.budget)
    # Measured, the largest tensor outside a tiled MLP replaces the assumed float32 copy of the input.
    measured = choose_plan(
        8, dataclasses.replace(c, largest_outside_mlp=c.input), static=GIB, budget=plan.budget, can_tile=True
    )
    assert measured.mlp_tile_tokens == plan.mlp_tile_tokens
    assert (
        measured.count("offload") <= plan.count("offload") and measured.predicted_peak < plan.predicted_peak
    )
    # With expandable segments the allocator needs room for one largest tensor, not two: a budget
    # that made the MLP tile without them fits untiled, every block offloaded.
    tight = budget_for(GIB + 2 * c.input + c.saved + 2 * c.input + 3 * c.largest + c.largest)
    assert choose_plan(8, c, static=GIB, budget=tight, can_tile=True).mlp_tile_tokens
    plan = choose_plan(8, c, static=GIB, budget=tight, can_tile=True, expandable_segments=True)
    assert plan.modes == ("offload",) * 8 and plan.mlp_tile_tokens is None and plan.fits
    # Without offload (FSDP) every block is recomputed, over the budget (the planner warns).
    plan = choose_plan(8, c, static=GIB, budget=budget_for(GIB + transient), allow_offload=False)
    assert plan.modes == ("recompute",) * 8 and not plan.fits
    # Host memory for 2 inputs only: no more than 2 blocks are offloaded.
    plan = choose_plan(
        8, c, static=GIB, budget=budget_for(GIB + transient), host_bytes=int(2.5 * c.input / 0.8)
    )
    assert plan.count("offload") == 2


def step(model: nn.Module, tokens: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def same(a: tuple, b: tuple) -> bool:
    """Two ``step`` results are bitwise equal."""
    return a[0] == b[0] and a[1].keys() == b[1].keys() and all(torch.equal(a[1][n], b[1][n]) for n in a[1])


def prepared_llama(activation_memory, bits: int = 4, layers: int = 4):
    model = tiny_llama(layers=layers).train()
    prepared = prepare_model(
        model,
        QuantizationConfig(bits=bits),
        TrainingOptions(activation_memory=activation_memory),
        peft_config=LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
    )
    return model, prepared


def measured(tokens: torch.Tensor, bits: int = 4) -> tuple[BlockCost, int]:
    """One block's cost on ``tokens``, and the static bytes, as the planner of ``prepared_llama`` measures them."""
    model, prepared = prepared_llama("auto", bits)
    step(model, tokens)
    return prepared.activations.plan.cost, prepared.activations.plan.static


def test_measure_block_counts_what_a_kept_block_saves(tokens):
    model, _ = prepared_llama("recompute")
    block = model.model.layers[0]
    captured = {}
    block.register_forward_pre_hook(
        lambda module, args, kwargs: captured.update(args=args, kwargs=kwargs), with_kwargs=True
    )
    model(input_ids=tokens, labels=tokens)
    c = measure_block(block, captured["args"], captured["kwargs"])
    assert c.tokens == tokens.numel() and c.input == tokens.numel() * 64 * 4  # hidden 64, float32
    assert c.saved > 4 * c.input and 0 < c.mlp < c.saved and c.largest <= c.saved


def test_a_long_batch_is_measured_with_its_mlp_over_tiles_and_scaled_alike(tokens, monkeypatch):
    import bnb_lightning.training.plan as plan_module
    from bnb_lightning import remove_tiled_mlp

    model, _ = prepared_llama("auto")
    assert all(isinstance(block.mlp, Tiled) and block.mlp.tile_tokens is None for block in model.model.layers)
    # The final norm runs over tiles of the probe's size, in every plan (its backward is float32).
    assert (
        isinstance(model.model.norm, Tiled) and model.model.norm.tile_tokens == plan_module.PROBE_TILE_TOKENS
    )
    block = model.model.layers[0]
    captured = {}
    block.register_forward_pre_hook(
        lambda module, args, kwargs: captured.update(args=args, kwargs=kwargs), with_kwargs=True
    )
    model(input_ids=tokens, labels=tokens)
    monkeypatch.setattr(plan_module, "PROBE_TILE_TOKENS", 4)  # 16 tokens a sequence: 4 tiles
    sampled = measure_block(block, captured["args"], captured["kwargs"])
    assert block.mlp.tile_tokens is None  # as it was
    remove_tiled_mlp(model)
    assert not isinstance(model.model.norm, Tiled)
    whole = measure_block(block, captured["args"], captured["kwargs"])
    assert (sampled.tokens, sampled.input, sampled.largest) == (whole.tokens, whole.input, whole.largest)
    # Over tiles, the largest saved tensor outside the MLP is known too: smaller than the MLP's intermediate.
    assert whole.largest_outside_mlp == 0 and 0 < sampled.largest_outside_mlp < whole.largest
    # A little more, never less: the MLP's input counts in the tiled block and in the MLP measured
    # apart, and what an MLP saves once a call (bitsandbytes' CPU path may save a dequantized weight)
    # is scaled up with the tokens.
    assert whole.mlp <= sampled.mlp <= 1.5 * whole.mlp
    assert whole.saved <= sampled.saved <= 1.5 * whole.saved


@pytest.mark.parametrize("bits", [4, 8])
def test_a_budget_plans_on_the_first_batch_trains_bitwise_as_recompute_and_plans_again_for_a_longer_one(
    tokens, bits, caplog
):
    c, static = measured(tokens, bits)
    transient = (
        max(c.saved + 2 * c.input + 3 * c.largest, 3 * c.input + 3 * 4 * c.tokens * 256) + 2 * c.largest
    )
    # Room for 2 kept blocks (and half a block more), the others recomputed.
    budget = budget_for(static + 2 * c.saved + 2 * c.input + transient + c.saved // 2)
    reference, _ = prepared_llama("recompute", bits)
    model, prepared = prepared_llama(budget, bits)
    planner = prepared.activations
    assert (
        planner.plan is None and "planned on the first training batch, for a budget of" in planner.describe()
    )

    with caplog.at_level(logging.INFO, logger="bnb_lightning"):
        assert same(step(model, tokens), step(reference, tokens))
    plan = planner.plan
    # The last blocks kept, the first ones offloaded with their attention outputs (4 heads of 16 float32
    # values and a log-sum-exp a token), as the measured cost and the budget allow.
    attention = 32 * 4 * (16 * 4 + 4)
    assert plan == choose_plan(4, plan.cost, plan.static, budget, vocab=256, attention=attention)
    kept = plan.count("keep")
    assert 0 < kept < 4 and plan.modes == ("offload",) * (4 - kept) + ("keep",) * kept and plan.tokens == 32
    assert [block.gradient_checkpointing for block in model.model.layers] == [m != "keep" for m in plan.modes]
    assert (
        f"activations: {kept} block" in caplog.text
        and "offloaded; offloaded blocks' attention" in caplog.text
    )

    # A shorter batch fits the plan; a longer one is measured and planned for before it runs.
    assert same(step(model, tokens[:, :8]), step(reference, tokens[:, :8]))
    assert planner.plan is plan and planner.plans == 1
    longer = torch.cat([tokens, tokens], dim=1)
    assert same(step(model, longer), step(reference, longer))
    assert planner.plans == 2 and planner.plan.tokens == 64 and planner.plan.count("keep") <= kept
    assert planner.plan.cost.input == 2 * plan.cost.input and planner.plan.cost.saved > plan.cost.saved
    # Evaluation plans nothing.
    with torch.no_grad():
        model(input_ids=torch.cat([longer, longer], dim=1))
    assert planner.plans == 2


@pytest.mark.parametrize("mode", ["recompute", "offload"])
def test_a_block_is_recomputed_under_the_default_dtype_of_its_forward(tokens, mode):
    # Lightning's "bf16-true" sets the default dtype for the forward pass only. Recomputed under
    # another, a compiled block failed its guards and compiled again; past torch.compile's recompile
    # limit it ran eagerly and checkpoint failed ("A different number of tensors was saved").
    model, _ = prepared_llama(mode)
    seen = []
    for block in model.model.layers:
        block.mlp.register_forward_pre_hook(lambda *_: seen.append(torch.get_default_dtype()))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        loss = model(input_ids=tokens, labels=tokens).loss
    finally:
        torch.set_default_dtype(previous)
    loss.backward()
    assert seen == [torch.float64] * 8  # 4 forwards, then 4 recomputes
    assert torch.get_default_dtype() == previous


def test_a_budget_with_no_room_for_recompute_offloads_and_tiles_within_float_tolerance(tokens, caplog):
    c, static = measured(tokens)
    reference, _ = prepared_llama("recompute")
    model, prepared = prepared_llama(budget_for(static + c.input))
    with caplog.at_level(logging.WARNING, logger="bnb_lightning"):
        loss, grads = step(model, tokens)
    plan = prepared.activations.plan
    assert plan.count("offload") == 4 and plan.mlp_tile_tokens
    assert any(isinstance(m, Tiled) for m in model.modules())
    assert "may run out of memory" in caplog.text  # 1 input is less than any block's recompute needs
    expected_loss, expected = step(reference, tokens)
    # The tiled MLP multiplies each tile on its own: equal up to float32 summation order.
    assert loss == pytest.approx(expected_loss, abs=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-6)


def test_a_list_of_modes_is_taken_as_it_is_and_checked_against_the_blocks(tokens):
    model, prepared = prepared_llama(["offload", "recompute", "keep", "keep"])
    assert [block.gradient_checkpointing for block in model.model.layers] == [True, True, False, False]
    reference, _ = prepared_llama("keep")
    assert same(step(model, tokens), step(reference, tokens))
    assert (
        "activations: 2 blocks kept, 1 recomputed, 1 offloaded; offloaded blocks' attention outputs in CPU "
        in (" ".join(prepared.messages()))
    )

    model = tiny_llama(layers=4)
    with pytest.raises(ValueError, match="lists 2 modes, but the model has 4 blocks"):
        prepare_model(model, QuantizationConfig(), {"activation_memory": ["keep", "keep"]})
    assert all(type(m) is not torch.nn.Linear or m.weight.dtype == torch.float32 for m in model.modules())
    assert not any("Linear4bit" in type(m).__name__ for m in model.modules())  # refused before quantizing


def test_uncheckpointed_blocks_is_an_explicit_plan(tokens):
    model = tiny_llama(layers=4).train()
    prepared = prepare_model(model, QuantizationConfig(), {"uncheckpointed_blocks": 1}, peft_config=lora())
    assert prepared.activations.plan.modes == ("recompute",) * 3 + ("keep",)


def test_a_budget_smaller_than_the_model_is_refused():
    model = tiny_llama(layers=4, hidden=512).train()
    with pytest.raises(ValueError, match=r"is less than the model itself .* Give a larger one"):
        prepare_model(model, QuantizationConfig(), {"activation_memory": "2MiB"})
    assert activation_planner(model) is None


class Block(ActivationBlock):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.down(torch.relu(self.up(hidden)))


class Stack(nn.Module):
    """A plain ``nn.Module`` language model whose blocks derive from ActivationBlock."""

    def __init__(self, width: int = 32, depth: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, 50)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(ids)
        for block in self.blocks:
            hidden = block(hidden)
        return nn.functional.cross_entropy(self.head(hidden).flatten(0, 1), ids.flatten())


@pytest.mark.parametrize("setting", ["keep", "recompute", "offload", "auto"])
def test_a_plain_module_stack_of_activation_blocks_is_planned_too(setting):
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))
    results = []
    for activation_memory in ("keep", setting):
        model = Stack().train()
        planner = plan_activations(model, activation_memory)
        model(ids).backward()
        results.append([p.grad for p in model.parameters()])
        assert planner.plan.modes == (
            (activation_memory,) * 3 if activation_memory != "auto" else ("keep",) * 3
        )
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))
    assert plan_activations(TiedMLP(), "offload") is None  # no blocks, nothing to plan


def test_the_callback_exposes_and_logs_its_plan(tmp_path, caplog):
    callback = BnbQuantization(peft_config=lora())
    with caplog.at_level(logging.INFO):
        fit(tmp_path, CausalLM(), [callback])
    assert callback.activation_plan.modes == ("keep", "keep") and callback.activation_plan.tokens == 32
    assert "activations: 2 blocks kept; predicted peak" in caplog.text


def test_the_planner_knows_whether_the_allocator_expands_its_segments(monkeypatch):
    from bnb_lightning.training.plan import _expandable_segments

    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.delenv(name, raising=False)
    assert not _expandable_segments(torch.device("cpu"))
    assert _expandable_segments(torch.device("cuda"))  # the planner turns them on once blocks are recomputed
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "max_split_size_mb:128")  # the user's choice is left alone
    assert not _expandable_segments(torch.device("cuda"))
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "max_split_size_mb:128, expandable_segments:True")
    assert _expandable_segments(torch.device("cuda"))
