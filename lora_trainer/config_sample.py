"""The `sample` section: the images a run draws of its prompts while it trains (before the first
step, every n steps or epochs, at the end, and the weight sweep), and how they are drawn."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .inference.schedulers import SAMPLERS, a1111_name, missing_package, sampler_choices, sampler_key
from .sample_prompts import parse_sample_prompt

DEFAULT_SAMPLER = "DPM++ 2M"  # what null draws with: DPM-Solver++ on the base's scheduler config, as A1111 names it


@dataclass
class SampleConfig:
    prompts: list[str] = field(default_factory=list)  # images generated with the adapter at the end
    negative_prompt: str = ""
    every_n_steps: int = 0  # 0: only at the end
    every_n_epochs: int = 0  # also at the end of every n-th epoch (not the last), into samples/epoch_XXXXXX/; 0: off
    # also once before the first update (kohya's --sample_at_first), into samples/step_00000/ with the
    # same seeds and settings: the base (or the lora.init_from adapter) to compare the later ones with.
    # A resumed run does not draw them again
    at_start: bool = False
    steps: int = 20
    guidance_scale: float = 7.5
    seed: int = 0
    # The sampler of every sample image (and sweep.png): one of infer.py's --scheduler names (ddim,
    # euler, euler_a, dpm++_2m_karras, ...), built on the base's noise schedule (kohya's --sample_sampler);
    # null: DPM++ 2M. The training noise schedule is not touched
    scheduler: Optional[str] = None
    # adapter weights of the prompts × weights grid drawn at the end (samples/sweep.png); [] skips it
    grid_weights: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0])

    @property
    def sampler_name(self) -> str:
        """The samples' sampler as A1111 names it (their PNG parameters, the published prompts.json)."""
        return a1111_name(self.scheduler) if self.scheduler else DEFAULT_SAMPLER


def check_sample(s: SampleConfig, errors: list[str]) -> None:
    """Append one line per bad sample.* value to `errors` (before any model loads)."""
    def need(ok: bool, key: str, value, allowed: str) -> None:
        if not ok:
            errors.append(f"sample.{key}: got {value!r}; expected {allowed}")

    need(s.steps >= 1, "steps", s.steps, "an integer >= 1")
    for i, prompt in enumerate(s.prompts):
        try:
            parse_sample_prompt(prompt)
        except ValueError as exc:
            errors.append(f"sample.prompts[{i}]: {exc} (in {prompt!r})")
    need(s.every_n_steps >= 0, "every_n_steps", s.every_n_steps, "an integer >= 0")
    need(s.every_n_epochs >= 0, "every_n_epochs", s.every_n_epochs, "an integer >= 0 (0: off)")
    if s.scheduler is not None and sampler_key(s.scheduler) not in SAMPLERS:
        errors.append(f"sample.scheduler: got {s.scheduler!r}, not a sampler infer.py knows; "
                      f"{sampler_choices(s.scheduler)}; or null ({DEFAULT_SAMPLER})")
    elif s.scheduler is not None and missing_package(sampler_key(s.scheduler)):
        errors.append(f"sample.scheduler: {sampler_key(s.scheduler)} needs {missing_package(sampler_key(s.scheduler))}")
