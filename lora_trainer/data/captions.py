"""Caption reading: `metadata.jsonl` (the HuggingFace imagefolder layout) and sidecar files.

Precedence per image: a metadata.jsonl entry, else `<stem><ext>` beside the image (ext is
data.caption_extension: `.txt` by default, `.caption` in kohya's default), else "".
"""

from __future__ import annotations

import codecs
import json
import logging
import os
from pathlib import Path
from typing import Iterable, Sequence

from lora_trainer.errors import DataError

METADATA_FILE = "metadata.jsonl"
# HuggingFace names the caption column freely; "text" is what its docs and most datasets use.
CAPTION_KEYS = ("text", "caption")
DEFAULT_CAPTION_EXTENSION = ".txt"
# Sidecar extensions captioners and taggers write (kohya's BLIP .caption, WD14 .txt, booru .tags):
# finding these but none of the configured one means the run would train on empty captions.
COMMON_CAPTION_EXTENSIONS = (".caption", ".txt", ".tags")

logger = logging.getLogger(__name__)


def sidecar_path(image_path: str | os.PathLike, ext: str = DEFAULT_CAPTION_EXTENSION) -> Path:
    """`<stem><ext>` beside the image: cat.png -> cat.txt (kohya's naming: the image suffix replaced)."""
    image_path = Path(image_path)
    return image_path.with_name(image_path.stem + ext)


def read_sidecar_caption(image_path: str | os.PathLike, ext: str = DEFAULT_CAPTION_EXTENSION) -> str | None:
    """The stripped text of `<stem><ext>` next to the image, or None when there is no such file."""
    sidecar = sidecar_path(image_path, ext)
    if not sidecar.is_file():
        return None
    return _read_text(sidecar).strip()


def other_caption_extension(image_paths: Sequence[Path], captions: Sequence[str | None],
                            ext: str) -> tuple[str, int, bool] | None:
    """(extension, count, mixed) of the first of COMMON_CAPTION_EXTENSIONS that images without a
    caption (None in `captions`, as `find_captions` gives them) have files of, else None: those
    images would train on empty captions (or their folder's name). `mixed` is True when other
    images do have a `<stem><ext>` file (a stray .txt beside kohya's .caption files)."""
    bare = [p for p, caption in zip(image_paths, captions)
            if caption is None and not sidecar_path(p, ext).is_file()]
    if not bare:
        return None
    for other in COMMON_CAPTION_EXTENSIONS:
        if other != ext:
            count = sum(sidecar_path(p, other).is_file() for p in bare)
            if count:
                mixed = any(sidecar_path(p, ext).is_file() for p in image_paths)
                return other, count, mixed
    return None


def other_extension_message(found: tuple[str, int, bool], ext: str, key: str) -> str:
    """The one-line warning for `other_caption_extension`'s answer; `key` is the setting as the
    user writes it (data.caption_extension, or --caption-extension)."""
    other, count, mixed = found
    kohya = " (kohya's default)" if other == ".caption" else ""
    if mixed:
        return (f"{count} image(s) have no {ext} file but a {other} file{kohya}, which is not read; "
                f"set {key}={other} if those are the captions, or give every image a {ext} file "
                f"(else they train on empty captions or their folder's name)")
    return (f"no image has a {ext} caption file, but {count} have {other} files{kohya}; set {key}={other} "
            f"to train on them (else they train on empty captions or their folder's name)")


def read_metadata_jsonl(path: str | os.PathLike) -> dict[Path, str]:
    """Map each image listed in a metadata.jsonl to its caption.

    Keys are resolved absolute paths (`file_name` is relative to the jsonl's folder and may
    contain subfolders). Entries without a caption column are left out, so the sidecar applies.
    """
    path = Path(path)
    captions: dict[Path, str] = {}
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: not valid JSON ({err.msg}); each line must be one "
                            '{"file_name": ..., "text": ...} object') from err
        if not isinstance(entry, dict):
            raise DataError(
                f'{where}: expected a JSON object like {{"file_name": ..., "text": ...}}')
        file_name = entry.get("file_name")
        if not isinstance(file_name, str) or not file_name:
            raise DataError(
                f'{where}: missing "file_name" (the image path relative to {path.parent})')
        key = next((k for k in CAPTION_KEYS if k in entry), None)
        if key is None:
            continue
        if not isinstance(entry[key], str):
            raise DataError(f'{where}: "{key}" must be a string, got {entry[key]!r}')
        captions[(path.parent / file_name).resolve()] = entry[key].strip()
    return captions


def resolve_captions(image_paths: Iterable[Path], metadata_files: Iterable[Path] = (),
                     ext: str = DEFAULT_CAPTION_EXTENSION) -> list[str]:
    """Captions for `image_paths`, in order, following the precedence in the module docstring
    ("" when an image has none)."""
    return [caption or "" for caption in find_captions(image_paths, metadata_files, ext)]


def find_captions(image_paths: Iterable[Path], metadata_files: Iterable[Path] = (),
                  ext: str = DEFAULT_CAPTION_EXTENSION) -> list[str | None]:
    """Like `resolve_captions`, but None for an image with neither a metadata.jsonl entry nor a
    `<stem><ext>` file (a blank file or entry gives ""): only those may take a caption from elsewhere.

    Warns once about metadata entries whose image does not exist (usually a typo or a renamed file).
    """
    image_paths = list(image_paths)
    from_metadata: dict[Path, str] = {}
    for metadata in metadata_files:
        from_metadata.update(read_metadata_jsonl(metadata))

    captions: list[str | None] = []
    for image in image_paths:
        caption = from_metadata.get(image.resolve())
        captions.append(caption if caption is not None else read_sidecar_caption(image, ext))

    dangling = sorted(str(p) for p in from_metadata if not p.exists())
    if dangling:
        shown = ", ".join(dangling[:5]) + (", ..." if len(dangling) > 5 else "")
        logger.warning("%d metadata.jsonl entries name images that do not exist: %s",
                       len(dangling), shown)
    return captions


def _encoding(data: bytes) -> str:
    """UTF-8 (its byte-order mark, which Windows editors often write, dropped), or UTF-16/32 when the
    file starts with their byte-order mark (Notepad's "Unicode" saves UTF-16)."""
    if data.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        return "utf-32"
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    return "utf-8-sig"


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
        # universal newlines, as text-mode reading gives
        return data.decode(_encoding(data)).replace("\r\n", "\n").replace("\r", "\n")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); "
                        "re-save it as UTF-8") from err
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from err
