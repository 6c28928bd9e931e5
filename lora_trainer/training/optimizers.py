"""Optimizer choice: AdamW (torch), 8-bit AdamW (bitsandbytes, CUDA only), Prodigy (prodigyopt)
and Adafactor (transformers). Availability is checked before anything loads."""

from __future__ import annotations

import importlib.util
import logging

import torch

from ..config import TrainConfig
from ..errors import ConfigError

log = logging.getLogger(__name__)

# kohya's `ss_optimizer` spelling, so tools showing the metadata read what they expect.
OPTIMIZER_NAMES = {
    "adamw": "torch.optim.adamw.AdamW",
    "adamw8bit": "bitsandbytes.optim.adamw.AdamW8bit",
    "prodigy": "prodigyopt.prodigy.Prodigy",
    "adafactor": "transformers.optimization.Adafactor",
}


def check_optimizer(t: TrainConfig, cuda_available: bool | None = None) -> None:
    """Fail with one line, before any model loads, when `train.optimizer` cannot run here."""
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if t.optimizer == "adamw8bit":
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError("train.optimizer: 'adamw8bit' needs the bitsandbytes package; "
                              "pip install 'lora-trainer[bnb]' or use train.optimizer=adamw")
        if not cuda_available:
            raise ConfigError("train.optimizer: 'adamw8bit' (bitsandbytes) needs a CUDA GPU and this machine has "
                              "none; use train.optimizer=adamw")
    if t.optimizer == "prodigy" and importlib.util.find_spec("prodigyopt") is None:
        raise ConfigError("train.optimizer: 'prodigy' needs the prodigyopt package; "
                          "pip install 'lora-trainer[prodigy]' or use train.optimizer=adamw")


def build_optimizer(t: TrainConfig, groups: list[dict]) -> torch.optim.Optimizer:
    """The optimizer over `groups` ({"params", "lr"} per adapted model) as `t.optimizer` says."""
    betas = (t.adam_beta1, t.adam_beta2)
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, betas=betas, weight_decay=t.weight_decay, eps=t.adam_epsilon)
    if t.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, betas=betas, weight_decay=t.weight_decay, eps=t.adam_epsilon)
    if t.optimizer == "prodigy":
        from prodigyopt import Prodigy

        if t.lr < 0.1:
            # Prodigy estimates the step size itself; lr multiplies that estimate.
            log.warning("train.optimizer=prodigy with train.lr=%g: Prodigy expects lr about 1.0", t.lr)
        return Prodigy(groups, betas=betas, weight_decay=t.weight_decay, eps=t.adam_epsilon,
                       use_bias_correction=True, safeguard_warmup=t.warmup > 0)
    if t.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        # A fixed learning rate (the schedule comes from train.scheduler), as kohya uses it for LoRA.
        return Adafactor(groups, lr=t.lr, weight_decay=t.weight_decay, scale_parameter=False,
                         relative_step=False, warmup_init=False)
    raise ConfigError(f"train.optimizer: got {t.optimizer!r}; expected adamw, adamw8bit, prodigy or adafactor")
