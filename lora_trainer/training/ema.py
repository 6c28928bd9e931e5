"""An exponential moving average (EMA) of the adapter weights (SimpleTuner's --use_ema, ai-toolkit's
ema_config, the diffusers scripts' EMAModel): a float32 copy of every trainable adapter tensor,
moved towards the trained weights θ once per optimizer step, after the update (and max-norm):

    ema ← d_t · ema + (1 − d_t) · θ        d_t = min(decay, (1 + t) / (10 + t)) with the warm-up

where t counts the updates before this one, and the first (t = 0) copies θ, as EMAModel does.
Without the warm-up d_t = decay from the first update, which starts from the initial adapter.

The adapter files, the samples and the validation loss use the EMA (swapped in, then the trained
weights put back bit for bit); training continues from the trained weights. A checkpoint keeps the
EMA beside them, so a resumed run continues it exactly.
"""

from __future__ import annotations

import functools
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch

from ..errors import ConfigError

log = logging.getLogger(__name__)

EMA_FILE = "ema_state.pt"  # in a checkpoint folder, beside accelerate's files


class AdapterEMA:
    """The EMA of `named` ({name: trainable parameter}), held in fp32 on `device`."""

    def __init__(self, named: dict[str, torch.nn.Parameter], decay: float, warmup: bool = True,
                 device: torch.device | str = "cpu"):
        self.names = list(named)
        self.params = list(named.values())
        self.decay, self.warmup = float(decay), warmup
        self.device = torch.device(device)
        self.weights = [p.detach().to(self.device, torch.float32, copy=True) for p in self.params]
        self.updates = 0  # updates done: the t of the next one

    def next_decay(self) -> float:
        """d_t of the next update."""
        if not self.warmup:
            return self.decay
        t = self.updates
        return 0.0 if t == 0 else min(self.decay, (1 + t) / (10 + t))

    @torch.no_grad()
    def update(self) -> None:
        """One step of the recurrence, from the parameters as they are now."""
        weight = 1.0 - self.next_decay()
        # No copy when the parameters already are fp32 on the EMA's device; lerp_ with weight 1
        # (decay 0) gives θ exactly.
        current = [p.detach().to(self.device, torch.float32) for p in self.params]
        torch._foreach_lerp_(self.weights, current, weight)
        self.updates += 1

    @contextmanager
    def applied(self):
        """The EMA in the parameters' place inside the block; the trained values back after it, bit for bit."""
        with torch.no_grad():
            trained = [p.detach().clone() for p in self.params]
            for p, w in zip(self.params, self.weights):
                p.copy_(w)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, t in zip(self.params, trained):
                    p.copy_(t)

    def named(self) -> dict[str, torch.Tensor]:
        """{name: EMA tensor} on the CPU."""
        return {name: w.detach().cpu().clone() for name, w in zip(self.names, self.weights)}

    def save(self, folder: Path) -> None:
        """Into a checkpoint folder (still the hidden temporary one: it appears when complete)."""
        state = {"decay": self.decay, "warmup": self.warmup, "updates": self.updates, "weights": self.named()}
        torch.save(state, Path(folder) / EMA_FILE)

    def load(self, path: Path) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        saved = state["weights"]
        mismatched = sorted(set(saved) ^ set(self.names)) or sorted(
            n for n, w in zip(self.names, self.weights) if saved[n].shape != w.shape)
        if mismatched:  # the adapter itself loads first and names the change; this is a damaged file
            raise ConfigError(f"train.resume: {path} holds the EMA of another adapter ({len(mismatched)} "
                              f"mismatched weights, e.g. {mismatched[0]}); resume with the config that wrote it")
        with torch.no_grad():
            for name, w in zip(self.names, self.weights):
                w.copy_(saved[name])
        self.updates = int(state["updates"])


def start_ema(t, modules: dict[str, torch.nn.Module], device: torch.device,
              checkpoint: Path | None = None, steps: int | None = None) -> AdapterEMA | None:
    """The run's EMA (`t` is the TrainConfig; `modules` the unwrapped trained modules by component),
    continued from `checkpoint` when it holds one; None when train.ema_decay is null. `steps`: the
    run's length, to warn when the files would keep much of the untrained start."""
    saved = Path(checkpoint) / EMA_FILE if checkpoint is not None else None
    if t.ema_decay is None:
        if saved is not None and saved.is_file():
            log.warning("train.ema_decay is null: the EMA kept in %s is left unused; the adapter files from here "
                        "on hold the trained weights (resume with train.ema_decay set to continue it)", checkpoint)
        return None
    named = {f"{component}.{name}": p for component, module in modules.items()
             for name, p in module.named_parameters() if p.requires_grad}
    ema = AdapterEMA(named, t.ema_decay, t.ema_warmup, "cpu" if t.ema_device == "cpu" else device)
    if saved is not None and saved.is_file():
        ema.load(saved)
    elif saved is not None:
        log.warning("train.ema_decay: %s was saved without an EMA; the EMA starts here, from the adapter at that "
                    "step (warm-up from its start), so the files differ from a run with the EMA from step 0",
                    checkpoint)
    kept = t.ema_decay ** steps if steps and not t.ema_warmup else 0.0
    if kept > 0.1:  # without warm-up the initial adapter (B = 0: no change) weighs decay^steps in the files
        log.warning("train.ema_decay: %g without warm-up keeps %.0f%% of the untrained adapter in the files after %d "
                    "steps (decay^steps), so they change the base little; set train.ema_warmup: true, or a decay of "
                    "about %.3g for this length", t.ema_decay, 100 * kept, steps, 0.01 ** (1 / steps))
    log.info("EMA of the adapter weights: decay %g%s, %d tensors in fp32 on %s", ema.decay,
             " with warm-up" if ema.warmup else "", len(named), ema.device)
    return ema


def with_ema(ema: AdapterEMA | None, fn: Callable) -> Callable:
    """`fn` run with the EMA in the adapter's place (`fn` itself without an EMA)."""
    if ema is None:
        return fn

    @functools.wraps(fn)
    def averaged(*args, **kwargs):
        with ema.applied():
            return fn(*args, **kwargs)

    return averaged
