"""Datasets and loaders of a run, with a data order that is a function of (seed, epoch) only, so a
resumed run or one with another number of processes sees the same batches in the same order."""

from __future__ import annotations

import logging
import random

import torch

from ..config import RunConfig, describe_sides, main_side, resolution_sides, resolve_subsets
from ..data import ImageCaptionDataset
from ..data.treatment import Treatment
from ..data.buckets import BucketBatchSampler, assign_buckets, describe_buckets
from ..data.templates import template_captions
from ..textencode import comma_in_brackets

log = logging.getLogger(__name__)


class ShuffledBatches:
    """Batches of shuffled indices, the order drawn from (seed, epoch); full batches only when
    there are enough items (a short last batch would weigh its few images more)."""

    def __init__(self, size: int, batch_size: int, seed: int):
        self.size, self.batch_size, self.seed, self.epoch = size, batch_size, seed, 0
        self.drop_last = size >= batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        order = list(range(self.size))
        random.Random(f"order:{self.seed}:{self.epoch}").shuffle(order)
        for b in range(len(self)):
            yield order[b * self.batch_size:(b + 1) * self.batch_size]

    def __len__(self) -> int:
        return self.size // self.batch_size if self.drop_last else 1


def warn_split_weights(cfg: RunConfig, examples) -> None:
    """One warning when weighted captions would be split inside a bracket by tag shuffling, tag
    dropout or keep_tokens (all of which cut captions at every comma)."""
    subs = resolve_subsets(cfg.data)
    if not (cfg.data.weighted_captions and not all(Treatment.of(d).fixed_captions for d in subs)):
        return
    texts = [subs[ex.subset].caption_prefix + ex.caption + subs[ex.subset].caption_suffix for ex in examples]
    found = [ex.path.name for ex, text in zip(examples, texts) if comma_in_brackets(text)]
    if found:
        log.warning("data.weighted_captions: %d caption(s) have a comma inside brackets (first: %s), which tag "
                    "shuffling/dropout splits apart; write each weighted group without commas",
                    len(found), found[0])


def example_sides(cfg: RunConfig, examples, instance: bool = True) -> list[list[int]]:
    """The training sides of each example: its subset's resolution (a key left out takes data.resolution's),
    every listed side; class images (`instance` false) train at the run's main side alone."""
    if not instance:
        return [[main_side(cfg.data.resolution)]] * len(examples)
    subs = resolve_subsets(cfg.data)
    return [resolution_sides(subs[ex.subset].resolution) for ex in examples]


def example_buckets(d, examples, sides: list[list[int]]) -> list[list[tuple[int, int]]]:
    """Each example's aspect bucket at each of its sides (about side² pixels each)."""
    buckets: dict[int, list[tuple[int, int]]] = {}
    for side in sorted({s for own in sides for s in own}):
        buckets[side] = assign_buckets([ex.path for ex in examples], side, d.bucket_step, d.min_bucket_side,
                                       d.max_bucket_side, d.bucket_no_upscale)
    return [[buckets[side][j] for side in own] for j, own in enumerate(sides)]


def make_dataset(cfg: RunConfig, examples, seed: int, instance: bool = True) -> ImageCaptionDataset:
    """The dataset of the instance images (each with its data.subsets entry's treatment and sides), or
    with `instance` false of the class images (their prompts as they are, once per epoch)."""
    d = cfg.data
    if instance:
        warn_split_weights(cfg, examples)
    sides = example_sides(cfg, examples, instance)
    if instance and (any(own != sides[0] for own in sides) or len(sides[0]) > 1):
        counts = {describe_sides(own): sum(1 for o in sides if o == own) for own in sides}
        log.info("training sides (px: images): %s; each image is an item at each of its sides",
                 ", ".join(f"{k}: {n}" for k, n in counts.items()))
    sizes = None
    if d.buckets:
        sizes = example_buckets(d, examples, sides)
        what = "images" if all(len(own) == 1 for own in sides) else "items, an image at each side"
        log.info("aspect buckets (w x h: %s): %s", what, describe_buckets([hw for own in sizes for hw in own]))
    return ImageCaptionDataset(
        examples, d.resolution, center_crop=d.center_crop, random_flip=d.random_flip, sides=sides,
        caption_prefix=d.caption_prefix if instance else "", caption_dropout=d.caption_dropout if instance else 0.0,
        repeats=d.repeats if instance else 1, seed=seed, sizes=sizes,
        shuffle_tags=d.shuffle_tags and instance, keep_tokens=d.keep_tokens,
        caption_suffix=d.caption_suffix if instance else "",
        caption_tag_dropout=d.caption_tag_dropout if instance else 0.0, alpha_mask=d.alpha_mask,
        keep_tokens_separator=d.keep_tokens_separator,
        caption_dropout_every_n_epochs=d.caption_dropout_every_n_epochs if instance else 0,
        templates=template_captions(cfg.embedding.templates, cfg.embedding.token) if instance else (),
        treatments=[Treatment.of(sub) for sub in resolve_subsets(d)] if instance and d.subsets else None,
    )


def make_loader(cfg: RunConfig, dataset: ImageCaptionDataset, seed: int):
    """Shuffled batches; with buckets or several sides, each batch from one shape (the last one of a
    shape may be short): items of different sides that share a bucket shape may share a batch."""
    item_buckets = [dataset.item_size(i) for i in range(len(dataset))]
    if dataset.sizes is not None or len(set(item_buckets)) > 1:
        sampler = BucketBatchSampler(item_buckets, cfg.train.batch_size, seed)
    else:
        sampler = ShuffledBatches(len(dataset), cfg.train.batch_size, seed)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers)


def prepared_loaders(cfg: RunConfig, accelerator, examples, class_set=()) -> list:
    """The loader of the instance images and, when `class_set` (the class images' examples) is not
    empty, the class images' one, as accelerate deals their batches out to this process: an epoch's
    steps are this process's share (an unfinished last round is dropped, full batches only; with
    buckets it is padded with the epoch's first batches)."""
    t = cfg.train
    loaders = [make_loader(cfg, make_dataset(cfg, examples, t.seed), t.seed)]
    if class_set:
        loaders.append(make_loader(cfg, make_dataset(cfg, class_set, t.seed + 1, instance=False), t.seed + 1))
    return [accelerator.prepare_data_loader(loader) for loader in loaders]


def set_epoch(loader, epoch: int) -> None:
    """New shuffles and augmentations each epoch: accelerate's wrapper passes the epoch on to some
    of the dataset and samplers, not all, so every one that takes it is told."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    for obj in (loader, loader.dataset, batch_sampler, getattr(batch_sampler, "batch_sampler", None)):
        if hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)


def epoch_batches(loader, epoch: int, skip: int = 0):
    """The batches of `epoch`, the first `skip` (already trained on before a resume) left out
    without loading them."""
    from accelerate import skip_first_batches

    set_epoch(loader, epoch)  # the skipping loader shares the sampler and dataset, so it sees the epoch
    return skip_first_batches(loader, skip) if skip else loader


class ClassBatches:
    """DreamBooth class-image batches forever, a new epoch each pass, with a position
    (epoch, batches consumed) that a checkpoint stores and a resumed run continues from."""

    def __init__(self, loader, epoch: int = 0, consumed: int = 0):
        self.loader, self.epoch, self.consumed = loader, epoch, consumed
        self._batches = None

    def __next__(self):
        while True:
            if self._batches is None:
                self._batches = iter(epoch_batches(self.loader, self.epoch, self.consumed))
            try:
                batch = next(self._batches)
            except StopIteration:
                self._batches, self.epoch, self.consumed = None, self.epoch + 1, 0
                continue
            self.consumed += 1
            return batch
