"""What training does to an image each time it uses it (its caption's prefix, suffix, tag order and
dropout, the flip, the repeats): one Treatment for the whole dataset, or one per `data.subsets` entry."""

from __future__ import annotations

import random
from dataclasses import dataclass

from lora_trainer.data.tags import append_suffix, drop_tags, join_tags, shuffle_tags, split_fixed
from lora_trainer.data.templates import pick_template


@dataclass(frozen=True)
class Treatment:
    """The per-image options of a dataset or of one of its subsets (the `data.*` keys of the same names)."""

    repeats: int = 1
    caption_prefix: str = ""
    caption_suffix: str = ""
    caption_dropout: float = 0.0
    caption_tag_dropout: float = 0.0
    shuffle_tags: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    random_flip: bool = False
    alpha_mask: bool = False

    @classmethod
    def of(cls, d, instance: bool = True) -> Treatment:
        """The treatment a data section (or a resolved subset) `d` asks for; `instance` false: class
        images, which train on their prompt as it is, once per epoch."""
        if not instance:
            return cls(keep_tokens=d.keep_tokens, keep_tokens_separator=d.keep_tokens_separator,
                       random_flip=d.random_flip, alpha_mask=d.alpha_mask)
        return cls(d.repeats, d.caption_prefix, d.caption_suffix, d.caption_dropout, d.caption_tag_dropout,
                   d.shuffle_tags, d.keep_tokens, d.keep_tokens_separator, d.random_flip, d.alpha_mask)

    def __post_init__(self):
        if self.repeats < 1:
            raise ValueError(f"repeats must be at least 1, got {self.repeats}")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1], got {self.caption_dropout}")
        if not 0.0 <= self.caption_tag_dropout <= 1.0:
            raise ValueError(f"caption_tag_dropout must be in [0, 1], got {self.caption_tag_dropout}")

    @property
    def fixed_captions(self) -> bool:
        """Does an image get the same caption every epoch (so its text embedding can be cached)?"""
        return not self.shuffle_tags and self.caption_tag_dropout == 0


def item_caption(t: Treatment, caption: str, seed: int, epoch: int, i: int, dropped: bool,
                 templates: list[str]) -> str:
    """Item i's caption in `epoch`: a template, or the example's with `t`'s prefix and suffix, its
    tags dropped and shuffled; each draw on its own stream of (seed, epoch, i), so turning one
    option on leaves every other choice of the item as it was."""
    if templates:
        return "" if dropped else pick_template(templates, seed, epoch, i)
    if dropped:
        caption = ""
    elif not caption:  # a prefix like "sks, " alone should not end in a dangling separator
        caption = t.caption_prefix.strip().rstrip(",").strip()
    else:
        caption = t.caption_prefix + caption
    head, caption, tail = split_fixed(caption, t.keep_tokens_separator)
    keep = 0 if head is not None else t.keep_tokens  # the separator, when present, says what stays
    if t.caption_tag_dropout > 0 and caption:
        caption = drop_tags(caption, keep, t.caption_tag_dropout, random.Random(f"{seed}:{epoch}:{i}:tag-dropout"))
    if t.shuffle_tags and caption:
        caption = shuffle_tags(caption, keep, random.Random(f"{seed}:{epoch}:{i}:tags"))
    if head is not None:
        caption = join_tags(head, caption, tail)
    if not dropped:
        caption = append_suffix(caption, t.caption_suffix)
    return caption
