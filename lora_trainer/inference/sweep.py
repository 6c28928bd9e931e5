"""Adapter strength sweep: prompts × weights with fixed seeds in one labelled grid, the usual way to
judge how strong an adapter is and where it starts to overfit. Training and publishing call
`sweep_grid` too (sample grids, model-card previews)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ..errors import ConfigError
from ..pnginfo import GenerationInfo
from .adapters import adapter_named
from .generate import Generator, Request
from ..imagegrid import Grid, labelled_grid


@dataclass
class Sweep:
    grid: Grid
    info: GenerationInfo  # the first cell's parameters, with the sweep described under "Sweep"


def parse_weights_list(text: str) -> list[float]:
    try:
        weights = [float(part) for part in text.split(",") if part.strip()]
        if not all(math.isfinite(w) for w in weights):  # 'nan' and 'inf' parse, and would draw black images
            raise ValueError
    except ValueError:
        raise ConfigError(f"--sweep: {text!r} is not a comma-separated list of numbers, e.g. 0,0.25,0.5,0.75,1") from None
    if not weights:
        raise ConfigError("--sweep: give at least one weight, e.g. 0,0.5,1")
    return weights


def sweep_grid(generator: Generator, prompts: list[str], weights: list[float], adapter: str | None = None,
               request: Request | None = None) -> Sweep:
    """Render each prompt at each weight of `adapter` (default: the first loaded) with the same
    seed, so cells differ only by the adapter's strength. Other adapters keep their weights; the
    swept one gets its weight back afterwards."""
    names = list(generator.adapters.specs)
    if not names:
        raise ConfigError("--sweep needs at least one --lora to sweep")
    name = adapter_named(generator.adapters.specs, adapter) if adapter else names[0]
    if name is None:
        raise ConfigError(f"--sweep-adapter: {adapter!r} is not loaded; loaded: {', '.join(names)}")
    request = request or Request(prompt="")
    before = generator.adapters.specs[name].weight
    rows, first = [], None
    try:
        for prompt in prompts:
            row = []
            for weight in weights:
                generator.set_weight(name, weight)
                result = generator.generate(replace(request, prompt=prompt, batch_size=1, batch_count=1))[0]
                row.append(result.image)
                first = first or result.info
            rows.append(row)
    finally:
        generator.set_weight(name, before)
    grid = labelled_grid(rows, prompts, [f"{name}: {w:g}" for w in weights])
    first.extra["Sweep"] = f"{name}: {','.join(f'{w:g}' for w in weights)}"
    return Sweep(grid, first)
