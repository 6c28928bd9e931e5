"""Files and folders written for the user get the umask's usual modes, not a temp file's private
0o600: adapters, images and captions must be readable by a UI or server running as another user."""

from __future__ import annotations

import os

import pytest
from PIL import Image

from lora_trainer.fileio import atomic_path, new_dir_mode, new_file_mode, write_text_atomic


@pytest.fixture()
def umask_022():
    before = os.umask(0o022)
    yield
    os.umask(before)


def mode(path) -> int:
    return os.stat(path).st_mode & 0o777


def test_new_files_get_the_umask_mode_and_replaced_files_keep_theirs(umask_022, tmp_path):
    assert (new_file_mode(), new_dir_mode()) == (0o644, 0o755)
    new = tmp_path / "caption.txt"
    write_text_atomic(new, "a red circle\n")
    assert mode(new) == 0o644

    kept = tmp_path / "mine.txt"
    kept.write_text("old")
    os.chmod(kept, 0o640)
    write_text_atomic(kept, "new")
    assert kept.read_text() == "new" and mode(kept) == 0o640

    with atomic_path(tmp_path / "image.png") as tmp:
        Image.new("RGB", (8, 8)).save(tmp, format="PNG")
    assert mode(tmp_path / "image.png") == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["caption.txt", "image.png", "mine.txt"]


def test_a_private_umask_is_honoured_too(tmp_path):
    before = os.umask(0o077)
    try:
        write_text_atomic(tmp_path / "x.txt", "x")
        assert mode(tmp_path / "x.txt") == 0o600 and new_dir_mode() == 0o700
    finally:
        os.umask(before)
