"""The axes of an X/Y plot (`infer --grid-x AXIS=V1,V2,... --grid-y AXIS=...`, xyz.py draws it): each
axis read from its flag, its values checked as their single flags check them, and the whole plot
checked before any model loads."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, replace
from io import StringIO
from typing import TYPE_CHECKING

from ..errors import ConfigError
from .adapter_spec import AdapterSpec, adapter_named
from .block_weights import PRESETS, block_weights_text, check_file_count
from .schedulers import MAX_STEPS, a1111_name, check_sampler, resolve_seed, sampler_choices

if TYPE_CHECKING:  # generate.py loads diffusers: the CLI reads the flags without it
    from .generate import Request

MAX_CELLS = 100  # images all grids of one command draw, unless --grid-max-cells says otherwise
# axis → (Request field it sets, A1111's axis type name for the grid's "X Type", the label before a value)
SETTINGS = {
    "cfg": ("guidance_scale", "CFG Scale", "CFG scale"),
    "steps": ("steps", "Steps", "Steps"),
    "sampler": ("sampler", "Sampler", None),  # labelled by the sampler's name alone, as A1111 does
    "seed": ("seed", "Seed", "Seed"),
    "clip-skip": ("clip_skip", "Clip skip", "Clip skip"),
    "hires-strength": ("hires_strength", "Denoising", "Hires strength"),
    "prompt-sr": (None, "Prompt S/R", None),  # labelled by the replacing text, as A1111 does
}
ADAPTER_AXES = ("weight", "lbw")  # weight:NAME, lbw:NAME
AXIS_NAMES = (*SETTINGS, "weight:NAME", "lbw:NAME")


@dataclass
class Axis:
    """One axis of a plot: the setting it changes and its values (parsed), as `parse_axis` reads them."""

    kind: str  # a key of SETTINGS, or "weight" / "lbw"
    values: list
    text: str  # the values as given, for the grid's "X Values"
    adapter: str | None = None  # weight/lbw: the --lora it changes, as named (its file's stem)
    flag: str = "--grid-x"  # where it was given, for errors

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.adapter}" if self.adapter is not None else self.kind

    @property
    def a1111_type(self) -> str:
        """A1111's name of the axis type where it has the axis, else ours (weight:NAME, lbw:NAME)."""
        return SETTINGS[self.kind][1] if self.kind in SETTINGS else self.name

    def labels(self) -> list[str]:
        if self.kind == "weight":
            return [f"{self.adapter}: {v:g}" for v in self.values]
        if self.kind == "lbw":
            return [f"{self.adapter} lbw={v}" for v in self.values]
        if self.kind == "sampler":
            return [a1111_name(v) for v in self.values]
        if self.kind == "prompt-sr":
            return list(self.values)
        return [f"{SETTINGS[self.kind][2]}: {_text(v)}" for v in self.values]

    def request(self, request: Request, value) -> Request:
        """`request` with this axis at `value` (weight and lbw axes change the adapter, not the request)."""
        if self.kind == "prompt-sr":  # A1111's Prompt S/R: in the prompt and the negative prompt
            search = self.values[0]
            return replace(request, prompt=request.prompt.replace(search, value),
                           negative_prompt=request.negative_prompt.replace(search, value))
        if self.kind in ADAPTER_AXES:
            return request
        return replace(request, **{SETTINGS[self.kind][0]: value})


def _text(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _split(text: str) -> list[str]:
    """Comma-separated values, stripped; a value in double quotes may hold commas (A1111's rule),
    as numeric block weights do: lbw:style=OUTALL,"1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1"."""
    return [item.strip() for row in csv.reader(StringIO(text), skipinitialspace=True) for item in row]


def _number(kind: str, item: str, flag: str, cast, ok, allowed: str, example: str):
    try:
        value = cast(item)
        if isinstance(value, float) and not math.isfinite(value):  # 'nan' and 'inf' parse
            raise ValueError(item)
    except ValueError:
        raise ConfigError(f"{flag}: {kind}: {item!r} is not {'an integer' if cast is int else 'a number'}; "
                          f"give {allowed}, e.g. {example}") from None
    if not ok(value):
        raise ConfigError(f"{flag}: {kind}: {item} is not allowed; give {allowed}, e.g. {example}")
    return value


NUMBERS = {  # axis → (type, check, what is allowed, an example of the flag's value)
    "cfg": (float, lambda v: v > 0, "numbers above 0", "cfg=4,7,10"),
    "steps": (int, lambda v: 1 <= v <= MAX_STEPS, f"integers from 1 to {MAX_STEPS}", "steps=10,20,30"),
    "seed": (int, lambda v: True, "integers", "seed=1,2,3"),
    "clip-skip": (int, lambda v: v >= 1, "integers >= 1 (1 = the last CLIP layer)", "clip-skip=1,2"),
    "hires-strength": (float, lambda v: 0 < v <= 1, "numbers above 0, at most 1", "hires-strength=0.3,0.5,0.7"),
    "weight": (float, lambda v: True, "numbers", "weight:style=0,0.5,1"),
}


def parse_axis(text: str, flag: str = "--grid-x") -> Axis:
    """`AXIS=V1,V2,...` as an Axis, every value checked as its single flag checks it (one-line
    ConfigErrors naming `flag`). Adapter names are checked against the loaded ones by `check_axes`."""
    head, sep, rest = text.partition("=")
    head = head.strip().lower()
    kind, colon, adapter = head.partition(":")
    if not sep or kind not in (*SETTINGS, *ADAPTER_AXES):
        hint = f"{text!r} is no axis" if sep else f"{text!r} has no '='"
        raise ConfigError(f"{flag}: {hint}; write AXIS=V1,V2,... with AXIS one of {', '.join(AXIS_NAMES)}, "
                          f"e.g. {flag} cfg=4,7,10")
    if (kind in ADAPTER_AXES) != bool(colon and adapter):
        raise ConfigError(f"{flag}: {head!r}: " + (f"name the --lora, e.g. {kind}:style=..." if kind in ADAPTER_AXES
                                                   else f"{kind} takes no ':NAME'; only weight:NAME and lbw:NAME do"))
    adapter = text.partition("=")[0].strip().partition(":")[2] or None  # the name as given, its case kept
    items = _split(rest)
    if not any(items):
        raise ConfigError(f"{flag}: {head}: give at least one value after '=', e.g. {flag} cfg=4,7,10")
    if kind in NUMBERS:
        cast, ok, allowed, example = NUMBERS[kind]
        values = [_number(kind, item, flag, cast, ok, allowed, example) for item in items]
        if kind == "seed":  # -1 is a random seed, drawn now, as A1111's X/Y/Z plot does
            values = [resolve_seed(v) for v in values]
    elif kind == "sampler":
        values = []
        for item in items:
            try:
                values.append(check_sampler(item))
            except ConfigError:
                raise ConfigError(f"{flag}: sampler: {item!r} is not a known sampler; "
                                  f"{sampler_choices(item)}") from None
    elif kind == "lbw":
        values = [block_weights_text(item, f"{flag}: lbw:{adapter}") for item in items]
        if any("," not in v and v.upper() not in PRESETS for v in values):  # numbers split at their commas
            raise ConfigError(f"{flag}: lbw:{adapter}: {rest.strip()!r}: each value is a preset or a whole list of "
                              f"block weights; quote a list, e.g. "
                              f'lbw:{adapter}=OUTALL,"1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1"')
    else:  # prompt-sr: text; the first value is what is searched, and the first column
        if not items[0]:
            raise ConfigError(f"{flag}: prompt-sr: the first value is the text searched in the prompt; it cannot be "
                              "empty (e.g. prompt-sr=red,blue,green)")
        values = items
    return Axis(kind, values, rest.strip(), adapter, flag)


def check_axes(x: Axis | None, y: Axis | None, prompts: list[str], request: Request, adapters: list[AdapterSpec],
               max_cells: int = MAX_CELLS) -> None:
    """Refuse, before any model loads, what no plot can draw: the same axis twice (prompt-sr twice:
    the same searched text), a weight or lbw axis naming no --lora (and block weights whose count
    fits no form of its file's family), a prompt-sr whose first value a prompt lacks, hires-strength
    without the hires fix, more cells than `max_cells`, and any
    cell whose settings a plain `infer` would refuse."""
    named = {a.name: a for a in adapters}
    axes = [axis for axis in (x, y) if axis is not None]
    keys = []
    for axis in axes:
        flag, key = axis.flag, axis.kind
        if axis.adapter is not None:
            key = adapter_named(named, axis.adapter)
            if key is None:
                raise ConfigError(f"{flag}: {axis.name}: {axis.adapter!r} is none of the --lora files; give one's name "
                                  f"(its file's stem): {', '.join(a.path.stem for a in adapters) or 'no --lora given'}")
            if axis.kind == "lbw":
                for value in axis.values:  # the count against the family the file's header tells
                    try:
                        check_file_count(AdapterSpec(named[key].path, 1.0, value))
                    except ConfigError as exc:
                        raise ConfigError(str(exc).replace("--lora: ", f"{flag}: lbw:{axis.adapter}: ", 1)) from None
            key = f"{axis.kind}:{key}"
        elif axis.kind == "prompt-sr":  # two texts replaced, one along each axis, as A1111 allows
            key = f"prompt-sr:{axis.values[0]}"
        if key in keys:
            raise ConfigError(f"--grid-x and --grid-y both change {axis.name}; give another axis to one of them")
        keys.append(key)
        if axis.kind == "hires-strength" and request.hires_scale is None:
            raise ConfigError(f"{flag}: hires-strength needs --hires-scale; without it the axis would change nothing")
        if axis.kind == "prompt-sr":
            for prompt in prompts:
                if axis.values[0] not in prompt and axis.values[0] not in request.negative_prompt:
                    raise ConfigError(f"{flag}: prompt-sr: {axis.values[0]!r} is in neither --prompt {prompt!r} nor "
                                      "--negative-prompt; its first value is the text each value replaces")
    count = len(prompts) * math.prod(len(axis.values) for axis in axes)
    if count > max_cells:
        raise ConfigError(f"--grid-x/--grid-y: {count} cells ({len(prompts)} prompt(s) × "
                          f"{' × '.join(str(len(a.values)) for a in axes)} values) are more than {max_cells}; "
                          "give fewer values, or --grid-max-cells N to allow more")
    from .generate import check_request

    for prompt in prompts:
        for _, _, cell in cells(replace(request, prompt=prompt), x, y):
            check_request(cell)


def cells(request: Request, x: Axis | None, y: Axis | None):
    """(x value, y value, the cell's request) for each cell, row by row; the adapter axes leave the
    request as it is."""
    for y_value in y.values if y else [None]:
        for x_value in x.values if x else [None]:
            cell = request
            for axis, value in ((y, y_value), (x, x_value)):
                cell = axis.request(cell, value) if axis else cell
            yield x_value, y_value, cell


def cell_prompts(prompts: list[str], negative_prompt: str, axes: list[Axis]) -> list[str]:
    """Every prompt and negative prompt the cells draw (what an embedding's use is looked for in)."""
    texts = [*prompts, negative_prompt]
    for axis in axes:
        if axis.kind == "prompt-sr":
            texts += [t.replace(axis.values[0], v) for t in texts for v in axis.values]
    return texts
