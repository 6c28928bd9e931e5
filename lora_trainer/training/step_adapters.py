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
import re
import shutil
from pathlib import Path

from ..fileio import atomic_path

log = logging.getLogger(__name__)


def step_suffix(step: int) -> str:
    """What follows the adapter's name in a kept step file: "-step00000100"."""
    return f"-step{step:08d}"


def step_files(out_dir: Path, name: str) -> dict[int, list[Path]]:
    """{step: its files (one per layout)} of the step adapters named `name` in `out_dir`."""
    pattern = re.compile(rf"{re.escape(name)}-step(\d{{8}})(\.diffusers)?\.safetensors")
    found: dict[int, list[Path]] = {}
    if Path(out_dir).is_dir():
        for path in sorted(Path(out_dir).iterdir()):
            match = pattern.fullmatch(path.name)
            if match and path.is_file():
                found.setdefault(int(match.group(1)), []).append(path)
    return found


def keep_step_adapters(exported: list[Path], exported_suffix: str, out_dir: Path, output, step: int) -> list[Path]:
    """Copy a checkpoint's exported files (named `<name><exported_suffix>...`) into `out_dir` under
    the kept name, each atomically, then remove the step files beyond `output.save_last_n_step_adapters`;
    return the new paths. `output` is the run's OutputConfig."""
    name, kept = output.name, []
    for source in exported:
        tail = Path(source).name[len(name + exported_suffix):]  # ".safetensors" or ".diffusers.safetensors"
        target = Path(out_dir) / f"{name}{step_suffix(step)}{tail}"
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)
        log.info("kept the adapter of step %d: %s", step, target)
        kept.append(target)
    for path in remove_old_step_adapters(out_dir, name, output.save_last_n_step_adapters, step):
        log.info("removed %s (output.save_last_n_step_adapters=%d)", path.name, output.save_last_n_step_adapters)
    return kept


def remove_old_step_adapters(out_dir: Path, name: str, keep: int, current: int) -> list[Path]:
    """Keep the files of the newest `keep` steps up to `current` (0 keeps all); return those removed.
    Files of later steps (left by a run that got further before it was resumed from an earlier
    checkpoint) are not counted: this run writes them again when it gets there."""
    if keep <= 0:
        return []
    found = step_files(out_dir, name)
    removed = []
    for step in sorted(s for s in found if s <= current)[:-keep]:
        for path in found[step]:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
