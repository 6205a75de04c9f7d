"""Activation offload: saved tensors wait in pinned CPU memory between the forward and the backward pass.

With every transformer block checkpointed, a training step keeps each block's input until that
block's backward pass (sequence x hidden size per block: 8 KiB a token for each of the 32 blocks of a
Llama-3-8B shape). At long sequences those inputs, not the quantized weights, fill the device. The
activation planner (``training/plan.py``) runs an offloaded block's checkpoint inside these hooks:
its input goes to pinned CPU memory as the forward pass makes it and comes back when the backward
pass needs it; inside the block, checkpointing still recomputes the rest on the device. Unlike
torch's ``save_on_cpu``, the copies run on a side stream, overlapping the compute, and each tensor
brought back starts bringing back the ones saved before it, which the backward pass needs next.

The tensors saved inside one ``with`` of the hooks are a group. An offloaded block whose attention
output waits here too (``training/attention.py``) needs all of its group at once: the first of them
the backward pass asks for brings back the rest and starts bringing back the group before, whole.

torch's pinned-memory allocator rounds every request up to a power of two and hands a freed block out
again only for a request of that size. So a saved tensor larger than a page waits in whole pinned pages
of one size (``pinned_page``: about an eighth of a block's input at the longest batch planned for, a
power of two), and one of any length or shape takes the pages an earlier one freed instead of new
ones beside them: batches of varying length, whose final norm and loss save tensors of other shapes,
never pin more than the longest one did. The planner counts what they take (``pinned_bytes``), and a
longer batch's new plan first gives the cached pages back (``release_cached_pinned_memory``). Tensors
of a few KiB (a norm's statistics) and parameters, on the device for the whole step anyway, stay there.
"""

from __future__ import annotations

import warnings
import weakref

import torch
from torch import nn

_SMALLEST_PAGE = 1 << 21
_LARGEST_PAGE = 1 << 28
# Saved tensors smaller than this stay on the device: a copy would cost more than the memory is worth.
_STAYS_ON_DEVICE_BYTES = 1 << 16


def pinned_page(largest: int) -> int:
    """The size of the pinned pages for a step whose largest saved tensor (a block's input at the longest
    batch planned for) has ``largest`` bytes: the power of two at or under an eighth of it (so its last
    page wastes less than an eighth), from 2 to 256 MiB."""
    return min(_LARGEST_PAGE, max(_SMALLEST_PAGE, 1 << max(0, (largest // 8).bit_length() - 1)))


def pinned_bytes(nbytes: int, page: int) -> int:
    """The pinned host memory a saved tensor of ``nbytes`` takes: whole pages, or, up to one page, one
    buffer of the power of two the allocator rounds it to (counted for the few KiB that stay on the device too)."""
    if nbytes > page:
        return -(-nbytes // page) * page
    return 1 << (nbytes - 1).bit_length() if nbytes else 0


def release_cached_pinned_memory() -> None:
    """Give the pinned blocks torch's cache holds, unused, back to the host (where this torch can)."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return
    empty = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None)
    empty = empty or getattr(torch._C, "_host_emptyCache", None)
    if empty is not None:
        empty()


class _Group:
    """The tensors saved in one ``with`` of the hooks, and the group before them.

    ``whole``: the backward pass needs them all at once (a block with saved attention), so they come
    back together; otherwise one at a time, each bringing back the one saved before it.
    """

    def __init__(self, previous: _Group | None) -> None:
        self.members: list[weakref.ref[_Saved]] = []
        self.previous = weakref.ref(previous) if previous is not None else None
        self.whole = False


class _Saved:
    """One saved tensor while it waits in CPU memory: where it came from, its copy, and when that is ready."""

    def __init__(
        self,
        device: torch.device | None,
        host: torch.Tensor | list[torch.Tensor],
        ready: torch.cuda.Event | None,
    ) -> None:
        self.device, self.ready = device, ready
        self.host = host  # or, in order, flat views of the pinned pages a large tensor waits in
        self.shape: torch.Size | None = None
        self.on_device: torch.Tensor | None = None  # brought back ahead of its use
        self.taken = False  # given back to the backward pass (a second use copies it again)
        self.group: _Group | None = None
        self.index = 0  # in its group


class _Offload(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks that keep saved tensors in pinned CPU memory, copied on a side stream."""

    def __init__(self) -> None:
        self.streams: dict[torch.device, torch.cuda.Stream] = {}
        self.group: _Group | None = None
        self.pin = True
        self.page = _SMALLEST_PAGE  # set by the planner for the longest batch it planned for
        super().__init__(self._pack, self._unpack)

    def __enter__(self) -> None:
        self.group = _Group(self.group)
        super().__enter__()

    def _host_buffer(self, tensor: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        def empty(pin: bool) -> torch.Tensor:
            return torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout, pin_memory=pin)

        if not (tensor.is_cuda and self.pin):
            return empty(False)
        try:
            size, page = tensor.element_size(), self.page
            nbytes = tensor.numel() * size
            if nbytes <= page or not tensor.is_contiguous():
                return empty(True)
            return [
                torch.empty(page // size, dtype=tensor.dtype, pin_memory=True)[
                    : min(page, nbytes - start) // size
                ]
                for start in range(0, nbytes, page)
            ]
        except RuntimeError as error:  # no pinned memory left (or none allowed, as in some containers)
            self.pin = False
            warnings.warn(
                f"bnb_lightning: offloaded activations go to pageable CPU memory, slower to copy, as pinned memory "
                f"could not be had ({str(error).splitlines()[0]}). Free host memory, raise the container's "
                "locked-memory limit, or use activation_memory='recompute'.",
                stacklevel=2,
            )
            return empty(False)

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self.streams:
            self.streams[device] = torch.cuda.Stream(device)
        return self.streams[device]

    def _pack(self, tensor: torch.Tensor) -> _Saved | torch.Tensor:
        if (
            isinstance(tensor, nn.Parameter)
            or isinstance(tensor._base, nn.Parameter)
            or (tensor.is_cuda and tensor.numel() * tensor.element_size() < _STAYS_ON_DEVICE_BYTES)
        ):
            return tensor  # a weight (a norm's, an output layer's), there for the whole step, or a few KiB
        host = self._host_buffer(tensor)
        if not tensor.is_cuda:
            host.copy_(tensor)  # on the CPU, a second buffer: the same round trip, without streams
            saved = _Saved(None, host, None)
        else:
            stream = self._stream(tensor.device)
            stream.wait_stream(torch.cuda.current_stream(tensor.device))
            with torch.cuda.stream(stream):
                if isinstance(host, list):
                    for piece, part in zip(host, _parts(tensor.view(-1), host), strict=True):
                        piece.copy_(part, non_blocking=True)
                else:
                    host.copy_(tensor, non_blocking=True)
            tensor.record_stream(stream)  # its memory is not reused before the copy is done
            saved = _Saved(tensor.device, host, stream.record_event())
            saved.shape = tensor.shape
        saved.group, saved.index = self.group, len(self.group.members)
        self.group.members.append(weakref.ref(saved))
        return saved

    def _fetch(self, saved: _Saved) -> None:
        stream = self._stream(saved.device)
        with torch.cuda.stream(stream):
            if isinstance(saved.host, list):
                tensor = torch.empty(saved.shape, dtype=saved.host[0].dtype, device=saved.device)
                for part, piece in zip(_parts(tensor.view(-1), saved.host), saved.host, strict=True):
                    part.copy_(piece, non_blocking=True)
                saved.on_device = tensor
            else:
                saved.on_device = saved.host.to(saved.device, non_blocking=True)
        saved.ready = stream.record_event()

    def _fetch_ahead(self, members: list[weakref.ref[_Saved]]) -> None:
        for member in members:
            saved = member()
            if saved is not None and saved.device is not None and saved.on_device is None and not saved.taken:
                self._fetch(saved)

    def _fetch_next_needed(self, saved: _Saved) -> None:
        """Start bringing back what the backward pass needs after ``saved``: the backward pass goes
        through the saved tensors, and the blocks, in reverse."""
        group = saved.group
        if group.whole:
            self._fetch_ahead(group.members)
        elif saved.index:
            self._fetch_ahead(group.members[saved.index - 1 : saved.index])
            return
        before = group.previous() if group.previous is not None else None
        if before is not None:
            self._fetch_ahead(before.members if before.whole else before.members[-1:])

    def _unpack(self, saved: _Saved | torch.Tensor) -> torch.Tensor:
        if isinstance(saved, torch.Tensor):
            return saved
        if saved.device is None:
            return saved.host
        if saved.on_device is None:
            self._fetch(saved)
        tensor, saved.on_device, saved.taken = saved.on_device, None, True
        current = torch.cuda.current_stream(saved.device)
        current.wait_event(saved.ready)
        tensor.record_stream(current)
        self._fetch_next_needed(saved)
        return tensor


def _parts(flat: torch.Tensor, pieces: list[torch.Tensor]) -> list[torch.Tensor]:
    """``flat``'s slices matching ``pieces`` in order."""
    return list(flat.split([piece.numel() for piece in pieces]))


def __getattr__(name: str):
    # Where these lived before the planner: the functions are the planner's now.
    if name in ("use_activation_offload", "remove_activation_offload"):
        from . import plan

        return getattr(plan, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
