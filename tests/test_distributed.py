"""Several devices: DDP fits on 2 CPU processes, FSDP's pieces, refusals, and the memory math."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from lightning.pytorch.plugins.precision import FSDPPrecision
from lightning.pytorch.strategies import (
    DDPStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
)
from peft import LoraConfig
from torch.distributed.fsdp import MixedPrecision
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from bnb_lightning import QuantizationConfig, inject_adapters, quantize_model
from bnb_lightning.distributed import (
    DDP,
    FSDP,
    FSDP2,
    SINGLE_DEVICE,
    base_memory,
    check_strategy,
    config_for_fsdp,
    configure_fsdp,
    fsdp_auto_wrap_policy,
    fsdp_mixed_precision,
    strategy_kind,
)
from bnb_lightning.io.export import base_record

SCRIPT = Path(__file__).parent / "scripts" / "distributed_fit.py"
BENCHMARK = Path(__file__).parent.parent / "benchmarks" / "multi_gpu.py"
STEPS, RESUME_STEPS = 8, 4


def clean_env() -> dict[str, str]:
    """This environment without an earlier launch's settings: after an in-process distributed Trainer,
    Lightning leaves MASTER_PORT (a port this process still holds), LOCAL_RANK and the like set, and a
    script inheriting them would act as an already launched rank instead of starting the others."""
    launch = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")
    return {k: v for k, v in os.environ.items() if k not in launch and not k.startswith("LOCAL_WORLD")}


def run_script(out: Path, *args: str) -> subprocess.CompletedProcess:
    # Lightning's "ddp" starts the other ranks by running the script again: it must be a script of its own.
    return subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--out",
            str(out),
            "--steps",
            str(STEPS),
            "--resume-steps",
            str(RESUME_STEPS),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=clean_env(),
    )


def fit_on_ranks(out: Path, *args: str) -> list[dict]:
    result = run_script(out, *args)
    assert result.returncode == 0, result.stderr[-4000:]
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]


def assert_equal_adapters(ranks: list[dict], key: str) -> None:
    first, second = ranks[0][key], ranks[1][key]
    assert first and first.keys() == second.keys()
    assert all("lora_" in name for name in first)
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert all(first[name].abs().sum() > 0 for name in first if "lora_B" in name)  # trained: B starts at 0


@pytest.mark.parametrize("bits", [4, 8])
def test_ddp_fit_on_two_cpu_processes(tmp_path, bits):
    ranks = fit_on_ranks(tmp_path, "--strategy", "ddp", "--bits", str(bits))

    for rank in ranks:
        assert rank["losses"][-1] < rank["losses"][0] - 0.5, rank["losses"]
        # Only adapters train, so only they are in DDP's gradient buckets (a frozen parameter never is).
        assert rank["trainable"] and all("lora_" in name for name in rank["trainable"])
    assert ranks[0]["fingerprint"] == ranks[1]["fingerprint"]
    assert_equal_adapters(ranks, "adapters")

    # Rank zero alone logs and writes: one summary, one checkpoint, one export.
    summaries = [sum("linear layers to" in line for line in rank["logs"]) for rank in ranks]
    assert summaries == [1, 0]
    assert any(f"{bits}-bit" in line or "LLM.int8" in line for line in ranks[0]["logs"])
    assert any(
        "frozen base weights" in line and "on each of 2 devices (DDP)" in line for line in ranks[0]["logs"]
    )
    assert ranks[0]["written"] == [ranks[0]["checkpoint"]] and ranks[1]["written"] == []
    assert (tmp_path / "adapters" / "adapter_model.safetensors").is_file()
    checkpoint = torch.load(ranks[0]["checkpoint"], weights_only=False)
    assert set(checkpoint["state_dict"]) == set(ranks[0]["adapters"])  # adapter-only
    assert checkpoint["callbacks"]["BnbQuantization"]["adapter_only"] is True

    # Resumed on both ranks from that checkpoint: same adapters on both, training goes on from step 8.
    for rank in ranks:
        assert rank["resumed_global_step"] == STEPS + RESUME_STEPS
        assert len(rank["resumed_losses"]) == RESUME_STEPS
        assert rank["resumed_losses"][0] < rank["losses"][0] - 0.5, (rank["losses"], rank["resumed_losses"])
    assert_equal_adapters(ranks, "resumed_adapters")
    assert len(ranks[0]["resumed_written"]) == 1 and ranks[1]["resumed_written"] == []


def test_fsdp2_fit_on_two_cpu_processes_trains_exactly_as_ddp_and_resumes(tmp_path):
    """ModelParallelStrategy (FSDP2): the callback quantizes, then shards one unit per block; packed 4-bit
    weights shard as uint8. Same data, same steps: the losses and adapters of DDP, to the bit."""
    ddp = fit_on_ranks(tmp_path / "ddp", "--strategy", "ddp", "--bits", "4")
    ranks = fit_on_ranks(tmp_path / "fsdp2", "--strategy", "fsdp2", "--bits", "4", "--straight")

    for rank, reference in zip(ranks, ddp, strict=True):
        assert rank["losses"] == reference["losses"]
        assert rank["losses"][-1] < rank["losses"][0] - 0.5, rank["losses"]
    assert_equal_adapters(ranks, "adapters")
    assert all(torch.equal(ranks[0]["adapters"][n], a) for n, a in ddp[0]["adapters"].items())
    logs = ranks[0]["logs"]
    assert any("sharded with FSDP2 over 2 devices: 2 blocks" in line for line in logs)
    assert ranks[0]["offload_policies"] == ["OffloadPolicy"]  # the shards on the device
    assert ranks[0]["forward_prefetch"] == [1, 0]  # the first block gathers the second ahead of time
    assert any("under FSDP2 over 2 devices" in line and "sharded 2 ways" in line for line in logs)
    assert ranks[1]["logs"] == [] or not any("FSDP2" in line for line in ranks[1]["logs"])
    # Rank zero writes an adapter-only checkpoint, gathered without the frozen base.
    assert ranks[0]["written"] == [ranks[0]["checkpoint"]] and ranks[1]["written"] == []
    checkpoint = torch.load(ranks[0]["checkpoint"], weights_only=False)
    assert set(checkpoint["state_dict"]) == set(ranks[0]["adapters"])
    assert checkpoint["callbacks"]["BnbQuantization"]["adapter_only"] is True
    # Resumed from it on both ranks: the adapters load into the shards, training goes on from step 8.
    for rank in ranks:
        assert rank["resumed_global_step"] == STEPS + RESUME_STEPS
        assert rank["resumed_losses"][0] < rank["losses"][0] - 0.5, (rank["losses"], rank["resumed_losses"])
    assert_equal_adapters(ranks, "resumed_adapters")
    # The adapter export at the end of fit, gathered from the shards: DDP's, file for file, base record included.
    from safetensors.torch import load_file

    exported = [
        load_file(run / "adapters" / "adapter_model.safetensors")
        for run in (tmp_path / "ddp", tmp_path / "fsdp2")
    ]
    assert exported[0].keys() == exported[1].keys() and len(exported[0]) == len(ranks[0]["adapters"])
    assert all(torch.equal(exported[0][key], exported[1][key]) for key in exported[0])
    manifest = json.loads((tmp_path / "fsdp2" / "adapters" / "bnb_lightning_export.json").read_text())
    # The base record was taken before sharding: that of the same base quantized on one device. (DDP's
    # export has none: bitsandbytes repacked its 4-bit weights for the CPU in the forwards before it.)
    base = tiny_llama().train()
    quantize_model(base, QuantizationConfig(bits=4))
    inject_adapters(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    assert manifest["exports"]["adapters"]["base"] == base_record(base) is not None
    # Exact resume: the first fit and the resumed one are the straight run, loss for loss, to the bit.
    for rank in ranks:
        assert rank["losses"] + rank["resumed_losses"] == rank["straight_losses"]
    assert all(
        torch.equal(ranks[0]["straight_adapters"][n], a) for n, a in ranks[0]["resumed_adapters"].items()
    )


def test_fsdp2_offloads_block_activations_exactly_as_ddp_and_resumes(tmp_path):
    """Offloaded blocks under FSDP2: their inputs wait aside while the sharded parameters are gathered and
    freed around each block's forward and recompute; losses, adapters and the resume are DDP's, to the bit."""
    ddp = fit_on_ranks(tmp_path / "ddp", "--strategy", "ddp", "--bits", "4", "--offload")
    ranks = fit_on_ranks(tmp_path / "fsdp2", "--strategy", "fsdp2", "--bits", "4", "--offload")

    assert any("activations: 2 blocks offloaded" in line for line in ranks[0]["logs"])
    for rank, reference in zip(ranks, ddp, strict=True):
        assert rank["losses"] == reference["losses"] and rank["resumed_losses"] == reference["resumed_losses"]
        assert rank["losses"][-1] < rank["losses"][0] - 0.5, rank["losses"]
    assert all(torch.equal(ranks[0]["adapters"][n], a) for n, a in ddp[0]["adapters"].items())
    assert all(torch.equal(ranks[1]["resumed_adapters"][n], a) for n, a in ddp[1]["resumed_adapters"].items())


def test_fsdp2_gathers_untied_embeddings_and_output_layer_only_where_used_and_trains_as_ddp(tmp_path):
    """Untied, the input embeddings and the output layer are FSDP2 units of their own: the embeddings
    gathered for their lookup, the output layer never whole (the loss exchanges hidden states between
    the ranks instead), sharded through the blocks' backward pass. Tied, they stay in the unit around
    the blocks, which FSDP2 gathers for the whole backward pass."""
    args = ("--bits", "4", "--offload", "--untied", "--vocab", "1024")  # exchange 32 KiB, layer 128 KiB
    ddp = fit_on_ranks(tmp_path / "ddp", "--strategy", "ddp", *args)
    ranks = fit_on_ranks(tmp_path / "fsdp2", "--strategy", "fsdp2", *args)
    gathered = fit_on_ranks(tmp_path / "gathered", "--strategy", "fsdp2", *args[:-1], "256")
    tied = fit_on_ranks(tmp_path / "tied", "--strategy", "fsdp2", "--bits", "4", "--steps", "2", "--offload")
    offloaded = fit_on_ranks(tmp_path / "offloaded", "--strategy", "fsdp2", *args, "--offload-params")

    exchanges = "the loss exchanges hidden states between the ranks"
    assert all(any(exchanges in line for line in rank["logs"]) for rank in ranks)
    assert not any(
        exchanges in line for run in (ddp, gathered, tied) for rank in run for line in rank["logs"]
    )
    assert all(any(exchanges in line for line in rank["logs"]) for rank in offloaded)
    for rank, reference in zip(ranks + offloaded, ddp + ddp, strict=True):
        assert rank["head_rows"] == rank["embedding_rows"] == [512] * len(rank["losses"])  # shards only
        # The loss over the ranks' rows, combined in float32: DDP's to its rounding.
        torch.testing.assert_close(rank["losses"], reference["losses"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rank["resumed_losses"], reference["resumed_losses"], rtol=1e-5, atol=1e-6)
        assert rank["losses"][-1] < rank["losses"][0] - 0.5, rank["losses"]
    for name, adapter in ddp[0]["adapters"].items():
        # AdamW's first steps move each weight by about lr whatever its gradient's size, so a gradient
        # near zero, rounded otherwise, can move its weight the other way: a tolerance of the tensor's scale.
        atol = 0.01 * adapter.abs().max().item()
        torch.testing.assert_close(ranks[0]["adapters"][name], adapter, rtol=0, atol=atol, msg=name)
    # Where the exchange is no smaller than the layer's other rows (256 rows), the loss gathers the layer
    # (and sheds it before the backward pass): DDP's losses, to the bit.
    ddp_small = fit_on_ranks(tmp_path / "ddp_small", "--strategy", "ddp", *args[:-1], "256")
    assert [r["losses"] for r in gathered] == [r["losses"] for r in ddp_small]
    assert gathered[0]["head_rows"] == [128] * len(gathered[0]["losses"])
    assert tied[0]["head_rows"] == tied[0]["embedding_rows"] == [256] * len(tied[0]["losses"])
    # What the activation planner counts for the loss: the exchange, or the rows gathered (float32 here).
    assert [rank["loss_bytes"] for rank in ranks] == [2 * 2 * 32 * 64 * 4] * 2
    # offload_params on CPU processes: the shards are where the device is, nothing more to copy (on a GPU
    # this rank's rows would come to it too).
    assert [rank["loss_bytes"] for rank in offloaded] == [2 * 2 * 32 * 64 * 4] * 2
    assert [rank["loss_bytes"] for rank in gathered] == [128 * 64 * 4] * 2
    assert ddp[0]["loss_bytes"] == tied[0]["loss_bytes"] == 0


def test_fsdp2_with_its_shards_in_cpu_memory_trains_exactly_as_ddp(tmp_path):
    """offload_params: FSDP2's CPUOffloadPolicy (unpinned here: on CPU processes the device is the CPU),
    and the strategy leaves the shards where FSDP2 keeps them."""
    ddp = fit_on_ranks(tmp_path / "ddp", "--strategy", "ddp", "--bits", "4")
    ranks = fit_on_ranks(tmp_path / "fsdp2", "--strategy", "fsdp2", "--bits", "4", "--offload-params")

    assert any("they stay in CPU memory (offload_params)" in line for line in ranks[0]["logs"])
    assert ranks[0]["offload_policies"] == ["CPUOffloadPolicy"] and ddp[0]["offload_policies"] == []
    for rank, reference in zip(ranks, ddp, strict=True):
        assert rank["losses"] == reference["losses"] and rank["resumed_losses"] == reference["resumed_losses"]
    assert all(torch.equal(ranks[0]["adapters"][n], a) for n, a in ddp[0]["adapters"].items())


@pytest.mark.parametrize(
    ("precision", "untied"), [("bf16-true", False), ("bf16-mixed", False), ("bf16-true", True)]
)
def test_fsdp2_trains_under_bfloat16_precisions(tmp_path, precision, untied):
    # Untied, with a vocabulary for which the loss exchanges hidden states over the sharded output layer.
    model = ("--untied", "--vocab", "1024") if untied else ()
    ranks = fit_on_ranks(tmp_path, "--strategy", "fsdp2", "--bits", "4", "--precision", precision, *model)

    assert any("the loss exchanges hidden states" in line for line in ranks[0]["logs"]) == untied
    for rank in ranks:
        assert rank["losses"][-1] < rank["losses"][0] - 0.5, rank["losses"]
        assert len(rank["resumed_losses"]) == RESUME_STEPS
    assert_equal_adapters(ranks, "adapters")
    # Adapters train in float32 under bf16-mixed, in bfloat16 under bf16-true.
    wanted = torch.float32 if precision == "bf16-mixed" else torch.bfloat16
    assert set(ranks[0]["trainable_dtypes"].values()) == {wanted}


@pytest.mark.parametrize(
    ("flag", "logged"),
    [
        # Off by default on the CPU; on by default under DDP on GPUs.
        ("--compile", "compiled 2 transformer blocks"),
        ("--offload", "activations: 2 blocks offloaded"),
    ],
)
def test_ddp_trains_compiled_or_offloaded_blocks_on_two_cpu_processes(tmp_path, flag, logged):
    ranks = fit_on_ranks(tmp_path, "--strategy", "ddp", "--bits", "4", flag)

    assert any(logged in line for line in ranks[0]["logs"])
    for rank in ranks:
        assert rank["losses"][-1] < rank["losses"][0] - 0.5, rank["losses"]
        assert len(rank["resumed_losses"]) == RESUME_STEPS
        assert rank["host_share"] == 2  # two ranks on this machine: each offloads within half its memory
    assert_equal_adapters(ranks, "adapters")
    assert_equal_adapters(ranks, "resumed_adapters")


def test_ddp_refuses_ranks_with_different_base_weights(tmp_path):
    result = run_script(tmp_path, "--strategy", "ddp", "--seed-per-rank")
    assert result.returncode != 0
    assert "the ranks quantized different base weights" in result.stderr
    assert "seed_everything" in result.stderr
    # Found after quantization: each rank's model keeps its quantized layers and nothing else of the
    # preparation (no adapters), the callback does not count it as prepared, and its hooks are unwrapped.
    for rank in range(2):
        state = torch.load(tmp_path / f"failed_rank{rank}.pt", weights_only=False)
        assert "different base weights" in state["error"]
        assert state["quantized_layers"] == 14
        assert state["adapter_parameters"] == []
        assert state["prepared"] is False
        assert state["wrapped_hooks"] == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    ("strategy", "precision"),
    [("ddp", "bf16-true")]
    + [
        pytest.param(
            "fsdp",
            precision,
            marks=pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP needs 2 GPUs"),
        )
        for precision in ("bf16-true", "bf16-mixed")
    ],
)
def test_fit_on_gpus(tmp_path, strategy, precision):
    devices = min(torch.cuda.device_count(), 2)
    args = ("--accelerator", "cuda", "--devices", str(devices), "--precision", precision)
    result = run_script(tmp_path, "--strategy", strategy, *args)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(devices)]
    if devices == 2:
        assert_equal_adapters(ranks, "adapters")
        assert_equal_adapters(ranks, "resumed_adapters")
        assert ranks[1]["written"] == []
    rank = ranks[0]
    assert rank["losses"][-1] < rank["losses"][0] - 0.5, rank["losses"]
    assert rank["written"] == [rank["checkpoint"]]
    assert any("frozen base weights" in line for line in rank["logs"])
    checkpoint = torch.load(rank["checkpoint"], weights_only=False)
    assert set(checkpoint["state_dict"]) == set(rank["adapters"])  # adapter-only, gathered from the shards
    assert rank["resumed_global_step"] == STEPS + RESUME_STEPS
    assert rank["resumed_losses"][0] < rank["losses"][0] - 0.5


# FSDP's checks and settings, on CPU: torch's FSDP itself needs a GPU, Lightning's FSDPStrategy object does not.


def test_fsdp_refuses_8bit():
    with pytest.raises(ValueError, match="8-bit .* cannot be sharded by FSDP.*bits=4.*strategy='ddp'"):
        check_strategy(FSDPStrategy(), QuantizationConfig(bits=8), "bf16-true", adapter_only=True)


def test_fsdp_refuses_a_storage_it_cannot_flatten():
    config = QuantizationConfig(quant_storage="float16")
    with pytest.raises(
        ValueError, match="quant_storage=torch.float16 cannot be sharded.*quant_storage='bfloat16'"
    ):
        check_strategy(FSDPStrategy(), config, "bf16-true", adapter_only=True)
    with pytest.raises(ValueError, match="quant_storage=torch.bfloat16 cannot be sharded.*torch.float32"):
        config_for_fsdp(QuantizationConfig(quant_storage="bfloat16"), tiny_llama(), "32-true")


@pytest.mark.parametrize(
    ("kwargs", "precision", "message"),
    [
        ({"state_dict_type": "sharded"}, "bf16-true", "state_dict_type='sharded'.*adapter-only.*'full'"),
        ({}, "16-true", "16-true.*bf16-true"),
    ],
)
def test_fsdp_refusals_name_the_fix(kwargs, precision, message):
    with pytest.raises(RuntimeError, match=message):
        check_strategy(FSDPStrategy(**kwargs), QuantizationConfig(), precision, adapter_only=True)


def test_fsdp_on_one_device_is_refused_and_on_two_allowed():
    with pytest.raises(RuntimeError, match="FSDP on one device shards nothing.*default strategy"):
        check_strategy(FSDPStrategy(), QuantizationConfig(), "bf16-true", adapter_only=True)
    two = FSDPStrategy(parallel_devices=[torch.device("cuda", 0), torch.device("cuda", 1)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_strategy(two, QuantizationConfig(), "bf16-true", adapter_only=True) == FSDP


def test_torch_fsdp_trains_the_quantized_model_on_two_cpu_processes(tmp_path):
    """What the callback sets up under FSDP, run by torch's FSDP itself (Lightning's needs CUDA)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable,
        str(SCRIPT.parent / "fsdp_torch_fit.py"),
        "--out",
        str(tmp_path),
        "--port",
        str(port),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=clean_env())
    assert result.returncode == 0, result.stderr[-4000:]

    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(2)]
    for rank in ranks:
        assert rank["losses"][-1] < rank["losses"][0] - 0.5, rank["losses"]
        assert rank["quant_storage"] == "torch.float32"  # the dtype of the other parameters
        assert rank["chunked_loss"] == [""]
        # FULL_SHARD: each rank holds half of the frozen base, packed 4-bit weights included.
        assert rank["frozen_local"] * 2 == rank["frozen_total"]
    assert ranks[0]["adapters"].keys() == ranks[1]["adapters"].keys() and ranks[0]["adapters"]
    assert all(torch.equal(ranks[0]["adapters"][k], ranks[1]["adapters"][k]) for k in ranks[0]["adapters"])


def test_fsdp_refuses_exports():
    with pytest.raises(RuntimeError, match="export_adapters_to.*not supported under FSDP.*strategy='ddp'"):
        check_strategy(FSDPStrategy(), QuantizationConfig(), "bf16-true", adapter_only=True, exports=True)


@pytest.mark.parametrize(
    ("model_dtype", "precision", "storage"),
    [
        (torch.float32, "bf16-true", torch.bfloat16),
        (torch.float32, "32-true", torch.float32),
        (torch.bfloat16, "32-true", torch.bfloat16),
        (torch.float32, "bf16-mixed", torch.float32),
    ],
)
def test_fsdp_storage_is_the_dtype_of_the_other_parameters(model_dtype, precision, storage):
    model = tiny_llama(dtype=model_dtype)
    config = config_for_fsdp(QuantizationConfig(), model, precision)
    assert config.quant_storage == storage
    assert config_for_fsdp(config, model, precision) == config  # set explicitly to that dtype: kept


def test_fsdp_mixed_precision_never_casts_packed_weights():
    bf16_true = FSDPStrategy(precision_plugin=FSDPPrecision("bf16-true"))
    assert fsdp_mixed_precision(bf16_true, torch.bfloat16) is None  # casts bfloat16 to bfloat16: nothing
    mixed = fsdp_mixed_precision(FSDPStrategy(precision_plugin=FSDPPrecision("bf16-mixed")), torch.float32)
    assert mixed.param_dtype is None and mixed.buffer_dtype is None and mixed.reduce_dtype == torch.bfloat16
    own = FSDPStrategy(mixed_precision=MixedPrecision(param_dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="would cast the packed 4-bit weights.*param_dtype=None"):
        fsdp_mixed_precision(own, torch.float32)


def test_fsdp_auto_wrap_policy_wraps_blocks_and_trainable_leaves():
    model = tiny_llama()
    quantize_model(model, QuantizationConfig(quant_storage="float32"), device="cpu")
    inject_adapters(model, LoraConfig(r=4, target_modules="all-linear"))
    policy = fsdp_auto_wrap_policy(model)

    units = [name for name, m in model.named_modules() if policy(module=m, recurse=False, nonwrapped_numel=0)]
    blocks = [name for name in units if name.endswith(("layers.0", "layers.1"))]
    leaves = [name for name in units if name not in blocks]
    assert blocks == ["model.layers.0", "model.layers.1"]
    assert len(leaves) == 28 and all(name.endswith(("lora_A.default", "lora_B.default")) for name in leaves)
    # Every quantized weight is in a block: sharded with its block, never alone at the root.
    assert all(
        name.startswith(tuple(blocks)) for name in model.state_dict() if name.endswith("weight.absmax")
    )


def test_configure_fsdp_sets_the_lean_policy_and_names_the_faster_one(caplog):
    model = tiny_llama()
    quantize_model(model, QuantizationConfig(quant_storage="float32"), device="cpu")
    inject_adapters(model, LoraConfig(r=4, target_modules="all-linear"))
    strategy = FSDPStrategy()
    with caplog.at_level(logging.INFO):
        configure_fsdp(strategy, model, QuantizationConfig(quant_storage="float32"), adapter_only=True)
    policy = strategy.kwargs["auto_wrap_policy"]
    assert policy(module=model.model.layers[0], recurse=False, nonwrapped_numel=0)  # a block: a unit
    assert "FSDPStrategy(auto_wrap_policy={LlamaDecoderLayer}) trains faster" in caplog.text

    caplog.clear()
    users = FSDPStrategy(auto_wrap_policy={LlamaDecoderLayer})
    chosen = users.kwargs["auto_wrap_policy"]
    with caplog.at_level(logging.INFO):
        configure_fsdp(users, model, QuantizationConfig(quant_storage="float32"), adapter_only=True)
    assert users.kwargs["auto_wrap_policy"] is chosen and "trains faster" not in caplog.text


# Strategies that cannot train a quantized model.


def test_strategy_kinds():
    assert strategy_kind(SingleDeviceStrategy("cpu")) == SINGLE_DEVICE
    assert strategy_kind(DDPStrategy()) == DDP
    assert strategy_kind(FSDPStrategy()) == FSDP
    assert strategy_kind(ModelParallelStrategy()) == FSDP2


def fsdp2(**kwargs) -> ModelParallelStrategy:
    return ModelParallelStrategy(
        **{"data_parallel_size": 2, "tensor_parallel_size": 1, "save_distributed_checkpoint": False, **kwargs}
    )


def test_fsdp2_accepts_data_parallel_4bit_with_full_checkpoints():
    assert check_strategy(fsdp2(), QuantizationConfig(), "bf16-true", adapter_only=True) == FSDP2
    # Packed weights shard as uint8: no floating quant_storage is needed, unlike FSDP1's.
    assert (
        check_strategy(fsdp2(), QuantizationConfig(quant_storage="uint8"), "32-true", adapter_only=True)
        == FSDP2
    )


@pytest.mark.parametrize(
    ("strategy", "config", "kwargs", "message"),
    [
        (
            fsdp2(tensor_parallel_size=2),
            QuantizationConfig(),
            {},
            "tensor_parallel_size=2.*tensor_parallel_size=1",
        ),
        (fsdp2(tensor_parallel_size="auto"), QuantizationConfig(), {}, "tensor_parallel_size='auto'"),
        (fsdp2(), QuantizationConfig(bits=8), {}, "8-bit .* FSDP2.*bits=4"),
        (fsdp2(), QuantizationConfig(), {"precision": "16-true"}, "16-true.*'bf16-true'"),
        (
            fsdp2(),
            QuantizationConfig(),
            {"exports": True, "merged_export": True},
            "export_merged_to.*export_merged",
        ),
        (
            fsdp2(save_distributed_checkpoint=True),
            QuantizationConfig(),
            {},
            "save_distributed_checkpoint=True.*save_distributed_checkpoint=False",
        ),
    ],
)
def test_fsdp2_refusals_name_the_fix(strategy, config, kwargs, message):
    kwargs = {"precision": "bf16-true", **kwargs}
    with pytest.raises((RuntimeError, ValueError), match=message):
        check_strategy(strategy, config, adapter_only=True, **kwargs)


def test_refuses_deepspeed_naming_what_works():
    pytest.importorskip("deepspeed")
    from lightning.pytorch.strategies import DeepSpeedStrategy

    with pytest.raises(RuntimeError, match="DeepSpeedStrategy: DeepSpeed partitions.*DDP"):
        strategy_kind(DeepSpeedStrategy())


# Memory math.


def test_base_memory_per_device():
    model = tiny_llama()
    quantize_model(model, QuantizationConfig(quant_storage="float32"), device="cpu")
    inject_adapters(model, LoraConfig(r=4, target_modules="all-linear"))
    frozen = sum(p.nbytes for p in model.parameters() if not p.requires_grad)

    ddp = base_memory(model, DDP, devices=2)
    assert ddp.sharded_bytes == frozen and ddp.replicated_bytes > 0
    assert ddp.per_device_bytes == ddp.total_bytes
    assert "on each of 2 devices (DDP)" in str(ddp)

    fsdp = base_memory(model, FSDP, devices=4, shards=4)
    assert fsdp.total_bytes == ddp.total_bytes
    assert fsdp.per_device_bytes == -(-frozen // 4) + fsdp.replicated_bytes
    assert fsdp.per_device_bytes < ddp.per_device_bytes / 2
    assert "per device under FSDP over 4 devices" in str(fsdp)


def test_multi_gpu_benchmark_smoke_run_on_cpu(tmp_path):
    out = tmp_path / "results.jsonl"
    command = [sys.executable, str(BENCHMARK), "--shape", "tiny", "--accelerator", "cpu", "--devices", "2"]
    result = subprocess.run(
        [*command, "--steps", "4", "--warmup", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=clean_env(),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    rows = {row["strategy"]: row for row in map(json.loads, out.read_text().splitlines())}
    ddp = rows["ddp"]
    assert ddp["status"] == "measured", ddp
    assert ddp["adapters_equal"] and ddp["checkpoint_written_once"] and ddp["resumed"]
    assert ddp["tokens_per_s"] > 0 and len(ddp["tokens_per_s_per_device"]) == 2
    assert ddp["base_bytes_per_device"] == [ddp["base_bytes_expected"]] * 2
    assert rows["fsdp"] == {"strategy": "fsdp", "status": "skipped", "reason": "torch's FSDP needs a GPU"}
    fsdp2 = rows["fsdp2"]
    assert fsdp2["status"] == "measured", fsdp2
    assert fsdp2["adapters_equal"] and fsdp2["checkpoint_written_once"] and fsdp2["resumed"]
    # Each rank holds its shard of the frozen base plus every 4-bit statistic, as the memory math says.
    assert fsdp2["base_bytes_per_device"] == [fsdp2["base_bytes_expected"]] * 2
    assert (
        fsdp2["base_bytes_total"] == ddp["base_bytes_total"]
        and fsdp2["base_bytes_expected"] < 0.6 * ddp["base_bytes_expected"]
    )


def test_4bit_layers_keep_a_weight_view_that_lost_its_quant_state(tokens):
    import bitsandbytes as bnb
    from conftest import tiny_llama

    from bnb_lightning import QuantizationConfig, quantize_model
    from bnb_lightning.distributed import share_quant_state_with_weight_views

    model = tiny_llama().train()
    quantize_model(model, QuantizationConfig(bits=4, quant_storage="bfloat16"))
    with torch.no_grad():
        expected = model(tokens).logits
    assert share_quant_state_with_weight_views(model) == 14
    # What FSDP does: each weight becomes a plain view of its flat parameter, without quant_state.
    views = {}
    for name, layer in model.named_modules():
        if isinstance(layer, bnb.nn.Linear4bit):
            layer.weight = torch.nn.Parameter(layer.weight.data.view_as(layer.weight), requires_grad=False)
            views[name] = layer.weight
    with torch.no_grad():
        actual = model(tokens).logits
    assert torch.equal(actual, expected)
    modules = dict(model.named_modules())
    assert all(modules[name].weight is view for name, view in views.items())  # never re-registered


def test_fsdp2_sharding_makes_integer_shards_frozen_parameters_on_torch_that_would_fail():
    """torch up to 2.11 wraps each shard as ``nn.Parameter(shard)``, which fails for the packed uint8
    weights; while ``shard_model`` shards, that call makes them frozen parameters instead."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param

    from bnb_lightning.fsdp2 import integer_parameters_shardable

    packed = torch.arange(6, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="floating point"):
        _fsdp_param.nn.Parameter(packed)  # what torch 2.11's fully_shard calls
    with integer_parameters_shardable():
        frozen = _fsdp_param.nn.Parameter(packed)
        floating = _fsdp_param.nn.Parameter(torch.ones(2))
        explicit = _fsdp_param.nn.Parameter(torch.ones(2), requires_grad=False)
        assert _fsdp_param.nn.Module is torch.nn.Module
    assert type(frozen) is torch.nn.Parameter and not frozen.requires_grad
    assert torch.equal(frozen, packed)
    assert floating.requires_grad and not explicit.requires_grad
    assert _fsdp_param.nn is torch.nn  # restored
