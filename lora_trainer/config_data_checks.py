"""Checks of the `data` section's own values (config_data.py) that the CLI and the data stage call
too: the caption extension, the bucket side limits, the captioning options (and the warning for
tagger options set for another method). Re-exported by
config_checks.py and config.py."""

from __future__ import annotations

import typing
from typing import TYPE_CHECKING, Optional

from .errors import ConfigError

if TYPE_CHECKING:
    from .config_data import CaptionConfig, DataConfig


def normalize_caption_extension(value: str, key: str = "data.caption_extension") -> str:
    """The caption file extension with its dot (".caption" for "caption" or ".caption"), or a
    one-line ConfigError naming `key` for one that is empty or holds a path separator."""
    ext = value.strip()
    if ext and not ext.startswith("."):
        ext = "." + ext
    if not ext.strip(".") or "/" in ext or "\\" in ext:
        raise ConfigError(f"{key}: got {value!r}; expected a file extension such as .txt or .caption "
                          "(the caption of cat.png is then cat.txt or cat.caption beside it)")
    from .data.images import IMAGE_EXTENSIONS

    if ext.lower() in IMAGE_EXTENSIONS:
        # cat.png's caption file would be cat.png itself: read as text, or written over with --overwrite
        raise ConfigError(f"{key}: got {value!r}, an image extension; caption files need their own, "
                          "such as .txt or .caption")
    return ext


def treatment_errors(d: DataConfig, key: typing.Callable[[str], str] = lambda name: f"data.{name}",
                     names: Optional[set[str]] = None) -> list[str]:
    """Range checks of the keys a subset may set too (repeats, keep_tokens, dropouts, separator),
    each named by `key`; with `names`, only those keys are checked."""
    errors: list[str] = []

    def need(ok: bool, name: str, allowed: str) -> None:
        if not ok and (names is None or name in names):
            errors.append(f"{key(name)}: got {getattr(d, name)!r}; expected {allowed}")

    need(d.keep_tokens >= 0, "keep_tokens", "an integer >= 0")
    need(d.repeats >= 1, "repeats", "an integer >= 1")
    need(0.0 <= d.caption_dropout <= 1.0, "caption_dropout", "a number in [0, 1]")
    need(0.0 <= d.caption_tag_dropout <= 1.0, "caption_tag_dropout",
         "a number in [0, 1] (e.g. 0.1: each tag is left out one time in ten)")
    sep = d.keep_tokens_separator
    need(not sep or (bool(sep.strip()) and "," not in sep), "keep_tokens_separator",
         "a marker that is not a comma or blank, e.g. '|||', or '' (off)")
    return errors


def resolution_errors(value, key: str = "data.resolution") -> list[str]:
    """Problems with a resolution value (`key`: data.resolution or a subset's): an int or a list of
    sides, each a positive multiple of 8, the list not empty and without repeats."""
    allowed = "a positive multiple of 8 (e.g. 512), a list of them (e.g. [512, 768, 1024]) or null"
    if value is None:
        return []
    if isinstance(value, int):
        return [] if value >= 8 and value % 8 == 0 else [f"{key}: got {value!r}; expected {allowed}"]
    if not value:
        return [f"{key}: got []; expected {allowed}"]
    bad = [side for side in value if side < 8 or side % 8]
    if bad:
        return [f"{key}: got {value!r}, with {', '.join(map(str, bad))}; every side must be a positive multiple of 8"]
    twice = sorted({side for side in value if value.count(side) > 1})
    if twice:
        return [f"{key}: got {value!r}, with {', '.join(map(str, twice))} more than once; list each side once "
                "(data.repeats trains images more often)"]
    return []


def bucket_limit_errors(d: DataConfig, resolution) -> list[str]:
    """Problems with data.min_bucket_side / max_bucket_side: each a multiple of bucket_step, and
    (once the resolution is known) the square bucket between them, as kohya requires, for every
    side `resolution` lists."""
    errors = []
    step = d.bucket_step
    for key in ("min_bucket_side", "max_bucket_side"):
        value = getattr(d, key)
        if value is not None and (value < step or value % step):
            errors.append(f"data.{key}: got {value!r}; expected a multiple of data.bucket_step ({step}) or null")
    low, high = d.min_bucket_side, d.max_bucket_side
    if errors or (low is None and high is None):
        return errors
    if low is not None and high is not None and low > high:
        return [f"data.min_bucket_side: got {low}, above data.max_bucket_side {high}; lower it or raise the maximum"]
    from .config_data import resolution_sides

    for res in resolution_sides(resolution):
        side = max(step, res // step * step)  # the square bucket's side
        if low is not None and low > side:
            errors.append(f"data.min_bucket_side: got {low}, above the square bucket's side {side} "
                          f"(data.resolution {res}); set it to {side} or less")
        if high is not None and high < side:
            errors.append(f"data.max_bucket_side: got {high}, below the square bucket's side {side} "
                          f"(data.resolution {res}); set it to {side} or more")
    return errors


def check_caption_config(c: CaptionConfig, errors: list[str],
                         key: typing.Callable[[str], str] = lambda name: f"data.caption.{name}") -> None:
    """Range checks for caption options; `key` names a field as the user wrote it (config key or flag)."""

    def need(ok: bool, name: str, allowed: str) -> None:
        if not ok:
            errors.append(f"{key(name)}: got {getattr(c, name)!r}; expected {allowed}")

    need(c.model is None or bool(c.model.strip()), "model",
         "a hub id or a model folder (null: the method's default model)")
    need(c.batch_size >= 1, "batch_size", "an integer >= 1")
    need(c.max_length >= 1, "max_length", "an integer >= 1 (new tokens per caption)")
    default_min = type(c)().min_length
    need(0 <= c.min_length <= c.max_length, "min_length", f"an integer in [0, max_length={c.max_length}]"
         + (f" (it is the default, {default_min}: lower it with {key('max_length')})" if c.min_length == default_min
            else ""))
    need(c.num_beams >= 1, "num_beams", "an integer >= 1")
    need(0.0 < c.top_p <= 1.0, "top_p", "a number in (0, 1]")
    need(c.temperature > 0, "temperature", "a number > 0")
    need(c.repetition_penalty > 0, "repetition_penalty", "a number > 0 (1 = off)")
    for name in ("general_threshold", "character_threshold"):
        need(0.0 <= getattr(c, name) <= 1.0, name, "a number in [0, 1] (the tagger's confidence, e.g. 0.35)")


WD14_OPTIONS = ("general_threshold", "character_threshold", "rating_tag", "replace_underscores", "undesired_tags")


def caption_warnings(c: CaptionConfig) -> list[str]:
    """One line per WD14 tagger option set while data.caption.method is not wd14 (it is not read)."""
    if c.method == "wd14":
        return []
    default = type(c)()
    return [f"data.caption.{name}: got {getattr(c, name)!r} with data.caption.method {c.method!r}, which does not "
            "read it; it is for data.caption.method=wd14" for name in WD14_OPTIONS
            if getattr(c, name) != getattr(default, name)]
