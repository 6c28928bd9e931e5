"""Caption reading: `metadata.jsonl` (the HuggingFace imagefolder layout) and sidecar `.txt` files.

Precedence per image: a metadata.jsonl entry, else `<stem>.txt` beside the image, else "".
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterable

from lora_trainer.errors import DataError

METADATA_FILE = "metadata.jsonl"
# HuggingFace names the caption column freely; "text" is what its docs and most datasets use.
CAPTION_KEYS = ("text", "caption")

logger = logging.getLogger(__name__)


def read_sidecar_caption(image_path: str | os.PathLike) -> str | None:
    """The stripped text of `<stem>.txt` next to the image, or None when there is no such file."""
    txt = Path(image_path).with_suffix(".txt")
    if not txt.is_file():
        return None
    return _read_text(txt).strip()


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


def resolve_captions(image_paths: Iterable[Path], metadata_files: Iterable[Path] = ()) -> list[str]:
    """Captions for `image_paths`, in order, following the precedence in the module docstring
    ("" when an image has none)."""
    return [caption or "" for caption in find_captions(image_paths, metadata_files)]


def find_captions(image_paths: Iterable[Path], metadata_files: Iterable[Path] = ()) -> list[str | None]:
    """Like `resolve_captions`, but None for an image with neither a metadata.jsonl entry nor a
    `.txt` (a blank file or entry gives ""): only those may take a caption from elsewhere.

    Warns once about metadata entries whose image does not exist (usually a typo or a renamed file).
    """
    image_paths = list(image_paths)
    from_metadata: dict[Path, str] = {}
    for metadata in metadata_files:
        from_metadata.update(read_metadata_jsonl(metadata))

    captions: list[str | None] = []
    for image in image_paths:
        caption = from_metadata.get(image.resolve())
        captions.append(caption if caption is not None else read_sidecar_caption(image))

    dangling = sorted(str(p) for p in from_metadata if not p.exists())
    if dangling:
        shown = ", ".join(dangling[:5]) + (", ..." if len(dangling) > 5 else "")
        logger.warning("%d metadata.jsonl entries name images that do not exist: %s",
                       len(dangling), shown)
    return captions


def _read_text(path: Path) -> str:
    # utf-8-sig: caption files saved by Windows editors often start with a byte-order mark.
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); "
                        "re-save it as UTF-8") from err
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from err
