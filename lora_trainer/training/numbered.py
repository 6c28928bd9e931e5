"""Adapter files numbered after the run's name, kept beside the final one: `<name>-000003` per epoch,
`<name>-step00000100` per N steps (kohya's names), each in one or both layouts
(`.safetensors`, `.diffusers.safetensors`). Finding them and keeping the newest few is shared here."""

from __future__ import annotations

import re
from pathlib import Path


def numbered_files(out_dir: Path, name: str, tag: str, digits: int) -> dict[int, list[Path]]:
    """{number: its files (one per layout)} of `<name>-<tag><number:0{digits}d>` adapters in `out_dir`."""
    pattern = re.compile(rf"{re.escape(name)}-{re.escape(tag)}(\d{{{digits}}})(\.diffusers)?\.safetensors")
    found: dict[int, list[Path]] = {}
    if Path(out_dir).is_dir():
        for path in sorted(Path(out_dir).iterdir()):
            match = pattern.fullmatch(path.name)
            if match and path.is_file():
                found.setdefault(int(match.group(1)), []).append(path)
    return found


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
