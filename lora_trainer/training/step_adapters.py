"""Adapters kept per N steps (kohya's --save_every_n_steps / --save_last_n_steps): with
`output.save_step_adapters`, each scheduled checkpoint's adapter is also kept beside the final one as
`<name>-step<step:08d>.safetensors` (kohya's naming; `<name>-step<step:08d>.diffusers.safetensors` for
the diffusers layout of `output.format: both`), and stays when its checkpoint rotates out.

The files are copies of the adapter the checkpoint exported (same bytes, same metadata), made before
the checkpoint is published, so a run resumed from a checkpoint already has that step's files and
never writes them again.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from ..fileio import atomic_path
from ..run_folder import EMBEDDINGS_DIR
from .numbered import STEPS, numbered_files, remove_older

log = logging.getLogger(__name__)


def step_suffix(step: int) -> str:
    """What follows the adapter's name in a kept step file: "-step00000100"."""
    return f"-step{step:08d}"


def step_files(out_dir: Path, name: str) -> dict[int, list[Path]]:
    """{step: its files (one per layout)} of the step adapters named `name` in `out_dir`."""
    return numbered_files(out_dir, name, *STEPS)


def keep_step_adapters(exported: list[Path], exported_suffix: str, out_dir: Path, output, step: int,
                       token: str | None = None, folder: Path | None = None) -> list[Path]:
    """Copy a checkpoint's exported files (named `<name><exported_suffix>...`) into `out_dir` under
    the kept name, each atomically, then remove the step files beyond `output.save_last_n_step_adapters`;
    return the new paths. `output` is the run's OutputConfig. `token` (embedding.token): the trained
    embedding in `folder` (the checkpoint's) too, as embeddings/<token>-step<step:08d>.safetensors."""
    name, kept = output.name, []
    copies = [(Path(source), Path(out_dir) / f"{name}{step_suffix(step)}{Path(source).name[len(name + exported_suffix):]}",
               "adapter") for source in exported]  # the tail: ".safetensors" or ".diffusers.safetensors"
    if token is not None and folder is not None:
        embeddings = Path(folder) / EMBEDDINGS_DIR
        copies.append((embeddings / f"{token}{exported_suffix}.safetensors",
                       Path(out_dir) / EMBEDDINGS_DIR / f"{token}{step_suffix(step)}.safetensors", "embedding"))
    for source, target, kind in copies:
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)
        log.info("kept the %s of step %d: %s", kind, step, target)
        kept.append(target)
    keep = output.save_last_n_step_adapters
    removed = remove_old_step_adapters(out_dir, name, keep, step)
    if token is not None:
        removed += remove_old_step_adapters(Path(out_dir) / EMBEDDINGS_DIR, token, keep, step)
    for path in removed:
        log.info("removed %s (output.save_last_n_step_adapters=%d)", path.name, keep)
    return kept


def remove_old_step_adapters(out_dir: Path, name: str, keep: int, current: int) -> list[Path]:
    """Keep the files of the newest `keep` steps up to `current` (0 keeps all); return those removed."""
    return remove_older(step_files(out_dir, name), keep, current)
