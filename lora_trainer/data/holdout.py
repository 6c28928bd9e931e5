"""Held-out images for the validation loss: a seeded share of the dataset (`data.validation_split`)
or a folder of its own (`data.validation_path`). Held-out images are never trained on. With
data.subsets the share is drawn from all their images together."""

from __future__ import annotations

import hashlib
import math
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from lora_trainer.config import RunConfig, resolve_subsets
from lora_trainer.data.dataset import Example, scan_dataset
from lora_trainer.data.masks import attach_masks
from lora_trainer.errors import DataError, looked_in


def validation_seed(cfg: RunConfig) -> int:
    """The seed of the held-out draw and of the validation noise."""
    return cfg.data.validation_seed if cfg.data.validation_seed is not None else cfg.train.seed


def held_out_flags(examples: Sequence[Example], root: str | Path, fraction: float, seed: int,
                   names: Sequence[str] | None = None) -> list[bool]:
    """Which examples are held out: the `round(fraction · n)` (at least 1) whose hash of
    (seed, path relative to `root`, or their `names`: see example_names) is smallest.

    Each image's rank depends on its own name only, so the choice is the same in every process and
    every resumed run, whatever order the images come in, and adding an image to the folder moves
    at most one image out of the held-out set.
    """
    n = len(examples)
    count = max(1, math.floor(fraction * n + 0.5))
    if count >= n:
        raise DataError(f"data.validation_split: {fraction:g} of the {n} image(s) in {root} holds out {count}, "
                        "leaving none to train on; lower it, add images, or use data.validation_path")
    names = names if names is not None else [Path(ex.path).relative_to(root).as_posix() for ex in examples]
    keys = [hashlib.sha256(f"{seed}:{name}".encode()).hexdigest() for name in names]
    chosen = set(sorted(range(n), key=lambda i: keys[i])[:count])
    return [i in chosen for i in range(n)]


def example_names(examples: Sequence[Example], subsets: Sequence) -> list[str]:
    """The names the held-out draw ranks images by (`subsets`: resolve_subsets'): the path under
    data.path (or a lone subset's folder, so it draws as data.path would); with several subsets, the path
    under the image's subset folder after its index ("1/img/a.png"), so the draw takes from all
    subsets together and an image listed in two subsets is two candidates."""
    if len(subsets) == 1:
        return [Path(ex.path).relative_to(subsets[0].path).as_posix() for ex in examples]
    return [f"{ex.subset}/{Path(ex.path).relative_to(subsets[ex.subset].path).as_posix()}" for ex in examples]


def split_examples(cfg: RunConfig, examples: Sequence[Example]) -> tuple[list[Example], list[Example]]:
    """(training examples, held-out examples) as the config asks; no held-out ones when validation is off.

    Held-out images count once each (their folder repeats are for training). `examples` carry
    their final captions (DreamBooth's instance prompt already applied); images read from
    `data.validation_path` get it here.
    """
    d = cfg.data
    if d.validation_path:  # with data.subsets, its images take the data.* keys: a treatment after the subsets'
        return list(examples), [replace(ex, repeats=1, subset=len(d.subsets)) for ex in scan_validation_folder(cfg)]
    if d.validation_split <= 0:
        return list(examples), []
    subsets = resolve_subsets(d)
    flags = held_out_flags(examples, d.path or "data.subsets", d.validation_split, validation_seed(cfg),
                           example_names(examples, subsets))
    return ([ex for ex, out in zip(examples, flags) if not out],
            [replace(ex, repeats=1) for ex, out in zip(examples, flags) if out])


def scan_validation_folder(cfg: RunConfig) -> list[Example]:
    """The images and captions of `data.validation_path`, read as data.path is read."""
    folder = Path(cfg.data.validation_path)
    if not folder.is_dir():
        raise DataError(f"data.validation_path: {folder} is not a folder{looked_in(folder)}; point it at a folder "
                        "of held-out images with captions (laid out like data.path), or set data.validation_split instead")
    instance_prompt = cfg.dreambooth.instance_prompt
    examples = scan_dataset(folder, cfg.data.folder_repeats,
                            folder_captions=cfg.data.folder_repeats and not instance_prompt,
                            caption_extension=cfg.data.caption_extension,
                            default_caption=cfg.data.default_caption)
    if cfg.data.mask_dir:  # scored as trained: held-out images need their masks too
        examples = attach_masks(examples, folder, cfg.data.mask_dir)
    return [replace(ex, caption=instance_prompt) for ex in examples] if instance_prompt else examples
