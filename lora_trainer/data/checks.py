"""Dataset checks (`check-data`, and the summary logged when training starts): what is in a folder
and what will go wrong with it, before any model loads.

Errors mean the set cannot train (no readable image, a broken metadata.jsonl or caption file);
warnings are things users usually want to fix (duplicates, tiny images, missing or cut captions).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lora_trainer.data.captions import (
    DEFAULT_CAPTION_EXTENSION,
    other_caption_extension,
    other_extension_message,
    read_metadata_jsonl,
    read_sidecar_caption,
)
from lora_trainer.data.dataset import Example, _walk
from lora_trainer.data.folders import describe_folders, format_folders, repeat_folder
from lora_trainer.data.images import IMAGE_EXTENSIONS, load_image, unread_formats_message
from lora_trainer.data.masks import attach_masks
from lora_trainer.data.tags import tag_frequency, training_caption
from lora_trainer.errors import DataError
from lora_trainer.textencode import plain_text

CLIP_MAX_TOKENS = 77  # the SD text encoders' context, start and end tokens included
_RATIOS = {"1:1": 1.0, "5:4": 1.25, "4:5": 0.8, "4:3": 4 / 3, "3:4": 0.75, "3:2": 1.5, "2:3": 2 / 3,
           "16:9": 16 / 9, "9:16": 9 / 16, "2:1": 2.0, "1:2": 0.5}
# CLIP's pre-tokenizer splits words, single digits and runs of punctuation; most English words
# are one token in its 49k vocabulary, so counting pieces (long words as several) is a close estimate.
_CLIP_PIECES = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|[^\s\w]+|_", re.IGNORECASE)


@dataclass
class Problem:
    severity: str  # "error": the set cannot train; "warning": it trains, but probably not as meant
    # no_images, unread_format, unreadable, bad_caption_file, metadata, duplicate, too_small, missing_caption, ...
    kind: str
    message: str  # one line
    files: list[str] = field(default_factory=list)  # relative to the dataset folder


@dataclass
class DataReport:
    root: str
    resolution: int  # the largest training side: smaller images are flagged as upscaled
    caption_extension: str = DEFAULT_CAPTION_EXTENSION  # the sidecar files read: <stem><caption_extension>
    num_images: int = 0  # image files found
    num_readable: int = 0
    sizes: dict[str, Any] = field(default_factory=dict)  # smallest/largest/median "WxH"
    aspect_ratios: dict[str, int] = field(default_factory=dict)
    num_captioned: int = 0
    max_tokens: int = 0  # longest caption in text-encoder tokens (start/end excluded)
    token_limit: int = CLIP_MAX_TOKENS - 2  # caption tokens training reads (model.max_token_length)
    token_counter: str = "estimate"  # "tokenizer" when counted with the model's own tokenizer
    sides: list[int] = field(default_factory=list)  # every training side (data.resolution a list); [] for one
    tag_frequency: dict[str, int] = field(default_factory=dict)
    # kohya's <N>_<name> folders: [{"folder", "img_count", "n_repeats"}], the other images under the
    # root's name; empty when there are none (or folder repeats are off)
    folders: list[dict[str, Any]] = field(default_factory=list)
    masks: str = ""  # with a mask folder whose masks all check out: where they are and how many
    problems: list[Problem] = field(default_factory=list)

    @property
    def can_train(self) -> bool:
        return not any(p.severity == "error" for p in self.problems)

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "can_train": self.can_train}

    def _sides_note(self) -> str:
        return f"; sides {', '.join(map(str, self.sides))}, each image trained at each" if len(self.sides) > 1 else ""

    def format_text(self, max_files: int = 10, max_tags: int = 20) -> str:
        """The report as a few readable lines (what check-data prints and training logs)."""
        files = f" ({self.caption_extension} files)" if self.caption_extension != DEFAULT_CAPTION_EXTENSION else ""
        lines = [f"dataset {self.root}: {self.num_images} image(s), {self.num_readable} readable, "
                 f"{self.num_captioned} captioned{files}"]
        if self.folders:
            lines.append("  folders (images × repeats): " + format_folders(self.folders))
        if self.sizes:
            s = self.sizes
            lines.append(f"  sizes: smallest {s['smallest']}, median {s['median']}, largest {s['largest']} "
                         f"(training resolution {self.resolution}{self._sides_note()})")
        if self.aspect_ratios:
            lines.append("  aspect ratios: " + ", ".join(f"{k} x{v}" for k, v in self.aspect_ratios.items()))
        if self.masks:
            lines.append(f"  masks: {self.masks}")
        if self.num_captioned:
            how = "tokenizer" if self.token_counter == "tokenizer" else "estimated; give --model to count exactly"
            lines.append(f"  longest caption: {self.max_tokens} tokens of {self.token_limit} ({how})")
        if self.tag_frequency:
            top = list(self.tag_frequency.items())[:max_tags]
            lines.append("  tags: " + ", ".join(f"{tag} ({n})" for tag, n in top)
                         + (f", ... {len(self.tag_frequency) - len(top)} more" if len(self.tag_frequency) > len(top) else ""))
        for p in self.problems:
            shown = p.files[:max_files]
            more = f", ... {len(p.files) - len(shown)} more" if len(p.files) > len(shown) else ""
            files = f": {', '.join(shown)}{more}" if shown else ""
            lines.append(f"  {p.severity}: {p.message}{files}")
        n_warn = len(self.warnings)
        lines.append("  result: " + (f"can train ({n_warn} warning(s))" if self.can_train
                                     else "CANNOT TRAIN: fix the errors above"))
        return "\n".join(lines)


def check_dataset(root: str | os.PathLike, resolution: int | list[int] = 512, tokenizer=None,
                  caption_prefix: str = "", folder_repeats: bool = True,
                  token_limit: int = CLIP_MAX_TOKENS - 2, caption_extension: str = DEFAULT_CAPTION_EXTENSION,
                  caption_suffix: str = "", extension_key: str = "data.caption_extension",
                  weighted_captions: bool = False, no_upscale: bool = False,
                  mask_dir: str | os.PathLike | None = None, separator: str = "",
                  instance_prompt: str = "") -> DataReport:
    """Inspect every image and caption under `root` the way training will read them, at `resolution`
    (a list: every side; images smaller than the largest are flagged).

    `tokenizer`: the base model's CLIP tokenizer, to count caption tokens exactly (else estimated).
    `caption_prefix`, `caption_suffix`: added at training time, so they count towards length and tags.
    `folder_repeats`: data.folder_repeats, kohya's `<N>_<name>` folders (see data/folders.py).
    `token_limit`: caption tokens training reads (model.max_token_length: 75, 150 or 225).
    `caption_extension`: caption files are `<stem><caption_extension>`; `extension_key` is how the
    warning about captions of another extension names the setting.
    `weighted_captions`: data.weighted_captions; tokens are counted without the weight syntax.
    `no_upscale`: data.buckets with data.bucket_no_upscale; small images keep their size, so they
    are not flagged as upscaled.
    `mask_dir`: data.mask_dir; every readable image needs a readable mask of its size there.
    `separator`: data.keep_tokens_separator, taken out of captions by training, so not counted.
    `instance_prompt`: dreambooth.instance_prompt, the caption every image trains on, so caption
    files are neither needed nor counted.
    """
    root = Path(root)
    sides = [resolution] if isinstance(resolution, int) else list(resolution)
    report = DataReport(str(root), max(sides), caption_extension, token_limit=token_limit,
                        sides=sides if len(sides) > 1 else [])
    if not root.is_dir():
        what = "a file, not a dataset folder" if root.exists() else "dataset folder not found"
        report.problems.append(Problem("error", "no_images", what))
        return report

    def rel(path: Path) -> str:
        return path.relative_to(root).as_posix()

    image_paths, metadata_files, parked, unread = _walk(root, skip_parked=folder_repeats)
    report.num_images = len(image_paths)
    if parked:
        report.problems.append(Problem("warning", "parked_folder", f"{len(parked)} folder(s) named 0_<name> "
                                       "(0 repeats) are left out of training", [rel(p) for p in parked]))
    if unread:
        names = [rel(p) for p in unread]
        report.problems.append(Problem("warning" if image_paths else "error", "unread_format",
                                       unread_formats_message(names), names))
    if not image_paths:
        read = ", ".join(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)
        report.problems.append(Problem("error", "no_images", f"no images found ({read})"))
        return report
    try:
        folders = {p: repeat_folder(p, root) if folder_repeats else None for p in image_paths}
    except DataError as err:
        report.problems.append(Problem("error", "folder_name", str(err)))
        return report

    sizes: dict[Path, tuple[int, int]] = {}
    by_hash: dict[str, list[Path]] = {}
    unreadable = []
    for path in image_paths:
        try:
            image = load_image(path)
        except DataError:
            unreadable.append(rel(path))
            continue
        sizes[path] = image.size
        # Hash the decoded pixels, not the file: a PNG and its re-save (or a copy with other
        # metadata) are the same training image.
        digest = hashlib.sha256(f"{image.size}".encode() + image.tobytes()).hexdigest()
        by_hash.setdefault(digest, []).append(path)
    report.num_readable = len(sizes)
    if unreadable:
        severity = "warning" if sizes else "error"
        report.problems.append(Problem(severity, "unreadable", f"{len(unreadable)} unreadable image(s), "
                                       "skipped in training", unreadable))
    if not sizes:
        return report
    _add_sizes(report, sizes, rel, no_upscale)
    groups = [paths for paths in by_hash.values() if len(paths) > 1]
    if groups:
        report.problems.append(Problem(
            "warning", "duplicate", f"{sum(len(g) - 1 for g in groups)} duplicate image(s) (same pixels) "
            "are trained on more than once", [" = ".join(rel(p) for p in g) for g in groups]))

    readable = [Example(p, "", f.repeats if f else 1, f.path if f else None)
                for p, f in folders.items() if p in sizes]
    if any(ex.folder is not None for ex in readable):
        report.folders = describe_folders(readable, root)
    if mask_dir is not None:
        _check_masks(report, readable, root, Path(mask_dir))
    captions = _read_captions(report, list(sizes), metadata_files, rel)
    if captions is not None:
        other = other_caption_extension(list(captions), list(captions.values()), caption_extension)
        if other is not None:
            report.problems.append(Problem("warning", "caption_extension",
                                           other_extension_message(other, caption_extension, extension_key)))
        for path, caption in captions.items():
            if caption is None and folders[path] is not None and folders[path].name:
                captions[path] = folders[path].name  # what training captions it with
            if instance_prompt:
                captions[path] = instance_prompt  # replaces its own caption in training
        _check_captions(report, captions, tokenizer, caption_prefix, caption_suffix, rel, weighted_captions,
                        separator)
    return report


def _check_masks(report: DataReport, examples: list[Example], root: Path, mask_dir: Path) -> None:
    """The loss masks training would read (data.mask_dir): an error for a mask folder inside the
    dataset (its masks would train as images), or images without a readable mask of their size."""
    if mask_dir.resolve() == root.resolve() or root.resolve() in mask_dir.resolve().parents:
        report.problems.append(Problem("error", "masks", f"mask folder {mask_dir} is inside the dataset folder, "
                                       "so its masks would train as images; move it out"))
        return
    try:
        attach_masks(examples, root, mask_dir, key="mask folder")
    except DataError as err:
        report.problems.append(Problem("error", "masks", str(err)))
        return
    report.masks = f"one for each of the {len(examples)} readable image(s), of its size, in {mask_dir}"


def _add_sizes(report: DataReport, sizes: dict[Path, tuple[int, int]], rel, no_upscale: bool = False) -> None:
    by_area = sorted(sizes.values(), key=lambda wh: (wh[0] * wh[1], wh))
    report.sizes = {"smallest": "%dx%d" % by_area[0], "largest": "%dx%d" % by_area[-1],
                    "median": "%dx%d" % (statistics.median_low(w for w, _ in by_area),
                                         statistics.median_low(h for _, h in by_area))}
    ratios = Counter(aspect_name(w, h) for w, h in sizes.values())
    report.aspect_ratios = dict(ratios.most_common())
    small = [f"{rel(p)} ({w}x{h})" for p, (w, h) in sizes.items() if min(w, h) < report.resolution]
    if small and not no_upscale:
        report.problems.append(Problem("warning", "too_small", f"{len(small)} image(s) have a side under "
                                       f"{report.resolution} px and are upscaled (blurry)", small))


def aspect_name(width: int, height: int) -> str:
    """The common ratio within 3% of width:height ("4:3"), else the ratio to one ("2.35:1")."""
    r = width / height
    name, value = min(_RATIOS.items(), key=lambda kv: abs(math.log(r / kv[1])))
    return name if abs(math.log(r / value)) < math.log(1.03) else f"{r:.2f}:1"


def _read_captions(report: DataReport, paths: list[Path], metadata_files: list[Path], rel):
    """{path: caption or None (no caption file or entry)}; None when metadata.jsonl is broken (which
    caption applies to which image is then unknown). A caption file that cannot be read is an error
    naming it, and its image is left out of the map, so the other captions are still checked."""
    in_metadata: dict[Path, str] = {}
    try:
        for metadata in metadata_files:
            in_metadata.update(read_metadata_jsonl(metadata))
    except DataError as err:
        report.problems.append(Problem("error", "metadata", str(err)))
        return None
    captions: dict[Path, str | None] = {}
    bad = []
    for path in paths:
        if path.resolve() in in_metadata:
            captions[path] = in_metadata[path.resolve()]
            continue
        try:
            captions[path] = read_sidecar_caption(path, report.caption_extension)
        except DataError as err:
            bad.append(str(err))
    if bad:
        report.problems.append(Problem("error", "bad_caption_file", f"{len(bad)} caption file(s) cannot be read "
                                       "(training stops on them): " + " | ".join(bad)))
    dangling = sorted(p.name for p in in_metadata if not p.exists())
    if dangling:
        report.problems.append(Problem("warning", "dangling_metadata", f"{len(dangling)} metadata.jsonl "
                                       "entries name images that do not exist", dangling))
    return captions


def _check_captions(report: DataReport, captions: dict[Path, str | None], tokenizer, prefix: str, suffix: str,
                    rel, weighted: bool = False, separator: str = "") -> None:
    missing = [rel(p) for p, c in captions.items() if c is None]
    empty = [rel(p) for p, c in captions.items() if c == ""]
    report.num_captioned = len(captions) - len(missing) - len(empty)
    if missing:
        report.problems.append(Problem("warning", "missing_caption", f"{len(missing)} image(s) have no caption "
                                       f"(no {report.caption_extension} file, no metadata.jsonl entry); caption them "
                                       "with `lora-trainer caption` or data.caption.method=blip2 (wd14: tags)", missing))
    if empty:
        report.problems.append(Problem("warning", "empty_caption", f"{len(empty)} image(s) have an empty caption",
                                       empty))
    trained = {p: training_caption(c, prefix, suffix, separator) for p, c in captions.items() if c}
    limit = report.token_limit
    cut = []
    for path, caption in trained.items():
        # weighted: the encoder reads "(red:1.5)" as "red"; BREAK's padding is not counted
        n, rest = count_tokens(plain_text(caption) if weighted else caption, tokenizer, limit)
        report.max_tokens = max(report.max_tokens, n)
        if n > limit:
            cut.append(f"{rel(path)} ({n} tokens, cut: {rest!r})")
    report.token_counter = "tokenizer" if tokenizer is not None else "estimate"
    if cut:
        report.problems.append(Problem("warning", "long_caption", f"{len(cut)} caption(s) are longer than the "
                                       f"{limit} tokens the text encoder reads; the end is ignored"
                                       + (" (model.max_token_length up to 225 reads more)" if limit < 225 else ""),
                                       cut))
    report.tag_frequency = tag_frequency([Example(p, c) for p, c in trained.items()])


def count_tokens(caption: str, tokenizer=None, limit: int = CLIP_MAX_TOKENS - 2) -> tuple[int, str]:
    """(number of tokens, the text past `limit` tokens that training cuts off)."""
    if tokenizer is not None:
        ids = tokenizer(caption, add_special_tokens=False).input_ids
        return len(ids), tokenizer.decode(ids[limit:]).strip() if len(ids) > limit else ""
    total, cut_at = 0, None
    for piece in _CLIP_PIECES.finditer(caption):
        # Long words split into a few sub-words ("photorealistic" is "photo" + "realistic").
        n = max(1, math.ceil(len(piece.group()) / 7))
        if total + n > limit and cut_at is None:
            cut_at = piece.start()
        total += n
    return total, caption[cut_at:].strip() if cut_at is not None else ""


def load_clip_tokenizer(base: str, revision: str | None = None):
    """The CLIP tokenizer of a diffusers base (folder or already downloaded hub id), or None.

    Nothing is downloaded for a check: a missing tokenizer only makes the token count an estimate.
    """
    if not base or base.endswith((".safetensors", ".ckpt")):
        return None
    from transformers import CLIPTokenizer

    for subfolder in ("tokenizer", ""):  # a diffusers pipeline, or a bare CLIP model/tokenizer
        # Checked first: without its files, from_pretrained may hand back an empty tokenizer.
        if not _has_tokenizer_files(base, subfolder, revision):
            continue
        try:
            tokenizer = CLIPTokenizer.from_pretrained(base, subfolder=subfolder, revision=revision,
                                                      local_files_only=True)
        except (OSError, ValueError):
            continue
        if len(tokenizer) > 2:
            return tokenizer
    return None


def _has_tokenizer_files(base: str, subfolder: str, revision: str | None) -> bool:
    names = [f"{subfolder}/{n}" if subfolder else n for n in ("vocab.json", "tokenizer.json")]
    if Path(base).is_dir():
        return any((Path(base) / n).is_file() for n in names)
    from huggingface_hub import try_to_load_from_cache

    try:
        return any(isinstance(try_to_load_from_cache(base, n, revision=revision), str) for n in names)
    except ValueError:  # not a valid repo id
        return False
