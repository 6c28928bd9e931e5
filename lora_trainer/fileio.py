"""Atomic file writes: everything written for the user goes to a temp name and is renamed."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path
from typing import Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The mode a plain `open(path, "w")` gives a new file under the process umask (usually 0o644).
    Temporary files are created 0o600; without this every output would stay private to its owner,
    unreadable by a UI or server that runs as another user."""
    return 0o666 & ~_umask()


def new_dir_mode() -> int:
    """The mode `mkdir` gives a new folder under the process umask (usually 0o755); see new_file_mode."""
    return 0o777 & ~_umask()


def unwritable_reason(folder: str | os.PathLike) -> str | None:
    """Why files cannot be written into `folder` (which may not exist yet: writing creates it), as
    the end of a sentence that starts with its name; None when they can. Commands ask before their
    long work, so that a read-only place fails in one line at the start, not after minutes.
    A test file is created and removed in the nearest existing folder; nothing else is made."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        return f"cannot be made: {existing} is a file"
    try:
        fd, tmp = tempfile.mkstemp(prefix=".write-check.", dir=existing)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        return f"cannot be written to ({exc.strerror or exc} in {existing})"
    return None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the same folder as `path`; rename it over `path` on success.

    On any exception the temporary file is removed and `path` is left as it was. The file gets the
    mode of the file it replaces, else the umask's default for a new file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except OSError:
            mode = new_file_mode()
        os.chmod(tmp_path, mode)
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
