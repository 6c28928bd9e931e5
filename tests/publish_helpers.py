"""Shared pieces of the publishing tests: a fake token that must never leak, and run-folder helpers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from lora_trainer.cli import main

FAKE_TOKEN = "hf_FakeTokenForTests0123456789abcdefXYZ"


@pytest.fixture()
def fake_token(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # never the developer's saved login
    return FAKE_TOKEN


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n", 2)[1])


def all_bytes(folder: Path) -> list[tuple[Path, bytes]]:
    return [(p, p.read_bytes()) for p in folder.rglob("*") if p.is_file()]


def copy_run(trained, dst: Path, drop: tuple[str, ...] = ()) -> Path:
    shutil.copytree(trained.output_dir, dst, ignore=shutil.ignore_patterns("hub-repo", "checkpoints", "logs"))
    for name in drop:
        (dst / name).unlink()
    return dst


def publish_dry(run_dir: Path, out: Path, *extra: str) -> int:
    return main(["publish", str(run_dir), "--hub", "alice/geoshape", "--dry-run", "--out", str(out), *extra])
