"""kohya-ss's dataset layout: under the dataset folder (kohya's `train_data_dir`), a folder named
`<N>_<name>` ("10_sks dog") repeats its images N times per epoch, and those of its images that have
no caption are captioned `<name>` (kohya's class tokens). A `0_<name>` folder is left out with
everything in it, as kohya leaves it out: users park images there."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from lora_trainer.errors import DataError

# ASCII digits only: str.isdigit-style matching would take "²_x" or Arabic-Indic digits for a count.
_REPEAT_NAME = re.compile(r"([0-9]+)_(.*)", re.DOTALL)
# A folder named "2024_trip" or "20240105_trip" is a date, not thousands of repeats: past this, the
# name is refused (kohya counts run from 1 to a few hundred).
MAX_FOLDER_REPEATS = 1000


@dataclass(frozen=True)
class RepeatFolder:
    """A `<N>_<name>` folder: where it is (relative to the dataset root), N, and <name>."""

    path: str  # POSIX path relative to the dataset root: "10_sks dog", "people/3_alice"
    repeats: int
    name: str  # the caption of its uncaptioned images; "" (a folder named "10_") gives none


def parse_folder_name(name: str) -> tuple[int, str] | None:
    """(N, name) for a folder named `<N>_<name>`, else None: "abc_x", "10" and "x_10" are plain folders."""
    match = _REPEAT_NAME.fullmatch(name)
    if match is None:
        return None
    return int(match.group(1)), match.group(2).strip()


def is_parked(name: str) -> bool:
    """Is this a `0_<name>` folder, which training leaves out?"""
    parsed = parse_folder_name(name)
    return parsed is not None and parsed[0] == 0


def repeat_folder(image: str | Path, root: str | Path) -> RepeatFolder | None:
    """The nearest folder named `<N>_<name>` between `image` and `root` (the root itself does not
    count), or None when the image is in no such folder."""
    parts = Path(image).relative_to(root).parts[:-1]
    for depth in range(len(parts), 0, -1):
        parsed = parse_folder_name(parts[depth - 1])
        if parsed is None:
            continue
        folder = "/".join(parts[:depth])
        repeats, name = parsed
        if repeats > MAX_FOLDER_REPEATS:
            raise DataError(f"{Path(root) / folder}: a folder name starting with {repeats}_ asks for {repeats} "
                            f"repeats (at most {MAX_FOLDER_REPEATS}); rename it (kohya's layout is "
                            "<repeats>_<name>, e.g. 10_sks dog) or set data.folder_repeats=false")
        return RepeatFolder(folder, repeats, name)
    return None


def group_key(folder: str | None, root: str | Path) -> str:
    """The name a folder goes by in logs and adapter metadata: its path under the root, or for
    images in no `<N>_<name>` folder the root's own name (what kohya's metadata calls a dataset dir)."""
    return folder if folder is not None else (Path(root).name or str(root))


def describe_folders(examples: Iterable, root: str | Path, repeats: int = 1) -> list[dict]:
    """One row per group of `examples` (anything with `.folder` and `.repeats`): its key, image
    count and repeats per epoch (the folder's N times `repeats`, data.repeats): the folders sorted
    by path, then the images in none."""
    counts: Counter[str] = Counter()
    per_image: dict[str, int] = {}
    for ex in examples:
        key = group_key(ex.folder, root)
        counts[key] += 1
        per_image[key] = ex.repeats * repeats
    rest = group_key(None, root)
    return [{"folder": key, "img_count": counts[key], "n_repeats": per_image[key]}
            for key in sorted(counts, key=lambda k: (k == rest, k))]


def format_folders(rows: list[dict]) -> str:
    """"10_a: 3 images × 10, b: 1 image × 1 (31 per epoch)", for logs and check-data."""
    parts = [f"{r['folder']}: {r['img_count']} image{'s' if r['img_count'] != 1 else ''} × {r['n_repeats']}"
             for r in rows]
    return ", ".join(parts) + f" ({sum(r['img_count'] * r['n_repeats'] for r in rows)} per epoch)"


def subset_names(paths: list[str]) -> list[str]:
    """How metadata names each data.subsets folder: its own name as kohya does (`img/close-ups` ->
    "close-ups"), or the path as written when two subsets share that name."""
    names = [Path(p).name or p for p in paths]
    return [name if names.count(name) == 1 else p for name, p in zip(names, paths)]


def group_keys(examples: Iterable, roots: list[str]) -> list[str]:
    """The folder key of each example (anything with `.folder` and `.subset`) for logs and metadata:
    with one image folder (data.path, or a single subset) as group_key says; with several, the
    subset's name (subset_names), followed by its `<N>_<name>` folder when the image is in one."""
    if len(roots) == 1:
        return [group_key(ex.folder, roots[0]) for ex in examples]
    names = subset_names(roots)
    return [names[ex.subset] + (f"/{ex.folder}" if ex.folder is not None else "") for ex in examples]


def describe_groups(examples: list, keys: list[str], repeats: list[int]) -> list[dict]:
    """describe_folders' rows for examples of several subsets: per key (group_keys), its image count
    and repeats per epoch (the folder's N times its subset's `repeats`), in the subsets' order."""
    rows: dict[str, dict] = {}
    for ex, key in zip(examples, keys):
        row = rows.setdefault(key, {"folder": key, "img_count": 0, "n_repeats": ex.repeats * repeats[ex.subset]})
        row["img_count"] += 1
    return list(rows.values())
