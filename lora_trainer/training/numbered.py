"""Adapter files numbered after the run's name, kept beside the final one: `<name>-000003` per epoch,
`<name>-step00000100` per N steps (kohya's names), each in one or both layouts
(`.safetensors`, `.diffusers.safetensors`). Finding them and keeping the newest few is shared here."""

from __future__ import annotations

import re
from pathlib import Path


# (tag, digits) of each numbering: `<name>-000003` per epoch, `<name>-step00000100` per N steps
EPOCHS, STEPS = ("", 6), ("step", 8)


def _pattern(name: str, tag: str, digits: int) -> re.Pattern:
    """`<name>-<tag><number:0{digits}d>` in either layout; `name` is a regex."""
    return re.compile(rf"(?P<name>{name})-{re.escape(tag)}(?P<number>\d{{{digits}}})(\.diffusers)?\.safetensors")


def numbered_files(out_dir: Path, name: str, tag: str, digits: int) -> dict[int, list[Path]]:
    """{number: its files (one per layout)} of `<name>-<tag><number:0{digits}d>` adapters in `out_dir`."""
    pattern = _pattern(re.escape(name), tag, digits)
    found: dict[int, list[Path]] = {}
    if Path(out_dir).is_dir():
        for path in sorted(Path(out_dir).iterdir()):
            match = pattern.fullmatch(path.name)
            if match and path.is_file():
                found.setdefault(int(match["number"]), []).append(path)
    return found


def numbering(filename: str) -> tuple[str, str | None, int | None]:
    """(the name it is numbered after, "epoch" | "step" | None, the number) of an adapter file's
    name: ('me', 'epoch', 2) for me-000002.safetensors, ('me', 'step', 100) for
    me-step00000100.diffusers.safetensors; (the name less .safetensors, None, None) for any other."""
    for kind, (tag, digits) in (("epoch", EPOCHS), ("step", STEPS)):
        match = _pattern(".+", tag, digits).fullmatch(filename)
        if match:
            return match["name"], kind, int(match["number"])
    return filename.removesuffix(".safetensors"), None, None


def unnumbered_name(filename: str) -> str:
    """The name a file is numbered after: 'me' for me-000002.safetensors or me-step00000100.safetensors
    (either layout); any other file's name less .safetensors."""
    return numbering(filename)[0]


def remove_older(found: dict[int, list[Path]], keep: int, current: int) -> list[Path]:
    """Delete the files of all but the newest `keep` numbers up to `current` (0 keeps all); return
    them. Higher numbers (left by a run that got further before it was resumed from an earlier
    checkpoint) are not counted: this run writes them again when it gets there."""
    if keep <= 0:
        return []
    removed = []
    for number in sorted(n for n in found if n <= current)[:-keep]:
        for path in found[number]:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
