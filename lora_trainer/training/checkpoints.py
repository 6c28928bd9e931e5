"""Checkpoints: the full training state (adapter, optimizer, scheduler, RNG of every process, data
position, step) saved through accelerate into a folder that appears only when complete.

A checkpoint is written to a hidden temporary folder and renamed into place, with the trainer
state file written last, so a run killed mid-save leaves the previous checkpoint as the latest
good one. Only the adapter weights are stored, not the frozen base; the folder also holds that
step's adapter exported as a usable .safetensors, so rotating a checkpoint out removes both.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import torch

from ..errors import ConfigError
from ..run_folder import EMBEDDINGS_DIR
from .numbered import unnumbered_name

STATE_FILE = "trainer_state.json"
ADAPTER_FILE = "adapter_state.pt"
_NAME = re.compile(r"^step-(\d+)$")


@dataclass
class TrainerState:
    step: int  # optimizer steps done
    epoch: int  # epoch in progress
    batches_in_epoch: int  # batches of that epoch already consumed (per process)
    class_epoch: int = 0  # DreamBooth class images: epoch of their own loader in progress
    class_batches: int = 0  # and batches of it consumed (per process)
    optimizer: str = ""  # train.optimizer that wrote its state ("" in checkpoints from before it was kept)
    embedding_token: str = ""  # embedding.token of the vectors it holds ("" without one, or from before it was kept)
    processes: int = 0  # how many processes trained it (0 in checkpoints from before it was kept)


def checkpoints_dir(out_dir: Path) -> Path:
    return Path(out_dir) / "checkpoints"


def _adapter_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def register_adapter_only_hooks(accelerator) -> None:
    """Make accelerate's save/load_state store just the trainable (adapter) weights of each
    prepared model, instead of the whole multi-GB base."""

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            states = [{k: v.detach().cpu().clone() for k, v in _adapter_params(accelerator.unwrap_model(m)).items()}
                      for m in models]
            torch.save(states, Path(output_dir) / ADAPTER_FILE)
        weights.clear()  # nothing else of the models is written

    def load_hook(models, input_dir):
        states = torch.load(Path(input_dir) / ADAPTER_FILE, map_location="cpu", weights_only=True)
        if len(states) != len(models):  # a component added or dropped (embedding.token, lora.train_*)
            raise ConfigError(f"train.resume: {input_dir} holds {len(states)} trained parts, this config trains "
                              f"{len(models)}; resume with the config that wrote it (lora.train_unet, "
                              "lora.train_text_encoder and embedding.token as they were)")
        for model, state in zip(models, states):
            params = _adapter_params(accelerator.unwrap_model(model))
            missing = set(params) ^ set(state)
            if missing:
                raise ConfigError(f"train.resume: {input_dir} holds a different adapter "
                                  f"({len(missing)} mismatched weights, e.g. {sorted(missing)[0]}); "
                                  "resume with the config that wrote it")
            resized = sorted(name for name, p in params.items() if p.shape != state[name].shape)
            if resized:  # same layers at another rank (lora.rank, conv_rank or block ranks changed)
                first = resized[0]
                raise ConfigError(f"train.resume: {input_dir} holds a different adapter ({len(resized)} weights of "
                                  f"another shape, e.g. {first}: {tuple(state[first].shape)} there, "
                                  f"{tuple(params[first].shape)} now); resume with the config that wrote it "
                                  "(lora.rank, lora.conv_rank and the block ranks as they were)")
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(state[name])
        models.clear()  # loaded here; accelerate must not try again

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def save_checkpoint(accelerator, out_dir: Path, state: TrainerState, keep: int,
                    export: Optional[Callable[[Path], object]] = None) -> Path:
    """Save the state as OUT/checkpoints/step-NNNNNN (all processes call this); keep the newest
    `keep` checkpoints (0 keeps all). `export(folder)` (main process) adds the usable adapter."""
    root = checkpoints_dir(out_dir)
    final = root / f"step-{state.step:06d}"
    tmp = root / f".step-{state.step:06d}.tmp"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if export is not None:
            export(tmp)
        _publish(tmp, final, replace(state, processes=accelerator.num_processes))
        _rotate(root, keep)
    accelerator.wait_for_everyone()
    return final


def _publish(tmp: Path, final: Path, state: TrainerState) -> None:
    """Mark the written folder complete and move it into place (a rename: all or nothing)."""
    (tmp / STATE_FILE).write_text(json.dumps(asdict(state)))  # written last
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def _complete(root: Path) -> list[Path]:
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / STATE_FILE).is_file()] \
        if root.is_dir() else []
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def _rotate(root: Path, keep: int) -> None:
    for stale in root.glob(".step-*.tmp"):  # left by a run killed while saving
        shutil.rmtree(stale, ignore_errors=True)
    if keep > 0:
        for old in _complete(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(out_dir: Path, resume: str) -> Path | None:
    """The checkpoint `train.resume` names: 'latest' (None when the run has none yet) or a path."""
    if resume == "latest":
        found = _complete(checkpoints_dir(out_dir))
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise ConfigError(f"train.resume: {resume!r} is not a complete checkpoint folder "
                          f"(no {STATE_FILE}); use 'latest' or a folder under {checkpoints_dir(out_dir)}")
    return path


def latest_checkpoint(out_dir: Path) -> Path | None:
    found = _complete(checkpoints_dir(out_dir))
    return found[-1] if found else None


def _saved_token(path: Path, state: TrainerState) -> str:
    """The embedding.token whose vectors the checkpoint at `path` holds: its state's, or for one
    written before that was kept, the name of the embedding file exported into it ("" if none)."""
    if state.embedding_token:
        return state.embedding_token
    names = [p.name for p in (Path(path) / EMBEDDINGS_DIR).glob("*.safetensors")]
    return unnumbered_name(names[0]) if len(names) == 1 else ""


def check_checkpoint_settings(path: Path, optimizer: str = "", token: str | None = None) -> TrainerState:
    """The state saved in `path`, refused in one line when `optimizer` (train.optimizer) is not the
    one that saved it (another optimizer's state would load without complaint and train wrongly), or
    `token` (embedding.token) not the word whose vectors it holds (they would go on training as
    this one). Reads no model: called before the run writes anything."""
    state = TrainerState(**json.loads((Path(path) / STATE_FILE).read_text()))
    if optimizer and state.optimizer and state.optimizer != optimizer:
        raise ConfigError(f"train.resume: {path} was saved by train.optimizer={state.optimizer}, not {optimizer}; "
                          f"resume with train.optimizer={state.optimizer}, or start a new run for {optimizer}")
    saved = _saved_token(path, state)
    if saved and not token:
        raise ConfigError(f"train.resume: {path} holds the vectors of embedding.token={saved}, which this config does "
                          "not train; resume with the config that wrote it (lora.train_unet, lora.train_text_encoder "
                          "and embedding.token as they were)")
    if token and saved and saved != token:
        raise ConfigError(f"train.resume: {path} holds the vectors of embedding.token={saved}, not {token}; resume "
                          f"with embedding.token={saved}, or start a new run (embedding.init_from can continue "
                          "its vectors under another word)")
    return state


def load_checkpoint(accelerator, path: Path, optimizer: str = "", token: str | None = None) -> TrainerState:
    """Restore the run state saved in `path`, checked as `check_checkpoint_settings` does."""
    state = check_checkpoint_settings(path, optimizer, token)
    try:
        accelerator.load_state(str(path))
    except ValueError as exc:  # torch's optimizer refuses another grouping of the parameters
        if "parameter group" not in str(exc):
            raise
        raise ConfigError(f"train.resume: {path} was saved with other optimizer groups ({exc}); resume with the "
                          "config that wrote it (train.loraplus_*, lora.train_unet and lora.train_text_encoder "
                          "as they were)") from None
    note = process_change(state, accelerator.num_processes)
    if note and accelerator.is_main_process:
        logging.getLogger(__name__).warning("train.resume: %s %s", path, note)
    return state


def process_change(state: TrainerState, processes: int) -> str:
    """What resuming `state` with another number of `processes` than trained it changes ("" when
    none or unknown): the checkpoint keeps each process's place in the epoch and the lr schedule's
    steps counted per process, both for the number that saved it."""
    if not state.processes or state.processes == processes:
        return ""
    return (f"was saved by {state.processes} process(es), and this run has {processes}: a step now takes "
            f"{processes}/{state.processes} as many images, the epoch in progress goes on from a place counted for "
            f"{state.processes} (some of its images may be seen twice or skipped) and a decaying lr schedule shifts; "
            f"resume with {state.processes} process(es) to continue exactly")
