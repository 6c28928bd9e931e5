"""A caption as comma-separated tags, the way training reads it: the prefix and suffix, kohya's
keep_tokens separator, tag dropout and shuffling (each item's draws are made by the dataset), and
the tag counts kohya records in ss_tag_frequency."""

from __future__ import annotations

import random
from collections import Counter
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from lora_trainer.data.dataset import Example


def tag_frequency(examples: Sequence[Example]) -> dict[str, int]:
    """How often each comma-separated tag appears, lower-cased like kohya's ss_tag_frequency."""
    counts: Counter[str] = Counter()
    for example in examples:
        for tag in example.caption.split(","):
            tag = tag.strip().lower()
            if tag:
                counts[tag] += 1
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


def training_caption(caption: str, prefix: str = "", suffix: str = "", separator: str = "") -> str:
    """The caption as training reads it, before caption dropout, tag dropout and shuffling:
    prefix + caption + suffix (with no caption, the prefix and suffix without dangling commas), a
    keep_tokens `separator` in it taken out."""
    head = prefix + caption if caption else prefix.strip().rstrip(",").strip()
    fixed, middle, tail = split_fixed(head, separator)
    return append_suffix(head if fixed is None else join_tags(fixed, middle, tail), suffix)


def append_suffix(caption: str, suffix: str) -> str:
    """caption + suffix, taken literally (the suffix brings its own ", "); a suffix alone loses its
    leading comma."""
    if not suffix:
        return caption
    return caption + suffix if caption else suffix.strip().lstrip(",").strip()


def split_fixed(caption: str, separator: str) -> tuple[str | None, str, str]:
    """(fixed head, the tags to shuffle and drop, fixed tail) of a caption written with kohya's
    keep_tokens_separator: `sks dog ||| red, blue ||| best quality` keeps `sks dog` first and
    `best quality` last; without the separator (or with none set): (None, caption, "")."""
    if not separator or separator not in caption:
        return None, caption, ""
    head, rest = caption.split(separator, 1)
    middle, _, tail = rest.partition(separator)
    return head, middle, tail.replace(separator, ",")


def join_tags(*parts: str) -> str:
    """Comma-separated parts as one caption of tags, empty tags left out."""
    return ", ".join(t.strip() for part in parts for t in part.split(",") if t.strip())


def drop_tags(caption: str, keep_tokens: int, rate: float, rng: random.Random) -> str:
    """The caption with each comma-separated tag after the first `keep_tokens` left out with
    probability `rate` (kohya's --caption_tag_dropout_rate); one draw per tag, in caption order."""
    tags = [t.strip() for t in caption.split(",")]
    kept = tags[:keep_tokens] + [t for t in tags[keep_tokens:] if rng.random() >= rate]
    return ", ".join(t for t in kept if t)


def shuffle_tags(caption: str, keep_tokens: int, rng: random.Random) -> str:
    """The caption's comma-separated tags in a random order, the first `keep_tokens` kept in place
    (kohya's --shuffle_caption / --keep_tokens: the trigger word stays first)."""
    tags = [t.strip() for t in caption.split(",")]
    head, tail = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(tail)
    return ", ".join(t for t in head + tail if t)
