"""HostToDevice: pinned, overlapped copies to CUDA; plain copies everywhere else (GPU tests: test_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from bnb_lightning.transfer import HostToDevice


def test_other_devices_get_plain_copies():
    tensor = torch.randn(3, 5)
    assert HostToDevice(torch.device("cpu"))(tensor) is tensor  # already there: no copy
    assert torch.equal(HostToDevice(torch.device("cpu"))(tensor.T), tensor.T)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine that cannot pin host memory")
def test_without_pinned_memory_it_warns_and_falls_back_to_plain_copies():
    upload = HostToDevice(torch.device("cuda"))
    with pytest.warns(UserWarning, match="cannot pin 128 MiB of host memory.*plain copies"):
        assert not upload._allocate_buffers()
    assert not upload._staged  # later tensors take `tensor.to(device)` without trying again
