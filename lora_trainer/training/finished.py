"""The record of a run that ran to its end (`OUT/finished.json`), and what `train.resume: latest`
does with it: nothing when the run is as long as the config asks, train on when the config asks
for more.

Checkpoints alone cannot tell: the last one is usually a few steps before the end (none is saved at
the last step, whose state is the final adapter), so a finished run looked like one to continue
from there, and rerunning the command trained those steps again and rewrote the final adapter.
The record is written atomically after the final adapter, so it exists only for a complete run.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..config import RunConfig
from ..errors import ConfigError
from ..fileio import write_text_atomic
from ..run_folder import EMBEDDINGS_DIR

log = logging.getLogger(__name__)

FINISHED_FILE = "finished.json"


@dataclass
class FinishedRun:
    step: int  # the last optimizer step: the final adapter's
    epochs: int  # epochs of that run (the last may be partial when max_steps ended inside it)
    updates_per_epoch: int  # steps an epoch took (with that run's data, batch and processes)
    adapters: list[str] = field(default_factory=list)  # the final adapter files, relative to output.dir


def write_finished(out_dir: Path, run: FinishedRun) -> None:
    write_text_atomic(Path(out_dir) / FINISHED_FILE, json.dumps(asdict(run), indent=1) + "\n")


def run_files(paths: list[Path], words=None) -> list[str]:
    """finished.json's "adapters": the adapter files, relative to `out_dir`; with no LoRA (an embedding
    alone: textual inversion) the embedding file, embeddings/<token>.safetensors."""
    if paths or words is None:
        return [Path(p).name for p in paths]
    return [f"{EMBEDDINGS_DIR}/{words.token}.safetensors"]


def read_finished(out_dir: Path) -> FinishedRun | None:
    """The record of the finished run in `out_dir`; None when there is none, it cannot be read, or
    its adapter is gone (then the run is made again from its newest checkpoint, as before)."""
    path = Path(out_dir) / FINISHED_FILE
    try:
        run = FinishedRun(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        run = None
    # an edited or foreign record ("step": "400") would stop the comparison below with a TypeError
    if run is not None and not (all(type(v) is int for v in (run.step, run.epochs, run.updates_per_epoch))
                                and isinstance(run.adapters, list) and all(isinstance(a, str) for a in run.adapters)):
        run = None
    if run is None:
        if path.exists():
            log.warning("%s cannot be read as the record of a finished run; it is ignored (the run is made again "
                        "from its newest checkpoint)", path)
        return None
    if not run.adapters or not all((Path(out_dir) / name).is_file() for name in run.adapters):
        return None
    return run


def target_steps(cfg: RunConfig, run: FinishedRun) -> int:
    """The length `cfg` asks for, in steps. train.epochs is counted in the finished run's epochs
    (the data is not scanned for this: nothing is read before the answer may be "nothing to do")."""
    t = cfg.train
    return t.max_steps if t.max_steps is not None else t.epochs * run.updates_per_epoch


def message(out_dir: Path, run: FinishedRun, cfg: RunConfig | None = None) -> str:
    """The "nothing to do" line; it names the training keys `cfg` changed since that run, which a
    job script passing train.resume=latest every time would otherwise drop without a word."""
    from .guards import resume_changes

    adapters = ", ".join(str(Path(out_dir) / name) for name in run.adapters)
    kind = "embedding" if run.adapters and all(n.startswith(f"{EMBEDDINGS_DIR}/") for n in run.adapters) else "adapter"
    text = (f"{out_dir}: already finished at step {run.step}, {kind} at {adapters}; nothing to do "
            "(raise train.max_steps / train.epochs to train on)")
    changed = resume_changes(Path(out_dir) / "config.yaml", cfg) if cfg is not None else []
    # the saved config holds the variant and native size the base resolved "auto"/null to; no base is read here
    changed = [c for c in changed if not (c.startswith(("model.variant (", "data.resolution ("))
                                          and c.endswith(("-> 'auto')", "-> None)")))]
    if changed:
        text += (f"; the config changed {', '.join(changed)} since that run, which a finished run does not take: "
                 "to train with them, give a new output.dir, or output.overwrite=true without train.resume to "
                 "train it again from step 0")
    return text


def already_finished(cfg: RunConfig, out_dir: Path, has_checkpoint: bool) -> FinishedRun | None:
    """With train.resume=latest: the finished run in `out_dir` when it already ran to the length
    `cfg` asks for (None: train). A longer run continues from the newest checkpoint; one with no
    checkpoint cannot, and starts again from step 0 only with output.overwrite=true."""
    run = read_finished(out_dir)
    if run is None:
        return None
    target = target_steps(cfg, run)
    if target <= run.step:
        return run
    if not has_checkpoint and not cfg.output.overwrite:
        every = cfg.output.save_every_n_steps  # a run's last step writes the adapter, never a checkpoint
        why = (f"checkpoints/ holds none: output.save_every_n_steps={every} saves before the last step only"
               if every else "output.save_every_n_steps was off")
        raise ConfigError(f"train.resume: the run in {out_dir} finished at step {run.step} and saved no checkpoint to "
                          f"continue from to step {target} ({why}); train it again from "
                          "step 0 with output.overwrite=true (its adapter is replaced), or start a new output.dir "
                          f"with lora.init_from={Path(out_dir) / run.adapters[0]}")
    return None
