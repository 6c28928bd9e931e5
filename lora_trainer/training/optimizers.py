"""Optimizer choice: AdamW (torch), 8-bit AdamW (bitsandbytes, CUDA only), Prodigy (prodigyopt),
Adafactor (transformers), Lion (lion-pytorch) and 8-bit Lion (bitsandbytes, CUDA only).
Availability is checked before anything loads."""

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
    "lion": "lion_pytorch.lion_pytorch.Lion",
    "lion8bit": "bitsandbytes.optim.lion.Lion8bit",
}
# Lion's update has the size lr in every weight (AdamW's is smaller where gradients are noisy), so
# it wants an lr 3-10x smaller than AdamW's; at or above this the run warns.
LION_HIGH_LR = 3e-4
# (the package an optimizer needs, the extra that installs it)
_PACKAGES = {"adamw8bit": ("bitsandbytes", "bnb"), "lion8bit": ("bitsandbytes", "bnb"),
             "prodigy": ("prodigyopt", "prodigy"), "lion": ("lion_pytorch", "lion")}


def check_optimizer(t: TrainConfig, cuda_available: bool | None = None) -> None:
    """Fail with one line, before any model loads, when `train.optimizer` cannot run here."""
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    name = t.optimizer
    fallback = "lion" if name == "lion8bit" else "adamw"
    if name in _PACKAGES:
        module, extra = _PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"train.optimizer: {name!r} needs the {module.replace('_', '-')} package; "
                              f"pip install 'lora-trainer[{extra}]' or use train.optimizer={fallback}")
    if name in ("adamw8bit", "lion8bit") and not cuda_available:
        raise ConfigError(f"train.optimizer: {name!r} (bitsandbytes) needs a CUDA GPU and this machine has "
                          f"none; use train.optimizer={fallback}")


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
    if t.optimizer in ("lion", "lion8bit"):
        if t.lr >= LION_HIGH_LR:
            log.warning("train.optimizer=%s with train.lr=%g: Lion wants an lr 3-10x smaller than AdamW's "
                        "(e.g. 1e-5 to 3e-5 where AdamW trains at 1e-4)", t.optimizer, t.lr)
        if t.optimizer == "lion8bit":
            import bitsandbytes as bnb

            return bnb.optim.Lion8bit(groups, lr=t.lr, betas=betas, weight_decay=t.weight_decay)
        from lion_pytorch import Lion

        return Lion(groups, lr=t.lr, betas=betas, weight_decay=t.weight_decay)
    raise ConfigError(f"train.optimizer: got {t.optimizer!r}; expected adamw, adamw8bit, prodigy, adafactor, lion "
                      "or lion8bit")
