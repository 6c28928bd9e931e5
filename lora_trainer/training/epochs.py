"""What a run leaves at the end of an epoch (kohya's --save_every_n_epochs, --save_last_n_epochs,
--sample_every_n_epochs): the adapter of every n-th epoch beside the final one, the newest few kept,
and sample images.

Epoch files are adapters only (no optimizer state: resuming is what checkpoints are for), named as
kohya names them, `<name>-<epoch:06d>.safetensors` (epochs counted from 1), and with `output.format:
both` the diffusers layout as `<name>-<epoch:06d>.diffusers.safetensors`. Nothing is written after
the last epoch: that adapter is the final `<name>.safetensors`.

They are written right after the epoch's last update, before a checkpoint of the same step, so a
checkpoint always comes after the epoch files before it: a resumed run neither redoes nor misses one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..run_folder import EMBEDDINGS_DIR
from .guards import check_free_space
from .numbered import EPOCHS, numbered_files, remove_older

log = logging.getLogger(__name__)


def epoch_suffix(epoch: int) -> str:
    """What follows the adapter's name in an epoch file: "-000002"."""
    return f"-{epoch:06d}"


def epoch_files(out_dir: Path, name: str) -> dict[int, list[Path]]:
    """{epoch: its files (one per layout)} of the epoch adapters named `name` in `out_dir`."""
    return numbered_files(out_dir, name, *EPOCHS)


def remove_old_epochs(out_dir: Path, name: str, keep: int, current: int) -> list[Path]:
    """Keep the files of the newest `keep` epochs up to `current` (0 keeps all); return those removed."""
    return remove_older(epoch_files(out_dir, name), keep, current)


def due(every: int, epoch: int, step: int, max_steps: int) -> bool:
    """Whether epoch `epoch` (counted from 1), ended at `step`, gets its files: every n-th one,
    except at the run's last step."""
    return every > 0 and epoch % every == 0 and step < max_steps


@dataclass
class EpochEnds:
    """Called by the loop after the last update of each epoch. `export(epoch, step)` writes the
    adapter with its epoch suffix and returns the paths (main process; [] elsewhere); `sample(epoch,
    step)` draws the samples into samples/epoch_XXXXXX/."""

    out_dir: Path
    name: str
    save_every: int
    keep: int
    sample_every: int
    max_steps: int
    is_main: bool
    export: Callable[[int, int], list[Path]]
    sample: Callable[[int, int], None]
    adapter_bytes: int = 0  # free space checked before each file
    token: str | None = None  # embedding.token: its epoch files in OUT/embeddings rotate with the adapter's

    @classmethod
    def for_run(cls, cfg, out_dir: Path, max_steps: int, is_main: bool, adapter_bytes: int,
                export: Callable[[int, int], list[Path]], sample: Callable[[int, int], None]) -> "EpochEnds":
        o = cfg.output
        return cls(Path(out_dir), o.name, o.save_every_n_epochs, o.save_last_n_epochs, cfg.sample.every_n_epochs,
                   max_steps, is_main, export, sample, adapter_bytes, cfg.embedding.token)

    def __call__(self, epoch: int, step: int) -> None:
        if due(self.save_every, epoch, step, self.max_steps):
            self._save(epoch, step)
        if due(self.sample_every, epoch, step, self.max_steps):
            self.sample(epoch, step)

    def catch_up(self, epoch: int, step: int) -> None:
        """A run resumed from a checkpoint taken at the end of epoch `epoch` (Ctrl-C can land
        between the update and the epoch's files): write its adapter if it is due and missing."""
        if due(self.save_every, epoch, step, self.max_steps) and epoch not in epoch_files(self.out_dir, self.name):
            self._save(epoch, step)

    def _save(self, epoch: int, step: int) -> None:
        if self.is_main:
            check_free_space(self.out_dir, self.adapter_bytes, f"the adapter of epoch {epoch}")
        self.export(epoch, step)
        if self.is_main:
            removed = remove_old_epochs(self.out_dir, self.name, self.keep, epoch)
            if self.token is not None:
                removed += remove_old_epochs(self.out_dir / EMBEDDINGS_DIR, self.token, self.keep, epoch)
            for path in removed:
                log.info("removed %s (output.save_last_n_epochs=%d)", path.name, self.keep)
