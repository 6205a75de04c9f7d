"""Host-to-device copies for quantization: through pinned memory, overlapped with the next copy."""

from __future__ import annotations

import dataclasses
import warnings

import torch

from .backend import flat_bytes

# Two staging buffers of this size: small next to any model, large enough for the copy engine to
# run at full speed.
CHUNK_BYTES = 64 * 2**20


class HostToDevice:
    """Copies tensors from the CPU to ``device``, through two pinned staging buffers on CUDA.

    A plain ``tensor.to("cuda")`` from pageable memory is a synchronous copy through the driver's
    own small staging buffer: a few GB/s, which was most of the time it took to quantize a model
    held in CPU memory. Here the host fills one pinned buffer (a multi-threaded copy) while the GPU
    reads the other, and the caller's kernels queue behind the copies on the current stream, so
    quantizing one layer overlaps with copying the next. The device holds nothing more than
    ``tensor.to(device)`` would. For other devices or sources, or where host memory cannot be
    pinned, it is ``tensor.to(device)``.
    """

    def __init__(self, device: torch.device, chunk_bytes: int = CHUNK_BYTES) -> None:
        self.device = device
        self.chunk_bytes = chunk_bytes
        self._buffers: list[torch.Tensor] = []
        self._events: list[torch.cuda.Event | None] = [None, None]
        self._next = 0
        self._staged = device.type == "cuda"

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        if not (self._staged and tensor.device.type == "cpu" and tensor.numel() and tensor.is_contiguous()):
            return tensor.to(self.device)
        if not self._buffers and not self._allocate_buffers():
            return tensor.to(self.device)
        source = tensor.detach()
        result = torch.empty_like(source, device=self.device)
        source_bytes, result_bytes = flat_bytes(source), flat_bytes(result)
        for start in range(0, source_bytes.numel(), self.chunk_bytes):
            end = min(start + self.chunk_bytes, source_bytes.numel())
            event = self._events[self._next]
            if event is not None:
                event.synchronize()  # the GPU has finished reading this buffer
            buffer = self._buffers[self._next][: end - start]
            buffer.copy_(source_bytes[start:end])
            result_bytes[start:end].copy_(buffer, non_blocking=True)
            self._events[self._next] = _recorded_event(self.device)
            self._next = 1 - self._next
        return result

    def _allocate_buffers(self) -> bool:
        try:
            self._buffers = [
                torch.empty(self.chunk_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(2)
            ]
        except RuntimeError as error:
            # E.g. a container's limit on locked memory: slower, but the same result.
            warnings.warn(
                f"bnb_lightning: cannot pin {2 * self.chunk_bytes >> 20} MiB of host memory ({error}); "
                "weights go to the GPU by plain copies, which is slower.",
                stacklevel=4,
            )
            self._staged = False
        return self._staged


def _recorded_event(device: torch.device) -> torch.cuda.Event:
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


# The attribute of a packed weight that holds only this rank's FSDP2 rows in CPU memory.
PARTIAL_HOST_COPY = "_bnb_lightning_partial_host_copy"


@dataclasses.dataclass(frozen=True)
class PartialHostCopy:
    """Which rows of a packed weight in CPU memory hold data (this rank's FSDP2 shard), and the
    checksums of the whole weight, taken on the device before the other rows were dropped."""

    start: int
    end: int
    checksums: torch.Tensor


def shard_rows(length: int, rank: int, world: int) -> tuple[int, int]:
    """The rows ``[start, end)`` of a ``length``-row tensor that FSDP2 gives ``rank`` of ``world``:
    ``torch.chunk`` along the first dimension (chunks of ``ceil(length / world)``, the last ones
    shorter or empty)."""
    size = -(-length // world)
    start = min(length, rank * size)
    return start, min(length, start + size)


def keep_rows_on_host(layer: torch.nn.Module, host_shard: tuple[int, int] | None) -> torch.nn.Module:
    """Move a 4-bit ``layer`` quantized on a device to CPU memory; with ``host_shard`` (rank, world),
    only the rows of its packed weight that FSDP2 will give that rank.

    The other rows of the CPU tensor are allocated but never written: for a large layer the operating
    system maps no memory for them, so each rank holds about 1/world of the packed weights until
    FSDP2 copies its shard. Only for a caller that shards the layer that way right after; the
    checksums of the whole weight are kept for the base's fingerprint.
    """
    if host_shard is None:
        return layer.to("cpu")  # bitsandbytes moves the packed weight and its quant state
    from .io.checkpoint import _checksums  # imported here: io builds on this module

    weight = layer.weight
    rank, world = host_shard
    start, end = shard_rows(weight.shape[0], rank, world)
    checksums = _checksums(weight.detach())
    host = torch.empty(weight.shape, dtype=weight.dtype, device="cpu")
    host[start:end].copy_(weight.data[start:end])
    weight.quant_state.to("cpu")  # in place: the layer and its weight share it
    weight.data = host
    setattr(weight, PARTIAL_HOST_COPY, PartialHostCopy(start, end, checksums))
    if layer.bias is not None:
        layer.bias.data = layer.bias.data.cpu()
    return layer
