"""Dataset stage: scan a folder into (image, caption, repeats) examples and serve them as square,
normalised tensors with reproducible random crops, flips, caption dropout and tag shuffling/dropout."""

from __future__ import annotations

import logging
import os
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from lora_trainer.data.captions import (DEFAULT_CAPTION_EXTENSION, METADATA_FILE, find_captions,
                                        other_caption_extension, other_extension_message)
from lora_trainer.data.folders import describe_folders, format_folders, is_parked, repeat_folder
from lora_trainer.data.images import (IMAGE_EXTENSIONS, is_image_file, is_unread_image_file, load_image,
                                      load_image_and_alpha, unread_files_note)
from lora_trainer.data.masks import read_mask
from lora_trainer.data.treatment import Treatment, item_caption
from lora_trainer.errors import DataError, looked_in

logger = logging.getLogger(__name__)

_EXTENSION_NAMES = ", ".join(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)


@dataclass
class Example:
    """One training image and its caption ("" when it has none)."""

    path: Path
    caption: str
    repeats: int = 1  # times per epoch, from its `<N>_<name>` folder (data.repeats multiplies it)
    folder: str | None = None  # that folder, relative to the dataset root; None: in no such folder
    mask: Path | None = None  # its loss-mask image (data.mask_dir); None: no mask image
    subset: int = 0  # its data.subsets entry (0 without subsets): the Treatment it gets


def scan_dataset(root: str | os.PathLike, folder_repeats: bool = True, folder_captions: bool = True,
                 caption_extension: str = DEFAULT_CAPTION_EXTENSION,
                 report_missing: bool = True, default_caption: str = "") -> list[Example]:
    """Find every image under `root` (recursively, sorted) with its caption (metadata.jsonl, else
    the `<stem><caption_extension>` file beside it).

    Hidden files and folders and anything under `.cache` are ignored. Each image is decoded
    once so that broken files are reported now, together in one warning, and skipped.
    `folder_repeats`: kohya's layout (see data/folders.py): an image in a `<N>_<name>` folder is
    repeated N times and `0_<name>` folders are left out; with `folder_captions` too, such an
    image with no caption at all is captioned `<name>`; `default_caption` (data.default_caption)
    captions the images still without one. When no image has a caption file of
    `caption_extension` but some have .caption/.txt/.tags files, one warning says which key to set.
    `report_missing`: log how many train uncaptioned (not when an instance prompt captions all).
    """
    root = Path(root)
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else f"dataset folder not found{looked_in(root)}"
        raise DataError(f"{root}: {what}; set data.path to a folder of images")
    image_paths, metadata_files, parked, unread = _walk(root, skip_parked=folder_repeats)
    if parked:
        logger.warning("leaving out %d folder(s) named 0_<name> (0 repeats, kohya's way to park images): %s",
                       len(parked), ", ".join(p.relative_to(root).as_posix() for p in parked))
    if not image_paths:
        where = " outside 0_<name> folders (rename one to 1_<name> to train on it)" if parked else ""
        found = f"; {unread_files_note(unread, root)}" if unread else ""
        raise DataError(f"{root}: no images found ({_EXTENSION_NAMES}){where}; "
                        f"put images with {caption_extension} captions there{found}")
    if unread:
        logger.warning("%s: %s", root, unread_files_note(unread, root))

    good: list[Path] = []
    problems: list[str] = []
    for path in image_paths:
        try:
            load_image(path)
        except DataError as err:
            problems.append(str(err))
            continue
        good.append(path)
    if not good:
        raise DataError(f"{root}: none of the {len(image_paths)} images can be read: "
                        + " | ".join(problems))
    if problems:
        logger.warning("skipping %d unreadable image(s) in %s:\n  %s",
                       len(problems), root, "\n  ".join(problems))

    examples = []
    from_folder: Counter[tuple[str, str]] = Counter()
    captions = find_captions(good, metadata_files, caption_extension)
    other = other_caption_extension(good, captions, caption_extension)
    if other is not None:
        logger.warning("%s: %s", root, other_extension_message(other, caption_extension, "data.caption_extension"))
    for path, caption in zip(good, captions):
        folder = repeat_folder(path, root) if folder_repeats else None
        if caption is None and folder_captions and folder is not None and folder.name:
            caption = folder.name
            from_folder[(folder.path, folder.name)] += 1
        elif caption is None and default_caption:
            caption = default_caption
            from_folder[(str(root), default_caption)] += 1
        examples.append(Example(path, caption or "", folder.repeats if folder else 1,
                                folder.path if folder else None))
    for (folder, name), n in from_folder.items():
        logger.info("%s: %d image(s) without a caption are captioned %r (%s)", folder, n, name,
                    "data.default_caption" if folder == str(root) else "the folder's name")
    missing = sum(1 for ex in examples if not ex.caption)
    if missing and report_missing:
        logger.info("%d of %d images have no caption (no metadata.jsonl entry or %s file, or a blank one); "
                    "they train with an empty caption", missing, len(examples), caption_extension)
    if any(ex.folder is not None for ex in examples):
        logger.info("folders (images × repeats): %s", format_folders(describe_folders(examples, root)))
    return examples


def _walk(root: Path, skip_parked: bool = False) -> tuple[list[Path], list[Path], list[Path], list[Path]]:
    """Image files and metadata.jsonl files under root, skipping hidden entries and .cache, and
    with `skip_parked` the `0_<name>` folders, which are returned third; fourth, the image files of
    a format training does not read (GIF, TIFF, HEIC, ...), for the caller to report."""
    images: list[Path] = []
    metadata: list[Path] = []
    parked: list[Path] = []
    unread: list[Path] = []
    for folder, subfolders, files in os.walk(root):
        # Pruning in place stops os.walk from descending into caches, .git and the like.
        subfolders[:] = sorted(d for d in subfolders if not d.startswith(".") and d != ".cache")
        if skip_parked:
            parked += [Path(folder) / d for d in subfolders if is_parked(d)]
            subfolders[:] = [d for d in subfolders if not is_parked(d)]
        for name in files:
            if name.startswith("."):
                continue
            path = Path(folder) / name
            if name == METADATA_FILE:
                metadata.append(path)
            elif is_image_file(name):
                images.append(path)
            elif is_unread_image_file(name):
                unread.append(path)
    # Sort on the relative path so the order (and so every seeded choice) is the same on any OS.
    for paths in (images, metadata, parked, unread):
        paths.sort(key=lambda p: p.relative_to(root).as_posix())
    return images, metadata, parked, unread


def dataset_summary(examples: Sequence[Example]) -> dict:
    """Counts for logs and adapter metadata."""
    captioned = sum(1 for e in examples if e.caption)
    return {"num_images": len(examples), "num_captioned": captioned,
            "num_uncaptioned": len(examples) - captioned}


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Square crops of `resolution` pixels in [-1, 1] with their (prefixed) captions.

    Example j appears `examples[j].repeats * repeats` (its treatment's) times per epoch (see `example_index`);
    with equal repeats, item i is example i % len(examples), so `repeats` copies of the folder make one epoch.
    Every random choice comes from (seed, epoch, i): the same call gives the same tensors in any
    process, DataLoader worker or resumed run. Call `set_epoch` before each epoch (with
    non-persistent workers, which copy the dataset when iteration starts).
    Items also carry `original_size` (h, w) and `crop_top_left` (y, x) for SDXL conditioning.
    `sizes` gives each example its own (h, w) crop (aspect-ratio buckets) instead of the square;
    `shuffle_tags` reorders a caption's comma-separated tags after the first `keep_tokens`, and
    `caption_tag_dropout` leaves each of those out with that probability. The prefix is one of the
    tags; `caption_suffix` is added after both, so it is never moved or dropped.
    `keep_tokens_separator` (kohya's): in a caption that holds it, the tags before it (and after a
    second one) stay in place and are never dropped, instead of the first `keep_tokens`; the
    separator itself never reaches the text encoder. `caption_dropout_every_n_epochs` n: every
    caption of epochs n, 2n, ... (counted from 1) is dropped.
    `templates` (embedding.templates, the trigger word in place): each item's caption is one of them,
    drawn from (seed, epoch, i) on a stream of its own, instead of its example's; taken as it is (no
    prefix, suffix, tag shuffling or tag dropout), and still dropped by caption dropout.
    `alpha_mask`: items also carry `alpha_mask` (1, h, w) in [0, 1], the image's alpha resized,
    cropped and flipped as its pixels are (ones for an image without alpha); the pixels are the same
    either way. Examples with a `mask` file (data.mask_dir) give items a `loss_mask` (1, h, w) in [0, 1]
    taken the same path, and `mask_id`, the mask file's SHA-256.
    `treatments` (data.subsets): one Treatment per subset, read for each example from its `subset`
    instead of the options above (seed, crop, sizes, caption_dropout_every_n_epochs and templates stay
    the dataset's); items of all subsets mix in the epoch and in every bucket.
    Several sides (data.resolution a list, or `sides`: each example's own list): every example is an
    item at each of its sides, its square (or its bucket, `sizes[j][k]` for side k) about side² pixels;
    pass k of the item table is the examples' k-th side, so with one side the items are as they were.
    Items carry their `side`.
    """

    def __init__(self, examples: Sequence[Example], resolution: int | Sequence[int], center_crop: bool = True,
                 random_flip: bool = False, caption_prefix: str = "", caption_dropout: float = 0.0,
                 repeats: int = 1, seed: int = 0, sizes: Sequence[tuple[int, int] | list] | None = None,
                 shuffle_tags: bool = False, keep_tokens: int = 0, caption_suffix: str = "",
                 caption_tag_dropout: float = 0.0, alpha_mask: bool = False, keep_tokens_separator: str = "",
                 caption_dropout_every_n_epochs: int = 0, templates: Sequence[str] = (),
                 treatments: Sequence[Treatment] | None = None, sides: Sequence[Sequence[int]] | None = None):
        if not examples:
            raise ValueError("ImageCaptionDataset needs at least one example")
        every = [resolution] if isinstance(resolution, int) else list(resolution)
        self.sides = [list(s) for s in sides] if sides is not None else [every] * len(examples)
        if len(self.sides) != len(examples) or min(min(s, default=0) for s in self.sides) <= 0:
            raise ValueError(f"each example needs positive sides, got {resolution} and {sides}")
        if min(ex.repeats for ex in examples) < 1:
            raise ValueError(f"repeats must be at least 1, got {min(ex.repeats for ex in examples)} from the examples")
        self.examples = list(examples)
        self.resolution = every[0]
        self.center_crop = center_crop
        # the treatment of every example, or with `treatments` of those of subset k the k-th one
        self.treatment = Treatment(repeats, caption_prefix, caption_suffix, caption_dropout, caption_tag_dropout,
                                   shuffle_tags, keep_tokens, keep_tokens_separator, random_flip, alpha_mask)
        self.treatments = list(treatments) if treatments is not None else None
        self.seed = seed
        self.epoch = 0
        if sizes is not None and len(sizes) != len(self.examples):
            raise ValueError(f"sizes has {len(sizes)} entries for {len(self.examples)} examples")
        # each example's bucket per side: a single (h, w) is the bucket of an example's one side
        self.sizes = ([[hw] if isinstance(hw[0], int) else list(hw) for hw in sizes]
                      if sizes is not None else None)
        # items carry an alpha_mask when any example's treatment reads alpha (ones for the others)
        self.alpha_mask = any(self.treatment_of(j).alpha_mask for j in range(len(self.examples)))
        self._mask_digests: dict[Path, str] = {}  # mask file -> SHA-256, once per run (see read_mask)
        self.caption_dropout_every_n_epochs = caption_dropout_every_n_epochs
        self.templates = list(templates)
        table = _item_table([ex.repeats * self.treatment_of(j).repeats for j, ex in enumerate(self.examples)])
        self._items = [(j, k) for k in range(max(map(len, self.sides))) for j in table if k < len(self.sides[j])]

    def treatment_of(self, index: int) -> Treatment:
        """The treatment of example `index`: its subset's, or the dataset's."""
        return self.treatments[self.examples[index].subset] if self.treatments is not None else self.treatment

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self._items)

    def example_index(self, i: int) -> int:
        """The example that dataset item i shows."""
        return self._items[i][0]

    def item_size(self, i: int) -> tuple[int, int]:
        """The (height, width) of dataset item i: its side's bucket, or the side² square."""
        index, k = self._items[i]
        return self.sizes[index][k] if self.sizes else (self.sides[index][k],) * 2

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for dataset of length {len(self)}")
        index, k = self._items[i]
        example = self.examples[index]
        t = self.treatment_of(index)
        # A string seed is hashed with SHA-512 by random.Random: stable across runs and
        # platforms, unlike hash() of a tuple.
        rng = random.Random(f"{self.seed}:{self.epoch}:{i}")
        # Fixed draw order (dropout, crop, flip) keeps each choice independent of the options.
        drop_caption = rng.random() < t.caption_dropout
        every = self.caption_dropout_every_n_epochs  # kohya counts epochs from 1: epochs n, 2n, ... drop all
        drop_caption = drop_caption or (every > 0 and (self.epoch + 1) % every == 0)
        crop_u, crop_v = rng.random(), rng.random()
        flipped = t.random_flip and rng.random() < 0.5

        height, width = self.item_size(i)
        image, alpha = load_image_and_alpha(example.path) if t.alpha_mask else (load_image(example.path), None)
        original_size = (image.height, image.width)
        image = resize_to_cover(image, height, width)
        top, left = self._crop_offsets(image, height, width, crop_u, crop_v)
        resized_width = image.width
        box = (left, top, left + width, top + height)
        image = image.crop(box)
        # The mask takes the pixels' path exactly: same resize, crop box and flip.
        alpha = resize_to_cover(alpha, height, width).crop(box) if alpha is not None else None
        mask, mask_id = read_mask(example.mask, self._mask_digests) if example.mask is not None else (None, None)
        mask = resize_to_cover(mask, height, width).crop(box) if mask is not None else None
        if flipped:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            alpha = alpha.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if alpha is not None else None
            mask = mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if mask is not None else None
            # The flipped crop is what cropping the mirrored image would give at this offset.
            left = resized_width - left - width

        caption = item_caption(t, example.caption, self.seed, self.epoch, i, drop_caption, self.templates)
        extra = {}
        if self.alpha_mask:
            extra["alpha_mask"] = (torch.from_numpy(np.asarray(alpha, dtype=np.float32) / 255.0)[None]
                                   if alpha is not None else torch.ones(1, height, width))
        if mask is not None:
            extra.update(loss_mask=torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None], mask_id=mask_id)
        return {
            **extra,
            "pixel_values": to_tensor(image),
            "caption": caption,
            "index": index,
            "side": self.sides[index][k],
            "item": i,  # the dataset position: with the epoch, it seeds the step's noise for this item
            "flipped": flipped,
            "original_size": torch.tensor(original_size),
            "crop_top_left": torch.tensor((top, left)),
        }

    def _crop_offsets(self, image: Image.Image, height: int, width: int, u: float, v: float) -> tuple[int, int]:
        spare_h = image.height - height
        spare_w = image.width - width
        if self.center_crop:
            return spare_h // 2, spare_w // 2
        return int(u * (spare_h + 1)), int(v * (spare_w + 1))


def _item_table(repeats: Sequence[int]) -> list[int]:
    """The example index of each dataset item: pass k lists, in order, the examples repeated more
    than k times, so equal repeats give example i % n at item i (the order before per-folder repeats)."""
    items: list[int] = []
    active = list(range(len(repeats)))
    for k in range(max(repeats)):
        active = [j for j in active if repeats[j] > k]
        items += active
    return items


def resize_shorter_side(image: Image.Image, resolution: int) -> Image.Image:
    """Scale so the shorter side is `resolution` pixels, keeping the aspect ratio."""
    return resize_to_cover(image, resolution, resolution)


def resize_to_cover(image: Image.Image, height: int, width: int) -> Image.Image:
    """Scale, keeping the aspect ratio, to the smallest size that covers height × width."""
    scale = max(width / image.width, height / image.height)
    # max() guards against rounding a side below the crop size.
    size = (max(width, round(image.width * scale)),
            max(height, round(image.height * scale)))
    if size == image.size:
        return image
    # reducing_gap lets PIL shrink big photos by whole factors first: much faster, same look.
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image to a float tensor [3, H, W] in [-1, 1], the range the VAE expects."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
