"""On a CUDA GPU: layer-by-layer quantization never puts the full-precision model on the device."""

from __future__ import annotations

import pytest
import torch

from bnb_lightning import QuantizationConfig, quantize_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def llama_on_cpu(hidden: int = 1024, layers: int = 8):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 128,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(torch.bfloat16)


@pytest.mark.parametrize("bits", [4, 8])
def test_peak_device_memory_is_quantized_size_plus_one_layer(bits):
    model = llama_on_cpu()
    full_bytes = sum(p.nbytes for p in model.parameters())
    largest_layer = max(m.weight.nbytes for m in model.modules() if type(m) is torch.nn.Linear)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()

    report = quantize_model(model, QuantizationConfig(bits=bits), device="cuda")

    torch.cuda.synchronize()
    footprint = torch.cuda.memory_allocated() - start
    peak = torch.cuda.max_memory_allocated() - start
    print(
        f"\n{bits}-bit: full bf16 {full_bytes / 2**20:.1f} MiB, on device {footprint / 2**20:.1f} MiB, "
        f"peak {peak / 2**20:.1f} MiB (peak/footprint {peak / footprint:.3f}), largest layer "
        f"{largest_layer / 2**20:.1f} MiB, {report.seconds:.2f} s"
    )
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    # Everything on the device is accounted for: the model minus its linear weights plus their quantized form.
    assert footprint <= full_bytes - report.bytes_before + report.bytes_after + 2**20
    # One layer's weights in flight (its bf16 copy and bitsandbytes' working buffers), never more.
    assert peak - footprint <= 3 * largest_layer


def test_the_chunked_loss_check_adds_no_weight_sized_memory():
    from peft import LoraConfig

    from bnb_lightning import inject_adapters, use_chunked_loss

    model = llama_on_cpu()
    quantize_model(model, QuantizationConfig(bits=4), device="cuda")
    inject_adapters(model, LoraConfig(r=8, target_modules="all-linear"))
    model.train()
    head = model.get_output_embeddings().weight
    torch.ones(8, 8, device="cuda") @ torch.ones(8, 8, device="cuda")  # cuBLAS' workspace, made once
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()

    assert use_chunked_loss(model) == [""]

    torch.cuda.synchronize()
    added = torch.cuda.max_memory_allocated() - start
    print(
        f"\nchunked-loss check: {added / 2**20:.2f} MiB over the model (head {head.nbytes / 2**20:.1f} MiB)"
    )
    # No copy of the head and no decoder forward (which dequantizes a layer, 8 MiB here): 8 tokens' logits.
    assert added <= 4 * 2**20


def test_quantized_model_trains_on_gpu():
    from peft import LoraConfig

    from bnb_lightning import inject_adapters

    model = llama_on_cpu(hidden=256, layers=2)
    quantize_model(model, QuantizationConfig(bits=4, compute_dtype="bf16"), device="cuda")
    inject_adapters(model, LoraConfig(r=8, target_modules="all-linear"))
    model.cuda().train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    tokens = torch.arange(4 * 64, device="cuda").remainder(11).view(4, 64)
    losses = []
    for _ in range(20):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0, losses


@pytest.mark.parametrize(
    "tensor",
    [
        torch.randn(1000, 333, dtype=torch.bfloat16),  # spans several staging chunks, the last one partial
        torch.randn(7, dtype=torch.float32),
        torch.tensor(3.5),
        torch.rand(4097) > 0.5,
        torch.randn(64, 48).T,  # not contiguous: a plain copy
    ],
    ids=["bf16-chunks", "fp32-small", "scalar", "bool", "transposed"],
)
def test_host_to_device_copies_exactly(tensor):
    from bnb_lightning.transfer import HostToDevice

    upload = HostToDevice(torch.device("cuda"), chunk_bytes=4096)
    copies = [upload(tensor) for _ in range(3)]  # the staging buffers are reused across calls
    for copy in copies:
        assert copy.device.type == "cuda" and copy.dtype == tensor.dtype and copy.shape == tensor.shape
        assert torch.equal(copy.cpu(), tensor)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantizing_from_the_cpu_matches_quantizing_on_the_device(bits):
    from_cpu = llama_on_cpu(hidden=256, layers=2)
    on_device = llama_on_cpu(hidden=256, layers=2).cuda()
    quantize_model(from_cpu, QuantizationConfig(bits=bits), device="cuda")
    quantize_model(on_device, QuantizationConfig(bits=bits), device="cuda")
    expected, got = on_device.state_dict(), from_cpu.state_dict()
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        # bitsandbytes keeps some 8-bit state (weight_format) on the CPU either way.
        assert got[key].device == value.device and torch.equal(got[key], value), key


def test_keep_on_host_quantizes_on_the_device_and_keeps_the_model_in_cpu_memory():
    """For FSDP2: the device holds one layer at a time, and the model, moved there later, is the same."""
    kept = llama_on_cpu(hidden=256, layers=2)
    direct = llama_on_cpu(hidden=256, layers=2)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()  # what earlier tests left (compiled graphs' buffers, caches)
    quantize_model(kept, QuantizationConfig(bits=4), device="cuda", keep_on_host=True)
    linears = [
        m.weight for m in direct.modules() if isinstance(m, torch.nn.Linear) and m is not direct.lm_head
    ]
    largest = max(w.numel() * w.element_size() for w in linears)
    whole = sum(p.numel() * p.element_size() for p in direct.parameters())
    # One full-precision layer and its quantized form at a time; never the embeddings or the whole model.
    assert torch.cuda.max_memory_allocated() - before < 4 * largest + (1 << 20) < whole / 4
    assert all(t.device.type == "cpu" for t in (*kept.parameters(), *kept.buffers()))
    layer = kept.model.layers[0].mlp.up_proj
    assert layer.quant_state.absmax.device.type == "cpu" and layer.weight.quant_state is layer.quant_state
    quantize_model(direct, QuantizationConfig(bits=4), device="cuda")
    kept.cuda()
    expected, got = direct.state_dict(), kept.state_dict()
    assert expected.keys() == got.keys() and all(torch.equal(got[k], v) for k, v in expected.items())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", [(4096, 1024), (96, 200), (130, 70)])
def test_fused_dequantization_equals_bitsandbytes_kernel(quant_type, double_quant, shape):
    import bitsandbytes.functional as BF

    from bnb_lightning.training.linear4bit import dequantize_4bit

    torch.manual_seed(0)
    weight = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
    packed, state = BF.quantize_4bit(weight, quant_type=quant_type, compress_statistics=double_quant)
    expected = BF.dequantize_4bit(packed, state).to(torch.bfloat16)
    assert torch.equal(dequantize_4bit(packed, state, torch.bfloat16), expected)
    compiled = torch.compile(dequantize_4bit)(packed, state, torch.bfloat16)
    # A compiled kernel may contract the double-quantized scale's multiply-add: one float32 rounding.
    torch.testing.assert_close(compiled, expected, rtol=2**-7, atol=0)
    if not double_quant:
        assert torch.equal(compiled, expected)


def test_compiled_blocks_with_fused_dequantization_match_bitsandbytes_op():
    from bnb_lightning.training.linear4bit import remove_fused_4bit_dequantize, use_fused_4bit_dequantize

    model = llama_on_cpu(hidden=512, layers=2)
    quantize_model(model, QuantizationConfig(bits=4, compute_dtype=torch.bfloat16), device="cuda")
    tokens = torch.randint(0, 32000, (2, 2048), device="cuda")

    def loss_and_input_grad():
        embeddings = model.model.embed_tokens(tokens).detach().requires_grad_()
        loss = model(inputs_embeds=embeddings, labels=tokens).loss
        loss.backward()
        return loss.detach(), embeddings.grad

    for layer in model.model.layers:
        layer.compile()
    expected = loss_and_input_grad()
    torch._dynamo.reset()
    assert use_fused_4bit_dequantize(model) == 14
    actual = loss_and_input_grad()
    remove_fused_4bit_dequantize(model)
    torch.testing.assert_close(actual[0], expected[0], rtol=1e-3, atol=0)
    # The same weights; the graphs around them fuse differently, so bfloat16 rounding differs.
    torch.testing.assert_close(actual[1], expected[1], rtol=0.05, atol=0.01 * expected[1].abs().max().item())


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize(
    "plan", ["offload", ["offload", "offload", "recompute", "keep"], "auto", "8GB", "100MB"]
)
def test_planned_activations_give_the_same_loss_and_gradients_as_recompute(compiled, plan):
    from peft import LoraConfig
    from transformers import LlamaConfig, LlamaForCausalLM

    from bnb_lightning import TrainingOptions, prepare_model

    results = {}
    for mode in ("recompute", "planned"):
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4
        )
        model = LlamaForCausalLM(config).to(torch.bfloat16).train()
        prepare_model(
            model,
            QuantizationConfig(bits=4),
            TrainingOptions(activation_memory=plan if mode == "planned" else mode, compile_blocks=compiled),
            device="cuda",
            precision="bf16-mixed",
            peft_config=LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False),
        )
        tokens = torch.randint(
            0, 512, (2, 256), device="cuda", generator=torch.Generator("cuda").manual_seed(0)
        )
        losses = []
        for _ in range(2):  # the second step reuses pinned buffers and the side stream
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=tokens, labels=tokens).loss
            loss.backward()
            losses.append(loss.item())
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results[mode] = losses, grads
        if mode == "planned":
            on_host = model.get_input_embeddings().weight.device.type == "cpu"
            assert on_host == (plan == "100MB")
    if plan == "100MB":
        # Below the plans' fixed margin: every block offloaded, the input embeddings in CPU memory and the
        # MLPs over tiles, whose weight gradients add up tile by tile (another order of the same sums).
        torch.testing.assert_close(results["planned"][0], results["recompute"][0], rtol=1e-3, atol=0)
        for name, grad in results["recompute"][1].items():
            atol = 0.01 * grad.abs().max().item()
            torch.testing.assert_close(results["planned"][1][name], grad, rtol=0.05, atol=atol, msg=name)
        return
    assert results["planned"][0] == results["recompute"][0]
    assert all(torch.equal(results["planned"][1][n], g) for n, g in results["recompute"][1].items())


def test_a_large_offloaded_tensor_waits_in_pinned_pages_and_comes_back_exactly():
    from bnb_lightning.training.offload import _Offload, pinned_bytes

    # 3 MiB and 12 bytes: two pages of 2 MiB, the second one partly filled.
    x = torch.randn(3 * 2**19 + 6, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(x.numel(), device="cuda", dtype=torch.bfloat16)
    offload = _Offload()
    assert offload.page == 2**21
    for _ in range(2):  # the second round reuses the pinned pages
        with offload:
            y = (x * weight).sin().sum()
        saved = [member() for member in offload.group.members]
        pages = [s.host for s in saved if isinstance(s.host, list)]
        assert [[p.nbytes for p in host] for host in pages] == [[2**21, 2**20 + 12]] * len(pages) != []
        assert all(p.untyped_storage().nbytes() == 2**21 and p.is_pinned() for host in pages for p in host)
        y.backward()
        torch.testing.assert_close(x.grad, weight * (x * weight).cos(), rtol=0, atol=0)
        x.grad = None
    assert pinned_bytes(x.nbytes, offload.page) == 2 * 2**21


def test_batches_of_varying_length_reuse_the_pinned_memory_of_the_longest_and_a_longer_one_releases_it():
    from peft import LoraConfig

    from bnb_lightning import TrainingOptions, prepare_model

    stats = getattr(torch.cuda, "host_memory_stats", None)
    if stats is not None and "allocated_bytes.current" not in stats():
        torch.empty(1, pin_memory=True)  # the stats start with the first pinned block
    if stats is None or not {"allocated_bytes.current", "num_host_free"} <= stats().keys():
        pytest.skip("this torch does not report its pinned memory")
    model = llama_on_cpu(hidden=1024, layers=4).train()
    prepare_model(
        model,
        QuantizationConfig(bits=4),
        TrainingOptions(activation_memory="offload"),
        device="cuda",
        precision="bf16-mixed",
        peft_config=LoraConfig(r=8, target_modules="all-linear"),
    )
    generator = torch.Generator("cuda").manual_seed(0)

    def step(length: int) -> dict:
        batch = torch.randint(0, 32000, (1, length), device="cuda", generator=generator)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.cuda.synchronize()
        return torch.cuda.host_memory_stats()

    # Each block's input is 2 KiB a token: 12 MiB at 6,144 tokens, 6 pinned pages of 2 MiB. Shorter batches
    # (whose final norm and loss save tensors of other shapes: not tiled under 4,096 tokens, in float32)
    # take pages the first one freed; only buffers under a page (per-head statistics) may be new.
    held = step(6144)["allocated_bytes.current"]
    for length in (3072, 4608, 5000, 6144):
        assert step(length)["allocated_bytes.current"] - held < 2**21, length
    before = torch.cuda.host_memory_stats()["num_host_free"]
    longer = step(8192)
    assert longer["num_host_free"] > before  # the cached blocks went back to the host before its plan
    assert step(4096)["allocated_bytes.current"] - longer["allocated_bytes.current"] < 2**21


def test_compiled_blocks_train_as_eager_blocks_on_a_repeated_batch():
    """The same model, batch and AdamW steps with and without compiled blocks: the same losses, up to
    bfloat16 rounding (a 70B run under FSDP2 once fell much faster compiled than eager, unexplained)."""
    from peft import LoraConfig
    from transformers import LlamaConfig, LlamaForCausalLM

    from bnb_lightning import TrainingOptions, prepare_model

    losses = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=4096,
            hidden_size=512,
            intermediate_size=1408,
            num_hidden_layers=4,
            num_attention_heads=8,
        )
        model = LlamaForCausalLM(config).to(torch.bfloat16).train()
        prepare_model(
            model,
            QuantizationConfig(bits=4),
            TrainingOptions(gradient_checkpointing=True, compile_blocks=compiled),
            device="cuda",
            precision="bf16-true",
            peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"),
        )
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        tokens = torch.randint(
            0, 4096, (1, 512), device="cuda", generator=torch.Generator("cuda").manual_seed(0)
        )
        losses[compiled] = []
        for _ in range(5):
            loss = model(input_ids=tokens, labels=tokens).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[compiled].append(loss.item())
    eager, compiled = losses[False], losses[True]
    assert eager[-1] < eager[0] and compiled[-1] < compiled[0], losses
    torch.testing.assert_close(compiled, eager, rtol=0.02, atol=0, msg=str(losses))


@pytest.mark.parametrize("train_head", [False, True])
@pytest.mark.parametrize("num_items", [None, 3000])
def test_liger_kernel_gives_the_torch_kernels_loss_and_gradients(train_head, num_items):
    pytest.importorskip("liger_kernel")
    from bnb_lightning.training import linear_cross_entropy

    generator = torch.Generator("cuda").manual_seed(0)
    hidden = torch.randn(4096, 1024, generator=generator, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(32000, 1024, generator=generator, device="cuda") * 0.02
    weight = weight.to(torch.bfloat16).requires_grad_(train_head)
    targets = torch.randint(0, 32000, (4096,), generator=generator, device="cuda")
    targets[:100] = -100
    results = {}
    for kernel in ("torch", "liger", "auto"):
        leaf = hidden.clone().requires_grad_()
        loss = linear_cross_entropy(leaf, weight, targets, num_items_in_batch=num_items, kernel=kernel)
        (2 * loss).backward()
        results[kernel] = (loss.detach(), leaf.grad, weight.grad)
        weight.grad = None
    torch_loss, torch_hidden, torch_weight = results["torch"]
    for kernel in ("liger", "auto"):  # "auto" is Liger where installed, on CUDA
        loss, grad_hidden, grad_weight = results[kernel]
        torch.testing.assert_close(loss, torch_loss, rtol=1e-5, atol=1e-5)
        # One bfloat16 rounding of the logits' gradient apart, at most.
        scale = torch_hidden.float().abs().max()
        assert (grad_hidden.float() - torch_hidden.float()).abs().max() <= scale / 64
        if train_head:
            scale = torch_weight.float().abs().max()
            assert (grad_weight.float() - torch_weight.float()).abs().max() <= scale / 64
        else:
            assert grad_weight is None


@pytest.mark.parametrize("bits", [4, 8])
def test_prequantized_checkpoint_loads_onto_the_gpu_as_the_files_hold_it(tmp_path, bits):
    """Through the pinned staging buffers: each tensor's bytes on the device are the file's."""
    from safetensors.torch import load_file
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    source = llama_on_cpu(hidden=256, layers=2)
    source.save_pretrained(tmp_path / "bf16")
    if bits == 4:
        hf_config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        config = QuantizationConfig(bits=4, double_quant=True, compute_dtype=torch.bfloat16)
    else:
        hf_config, config = BitsAndBytesConfig(load_in_8bit=True), QuantizationConfig(bits=8)
    quantized = LlamaForCausalLM.from_pretrained(
        tmp_path / "bf16", quantization_config=hf_config, device_map="cpu"
    )
    quantized.save_pretrained(tmp_path / "quantized", max_shard_size="2MB")
    with torch.device("meta"):
        model = LlamaForCausalLM(source.config)

    quantize_model(model, config, "cuda", weights=tmp_path / "quantized")

    in_files = {}
    for file in (tmp_path / "quantized").glob("*.safetensors"):
        in_files.update(load_file(file))
    loaded = model.state_dict()
    assert in_files and all(key in loaded for key in in_files)
    different = [key for key, value in in_files.items() if not torch.equal(loaded[key].cpu(), value)]
    assert different == []
    assert model.model.layers[0].mlp.up_proj.weight.device.type == "cuda"


@pytest.mark.parametrize("kernel", ["cudnn", "flash"])
@pytest.mark.parametrize("length", [256, 4096])
def test_saved_attention_kernels_give_sdpas_output_and_gradients(kernel, length):
    """The saved attention calls torch's cuDNN / FlashAttention kernels directly, grouped-query heads as
    they are: its output is SDPA's, and its gradients SDPA's up to bfloat16 rounding."""
    import torch.nn.functional as F

    from bnb_lightning.training.attention import AttentionStash, _install, kernel_for

    if kernel == "cudnn" and kernel_for(torch.device("cuda")) != "cudnn":
        pytest.skip("cuDNN attention needs compute capability 9.0")
    assert _install()
    generator = torch.Generator("cuda").manual_seed(0)

    def rand(heads):  # (batch, heads, sequence, head size) views of (batch, sequence, heads, head size)
        x = torch.randn(2, length, heads, 128, device="cuda", generator=generator, dtype=torch.bfloat16)
        return x.transpose(1, 2).requires_grad_()

    q, k, v = rand(32), rand(8), rand(8)
    grad = torch.randn(2, length, 32, 128, device="cuda", generator=generator, dtype=torch.bfloat16)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad)
    out, lse = torch.ops.bnb_lightning.saved_attention(q, k, v, 128**-0.5, kernel)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    torch.testing.assert_close(out, expected, rtol=0, atol=0 if kernel == "cudnn" else 2e-2)
    for actual, reference in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(actual, reference, rtol=0.02, atol=0.01 * reference.abs().max().item())
    # In a block's recompute the stash gives back what its forward kept, and the kernel does not run.
    stash = AttentionStash(lambda t: t.clone(), lambda t: t)
    with stash.active(replaying=False):
        kept = torch.ops.bnb_lightning.saved_attention(q, k, v, 128**-0.5, kernel)
    with stash.active(replaying=True), torch.profiler.profile() as profile:
        taken = torch.ops.bnb_lightning.saved_attention(q, k, v, 128**-0.5, kernel)
    assert torch.equal(taken[0], kept[0]) and torch.equal(taken[1], kept[1]) and not stash.kept
    assert not [e for e in profile.key_averages() if "scaled_dot_product" in e.key]
