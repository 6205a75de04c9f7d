"""Sequence-tiled MLPs (bnb_lightning.training.tiled_mlp) in tiny quantized Llamas with LoRA, on CPU: the
same loss and adapter gradients as untiled, less saved for the backward pass, untouched evaluation,
compiled blocks, pickling, and refused tile sizes."""

from __future__ import annotations

import copy
import pickle
import re
import subprocess
import sys

import pytest
import torch
from conftest import tiny_llama
from peft import LoraConfig
from torch._dynamo.testing import CompileCounterWithBackend
from transformers.models.llama.modeling_llama import LlamaMLP

from bnb_lightning import (
    QuantizationConfig,
    inject_adapters,
    prepare_for_kbit_training,
    quantize_model,
    use_dequantized_int8,
    use_fused_4bit_dequantize,
)
from bnb_lightning.training import tiled_mlp
from bnb_lightning.training.tiled_mlp import (
    Tiled,
    block_mlp,
    remove_tiled_mlp,
    set_mlp_tile_tokens,
    tile_module,
    use_tiled_mlp,
)

HIDDEN, INTERMEDIATE = 64, 128  # tiny_llama's sizes: intermediate = 2 x hidden
# Batch 2 of 37 tokens in tiles of 8: four full tiles and one of 5 (37 is not a multiple of 8).
BATCH, SEQUENCE, TILE = 2, 37, 8
TILES = [8, 8, 8, 8, 5]
BITS = pytest.mark.parametrize("bits", [4, 8])
CHECKPOINTING = pytest.mark.parametrize(
    "checkpointing", [False, True], ids=["blocks-kept", "blocks-checkpointed"]
)

# Tiling changes one thing in the arithmetic: the gradient of an MLP weight (here the LoRA A and B of
# gate/up/down) is a sum over tokens, which autograd now adds up tile by tile (one partial sum per
# tile, accumulated) instead of in one matmul over all tokens. That reassociates a float32 sum of 74
# products: measured, the difference is at most 3.6e-7 of the gradient's largest entry (a few ulps).
# 4e-6 of the largest entry (~30 ulps of it) leaves room for other CPUs' summation orders and is still
# far below what a wrong tile (a missing or doubled share of the tokens, >= 1e-2) would change.
MLP_GRAD_ATOL = 4e-6
MLP_GRAD_RTOL = 1e-5


def adapted_llama(bits: int, checkpointing: bool) -> torch.nn.Module:
    """A tiny Llama quantized on the CPU, with random-init LoRA on every linear (every adapter gets a
    gradient) and the layer classes it trains with (fused 4-bit dequantize, dequantized int8)."""
    model = tiny_llama().train()
    quantize_model(model, QuantizationConfig(bits=bits), device="cpu")
    prepare_for_kbit_training(model, gradient_checkpointing=checkpointing)
    torch.manual_seed(0)
    inject_adapters(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    (use_fused_4bit_dequantize if bits == 4 else use_dequantized_int8)(model)
    return model.train()


def tokens(batch: int = BATCH, sequence: int = SEQUENCE) -> torch.Tensor:
    return torch.randint(0, 256, (batch, sequence), generator=torch.Generator().manual_seed(0))


def mlps(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [layer.mlp for layer in model.model.layers]


def training_step(model: torch.nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The loss and the adapter gradients of one forward and backward pass."""
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_step(expected: tuple, actual: tuple) -> None:
    """Loss and every adapter gradient within float32 reassociation (see MLP_GRAD_ATOL).

    The MLPs' weight gradients are summed tile by tile, a different order of the same float32 sum.
    Gradients that flow back out of the MLPs are often bitwise equal too (a matmul row does not depend
    on the rows that go with it in BLAS's general kernel), but not with every kernel the CPU library
    picks, which may change within a process: they are held to the same tolerance.
    """
    (expected_loss, expected_grads), (loss, grads) = expected, actual
    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=0)
    assert grads.keys() == expected_grads.keys() and len(grads) == 28  # 7 linears x (A, B) x 2 blocks
    for name, grad in grads.items():
        atol = MLP_GRAD_ATOL * expected_grads[name].abs().max().item()
        torch.testing.assert_close(grad, expected_grads[name], rtol=MLP_GRAD_RTOL, atol=atol, msg=name)


def record_tiles(model: torch.nn.Module) -> tuple[list[list[int]], list]:
    """Per MLP, the token counts its ``down_proj`` runs on (one entry per tile), and the hook handles."""
    seen: list[list[int]] = [[] for _ in mlps(model)]
    handles = [
        mlp.down_proj.register_forward_hook(lambda module, args, out, i=i: seen[i].append(args[0].shape[-2]))
        for i, mlp in enumerate(mlps(model))
    ]
    return seen, handles


def saved_activations(model: torch.nn.Module, run) -> list[torch.Tensor]:
    """The tensors autograd saves for the backward pass while ``run()`` runs, one per storage, without
    the model's parameters and buffers (the quantized weights some layers save)."""
    state = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    saved: dict[int, torch.Tensor] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage().data_ptr()
        if storage not in state:
            saved.setdefault(storage, tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return list(saved.values())


def mlp_intermediates(saved: list[torch.Tensor], sequence: int) -> list[torch.Tensor]:
    """The saved tensors as wide as the MLP's intermediate size with at least a sequence of rows."""
    return [
        t
        for t in saved
        if t.dim() >= 2 and t.shape[-1] == INTERMEDIATE and t.numel() >= sequence * INTERMEDIATE
    ]


def block_inputs(model: torch.nn.Module, batch: int, sequence: int) -> tuple[torch.Tensor, dict]:
    x = torch.randn(batch, sequence, HIDDEN, generator=torch.Generator().manual_seed(1), requires_grad=True)
    positions = torch.arange(sequence).expand(batch, sequence)
    return x, {"position_ids": positions, "position_embeddings": model.model.rotary_emb(x, positions)}


# -- 1 and 7: the same training step as untiled --------------------------------------------------------


@BITS
@CHECKPOINTING
def test_a_tiled_training_step_gives_the_loss_and_adapter_gradients_of_the_untiled_one(bits, checkpointing):
    batch = tokens()
    expected = training_step(adapted_llama(bits, checkpointing), batch)

    model = adapted_llama(bits, checkpointing)
    assert use_tiled_mlp(model, TILE) == 2
    assert all(type(mlp).__bases__ == (Tiled, LlamaMLP) and mlp.tile_tokens == TILE for mlp in mlps(model))
    seen, handles = record_tiles(model)
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=batch, labels=batch).loss
    # Each MLP ran tile by tile (with checkpointed blocks: inside the block's checkpoint).
    assert seen == [TILES, TILES]
    loss.backward()
    for handle in handles:
        handle.remove()
    actual = loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert_same_step(expected, actual)


@BITS
def test_the_final_norm_over_tiles_gives_the_untiled_loss_and_gradients_and_saves_only_its_input(bits):
    """A norm acts on each token alone, with a frozen weight: over tiles, every number is the same."""
    batch = tokens()
    expected = training_step(adapted_llama(bits, True), batch)

    model = adapted_llama(bits, True)
    norm = model.model.norm
    x = torch.randn(BATCH, SEQUENCE, HIDDEN, requires_grad=True)
    untiled = saved_activations(model, lambda: norm(x))
    assert tile_module(norm, TILE) and isinstance(norm, Tiled) and norm.tile_tokens == TILE
    actual = training_step(model, batch)
    assert torch.equal(actual[0], expected[0])
    assert all(torch.equal(actual[1][name], grad) for name, grad in expected[1].items())
    saved = saved_activations(model, lambda: norm(x))
    # In one piece it saves tensors of its own (its normalized input, ...); over tiles, only views of its input.
    assert any(t.untyped_storage().data_ptr() != x.untyped_storage().data_ptr() for t in untiled)
    assert saved and all(t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for t in saved)
    remove_tiled_mlp(model)
    assert type(norm).__name__ == "LlamaRMSNorm"


@pytest.mark.parametrize("input_grad", [True, False], ids=["input-needs-grad", "input-frozen"])
def test_a_tiled_mlp_equals_the_untiled_one_for_any_batch_and_sequence_length(input_grad):
    """Also with an input that needs no gradient (a frozen base before the MLP): the adapters inside the
    tiles still get theirs, as non-reentrant checkpointing gives them (reentrant would give none)."""
    model = adapted_llama(4, checkpointing=False)
    mlp = block_mlp(model.model.layers[0])
    assert mlp is model.model.layers[0].mlp
    adapters = {name: p for name, p in mlp.named_parameters() if p.requires_grad}
    assert len(adapters) == 6  # gate, up, down x (lora_A, lora_B)
    shapes = [(3, 13, HIDDEN), (1, 37, HIDDEN), (13, HIDDEN), (3, 4, HIDDEN), (2, 3, HIDDEN)]
    for shape in shapes:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
        results = []
        for tile in (None, 4):
            if tile is None:
                remove_tiled_mlp(model)
            else:
                use_tiled_mlp(model, tile)
            seen, handles = record_tiles(model)
            mlp.zero_grad(set_to_none=True)
            leaf = x.clone().requires_grad_(input_grad)
            out = mlp(leaf)
            calls = list(seen[0])
            out.square().sum().backward()
            for handle in handles:
                handle.remove()
            grads = {name: p.grad for name, p in adapters.items()}
            if input_grad:
                grads["input"] = leaf.grad
            results.append((out.detach(), grads, calls))
        (untiled, untiled_grads, untiled_calls), (tiled, tiled_grads, tiled_calls) = results
        tokens_in = shape[-2]
        assert untiled_calls == [tokens_in]
        # Tiles of 4 tokens, the last one shorter; a sequence of at most one tile runs untiled.
        assert tiled_calls == [4] * (tokens_in // 4) + ([tokens_in % 4] if tokens_in % 4 else []), shape
        # Not bitwise: a tile of at most 3 rows (batch x tile tokens) goes through the CPU BLAS's small
        # matmul kernel, which rounds differently from the one a longer input gets (measured: a few
        # float32 ulps of the largest output); and the adapters' gradients add up tile by tile (see
        # MLP_GRAD_ATOL). Equal to that rounding, relative to the largest entry.
        assert tiled_grads.keys() == untiled_grads.keys() == {*adapters, *(["input"] if input_grad else [])}
        for name, got, expected in [("output", tiled, untiled)] + [
            (name, tiled_grads[name], untiled_grads[name]) for name in untiled_grads
        ]:
            atol = 1e-5 * expected.abs().max().item()
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=atol, msg=f"{name} {shape}")


# -- 2: less saved for the backward pass ---------------------------------------------------------------


@BITS
@pytest.mark.parametrize("backend", [None, "aot_eager"], ids=["eager", "compiled"])
def test_a_tiled_block_saves_none_of_the_mlp_intermediates(bits, backend):
    """One block's training forward, uncheckpointed: untiled, it saves the MLP's (batch x sequence x
    intermediate) tensors (eager: gate, up, activation, product; compiled, the compiler recomputes one
    of them); tiled, the tiles' checkpoints save none of them, and what the block saves shrinks by at
    least their bytes."""
    batch, sequence = 2, 40
    intermediate_bytes = batch * sequence * INTERMEDIATE * 4  # one float32 MLP intermediate
    results = {}
    for tile in (None, TILE):
        torch._dynamo.reset()
        model = adapted_llama(bits, checkpointing=False)
        if tile:
            use_tiled_mlp(model, tile)
        block = model.model.layers[0]
        if backend:
            block.compile(backend=backend)
        x, kwargs = block_inputs(model, batch, sequence)
        saved = saved_activations(model, lambda block=block, x=x, kwargs=kwargs: block(x, **kwargs))
        results[tile] = sum(t.untyped_storage().nbytes() for t in saved), mlp_intermediates(saved, sequence)
    torch._dynamo.reset()
    (untiled_bytes, untiled_wide), (tiled_bytes, tiled_wide) = results[None], results[TILE]
    assert len(untiled_wide) >= (3 if backend else 4) and tiled_wide == []
    assert all(t.untyped_storage().nbytes() >= intermediate_bytes for t in untiled_wide)
    wide_bytes = sum(t.untyped_storage().nbytes() for t in untiled_wide)
    assert tiled_bytes <= untiled_bytes - wide_bytes, (tiled_bytes, untiled_bytes, wide_bytes)


# -- 3: evaluation and no-grad forwards ----------------------------------------------------------------


@BITS
def test_evaluation_and_no_grad_forwards_run_the_mlp_untiled(bits):
    batch = tokens()
    untiled, tiled = adapted_llama(bits, False), adapted_llama(bits, False)
    use_tiled_mlp(tiled, TILE)
    seen, _ = record_tiles(tiled)

    # Training mode without gradients, then evaluation mode with them (the same weights' forwards in
    # both models, so the 4-bit weights bitsandbytes repacks in eval no-grad forwards stay alike).
    with torch.no_grad():
        assert torch.equal(tiled(input_ids=batch).logits, untiled(input_ids=batch).logits)
    assert seen == [[SEQUENCE], [SEQUENCE]]  # each MLP ran once, on the whole sequence
    for calls in seen:
        calls.clear()
    tiled.eval()
    untiled.eval()
    x, kwargs = block_inputs(tiled, BATCH, SEQUENCE)
    outputs, wide = [], []
    for model in (untiled, tiled):
        block = model.model.layers[0]
        saved = saved_activations(model, lambda block=block: outputs.append(block(x, **kwargs)))
        wide.append(len(mlp_intermediates(saved, SEQUENCE)))
    assert seen == [[SEQUENCE], []]
    assert torch.equal(outputs[0], outputs[1])
    # Not checkpointed: the evaluation forward with gradients saves the MLP's intermediates as untiled.
    assert wide[1] == wide[0] >= 4
    with torch.no_grad():
        assert torch.equal(tiled(input_ids=batch).logits, untiled(input_ids=batch).logits)


# -- 4: compiled blocks --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bits", "checkpointing", "backend"),
    [(4, True, "inductor"), (8, False, "inductor"), (4, False, "aot_eager"), (8, True, "aot_eager")],
)
def test_compiled_tiled_blocks_train_as_the_eager_ones(bits, checkpointing, backend):
    from torch._dynamo.utils import counters

    batch = tokens()
    eager = adapted_llama(bits, checkpointing)
    use_tiled_mlp(eager, TILE)
    expected = training_step(eager, batch)

    torch._dynamo.reset()
    counters.clear()
    model = adapted_llama(bits, checkpointing)
    use_tiled_mlp(model, TILE)
    counter = CompileCounterWithBackend(backend)
    for layer in model.model.layers:
        layer.compile(backend=counter)
    try:
        loss, grads = training_step(model, batch)
        # The tiles' checkpoints are traced into the block's graph: compiled, nothing breaks it.
        assert counter.frame_count >= 1 and dict(counters["graph_break"]) == {}
        # Inductor fuses and reorders float32 arithmetic: compiled and eager agree to rounding.
        torch.testing.assert_close(loss, expected[0], rtol=1e-6, atol=0)
        assert grads.keys() == expected[1].keys()
        for name, grad in grads.items():
            scale = expected[1][name].abs().max().item()
            torch.testing.assert_close(grad, expected[1][name], rtol=1e-5, atol=4e-6 * scale, msg=name)
    finally:
        torch._dynamo.reset()


# -- 5: copies, pickles, removal -----------------------------------------------------------------------


def test_a_tiled_model_deep_copies_and_pickles_as_tiled_and_comes_off_exactly():
    batch = tokens()
    # Checkpointing off: with it on, no model pickles, tiled or not (the hook transformers'
    # enable_input_require_grads registers is a local function).
    model = adapted_llama(4, checkpointing=False)
    keys = list(model.state_dict())
    use_tiled_mlp(model, TILE)
    assert list(model.state_dict()) == keys  # the class changes, the state dict does not
    cls = type(model.model.layers[0].mlp)
    assert cls.__name__ == "TiledLlamaMLP" and cls.__module__ == "bnb_lightning.training.tiled_mlp"
    # Copies made before any forward (bitsandbytes' CPU kernels rewrite 4-bit statistics on the first).
    copied, unpickled = copy.deepcopy(model), pickle.loads(pickle.dumps(model))
    assert pickle.loads(pickle.dumps(cls)) is cls and tiled_mlp.TiledLlamaMLP is cls
    expected = training_step(model, batch)
    for other in (copied, unpickled):
        assert [type(mlp) for mlp in mlps(other)] == [cls, cls]
        assert [vars(mlp)["tile_tokens"] for mlp in mlps(other)] == [TILE, TILE]
        loss, grads = training_step(other, batch)
        assert torch.equal(loss, expected[0])
        assert all(torch.equal(grads[name], expected[1][name]) for name in grads)

    untiled = adapted_llama(4, checkpointing=False)
    remove_tiled_mlp(model)
    assert [type(mlp) for mlp in mlps(model)] == [LlamaMLP, LlamaMLP]
    assert all("tile_tokens" not in vars(mlp) for mlp in mlps(model))
    assert list(model.state_dict()) == keys
    loss, grads = training_step(model, batch)
    expected_loss, expected_grads = training_step(untiled, batch)
    assert torch.equal(loss, expected_loss)
    assert all(torch.equal(grads[name], expected_grads[name]) for name in grads)
    remove_tiled_mlp(model)  # nothing left to undo
    assert [type(mlp) for mlp in mlps(model)] == [LlamaMLP, LlamaMLP]


def test_a_tiled_model_unpickles_in_a_fresh_process(tmp_path):
    """The tiled class is rebuilt from the MLP's own class, which another process imports by name."""
    batch = tokens()
    model = adapted_llama(8, checkpointing=False)
    use_tiled_mlp(model, TILE)
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps(model))
    expected_loss, _ = training_step(model, batch)
    script = f"""
import pickle, torch
torch.set_num_threads(1)
model = pickle.loads(open({str(path)!r}, "rb").read())
mlp = model.model.layers[0].mlp
print(type(mlp).__module__, type(mlp).__name__, [c.__name__ for c in type(mlp).__mro__[1:3]], mlp.tile_tokens)
batch = torch.randint(0, 256, ({BATCH}, {SEQUENCE}), generator=torch.Generator().manual_seed(0))
print(model(input_ids=batch, labels=batch).loss.item().hex())
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[-2] == f"bnb_lightning.training.tiled_mlp TiledLlamaMLP ['Tiled', 'LlamaMLP'] {TILE}"
    assert lines[-1] == expected_loss.item().hex()


# -- sizes: changing them, refusing bad ones -----------------------------------------------------------


def test_the_tile_size_changes_without_swapping_again_and_none_pauses_tiling():
    model = adapted_llama(8, checkpointing=False)
    batch = tokens(1, 20)
    assert use_tiled_mlp(model, 16) == 2
    classes = [type(mlp) for mlp in mlps(model)]
    seen, _ = record_tiles(model)

    def tiles() -> list[int]:
        for calls in seen:
            calls.clear()
        model(input_ids=batch, labels=batch)
        assert seen[0] == seen[1]
        return list(seen[0])

    assert tiles() == [16, 4]
    assert use_tiled_mlp(model, 6) == 2 and tiles() == [6, 6, 6, 2]
    assert set_mlp_tile_tokens(model, 10) == 2 and tiles() == [10, 10]
    assert set_mlp_tile_tokens(model, 20) == 2 and tiles() == [20]  # one tile: untiled
    assert set_mlp_tile_tokens(model, None) == 2 and tiles() == [20]
    assert [type(mlp) for mlp in mlps(model)] == classes  # swapped once
    assert type(mlps(model)[0]).__bases__ == (Tiled, LlamaMLP)
    remove_tiled_mlp(model)
    assert set_mlp_tile_tokens(model, 8) == 0 and tiles() == [20]


def test_mlps_are_found_under_each_name_and_blocks_without_one_are_skipped():
    model = tiny_llama(layers=3)
    layers = model.model.layers
    layers[0].feed_forward = layers[0]._modules.pop("mlp")
    layers[1].ffn = layers[1]._modules.pop("mlp")
    layers[2].mlp = None  # no MLP here (a block structure this module does not know)
    assert [block_mlp(layer) for layer in layers] == [layers[0].feed_forward, layers[1].ffn, None]
    assert use_tiled_mlp(model, TILE) == 2
    assert isinstance(layers[0].feed_forward, Tiled) and isinstance(layers[1].ffn, Tiled)
    remove_tiled_mlp(model)
    layers[0].feed_forward.forward = layers[0].feed_forward.forward  # e.g. accelerate's hooks
    assert use_tiled_mlp(model, TILE) == 1 and type(layers[0].feed_forward) is LlamaMLP


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "8"])
def test_bad_tile_sizes_are_refused_with_what_was_given_and_what_is_expected(bad):
    model = adapted_llama(4, checkpointing=False)
    message = re.escape(
        f"tile_tokens must be an int >= 1 (the tokens of one MLP tile, e.g. 4096), got {bad!r} ("
    )
    with pytest.raises(ValueError, match=message):
        use_tiled_mlp(model, bad)
    assert not any(isinstance(module, Tiled) for module in model.modules())  # refused before any change
    use_tiled_mlp(model, TILE)
    with pytest.raises(ValueError, match=message):
        set_mlp_tile_tokens(model, bad)
    assert [mlp.tile_tokens for mlp in mlps(model)] == [TILE, TILE]
