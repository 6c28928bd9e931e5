"""Per-block adapter weights at inference, as A1111's LoRA Block Weight extension gives them
(`<lora:name:1:lbw=OUTALL>`): a layer in a block of value v is applied at WEIGHT × v.

The extension names the blocks of the original (LDM) UNet: BASE (every text-encoder layer), IN00-IN11,
M00 and OUT00-OUT11 on SD 1.x, IN00-IN08, M00 and OUT00-OUT08 on SDXL (the 26 and 20 values of the
full forms). The short forms name only the blocks a LoRA of the attention layers adapts: 17 values
on SD 1.x (BASE, IN01, IN02, IN04, IN05, IN07, IN08, M00, OUT03-OUT11), 12 on SDXL (BASE, IN04, IN05,
IN07, IN08, M00, OUT00-OUT05). A block a form leaves out is at 0, as the extension sets it (a LoCon's
conv layers there, e.g. SD 1.x's IN03 downsampler, are off with a short form), and a layer in no block
(the time embedding, the output conv) keeps the adapter's weight. The presets are the extension's
own, 17 SD 1.x values each, applied by block name on SDXL too, as the extension applies them (OUTALL
there is BASE and OUT03-OUT08)."""

from __future__ import annotations

import math
from typing import Callable

from ..errors import ConfigError
from ..models.blocks import block_index

BLOCKS = {  # the full forms
    "sd15": ("BASE", *(f"IN{i:02d}" for i in range(12)), "M00", *(f"OUT{i:02d}" for i in range(12))),
    "sdxl": ("BASE", *(f"IN{i:02d}" for i in range(9)), "M00", *(f"OUT{i:02d}" for i in range(9))),
}
SHORT = {
    "sd15": ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", *(f"OUT{i:02d}" for i in range(3, 12))),
    "sdxl": ("BASE", "IN04", "IN05", "IN07", "IN08", "M00", *(f"OUT{i:02d}" for i in range(6))),
}
VARIANT_NAMES = {"sd15": "SD 1.x", "sdxl": "SDXL"}
PRESETS = {  # the extension's default presets, over SHORT["sd15"]
    "NONE": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "ALL": "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
    "INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "IND": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
    "OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
    "OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
    "OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
    "ALL0.5": "0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5",
}
COUNTS = {variant: (len(SHORT[variant]), len(BLOCKS[variant])) for variant in BLOCKS}


def block_weights_text(value, source: str) -> str:
    """`value` (a preset name, "1,0,0.5,...", or a list of numbers) as the text written after
    `lbw=`, checked for its spelling: a one-line ConfigError names an unknown preset or a
    non-number. Counts are checked against the base family by `block_values`."""
    text = ",".join(str(v).strip() for v in value) if isinstance(value, (list, tuple)) else str(value).strip()
    _numbers(text, source)
    return text


def _numbers(text: str, source: str) -> list[float]:
    """The values of a preset (by name, any case) or of a comma list; a one-line ConfigError else."""
    preset = PRESETS.get(text.upper())
    if preset is not None:
        return [float(v) for v in preset.split(",")]
    if "," not in text:
        try:
            float(text)
        except ValueError:
            raise ConfigError(f"{source}: lbw={text} is no preset; give one of {', '.join(PRESETS)} or "
                              f"comma-separated block weights ({_counts_text()})") from None
    values = []
    for item in text.split(","):
        try:
            values.append(float(item))
            if not math.isfinite(values[-1]):  # 'nan' and 'inf' parse, and would draw black images
                raise ValueError(item)
        except ValueError:
            raise ConfigError(f"{source}: lbw={text}: {item.strip()!r} is not a number; give numbers "
                              f"({_counts_text()}) or a preset: {', '.join(PRESETS)}") from None
    return values


def _counts_text(variant: str | None = None) -> str:
    variants = [variant] if variant else list(COUNTS)
    return "; ".join(f"{VARIANT_NAMES[v]}: {COUNTS[v][0]} or {COUNTS[v][1]}" for v in variants)


def check_count(text: str, variant: str | None, source: str) -> None:
    """Refuse numbers whose count fits no form of `variant` (None: a base not known yet, any family's)."""
    if text.upper() in PRESETS:
        return
    n = len(_numbers(text, source))
    allowed = COUNTS[variant] if variant else tuple(c for pair in COUNTS.values() for c in pair)
    if n in allowed:
        return
    if variant is None:
        raise ConfigError(f"{source}: lbw= has {n} values; give {_counts_text()} values, or a preset: "
                          f"{', '.join(PRESETS)}")
    full = BLOCKS[variant]
    raise ConfigError(f"{source}: lbw= has {n} values; an {VARIANT_NAMES[variant]} adapter takes {COUNTS[variant][0]} "
                      f"({','.join(SHORT[variant])}) or {COUNTS[variant][1]} (BASE,IN00-{full[len(full) // 2 - 1]},M00,"
                      f"OUT00-{full[-1]}), or a preset: {', '.join(PRESETS)}")


def block_values(text: str, variant: str, source: str) -> dict[str, float]:
    """{block name: value} for every block of the full 26-name layout (those a form leaves out at 0),
    from a preset or a form of `variant`'s counts; a one-line ConfigError otherwise."""
    check_count(text, variant, source)
    values = _numbers(text, source)
    if text.upper() in PRESETS:
        names = SHORT["sd15"]
    else:
        names = SHORT[variant] if len(values) == COUNTS[variant][0] else BLOCKS[variant]
    out = dict.fromkeys(BLOCKS["sd15"], 0.0)
    out.update(zip(names, values))
    return out


def layer_block(component: str, path: str, variant: str, layers_per_block: int = 2) -> str | None:
    """The extension's block of a layer (a UNet path in diffusers' spelling), or None when it is in
    none (SDXL's time and label embeddings, the output conv: they keep the adapter's weight)."""
    if component != "unet":
        return "BASE"
    if path.startswith("conv_in"):
        return "IN00"
    index = block_index(path, variant, layers_per_block)  # kohya's numbering, the same LDM blocks
    first_in, mid, first_out, last = (1, (10, 11, 12), 13, 21) if variant == "sdxl" else (0, (12,), 13, 24)
    if index in mid:
        return "M00"
    if first_out <= index <= last:
        return f"OUT{index - first_out:02d}"
    if 1 <= index < mid[0]:
        return f"IN{index - first_in:02d}"
    return None


def layer_factor(component: str, path: str, values: dict[str, float], variant: str,
                 layers_per_block: int = 2) -> float:
    """The value a layer's adapter weight is multiplied by (1 for a layer in no block)."""
    block = layer_block(component, path, variant, layers_per_block)
    return 1.0 if block is None else values[block]


def check_file_count(spec) -> None:
    """The count check of an AdapterSpec's `lbw` before any model loads: against the family the
    file's header tells (its keys, metadata and shapes), else against every family's counts (the
    load checks the base's)."""
    from ..export.adapter import read_adapter
    from ..export.lycoris import needs_lycoris_reader, read_lycoris

    if spec.lbw is None:
        return
    try:
        family = (read_lycoris if needs_lycoris_reader(spec.path) else read_adapter)(spec.path, header_only=True).base
    except Exception:  # a file that cannot be read or told apart: loading it says what is wrong
        family = None
    check_count(spec.lbw, family, f"--lora: {spec.path}")


def check_stack_count(spec, pipe) -> None:
    """The count check against the base the adapter loads into; a file of the other family is named
    as such rather than by its count."""
    from .adapter_fit import pipe_family, why_not_loadable

    if spec.lbw is None:
        return
    try:
        check_count(spec.lbw, pipe_family(pipe), f"--lora: {spec.path}")
    except ConfigError:
        why = why_not_loadable(spec.path, pipe, unreadable_is_a_reason=False)
        if why:
            raise ConfigError(f"--lora: {spec.path}: {why}") from None
        raise


def layer_scales(pipe, specs: dict) -> Callable[[str, str, str], float]:
    """scale(name, component, path): what adapter `name`'s weight is multiplied by in that layer, from
    its spec's `lbw` (1 everywhere for an adapter without one). `specs`: {name: AdapterSpec}."""
    from .adapter_fit import pipe_family

    variant = pipe_family(pipe)
    unet = getattr(pipe, "unet", None)
    layers_per_block = getattr(getattr(unet, "config", None), "layers_per_block", 2)
    values = {n: block_values(s.lbw, variant, f"--lora: {s.path}") for n, s in specs.items() if s.lbw}

    def scale(name: str, component: str, path: str) -> float:
        if name not in values:
            return 1.0
        return layer_factor(component, path, values[name], variant, layers_per_block)

    return scale
