"""Write a random-weight Llama checkpoint directory without ever holding the full-precision model.

A Llama-3-70B shape is 140 GB in bfloat16, more than the benchmark machine's disk (64 GB) or memory
(128 GB) holds, so it cannot be built and then quantized by ``from_pretrained``. This script builds
the model on the meta device only for its tensor names and shapes, then generates each tensor on
``--device`` (normal(0, ``initializer_range``) for linear and embedding weights, ones for norms, as
transformers initializes them), quantizes the linear layers' weights as transformers' bitsandbytes
quantizer does (``Params4bit(...).to(device)`` / ``int8_vectorwise_quant``, the same layers: not
``lm_head`` nor the embeddings), and appends the result to the shard it belongs to. The output has the
layout of ``save_pretrained`` after ``from_pretrained(..., quantization_config=BitsAndBytesConfig(...))``:
the same tensor names, dtypes and shapes, ``config.json`` with the same ``quantization_config``,
``generation_config.json``, and the index when there is more than one shard.

Every tensor is drawn from its own generator, seeded from ``--seed`` and the tensor's name, so the
``--bits 4`` and ``--bits 8`` checkpoints of a shape hold exactly the quantization of its ``--bits 16``
one (same seed, same device). The shard plan is computed from the shapes before anything is
generated (huggingface_hub's splitter, fed whole weights: a weight and its quantization statistics
never land in different shards); host memory holds one shard and one tensor at a time. Everything is
written into ``OUT.partial``, renamed to ``OUT`` at the end::

    python benchmarks/make_checkpoint.py --shape 70b --bits 4 --out /data/llama-70b-nf4 --device cuda
    python benchmarks/make_checkpoint.py --shape 8b --bits 16 --out /data/llama-8b-bf16
    python benchmarks/make_checkpoint.py --shape 70b --bits 4 --out /data/x --dry-run   # the plan and its size
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# Its neighbours import as top-level modules, also when this file is loaded by path (as the tests do).
if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))
from qlora_bench import SHAPES  # noqa: E402

GB = 10**9  # huggingface_hub's "5GB" is 5 * 10**9 bytes
BLOCKSIZE = 64  # Params4bit's default, which transformers' Linear4bit keeps
QUANT_STATE_BLOB_BYTES = 256  # the packed non-tensor quant state (JSON); ~170 bytes, planned generously
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class StorageFormat:
    """How the linear layers' weights are stored: bfloat16, LLM.int8 or bitsandbytes 4-bit."""

    bits: int = 4
    quant_type: str = "nf4"  # 4-bit only
    double_quant: bool = True  # 4-bit only: the absmax quantized again, to 8 bits

    def __post_init__(self) -> None:
        if self.bits not in (4, 8, 16):
            raise ValueError(f"bits={self.bits} is not supported; expected 4, 8 or 16.")
        if self.quant_type not in ("nf4", "fp4"):
            raise ValueError(f"quant_type={self.quant_type!r} is not supported; expected 'nf4' or 'fp4'.")

    @property
    def quantized(self) -> bool:
        return self.bits != 16

    def describe(self) -> str:
        if self.bits == 4:
            return f"4-bit {self.quant_type}{'' if self.double_quant else ' without double quantization'}"
        return "8-bit LLM.int8" if self.bits == 8 else "bfloat16"

    def bnb_config(self) -> Any:
        """The ``BitsAndBytesConfig`` a checkpoint in this format stands for; ``None`` for bfloat16."""
        from transformers import BitsAndBytesConfig

        if self.bits == 16:
            return None
        if self.bits == 8:
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )

    def stored_bytes(self, shape: tuple[int, ...], quantized: bool) -> int:
        """Bytes on disk of a weight and, when quantized, of its statistics, as bitsandbytes stores them."""
        numel = math.prod(shape)
        if not quantized:
            return numel * 2  # bfloat16
        if self.bits == 8:
            return numel + shape[0] * 4 + 1  # int8 weight, float32 SCB per row, uint8 weight_format
        blocks = math.ceil(numel / BLOCKSIZE)
        size = math.ceil(numel / 2) + 16 * 4 + QUANT_STATE_BLOB_BYTES  # packed weight, quant_map, quant state
        if self.double_quant:
            return size + blocks + math.ceil(blocks / 256) * 4 + 256 * 4  # uint8 absmax, nested absmax, map
        return size + blocks * 4  # float32 absmax

    def quantize(self, name: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """The state-dict entries bitsandbytes' layers save for the weight ``name``, on its device.

        4-bit: ``Params4bit(...).to(device)`` as transformers' ``Bnb4bitQuantize`` calls it, then what
        ``Linear4bit._save_to_state_dict`` adds (``QuantState.as_dict(packed=True)``). 8-bit: what
        ``Int8Params._quantize`` computes, called directly because ``Int8Params.to`` only quantizes
        weights coming from the CPU, then the ``SCB`` and ``weight_format`` that ``Linear8bitLt`` saves.
        """
        import bitsandbytes as bnb

        if self.bits == 4:
            parameter = bnb.nn.Params4bit(
                weight,
                requires_grad=False,
                compress_statistics=self.double_quant,
                quant_type=self.quant_type,
                quant_storage=torch.uint8,
            ).to(weight.device)
            entries = {name: parameter.data}
            for key, value in parameter.quant_state.as_dict(packed=True).items():
                entries[f"{name}.{key}"] = value
            return entries
        int8_weight, row_scales, _ = bnb.functional.int8_vectorwise_quant(weight.to(torch.float16))
        module_name = name.removesuffix(".weight")
        return {
            name: int8_weight,
            f"{module_name}.SCB": row_scales,
            f"{module_name}.weight_format": torch.tensor(0, dtype=torch.uint8),  # "row", the only one saved
        }


@dataclass(frozen=True)
class PlannedTensor:
    """One parameter of the model as it will be stored: how it is made and its size on disk."""

    name: str
    shape: tuple[int, ...]
    init: str  # "normal", "ones" or "zeros"
    quantized: bool
    stored_bytes: int  # the weight plus its quantization statistics (an upper bound for 4-bit)


def meta_model(shape: str) -> Any:
    """The model of ``shape`` (``qlora_bench.SHAPES``) on the meta device: names, shapes and module types."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if shape not in SHAPES:
        raise ValueError(f"shape={shape!r} is not known; expected one of {', '.join(SHAPES)}.")
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=131072, rope_theta=500000.0)
    with torch.device("meta"):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.config.architectures = [type(model).__name__]  # as save_pretrained records it
    return model


def plan_tensors(model: Any, storage: StorageFormat) -> list[PlannedTensor]:
    """Every weight ``save_pretrained`` would store, in state-dict order, with how it is made.

    Tied parameters appear once, under their first name, as transformers saves them. Linear layers
    are quantized unless transformers' bitsandbytes quantizer keeps them (``get_keys_to_not_convert``:
    the output embeddings and what is tied to them).
    """
    from torch import nn
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    kept_in_bf16 = get_keys_to_not_convert(model)
    planned = []
    for name, parameter in model.named_parameters():
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        if leaf == "bias":
            init = "zeros"
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            init = "normal"
        elif "norm" in type(module).__name__.lower():
            init = "ones"
        else:
            raise ValueError(
                f"{name} (a {type(module).__name__}) has no initialization rule here; expected linear, "
                "embedding and norm weights only. Extend plan_tensors for this architecture."
            )
        quantized = (
            storage.quantized
            and leaf == "weight"
            and type(module) is nn.Linear
            and should_convert_module(module_name, kept_in_bf16)
        )
        shape = tuple(parameter.shape)
        planned.append(PlannedTensor(name, shape, init, quantized, storage.stored_bytes(shape, quantized)))
    return planned


def plan_shards(planned: Sequence[PlannedTensor], max_shard_bytes: int) -> dict[str, list[PlannedTensor]]:
    """Shard file name -> its weights, as ``save_pretrained`` names and fills them (in order, greedily).

    A quantized weight travels with its statistics: the splitter is given whole weights.
    """
    from huggingface_hub import split_state_dict_into_shards_factory

    by_name = {tensor.name: tensor for tensor in planned}
    split = split_state_dict_into_shards_factory(
        by_name,
        get_storage_size=lambda tensor: tensor.stored_bytes,
        filename_pattern=WEIGHTS_NAME.replace(".safetensors", "{suffix}.safetensors"),
        max_shard_size=max_shard_bytes,
    )
    return {file: [by_name[name] for name in names] for file, names in split.filename_to_tensors.items()}


def tensor_seed(seed: int, name: str) -> int:
    """A generator seed for one weight: the same across runs, processes, bit widths and shard plans."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


def generate(tensor: PlannedTensor, seed: int, device: torch.device, std: float) -> torch.Tensor:
    """The weight's bfloat16 values on ``device``, initialized as transformers initializes a Llama."""
    values = torch.empty(tensor.shape, dtype=torch.bfloat16, device=device)
    if tensor.init == "ones":
        return values.fill_(1.0)
    if tensor.init == "zeros":
        return values.zero_()
    generator = torch.Generator(device).manual_seed(tensor_seed(seed, tensor.name))
    return values.normal_(0.0, std, generator=generator)


def size_text(size: int) -> str:
    """Bytes in GB (10**9, as --max-shard-gb), or MB under one GB."""
    return f"{size / GB:.2f} GB" if size >= GB else f"{size / 10**6:.2f} MB"


def partial_directory(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def check_output(out: Path, planned_bytes: int) -> None:
    """Refuse an output that exists and holds something, or a disk without room for the checkpoint."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(
            f"--out {out} already exists and is not an empty directory; expected a new or empty directory. "
            "Remove it or choose another path."
        )
    parent = next(folder for folder in out.absolute().parents if folder.exists())
    free = shutil.disk_usage(parent).free
    partial = partial_directory(out)
    if partial.is_dir():  # left by a run that was killed before it could clean up; removed before writing
        free += sum(file.stat().st_size for file in partial.iterdir())
    if planned_bytes > free:
        raise OSError(
            f"the checkpoint needs about {size_text(planned_bytes)} but {parent} has {size_text(free)} free; "
            "free some space or write elsewhere (--out)."
        )


def write_shards(
    directory: Path,
    shards: dict[str, list[PlannedTensor]],
    storage: StorageFormat,
    seed: int,
    device: torch.device,
    std: float,
) -> tuple[dict[str, str], int]:
    """Generate, quantize and write each shard in turn.

    Host memory holds one shard and the weight being moved to it. Returns the weight map and the
    bytes written.
    """
    from safetensors.torch import save_file

    start = time.perf_counter()
    weights = sum(len(tensors) for tensors in shards.values())
    planned_bytes = sum(tensor.stored_bytes for tensors in shards.values() for tensor in tensors)
    weight_map, written, done = {}, 0, 0
    for index, (file, tensors) in enumerate(shards.items(), 1):
        shard: dict[str, torch.Tensor] = {}
        for tensor in tensors:
            values = generate(tensor, seed, device, std)
            stored = storage.quantize(tensor.name, values) if tensor.quantized else {tensor.name: values}
            shard.update((key, value.contiguous().cpu()) for key, value in stored.items())
            del values, stored
        save_file(shard, directory / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
        shard_bytes = sum(value.nbytes for value in shard.values())
        written, done = written + shard_bytes, done + len(tensors)
        del shard
        print(
            f"[{index}/{len(shards)}] {file}: {size_text(shard_bytes)}; {done}/{weights} weights, "
            f"{size_text(written)} of about {size_text(planned_bytes)}, {time.perf_counter() - start:.1f} s",
            flush=True,
        )
    return weight_map, written


def write_metadata(
    directory: Path,
    model: Any,
    storage: StorageFormat,
    planned: Sequence[PlannedTensor],
    weight_map: dict[str, str],
    total_bytes: int,
) -> None:
    """The index (when sharded), ``config.json`` and ``generation_config.json``, as save_pretrained writes them."""
    if len(set(weight_map.values())) > 1:
        index = {
            "metadata": {
                "total_parameters": sum(math.prod(tensor.shape) for tensor in planned),
                "total_size": total_bytes,
            },
            "weight_map": weight_map,
        }
        (directory / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    if storage.quantized:
        model.config.quantization_config = storage.bnb_config()  # as the bitsandbytes quantizer sets it
    model.config.save_pretrained(directory)
    model.generation_config.save_pretrained(directory)


def write_checkpoint(
    out: str | Path,
    shape: str,
    storage: StorageFormat,
    device: str | torch.device = "cpu",
    seed: int = 0,
    max_shard_gb: float = 5.0,
) -> dict[str, Any]:
    """Write the random-weight checkpoint of ``shape`` into the new directory ``out``; return a summary.

    Raises:
        ValueError: an unknown shape or a shard size that is not positive.
        FileExistsError: ``out`` exists and is not an empty directory.
        OSError: the disk has no room for the planned checkpoint.

    Example::

        write_checkpoint("/data/llama-70b-nf4", "70b", StorageFormat(bits=4), device="cuda")
        LlamaForCausalLM.from_pretrained("/data/llama-70b-nf4", device_map="cuda")
    """
    if not max_shard_gb > 0:
        raise ValueError(
            f"max_shard_gb={max_shard_gb} is not positive; expected GB of 10**9 bytes, e.g. 5 or 0.5."
        )
    out, device, start = Path(out), torch.device(device), time.perf_counter()
    model = meta_model(shape)
    planned = plan_tensors(model, storage)
    shards = plan_shards(planned, int(max_shard_gb * GB))
    check_output(out, sum(tensor.stored_bytes for tensor in planned))
    partial = partial_directory(out)
    if partial.exists():
        print(f"removing {partial}, left by an interrupted run", flush=True)
        shutil.rmtree(partial)
    print(
        f"{shape} Llama, {storage.describe()}: {len(planned)} weights in {len(shards)} shard(s), "
        f"generated on {device}, into {out}",
        flush=True,
    )
    partial.mkdir(parents=True)
    try:
        std = model.config.initializer_range
        weight_map, total_bytes = write_shards(partial, shards, storage, seed, device, std)
        write_metadata(partial, model, storage, planned, weight_map, total_bytes)
        if out.exists():
            out.rmdir()  # empty: checked above
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # a half-written checkpoint of tens of GB helps no one
        raise
    seconds = time.perf_counter() - start
    print(f"wrote {out}: {len(weight_map)} tensors, {size_text(total_bytes)}, {seconds:.1f} s", flush=True)
    return {
        "out": str(out),
        "tensors": len(weight_map),
        "bytes": total_bytes,
        "shards": len(shards),
        "seconds": seconds,
    }


def dry_run(shape: str, storage: StorageFormat, max_shard_gb: float) -> dict[str, Any]:
    """Print the plan (weights, shards, size on disk) without generating anything; return its figures."""
    planned = plan_tensors(meta_model(shape), storage)
    shards = plan_shards(planned, int(max_shard_gb * GB))
    planned_bytes = sum(tensor.stored_bytes for tensor in planned)
    parameters = sum(math.prod(tensor.shape) for tensor in planned)
    print(
        f"{shape} Llama, {storage.describe()}: {parameters / 1e9:.2f} B parameters in {len(planned)} weights "
        f"({sum(tensor.quantized for tensor in planned)} quantized), about {size_text(planned_bytes)} "
        f"({planned_bytes / 1024**3:.2f} GiB) in {len(shards)} shard(s) of at most {max_shard_gb} GB"
    )
    return {"parameters": parameters, "bytes": planned_bytes, "shards": len(shards)}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=list(SHAPES), required=True)
    parser.add_argument("--bits", type=int, choices=(4, 8, 16), required=True)
    parser.add_argument("--out", required=True, help="a new (or empty) directory")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max-shard-gb", type=float, default=5.0, help="GB of 10**9 bytes, as save_pretrained"
    )
    parser.add_argument("--quant-type", choices=("nf4", "fp4"), default="nf4")
    parser.add_argument("--no-double-quant", action="store_true", help="4-bit: float32 absmax, not quantized")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and its size; write nothing")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    storage = StorageFormat(args.bits, args.quant_type, not args.no_double_quant)
    if args.dry_run:
        return dry_run(args.shape, storage, args.max_shard_gb)
    try:
        return write_checkpoint(args.out, args.shape, storage, args.device, args.seed, args.max_shard_gb)
    except (FileExistsError, ValueError) as error:
        raise SystemExit(f"make_checkpoint.py: {error}") from error


if __name__ == "__main__":
    main()
