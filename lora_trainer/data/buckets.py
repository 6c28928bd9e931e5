"""Aspect-ratio buckets: instead of square crops, each image is cropped to the bucket size
closest to its own aspect ratio (about resolution² pixels, sides multiples of `step`), and every
batch is drawn from one bucket, so images of one shape can be stacked. Optional limits on the
bucket sides and kohya's no-upscale rule (an image never enlarged to fill a bucket) come from
data.min_bucket_side, max_bucket_side and bucket_no_upscale."""

from __future__ import annotations

import math
import random
from collections import Counter
from pathlib import Path
from typing import Iterator, Sequence

from PIL import Image

# EXIF orientations that rotate by 90°: the upright image has width and height swapped.
_ROTATED = {5, 6, 7, 8}


def bucket_sizes(resolution: int, step: int = 64, max_aspect: float = 2.0, min_side: int | None = None,
                 max_side: int | None = None) -> list[tuple[int, int]]:
    """(height, width) buckets with area ≤ resolution², each side a multiple of `step` and an aspect
    ratio within 1:max_aspect, the square included. For each width the tallest height the pixel
    budget allows is taken (and its transpose), so every bucket is as large as it can be:
    1024 gives SDXL's familiar 1024x1024, 1152x896, 1216x832, 1344x768.
    `min_side` leaves out buckets with a shorter side; `max_side` caps the long side (kohya's
    min/max_bucket_reso); both multiples of `step`, with the square's side between them."""
    area = resolution * resolution
    side = max(step, resolution // step * step)
    if (min_side is not None and min_side > side) or (max_side is not None and max_side < side):
        raise ValueError(f"bucket side limits {min_side}..{max_side} leave out the square bucket {side}x{side}")
    sizes = {(side, side)}
    for width in range(min_side or step, side + 1, step):
        height = area // width // step * step
        if max_side is not None:
            height = min(height, max_side)
        if height >= width and height / width <= max_aspect:
            sizes.update({(height, width), (width, height)})
    return sorted(sizes, key=lambda hw: hw[1] / hw[0])


def own_size_bucket(height: int, width: int, resolution: int, step: int = 64,
                    max_side: int | None = None) -> tuple[int, int]:
    """The bucket of an image kept at its own shape (kohya's --bucket_no_upscale): its size, scaled
    down only as far as needed to hold at most resolution² pixels and no side over `max_side`,
    then each side rounded down to a multiple of `step` (one step at least)."""
    scale = min(1.0, math.sqrt(resolution * resolution / (height * width)))
    if max_side is not None:
        scale = min(scale, max_side / max(height, width))
    return (max(step, int(height * scale) // step * step), max(step, int(width * scale) // step * step))


def nearest_bucket(height: int, width: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's (compared as log ratios, so 1:2
    and 2:1 are equally far from square); the larger bucket wins a tie."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda hw: (abs(math.log(hw[1] / hw[0]) - aspect), -hw[0] * hw[1]))


def upright_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of the image as loaded (EXIF rotation applied), reading only the header."""
    with Image.open(path) as image:
        width, height = image.size
        try:
            if image.getexif().get(0x0112) in _ROTATED:
                width, height = height, width
        except Exception:  # malformed EXIF: load_image ignores it too
            pass
    return height, width


def assign_buckets(paths: Sequence[str | Path], resolution: int, step: int = 64, min_side: int | None = None,
                   max_side: int | None = None, no_upscale: bool = False) -> list[tuple[int, int]]:
    """The (height, width) bucket of each image: the one nearest its aspect ratio, or with
    `no_upscale`, when that bucket would enlarge the image, a bucket of the image's own shape."""
    buckets = bucket_sizes(resolution, step, min_side=min_side, max_side=max_side)
    chosen = []
    for path in paths:
        height, width = upright_size(path)
        bucket = nearest_bucket(height, width, buckets)
        if no_upscale and (bucket[0] > height or bucket[1] > width):
            bucket = own_size_bucket(height, width, resolution, step, max_side)
        chosen.append(bucket)
    return chosen


def bucket_side_range(resolution: int, step: int = 64, min_side: int | None = None,
                      max_side: int | None = None) -> tuple[int, int]:
    """(shortest, longest) side of the buckets: the limits when set, else what the buckets span
    (recorded as kohya's ss_min_bucket_reso / ss_max_bucket_reso)."""
    sides = [s for bucket in bucket_sizes(resolution, step, min_side=min_side, max_side=max_side) for s in bucket]
    return (min_side if min_side is not None else min(sides), max_side if max_side is not None else max(sides))


def describe_buckets(sizes: Sequence[tuple[int, int]]) -> str:
    counts = Counter(sizes)
    return ", ".join(f"{w}x{h}: {n}" for (h, w), n in sorted(counts.items(), key=lambda kv: kv[0][1] / kv[0][0]))


class BucketBatchSampler:
    """Batches of dataset indices that all share one bucket.

    Each epoch shuffles the items of every bucket, cuts them into batches (the last batch of a
    bucket may be smaller, so no image is skipped) and shuffles the batch order; all from
    (seed, epoch), so a run is reproducible. `item_buckets[i]` is the bucket of dataset item i.

    With several processes accelerate deals these batches out whole, in turn (the last round
    padded with the epoch's first batches): `batch_size` is None, as for batches of varying
    length, because with a number there accelerate regroups the indices into batches of that
    size, dropping some and mixing buckets in one batch.
    """

    batch_size = None  # read by accelerate: see above; the most images a batch holds is `max_batch_size`

    def __init__(self, item_buckets: Sequence[tuple[int, int]], batch_size: int, seed: int = 0):
        self.item_buckets = list(item_buckets)
        self.max_batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        rng = random.Random(f"buckets:{self.seed}:{self.epoch}")
        groups: dict[tuple[int, int], list[int]] = {}
        for i, bucket in enumerate(self.item_buckets):
            groups.setdefault(bucket, []).append(i)
        batches = []
        for bucket in sorted(groups):
            items = groups[bucket]
            rng.shuffle(items)
            size = self.max_batch_size
            batches += [items[k:k + size] for k in range(0, len(items), size)]
        rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self._batches())

    def __len__(self) -> int:
        counts = Counter(self.item_buckets)
        return sum(math.ceil(n / self.max_batch_size) for n in counts.values())
