"""`data.subsets`: several image folders in one run, each with its own caption, tag, flip and repeat
settings (kohya's `[[datasets.subsets]]`). A subset key left out takes the `data.*` value; the keys
not listed in SubsetConfig stay global. `resolve_subsets` turns the config into one DataConfig per
folder, which the data stage reads as it reads `data` alone."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

from .config_data_checks import bucket_limit_errors, normalize_caption_extension, resolution_errors, treatment_errors
from .errors import ConfigError

if TYPE_CHECKING:
    from .config import RunConfig
    from .config_data import DataConfig


@dataclass
class SubsetConfig:
    """One folder of `data.subsets`; null (left out) takes the `data.*` key of the same name."""

    path: str = ""  # the folder of images, read as data.path is read (required)
    repeats: Optional[int] = None  # times each image is seen per epoch (times its <N>_<name> folder's N)
    caption_extension: Optional[str] = None
    caption_prefix: Optional[str] = None  # e.g. this folder's trigger "sks, "
    caption_suffix: Optional[str] = None
    keep_tokens: Optional[int] = None
    keep_tokens_separator: Optional[str] = None
    shuffle_tags: Optional[bool] = None
    caption_dropout: Optional[float] = None
    caption_tag_dropout: Optional[float] = None
    random_flip: Optional[bool] = None
    folder_repeats: Optional[bool] = None  # its <N>_<name> folders give repeats and captions
    alpha_mask: Optional[bool] = None
    default_caption: Optional[str] = None  # its images without a caption take this one (kohya's class_tokens)
    # its training side(s), an int or a list as data.resolution (e.g. [512, 1024] for close-ups kept sharp)
    resolution: Optional[Union[int, list[int]]] = None

    @classmethod
    def unknown_key_error(cls, key: str, dotted: str) -> str | None:
        """The message for a `data.*` key given inside a subset, which stays global; None for others."""
        from .config_data import DataConfig

        if key in {f.name for f in dataclasses.fields(DataConfig)}:
            return (f"{dotted}: data.{key} is global (one value for every subset); set it under data, "
                    f"not in a subset (a subset sets {', '.join(SUBSET_KEYS)})")
        return None


SUBSET_KEYS = tuple(f.name for f in dataclasses.fields(SubsetConfig) if f.name != "path")


def subset_overrides(subset: SubsetConfig) -> dict:
    """The keys `subset` sets (not null), path excluded."""
    return {key: getattr(subset, key) for key in SUBSET_KEYS if getattr(subset, key) is not None}


def resolve_subsets(d: DataConfig) -> list[DataConfig]:
    """One DataConfig per folder of the run: `d` itself without data.subsets, else each subset's
    path and keys over `d`'s values (subsets emptied, so each reads as a plain data section)."""
    if not d.subsets:
        return [d]
    return [dataclasses.replace(d, path=s.path, subsets=[], **subset_overrides(s)) for s in d.subsets]


def trained_sides(d: DataConfig) -> list[int]:
    """Every side some folder of the run trains at, smallest first (data.resolution's, and the sides of
    subsets with their own): what a model card says the run was trained at."""
    from .config_data import resolution_sides

    return sorted({side for folder in resolve_subsets(d) for side in resolution_sides(folder.resolution)})


def dataset_root(d: DataConfig) -> str:
    """The run's first image folder (data.path, or the first subset's): where caches live by default."""
    return d.path or (d.subsets[0].path if d.subsets else "")


def subset_label(d: DataConfig, index: int) -> str:
    """How logs and errors name the folder of resolved subset `index`: data.path, or data.subsets[i] (path)."""
    return f"data.subsets[{index}] ({d.subsets[index].path})" if d.subsets else "data.path"


def normalize_subset_extensions(d: DataConfig, errors: list[str]) -> None:
    """Each subset's caption_extension with its dot, as data.caption_extension is normalized."""
    for i, s in enumerate(d.subsets):
        if s.caption_extension is not None:
            try:
                s.caption_extension = normalize_caption_extension(s.caption_extension,
                                                                  f"data.subsets[{i}].caption_extension")
            except ConfigError as exc:
                errors.append(str(exc))


def check_subsets(cfg: RunConfig, errors: list[str]) -> None:
    """One line per problem with data.subsets: data.path beside them, a subset without a path, a
    value out of range (named data.subsets[i].key; a resolution whose square bucket the bucket side
    limits leave out), or alpha_mask with the global data.mask_dir."""
    d = cfg.data
    if not d.subsets:
        return
    if d.path:
        errors.append(f"data.path: got {d.path!r} with data.subsets; list that folder as a subset "
                      f"(- path: {d.path}) and leave data.path empty")
    for i, s in enumerate(d.subsets):
        if not s.path.strip():
            errors.append(f"data.subsets[{i}].path: got {s.path!r}; expected a folder of images with captions")
        resolved = dataclasses.replace(d, subsets=[], **subset_overrides(s))
        given = set(subset_overrides(s))
        errors += treatment_errors(resolved, lambda name, i=i: f"data.subsets[{i}].{name}", given)
        bad_resolution = resolution_errors(s.resolution, f"data.subsets[{i}].resolution")
        errors += bad_resolution
        if s.resolution is not None and not bad_resolution and d.buckets:
            errors += [f"data.subsets[{i}]: {e}" for e in bucket_limit_errors(d, s.resolution)
                       if "square bucket" in e]  # the limits' own problems are named once, under data
        if s.alpha_mask and d.mask_dir is not None:
            errors.append(f"data.subsets[{i}].alpha_mask: got true with data.mask_dir {d.mask_dir!r}; the loss "
                          "mask comes from one of them: set only one")


def image_folders(d: DataConfig) -> list[tuple[str, str]]:
    """(key, folder) of each folder images are read from, for overlap checks: data.path or each subset's path."""
    if not d.subsets:
        return [("data.path", d.path)] if d.path else []
    return [(f"data.subsets[{i}].path", s.path) for i, s in enumerate(d.subsets) if s.path.strip()]


def inside(folder: str, images: str) -> bool:
    """Is `folder` the image folder `images` or below it (so its files would train as images)?"""
    inner, outer = Path(folder).resolve(), Path(images).resolve()
    return inner == outer or outer in inner.parents
