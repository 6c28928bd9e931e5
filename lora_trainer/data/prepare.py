"""The dataset as a training run takes it, before any diffusion model loads: caption the images
that have none (BLIP-2 or WD14 tags, when asked), check the set (logged as one summary), scan it (with its mask
images, data.mask_dir), each of data.subsets in turn, and record the captions trained on in the run folder
(`captions.jsonl`)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

from dataclasses import replace

from lora_trainer.config import DataConfig, RunConfig, bucket_limit_errors, resolve_subsets, subset_label
from lora_trainer.data.captioning import caption_folder
from lora_trainer.data.checks import check_dataset, load_clip_tokenizer
from lora_trainer.data.dataset import Example, scan_dataset
from lora_trainer.errors import ConfigError, DataError
from lora_trainer.data.holdout import example_names, held_out_flags, validation_seed
from lora_trainer.data.masks import attach_masks
from lora_trainer.data.tags import training_caption
from lora_trainer.data.templates import template_captions
from lora_trainer.fileio import write_text_atomic
from lora_trainer.processes import multiprocess_without_gpu

logger = logging.getLogger(__name__)

CAPTIONS_RECORD = "captions.jsonl"


def prepare_examples(cfg: RunConfig, show_progress: bool = True) -> list[Example]:
    """Caption, check and scan `cfg.data.path` (or each of data.subsets, in order, each example
    marked with its subset); write OUT/captions.jsonl; return the examples.

    Under `accelerate launch` the main process captions and writes; the others wait, then read
    the captions it wrote.
    """
    if cfg.data.buckets:  # null resolution is filled in once the base is known
        problems = list(dict.fromkeys(p for sub in resolve_subsets(cfg.data)  # each subset's sides
                                      for p in bucket_limit_errors(cfg.data, sub.resolution)))
        if problems:
            raise ConfigError("\n".join(problems))
    first, is_main = _main_process_first()
    generated: set[Path] = set()
    examples: list[Example] = []
    with first:
        for index, sub in enumerate(resolve_subsets(cfg.data)):
            try:
                found, made = _prepare_folder(cfg, sub, is_main, show_progress, subset_label(cfg.data, index))
            except DataError as err:
                if not cfg.data.subsets:
                    raise
                where = f"data.subsets[{index}].path"  # the scan's advice names data.path
                raise DataError(f"data.subsets[{index}]: " + str(err).replace("data.path", where)) from None
            examples += [replace(ex, subset=index) for ex in found]
            generated |= made
    if is_main:
        _record_captions(cfg, examples, generated)
    return examples


def _prepare_folder(cfg: RunConfig, sub: DataConfig, is_main: bool, show_progress: bool,
                    label: str) -> tuple[list[Example], set[Path]]:
    """Caption, check and scan one folder of the run (`sub`: data, or a resolved subset); its examples
    and the caption files written for them."""
    root, ext = Path(sub.path), sub.caption_extension
    generated: set[Path] = set()
    if is_main and cfg.data.caption.method != "none" and root.is_dir():
        if cfg.dreambooth.instance_prompt or cfg.embedding.templates is not None:
            which = "dreambooth.instance_prompt" if cfg.dreambooth.instance_prompt else "embedding.templates"
            logger.info("data.caption.method=%s ignored: %s captions every image", cfg.data.caption.method, which)
        else:
            # Before the scan: generated captions fill the gaps, and only images still without
            # one take their kohya folder's name.
            results = caption_folder(root, cfg.data.caption, show_progress=show_progress,
                                     skip_parked=sub.folder_repeats, caption_extension=ext,
                                     warn_unread=False)  # scan_dataset below names them
            generated = {r.path for r in results if r.status in ("generated", "replaced")}
    # data.resolution null means the base's native size, known only once the variant is: judge
    # image sizes against SD1.x's 512 unless the config already says SDXL.
    resolution = sub.resolution or (1024 if cfg.model.variant == "sdxl" else 512)  # a list: every side
    report = check_dataset(root, resolution, load_clip_tokenizer(cfg.model.base, cfg.model.revision),
                           sub.caption_prefix, sub.folder_repeats, cfg.model.max_token_length,
                           caption_extension=ext, caption_suffix=sub.caption_suffix,
                           weighted_captions=sub.weighted_captions,
                           no_upscale=sub.buckets and sub.bucket_no_upscale,
                           separator=sub.keep_tokens_separator,
                           instance_prompt=cfg.dreambooth.instance_prompt or _longest_template(cfg))
    # One INFO record (its lines say "warning:"): the scan below already warns about unreadable
    # files, and raises the precise error when the set cannot train.
    if is_main and report.can_train:
        head = (f"{label}: {report.num_readable} image(s) × repeats {sub.repeats}, "
                f"{report.num_readable - report.num_captioned} without a caption\n" if cfg.data.subsets else "")
        logger.info("%s%s", head, report.format_text(max_files=5))
    # dreambooth.instance_prompt captions every image, so folder names would caption none.
    examples = scan_dataset(root, sub.folder_repeats,
                            folder_captions=sub.folder_repeats and not cfg.dreambooth.instance_prompt,
                            caption_extension=ext, default_caption=sub.default_caption,
                            report_missing=not (cfg.dreambooth.instance_prompt or cfg.embedding.templates))
    if sub.mask_dir:  # with data.subsets, a subset's masks are looked for under its folder's name first
        examples = attach_masks(examples, root.parent if cfg.data.subsets else root, sub.mask_dir)
    return examples, generated


def _longest_template(cfg: RunConfig) -> str:
    """With embedding.templates, the longest caption they make: every image trains on templates, so
    its own caption is not needed, and this one is checked against the token limit."""
    return max(template_captions(cfg.embedding.templates, cfg.embedding.token or ""), key=len, default="")


def trained_caption(cfg: RunConfig, caption: str, sub: DataConfig | None = None) -> str:
    """The caption an image (of subset `sub`, resolved; None: data) trains on, before caption dropout,
    tag dropout and shuffling: the DreamBooth instance prompt replaces its own, and the prefix and
    suffix are added to either."""
    d = sub or cfg.data
    return training_caption(cfg.dreambooth.instance_prompt or caption, d.caption_prefix,
                            d.caption_suffix, d.keep_tokens_separator)


def _record_captions(cfg: RunConfig, examples: list[Example], generated: set[Path]) -> None:
    subs = resolve_subsets(cfg.data)
    held_out = [False] * len(examples)
    if cfg.data.validation_split > 0:  # marked, as they are not trained on
        held_out = held_out_flags(examples, cfg.data.path or "data.subsets", cfg.data.validation_split,
                                  validation_seed(cfg), example_names(examples, subs))
    lines = [json.dumps({**({"subset": ex.subset} if cfg.data.subsets else {}),
                         "file": ex.path.relative_to(subs[ex.subset].path).as_posix(),
                         "caption": trained_caption(cfg, ex.caption, subs[ex.subset]),
                         "generated": ex.path in generated, "repeats": ex.repeats * subs[ex.subset].repeats,
                         **({"validation": True} if out else {})},
                        ensure_ascii=False) for ex, out in zip(examples, held_out)]
    write_text_atomic(Path(cfg.output.dir) / CAPTIONS_RECORD, "\n".join(lines) + "\n")


def _main_process_first():
    """(context that runs its body on the main process first, is this the main process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return contextlib.nullcontext(), True
    from accelerate import PartialState

    # The first PartialState fixes the backend for the whole run (the Accelerator reuses it).
    state = PartialState(cpu=multiprocess_without_gpu())
    return state.main_process_first(), state.is_main_process
