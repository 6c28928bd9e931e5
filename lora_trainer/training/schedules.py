"""The learning-rate schedule: diffusers' schedules with kohya's options (cosine restarts, the
polynomial power), and a cosine that stops at a floor (kohya's cosine_with_min_lr).

accelerate steps a prepared scheduler once per process per update, so warmup and length are
counted in process steps here. Every schedule is a LambdaLR over a plain function: its state (the
step count and base rates) is all a checkpoint needs to resume it exactly.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from ..config import TrainConfig


def cosine_with_floor(warmup: int, total: int, floor: float):
    """The lr factor at a step: linear warmup from 0, then half a cosine from 1 down to `floor`
    (reached at `total`), so after warmup the lr never falls below floor × lr."""

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def scheduler_name(t: TrainConfig) -> str:
    """The schedule as kohya names it (its `ss_lr_scheduler`)."""
    return "cosine_with_min_lr" if t.scheduler == "cosine" and t.min_lr_ratio > 0 else t.scheduler


def build_scheduler(t: TrainConfig, optimizer: torch.optim.Optimizer, max_steps: int,
                    num_processes: int = 1) -> LambdaLR:
    """The schedule `t` asks for over `max_steps` updates."""
    from diffusers.optimization import get_scheduler

    warmup, total = t.warmup * num_processes, max_steps * num_processes
    if scheduler_name(t) == "cosine_with_min_lr":
        return LambdaLR(optimizer, cosine_with_floor(warmup, total, t.min_lr_ratio))
    return get_scheduler(t.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total,
                         num_cycles=t.scheduler_cycles, power=t.scheduler_power)
