"""What the process layout implies, shared by the stages that start accelerate (data preparation
and training) so both make the same choice."""

from __future__ import annotations

import os

import torch


def multiprocess_without_gpu() -> bool:
    """Several processes (torchrun, `accelerate launch`) on a machine without CUDA: accelerate only
    picks its gloo CPU backend when told the run is on CPU, and the first state created fixes it."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
