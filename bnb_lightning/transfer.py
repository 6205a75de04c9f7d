"""Host-to-device copies for quantization: through pinned memory, overlapped with the next copy."""

from __future__ import annotations

import torch

# Two staging buffers of this size: small next to any model, large enough for the copy engine to
# run at full speed.
CHUNK_BYTES = 64 * 2**20


class HostToDevice:
    """Copies tensors from the CPU to ``device``, through two pinned staging buffers on CUDA.

    A plain ``tensor.to("cuda")`` from pageable memory is a synchronous copy through the driver's
    own small staging buffer: a few GB/s, which is most of the time it takes to quantize a model
    that sits in CPU memory. Here the host fills one pinned buffer (a multi-threaded copy) while
    the GPU reads the other, and the caller's kernels queue behind the copies on the current
    stream, so quantizing one layer overlaps with copying the next. The device holds nothing more
    than ``tensor.to(device)`` would. For other devices or sources it is ``tensor.to(device)``.
    """

    def __init__(self, device: torch.device, chunk_bytes: int = CHUNK_BYTES) -> None:
        self.device = device
        self.chunk_bytes = chunk_bytes
        self._buffers: list[torch.Tensor] = []
        self._events: list[torch.cuda.Event | None] = []
        self._next = 0

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        if (
            self.device.type != "cuda"
            or tensor.device.type != "cpu"
            or tensor.numel() == 0
            or not tensor.is_contiguous()
        ):
            return tensor.to(self.device)
        source = tensor.detach()
        result = torch.empty_like(source, device=self.device)
        source_bytes, result_bytes = _as_bytes(source), _as_bytes(result)
        for start in range(0, source_bytes.numel(), self.chunk_bytes):
            end = min(start + self.chunk_bytes, source_bytes.numel())
            buffer = self._free_buffer()[: end - start]
            buffer.copy_(source_bytes[start:end])
            result_bytes[start:end].copy_(buffer, non_blocking=True)
            self._events[self._next] = _recorded_event(self.device)
            self._next = (self._next + 1) % len(self._buffers)
        return result

    def _free_buffer(self) -> torch.Tensor:
        if not self._buffers:
            self._buffers = [
                torch.empty(self.chunk_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(2)
            ]
            self._events = [None, None]
        event = self._events[self._next]
        if event is not None:
            event.synchronize()  # the GPU has finished reading this buffer
        return self._buffers[self._next]


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    flat = tensor.reshape(-1)
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)


def _recorded_event(device: torch.device) -> torch.cuda.Event:
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event
