"""X/Y plots over generation settings (`infer --grid-x AXIS=V1,V2,... --grid-y AXIS=...`), as A1111's
X/Y/Z plot: each cell is drawn with one setting per axis changed and everything else as the command
says, one labelled grid per prompt, each cell also saved with its own parameters (`save_comparison`
with prefix "xyz"). The axes are read and checked in xyz_axes.py.

The base and the adapters load once: an adapter's weight or block weights change in place for each
cell, and come back afterwards."""

from __future__ import annotations

import math
from dataclasses import replace

from ..errors import ConfigError
from ..imagegrid import labelled_grid
from .adapter_spec import adapter_named
from .pipelines import check_clip_skip
from .compare import Comparison
from .generate import Generator, Request
from .xyz_axes import Axis, cells, check_axes

__all__ = ["Axis", "xyz_grid"]


def xyz_grid(generator: Generator, prompt: str, request: Request, x: Axis | None = None,
             y: Axis | None = None) -> Comparison:
    """Draw `prompt` with every value of `x` (columns) and `y` (rows), one image per cell with
    `request.seed` unless an axis is the seed; the adapters' weights and block weights are as they
    were afterwards. One axis alone draws a strip, labelled with the prompt across the other side."""
    if x is None and y is None:
        raise ConfigError("--grid-x/--grid-y: give at least one axis")
    check_axes(x, y, [prompt], request, list(generator.adapters.specs.values()), max_cells=math.inf)
    for axis in (a for a in (x, y) if a is not None and a.kind == "clip-skip"):  # before the first cell
        check_clip_skip(generator.pipe, max(axis.values), f"{axis.flag}: clip-skip")
    names = {a.name: adapter_named(generator.adapters.specs, a.adapter) for a in (x, y)
             if a is not None and a.adapter is not None}
    saved = {name: (generator.adapters.specs[name].weight, generator.adapters.specs[name].lbw)
             for name in names.values()}
    base = replace(request, prompt=prompt, batch_size=1, batch_count=1)
    drawn = []
    try:
        for x_value, y_value, cell in cells(base, x, y):
            for axis, value in ((y, y_value), (x, x_value)):
                if axis is not None and axis.kind == "weight":
                    generator.set_weight(names[axis.name], value)
                elif axis is not None and axis.kind == "lbw":
                    generator.adapters.set_block_weights(names[axis.name], value)
            drawn.append(generator.generate(cell)[0])
    finally:
        for name, (weight, lbw) in saved.items():
            generator.set_weight(name, weight)
            generator.adapters.set_block_weights(name, lbw)
    width = len(x.values) if x else 1
    rows = [drawn[k:k + width] for k in range(0, len(drawn), width)]
    grid = labelled_grid([[c.image for c in row] for row in rows], y.labels() if y else [prompt],
                         x.labels() if x else [prompt])
    first = rows[0][0].info
    info = replace(first, extra=dict(first.extra))
    info.extra["Script"] = "X/Y/Z plot"  # A1111's keys: its X/Y/Z plot reads the axes back from them
    for letter, axis in (("X", x), ("Y", y)):
        if axis is not None:
            info.extra.update({f"{letter} Type": axis.a1111_type, f"{letter} Values": axis.text})
    names_out = [f"{r:02d}-{c:02d}" for r, row in enumerate(rows) for c in range(len(row))]
    return Comparison(grid, rows, names_out, info)

