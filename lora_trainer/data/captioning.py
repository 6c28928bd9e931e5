"""Captioning: a sidecar caption file (`<stem>.txt`, or data.caption_extension) for every image
that has no caption, with BLIP-2 (here) or a WD14 tagger (data/wd14.py).

The model loads only when some image needs a caption and is freed right after, so it is never in
memory together with the diffusion model. Captions are the user's work once written: existing ones
are kept unless `overwrite`, and then the old file is kept as `<stem><ext>.bak`.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from tqdm.auto import tqdm

from lora_trainer.config import CaptionConfig, caption_model
from lora_trainer.data.captions import (
    DEFAULT_CAPTION_EXTENSION,
    other_caption_extension,
    other_extension_message,
    read_metadata_jsonl,
    read_sidecar_caption,
    sidecar_path,
)
from lora_trainer.data.dataset import _walk  # the scan's own file walk: caption exactly what trains
from lora_trainer.data.images import load_image, unread_files_note
from lora_trainer.errors import ConfigError, DataError, ModelError, first_line
from lora_trainer.fileio import atomic_path, write_text_atomic
from lora_trainer.hubcheck import check_hub_model

if TYPE_CHECKING:
    from lora_trainer.data.wd14 import WD14Tagger

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class CaptionedImage:
    """What captioning did for one image."""

    path: Path
    caption: str  # the caption the image has now ("" when none)
    # generated: new caption file; replaced: caption file rewritten, old one in `backup`; kept: had a
    # caption; metadata: captioned (or blank) in metadata.jsonl, which wins over any file; unreadable: skipped
    status: str
    backup: Path | None = None


@dataclass
class Blip2Captioner:
    """A loaded BLIP-2 model with its processor and the options it generates with."""

    processor: Any
    model: Any
    device: torch.device
    dtype: torch.dtype
    options: CaptionConfig


def _key(name: str) -> str:
    # Named both ways: the same options come from a config (data.caption.x) or the caption command (--x).
    return f"data.caption.{name} (--{name.replace('_', '-')})"


def resolve_device_dtype(c: CaptionConfig) -> tuple[torch.device, torch.dtype]:
    """The device and weight dtype `c` asks for on this machine, or a ConfigError saying why not."""
    cuda = torch.cuda.is_available()
    if c.device == "cuda" and not cuda:
        raise ConfigError(f"{_key('device')}: got 'cuda' but no CUDA GPU is visible; use 'auto' or 'cpu'")
    device = torch.device("cuda" if (c.device == "cuda" or (c.device == "auto" and cuda)) else "cpu")
    if c.dtype == "auto":
        return device, torch.float16 if device.type == "cuda" else torch.float32
    if c.dtype == "fp16" and device.type != "cuda":
        # Half-precision kernels on CPU are missing or very slow; bf16 is the CPU's low precision.
        raise ConfigError(f"{_key('dtype')}: got 'fp16', which needs a GPU; on CPU use 'bf16' or 'fp32'")
    return device, DTYPES[c.dtype]


def load_blip2(c: CaptionConfig) -> Blip2Captioner:
    """Load the BLIP-2 model and processor named by `c.model` (hub id or local folder)."""
    source = caption_model(c)
    device, dtype = resolve_device_dtype(c)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if c.load_in_8bit:
        if device.type != "cuda":
            raise ConfigError(f"{_key('load_in_8bit')}: true needs a CUDA GPU; set it to false "
                              "(dtype bf16 also halves memory)")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError(f"{_key('load_in_8bit')}: true needs the bitsandbytes package; "
                              "pip install 'lora-trainer[bnb]' or set it to false")
        from transformers import BitsAndBytesConfig

        # 8-bit layers compute in fp16; bitsandbytes places them on the GPU itself.
        kwargs.update(quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                      device_map={"": device.index or 0}, dtype=torch.float16)
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    if not Path(source).expanduser().exists() and source.count("/") == 1:
        check_hub_model(source, _key("model"), "config.json")
    try:
        processor = Blip2Processor.from_pretrained(source)
        model = Blip2ForConditionalGeneration.from_pretrained(source, **kwargs)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelError(f"{_key('model')}: cannot load a BLIP-2 model from {source!r} ({first_line(err)}); give a hub id "
                         "like Salesforce/blip2-opt-2.7b or a folder saved with save_pretrained") from err
    if not c.load_in_8bit:
        model.to(device)
    model.eval()
    # Older processor configs lack the query count; without it no image tokens reach the model.
    if getattr(processor, "num_query_tokens", None) is None:
        processor.num_query_tokens = model.config.num_query_tokens
    return Blip2Captioner(processor, model, device, model.dtype if c.load_in_8bit else dtype, c)


def release(captioner: Blip2Captioner | WD14Tagger) -> None:
    """Free the model's memory now (GPU memory included), before the diffusion model loads."""
    device = captioner.device
    if isinstance(captioner, Blip2Captioner):
        captioner.model = None
    else:
        captioner.session = None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\ufffd]")


def clean_caption(text: str) -> str:
    """One line, single spaces: no control characters or undecodable bytes in a caption file."""
    return " ".join(_CONTROL.sub(" ", text).split())


def join_caption(prefix: str, caption: str, suffix: str) -> str:
    """prefix + caption + suffix, with a space where the user's prefix/suffix has none ("sks," from
    a command line, whose trailing space the shell or YAML dropped)."""
    if prefix and not prefix[-1].isspace():
        prefix += " "
    if suffix and not (suffix[0].isspace() or suffix[0] in ",.;:!?)"):
        suffix = " " + suffix
    return prefix + caption + suffix


def generate_captions(captioner: Blip2Captioner, images: Sequence) -> list[str]:
    """Captions (without prefix/suffix) for a batch of RGB PIL images, as `captioner.options` says."""
    c = captioner.options
    inputs = captioner.processor(images=list(images), text=[c.prompt] * len(images), return_tensors="pt")
    inputs = {k: v.to(captioner.device) for k, v in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(captioner.dtype)
    options: dict[str, Any] = dict(max_new_tokens=c.max_length, min_new_tokens=c.min_length,
                                   num_beams=c.num_beams, repetition_penalty=c.repetition_penalty,
                                   do_sample=c.do_sample)
    if c.do_sample:
        options.update(top_p=c.top_p, temperature=c.temperature)
    with torch.inference_mode():
        output = captioner.model.generate(**inputs, **options)
    if not captioner.model.config.is_encoder_decoder:
        # A decoder-only language model (OPT) returns the prompt tokens first; keep only the new ones.
        output = output[:, inputs["input_ids"].shape[1]:]
    texts = captioner.processor.batch_decode(output, skip_special_tokens=True)
    lead = c.prompt.strip() + " " if (c.keep_prompt and c.prompt.strip()) else ""
    return [clean_caption(lead + text) for text in texts]


def caption_folder(root: str | os.PathLike, c: CaptionConfig, show_progress: bool = True,
                   captioner: Blip2Captioner | WD14Tagger | None = None, skip_parked: bool = False,
                   caption_extension: str = DEFAULT_CAPTION_EXTENSION,
                   extension_key: str = "data.caption_extension", warn_unread: bool = True) -> list[CaptionedImage]:
    """Write `c.prefix + caption + c.suffix` to `<stem><caption_extension>` beside every image under
    `root` that needs a caption, from BLIP-2 or, with `c.method` wd14, a WD14 tagger.

    An image needs one when it has no (or a blank) caption file and no metadata.jsonl entry, or has
    one and `c.overwrite` is set (the old file is copied to `<stem><ext>.bak` first). Each batch's
    files are written as soon as it is captioned. The model loads only if some image needs a caption
    (or `captioner` is given, and then stays loaded). `skip_parked` leaves out `0_<name>` folders,
    as a run with data.folder_repeats does, and one log line says how many. When no image has a caption
    file of this extension but some have .caption/.txt/.tags files, a warning names `extension_key`
    (they are captioned anyway). Image files of formats that are not read, and the folders left out,
    are named unless `warn_unread` is False (training's own scan of the folder names them right after).
    """
    root = Path(root)
    if c.method == "wd14" and captioner is None:
        from lora_trainer.data.wd14 import check_onnxruntime

        check_onnxruntime()  # before any work: the folder is not even scanned without it
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "dataset folder not found"
        raise DataError(f"{root}: {what}; give a folder of images to caption")
    image_paths, metadata_files, parked, unread = _walk(root, skip_parked)
    if unread and warn_unread:
        logger.warning("%s: %s", root, unread_files_note(unread, root))
    if parked and warn_unread:
        logger.warning("%s: leaving out %d folder(s) named 0_<name> (%d image(s)), as training does: %s",
                       root, len(parked), sum(len(_walk(p)[0]) for p in parked),
                       ", ".join(p.relative_to(root).as_posix() for p in parked))
    in_metadata: dict[Path, str] = {}
    for metadata in metadata_files:
        in_metadata.update(read_metadata_jsonl(metadata))

    other = other_caption_extension(image_paths, [in_metadata.get(p.resolve()) for p in image_paths],
                                    caption_extension)
    if other is not None:
        logger.warning("%s: %s", root, other_extension_message(other, caption_extension, extension_key))
    results: dict[Path, CaptionedImage] = {}
    todo: list[Path] = []
    for path in image_paths:
        if path.resolve() in in_metadata:
            # metadata.jsonl wins over sidecars, so a generated file would be silently ignored.
            results[path] = CaptionedImage(path, in_metadata[path.resolve()], "metadata")
            continue
        existing = read_sidecar_caption(path, caption_extension)
        if existing and not c.overwrite:
            results[path] = CaptionedImage(path, existing, "kept")
        else:
            todo.append(path)
    blank = sorted(str(r.path) for r in results.values() if r.status == "metadata" and not r.caption)
    if blank:
        logger.warning("%d image(s) have a blank caption in metadata.jsonl, which wins over caption files; "
                       "write their captions there: %s", len(blank), ", ".join(blank[:5]))

    if todo:
        own = captioner is None
        if own:
            logger.info("captioning %d image(s) with %s", len(todo), caption_model(c))
            captioner = _load_captioner(c)
        try:
            _caption_paths(todo, captioner, c, results, show_progress, caption_extension)
        finally:
            if own:
                release(captioner)
    return [results[p] for p in image_paths]


def _load_captioner(c: CaptionConfig) -> Blip2Captioner | WD14Tagger:
    if c.method == "wd14":
        from lora_trainer.data.wd14 import load_wd14

        return load_wd14(c)
    return load_blip2(c)


def _caption_paths(paths: list[Path], captioner: Blip2Captioner | WD14Tagger, c: CaptionConfig,
                   results: dict[Path, CaptionedImage], show_progress: bool, ext: str) -> None:
    device = captioner.device
    if isinstance(captioner, Blip2Captioner):
        describe = generate_captions
    else:
        from lora_trainer.data.wd14 import tag_images as describe
    # A private RNG stream: seeded sampling here leaves the caller's random state as it was.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(c.seed)
        bar = tqdm(total=len(paths), desc="captioning", unit="img", disable=not show_progress)
        for start in range(0, len(paths), c.batch_size):
            batch, images = [], []
            for path in paths[start:start + c.batch_size]:
                try:
                    images.append(load_image(path))
                    batch.append(path)
                except DataError as err:
                    logger.warning("not captioned: %s", err)
                    results[path] = CaptionedImage(path, "", "unreadable")
            if images:
                for path, text in zip(batch, describe(captioner, images)):
                    results[path] = write_caption(path, join_caption(c.prefix, text, c.suffix), ext)
            bar.update(len(paths[start:start + c.batch_size]))
        bar.close()


def write_caption(image_path: Path, caption: str, ext: str = DEFAULT_CAPTION_EXTENSION) -> CaptionedImage:
    """Write `<stem><ext>` atomically; a non-empty one already there is first copied to a backup."""
    sidecar = sidecar_path(image_path, ext)
    backup = None
    if sidecar.exists() and sidecar.read_bytes().strip():
        backup = _free_backup_name(sidecar)
        with atomic_path(backup) as tmp:
            tmp.write_bytes(sidecar.read_bytes())
    write_text_atomic(sidecar, caption + "\n")
    return CaptionedImage(image_path, caption, "replaced" if backup else "generated", backup)


def _free_backup_name(sidecar: Path) -> Path:
    # An earlier run's backup may hold the user's original words: never write over it.
    candidate = sidecar.with_name(sidecar.name + ".bak")
    n = 1
    while candidate.exists():
        candidate = sidecar.with_name(f"{sidecar.name}.bak{n}")
        n += 1
    return candidate


def format_caption_table(root: str | os.PathLike, results: Sequence[CaptionedImage]) -> str:
    """file → status → caption, one line each, then counts (what `lora-trainer caption` prints)."""
    root = Path(root)
    names = [r.path.relative_to(root).as_posix() for r in results]
    width = max((len(n) for n in names), default=0)
    lines = [f"{name:<{width}}  {r.status:<10}  {r.caption}" for name, r in zip(names, results)]
    counts = {status: sum(r.status == status for r in results)
              for status in ("generated", "replaced", "kept", "metadata", "unreadable")}
    summary = ", ".join(f"{n} {status}" for status, n in counts.items() if n) or "no images"
    backups = [r.backup.relative_to(root).as_posix() for r in results if r.backup]
    if backups:
        summary += f" (old captions kept in {', '.join(backups)})"
    return "\n".join(lines + [f"{len(results)} image(s): {summary}"])
