"""Layer-sized work tensors reused from one layer to the next while many weight changes are built
(`infer.py` rebuilding every layer a LyCORIS adapter changes, see `lycoris.py`)."""

from __future__ import annotations

import math

import torch


class Scratch:
    """Named buffers, each allocated once: a new layer-sized tensor costs a page fault per 4 KiB page
    on its first write, which on a virtual machine can cost more than computing the change itself."""

    def __init__(self, numel: int = 0):
        self.numel = numel  # the largest layer to come: each buffer is allocated once, this big
        self._buffers: dict[tuple, torch.Tensor] = {}

    def get(self, slot: str, shape, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """A tensor of `shape` in buffer `slot`, holding whatever was there before."""
        key = (slot, dtype, torch.device(device))
        n = math.prod(shape)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < n:
            buffer = self._buffers[key] = torch.empty(max(n, self.numel), dtype=dtype, device=device)
        return buffer[:n].view(shape)


def work_tensor(scratch: Scratch | None, slot: str, shape, dtype: torch.dtype, device) -> torch.Tensor:
    """`scratch`'s buffer `slot` as a tensor of `shape`, or a new tensor without scratch."""
    if scratch is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return scratch.get(slot, shape, dtype, device)
