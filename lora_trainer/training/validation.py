"""The validation loss: the training loss of the current adapter on held-out images, with every
random choice fixed, so that from one evaluation to the next only the adapter changes.

Each held-out image (center crop, no flip, its caption as training reads it, at the largest side of
its resolution when data.resolution or its subset's lists several) is scored at
`train.validation_timesteps` evenly spaced timesteps, each with its own noise drawn from
(validation seed, epoch 0, image × timestep, "validation"): the same draws at every evaluation,
in every process and every resumed run. The loss is training's (noise offset, multi-resolution
noise, random noise strengths, loss type, min-SNR, v-prediction-like and debiased weighting, the
training noise schedule, v-prediction target), computed by the loop's own `batch_loss`, with no gradient and the adapters
in eval mode (LoRA dropout off), holding their EMA with train.ema_decay. Processes share the images and add up their per-image losses,
so 2 processes report the 1-process number.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager, nullcontext
from typing import Callable, ContextManager, Sequence

import torch

from ..config import RunConfig, main_side, resolve_subsets
from ..data import Example, ImageCaptionDataset
from ..data.holdout import validation_seed
from ..data.templates import template_captions
from ..data.treatment import Treatment

log = logging.getLogger(__name__)

STREAM = "validation"


def fixed_timesteps(count: int, num_timesteps: int, low: int = 0) -> torch.Tensor:
    """`count` timesteps at the middles of equal slices of [low, num_timesteps), the range training
    draws from: 8 of [0, 1000) are 62, 187, ..., 937 (neither end of the schedule, where the loss
    says little)."""
    span = num_timesteps - low
    return torch.tensor([low + int((j + 0.5) * span / count) for j in range(count)], dtype=torch.long)


def validation_interval(cfg: RunConfig, max_steps: int) -> int:
    """Steps between evaluations (0: only at step 0 and at the end)."""
    every = cfg.train.validate_every_n_steps
    return every if every is not None else math.ceil(max_steps / 10)


@contextmanager
def evaluating(modules: Sequence[torch.nn.Module]):
    """No gradients and eval mode (LoRA dropout off), then back to training mode."""
    for module in modules:
        module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module in modules:
            module.train()


class Validation:
    """When to evaluate, and the evaluation; inert (never due) when there are no held-out images.

    `batch_loss(batch, paths, epoch, stream, seed, timesteps)` is the loop's loss of one batch;
    `modules` are the trained (possibly wrapped) modules, put in eval mode while it runs, with the
    weights `weights()` puts in place (train.ema_decay: the EMA's).
    """

    def __init__(self, cfg: RunConfig, examples: Sequence[Example], num_timesteps: int, max_steps: int,
                 batch_loss: Callable[..., torch.Tensor], modules: Sequence[torch.nn.Module], accelerator,
                 weights: Callable[[], ContextManager] = nullcontext):
        self.examples = list(examples)
        self.paths = [ex.path for ex in self.examples]
        self.max_steps = max_steps
        self.every = validation_interval(cfg, max_steps)
        high = cfg.train.max_timestep or num_timesteps
        self.timesteps = fixed_timesteps(cfg.train.validation_timesteps, high, cfg.train.min_timestep)
        self.chunk = cfg.train.batch_size  # no gradients: a training batch's memory is enough
        self.seed = validation_seed(cfg)
        self.batch_loss, self.modules, self.accelerator, self.weights = batch_loss, list(modules), accelerator, weights
        self.losses: dict[int, float] = {}  # step -> loss, as computed in this run
        self.dataset = None
        if self.examples:
            from .loaders import example_buckets

            d = cfg.data
            folders = (*resolve_subsets(d), d) if d.subsets else (d,)  # validation_path's images: data.*'s
            sides = [[main_side(folders[ex.subset].resolution)] for ex in self.examples]
            sizes = example_buckets(d, self.examples, sides) if d.buckets else None
            self.dataset = ImageCaptionDataset(self.examples, d.resolution, center_crop=True, random_flip=False,
                                               sides=sides,
                                               caption_prefix=d.caption_prefix, caption_suffix=d.caption_suffix,
                                               seed=self.seed, sizes=sizes, alpha_mask=d.alpha_mask,
                                               keep_tokens_separator=d.keep_tokens_separator,
                                               templates=template_captions(cfg.embedding.templates,
                                                                           cfg.embedding.token),
                                               treatments=_held_out_treatments(d) if d.subsets else None)

    def due(self, step: int) -> bool:
        if not self.examples:
            return False
        return step == 0 or step == self.max_steps or (self.every > 0 and step % self.every == 0)

    def describe(self) -> str:
        when = f"every {self.every} step(s)" if self.every else "at step 0 and at the end"
        names = ", ".join(ex.path.name for ex in self.examples[:5]) + (", ..." if len(self.examples) > 5 else "")
        return (f"validation: {len(self.examples)} held-out image(s) ({names}), each at {len(self.timesteps)} "
                f"fixed timesteps, {when}")

    def postfix(self) -> dict[str, str]:
        """For the progress bar: the latest validation loss."""
        return {"val_loss": f"{self.losses[max(self.losses)]:.4f}"} if self.losses else {}

    def loss(self, step: int) -> float:
        """The mean loss over held-out images and timesteps at `step`, the same on every process."""
        acc, n = self.accelerator, len(self.examples)
        per_image = torch.zeros(n, dtype=torch.float32, device=acc.device)
        # Every process runs the same number of forward passes (wrapped modules may synchronise in
        # them): the last round is padded with repeats whose losses are dropped.
        rounds = math.ceil(n / acc.num_processes)
        with self.weights(), evaluating(self.modules):
            for position in range(acc.process_index, rounds * acc.num_processes, acc.num_processes):
                value = self._image_loss(position % n)
                if position < n:
                    per_image[position] = value
        per_image = acc.reduce(per_image, reduction="sum")  # each entry comes from one process, zeros elsewhere
        self.losses[step] = per_image.mean().item()
        if acc.is_main_process:
            log.info("step %d: val_loss %.6f", step, self.losses[step])
        return self.losses[step]

    def _image_loss(self, index: int) -> torch.Tensor:
        """One held-out image's loss, averaged over the fixed timesteps (batches of `self.chunk`)."""
        item = self.dataset[index]
        k = len(self.timesteps)
        total = torch.zeros((), dtype=torch.float32, device=self.accelerator.device)
        for start in range(0, k, self.chunk):
            timesteps = self.timesteps[start:start + self.chunk]
            batch = _repeat(item, [index * k + j for j in range(start, start + len(timesteps))])
            loss = self.batch_loss(batch, self.paths, 0, STREAM, self.seed, timesteps.to(self.accelerator.device))
            total += loss.float() * len(timesteps)
        return total / k


def _held_out_treatments(d) -> list[Treatment]:
    """With data.subsets: each subset's captions as training reads them (no dropout, shuffling or flip),
    then data.*'s for the images of data.validation_path."""
    return [Treatment(caption_prefix=s.caption_prefix, caption_suffix=s.caption_suffix,
                      keep_tokens_separator=s.keep_tokens_separator, alpha_mask=s.alpha_mask)
            for s in (*resolve_subsets(d), d)]


def _repeat(item: dict, draws: list[int]) -> dict:
    """A batch of one dataset item, once per draw, collated as the training loader collates (its
    `item` numbers the draw: noise and timestep)."""
    batch = torch.utils.data.default_collate([item] * len(draws))
    batch["item"] = torch.tensor(draws)
    return batch
