"""Several training subsets of kohya's dataset TOML as `data.subsets`: each subset's image_dir,
num_repeats and the caption, tag and flip options that data.subsets carries; the first subset's options
are the data.* values, so a subset lists only what differs from them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..config import DataConfig, normalize_caption_extension
from ..errors import ConfigError
from .data_options import data_options, kohya_caption_extension
from .options import inside as _inside
from .options import resolution_side

if TYPE_CHECKING:
    from .mapping import Args

# kohya's subset option -> the data.subsets key it becomes (caption_extension is read on its own)
CARRIED = {"shuffle_caption": "shuffle_tags", "keep_tokens": "keep_tokens", "caption_dropout_rate": "caption_dropout",
           "caption_tag_dropout_rate": "caption_tag_dropout", "flip_aug": "random_flip",
           "caption_prefix": "caption_prefix", "caption_suffix": "caption_suffix",
           "keep_tokens_separator": "keep_tokens_separator", "alpha_mask": "alpha_mask"}


def subset_repeats(subset: dict) -> int:
    """A subset's num_repeats (1 when unset), or a one-line ConfigError."""
    repeats = subset.get("num_repeats") or 1
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"dataset config: subset {subset['image_dir']} num_repeats {repeats!r}; expected an "
                          "integer >= 1")
    return repeats


def subsets_data(train: list[tuple[dict, "Args"]], cfg: dict, notes: list[str]) -> None:
    """data.subsets for two or more training subsets (subset, its layered arguments), after the first
    one's options went to data.*: each its path, repeats, the carried options and the resolution
    (of its [[datasets]] block) that differ."""
    data = cfg.setdefault("data", {})
    defaults = DataConfig()

    def value(section: dict, key: str):
        return section.get(key, getattr(defaults, key))

    entries = []
    for subset, layer in train:
        mine: dict = {"embedding": cfg.get("embedding", {})}  # TI templates refuse a prefix: data_options notes it
        data_options(type(layer)({k: v for k, v in layer.values.items() if k in CARRIED}, layer.where), mine, [])
        own = mine.get("data", {})
        entry: dict = {"path": str(subset["image_dir"])}
        if subset_repeats(subset) != value(data, "repeats"):
            entry["repeats"] = subset_repeats(subset)
        for key in CARRIED.values():
            if key == "alpha_mask" and "mask_dir" in data:  # the mask images win, as in kohya: noted there
                continue
            if value(own, key) != value(data, key):
                entry[key] = value(own, key)
        ext = _extension(layer, train[0][1], data)
        if ext != value(data, "caption_extension"):
            entry["caption_extension"] = ext
        if subset.get("class_tokens"):  # the caption of its images without one
            entry["default_caption"] = str(subset["class_tokens"])
        said: list[str] = []  # the first subset's non-square note is already there
        if layer.has("resolution") and (side := resolution_side(layer.get("resolution"), layer.name("resolution"),
                                                                 said)) != data.get("resolution"):
            entry["resolution"] = side  # a [[datasets]] block of its own size: the subset's own resolution
            notes += said
        entries.append(entry)
    data.pop("path", None)
    data["subsets"] = entries
    folders = [Path(e["path"]) for e in entries]
    for i, folder in enumerate(folders):
        for j, other in enumerate(folders):
            if i != j and folder != other and _inside(folder, other):
                notes.append(f"dataset config subset {folder}: lies inside subset {other}, whose scan reads every "
                             "image below it, so its images train in both; move it out")


def _given_extension(layer: "Args") -> str | None:
    return layer.values.get("caption_extention") or layer.values.get("caption_extension") or None


def _extension(layer: "Args", first: "Args", data: dict) -> str:
    """The caption extension this subset reads: its own, else kohya's default .caption, except where
    the first subset gave none either: then what data.caption_extension settled on for all folders."""
    if _given_extension(layer):
        return normalize_caption_extension(kohya_caption_extension(layer.values), layer.name("caption_extension"))
    return data.get("caption_extension", DataConfig().caption_extension) if not _given_extension(first) else ".caption"


