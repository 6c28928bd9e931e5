"""The accelerate side of a run: the Accelerator with its trackers (tensorboard, wandb), and the
per-step record that goes to OUT/train_log.jsonl, the trackers and, at the end, loss.png."""

from __future__ import annotations

import atexit
import json
import os
from pathlib import Path

import numpy as np

from ..config import RunConfig
from ..fileio import write_text_atomic
from ..processes import multiprocess_without_gpu

GROUP_NAMES = ("unet", "text_encoder", "text_encoder_2")


def tracker_config(cfg: RunConfig) -> dict:
    """The config flattened to scalar values, as trackers' hyperparameter tables want."""
    flat = {}
    for section, values in cfg.to_dict().items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def make_accelerator(cfg: RunConfig, out_dir: Path):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    trackers = [name for name, on in (("tensorboard", cfg.log.tensorboard), ("wandb", cfg.log.wandb)) if on]
    # A text encoder read below its last layer (clip skip; SDXL's first encoder always) leaves the
    # adapters of the layers above without gradients, which DDP refuses unless told to look for them.
    skips_layers = cfg.model.clip_skip > 1 or cfg.model.variant == "sdxl"
    unused = cfg.lora.train_text_encoder and skips_layers
    return Accelerator(
        cpu=multiprocess_without_gpu(),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)] if unused else None,
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.grad_accum,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(out_dir), logging_dir=str(out_dir / "logs")),
    )


def init_trackers(cfg: RunConfig, accelerator, out_dir: Path) -> None:
    if not (cfg.log.tensorboard or cfg.log.wandb):
        return
    wandb = {"name": cfg.output.name}
    if "WANDB_DIR" not in os.environ:  # the user's own wandb setting wins; else beside the tensorboard logs
        (out_dir / "logs").mkdir(parents=True, exist_ok=True)
        wandb["dir"] = str(out_dir / "logs")
    accelerator.init_trackers(cfg.log.project, config=tracker_config(cfg), init_kwargs={"wandb": wandb})


def end_run(accelerator) -> None:
    """accelerate's end_training without its destroying of the process group: the trackers are
    finished, and the group is left for the next run in these processes (a script or a notebook
    under notebook_launcher that trains twice) and destroyed when the process exits. gloo cannot
    always make a group again in the same processes (its peers reset the connection), and
    accelerate's next state joins the group that exists instead of making one."""
    import torch.distributed as dist

    for tracker in accelerator.trackers:
        tracker.finish()
    if dist.is_available() and dist.is_initialized():
        atexit.unregister(_destroy_process_group)  # once, however many runs the process trains
        atexit.register(_destroy_process_group)


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():  # the user's script may have destroyed it already
        dist.destroy_process_group()


def release_accelerate_state() -> None:
    # accelerate keeps process-wide singletons; drop them so a later run in the same process
    # (tests, notebooks) can choose other settings.
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def learning_rates(lr_scheduler, names: tuple[str, ...] | list[str] = GROUP_NAMES) -> dict[str, float]:
    """The current learning rate of each parameter group, named by the module it trains (`names`,
    one per group: LoRA+ adds a `<module>_plus` group after each)."""
    return {f"lr/{names[i]}": lr for i, lr in enumerate(lr_scheduler.get_last_lr())}


def write_record(accelerator, log_path: Path, record: dict) -> None:
    """One step: a line of train_log.jsonl and the scalars for the trackers (main process only)."""
    if not accelerator.is_main_process:
        return
    with log_path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
    accelerator.log({k: v for k, v in record.items() if k not in ("step", "epoch")}, step=record["step"])


def truncate_log(log_path: Path, step: int) -> None:
    """Drop the lines after `step` (written before a crash, redone after the resume)."""
    if not log_path.is_file():
        return
    kept = [line for line in log_path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line)["step"] <= step]
    write_text_atomic(log_path, "".join(line + "\n" for line in kept))


def log_images(accelerator, key: str, images: list, step: int) -> None:
    """Sample images to the trackers that take them."""
    if not images or not accelerator.is_main_process:
        return
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({key: np.stack([np.asarray(im) for im in images])}, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({key: images}, step)
