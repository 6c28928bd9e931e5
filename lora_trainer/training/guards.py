"""Guards that stop a run early and clearly instead of wasting hours or overwriting work."""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import signal
import threading
from pathlib import Path

import torch

from ..config import OutputConfig, RunConfig, TrainConfig
from ..errors import ConfigError, LoraTrainerError
from ..fileio import unwritable_reason
from ..interrupts import CtrlC, note_ctrl_c
from ..run_folder import EMBEDDINGS_DIR, read_saved_config, saved_text


class TrainingStopped(LoraTrainerError):
    """The run cannot go on (non-finite loss, full disk); the message says where it stopped."""


class RunInterrupted(LoraTrainerError):
    """Stopped by the user (Ctrl-C or SIGTERM) after saving a checkpoint; the message says how to continue."""

    label, exit_code = "stopped", 130

    def __init__(self, step: int, checkpoint: Path | None):
        self.step, self.checkpoint = step, checkpoint
        if checkpoint is None:
            super().__init__("interrupted before the first step finished; nothing saved, run the same command again")
        else:
            super().__init__(f"interrupted at step {step}; saved {checkpoint}; continue with train.resume=latest "
                             "(same config and output.dir)")


class StopSignals:
    """Ctrl-C (SIGINT) and SIGTERM (`kill`, a job scheduler's time limit, `docker stop`) stop a run
    the same way: KeyboardInterrupt, which the loop turns into a checkpoint of the last finished
    step. The signal is also remembered, because Python drops an exception raised while a
    finalizer runs (torch frees tensors through weakref callbacks, so a Ctrl-C often lands in
    one): `check()`, called at every batch, raises it again, so no stop request is lost.

    With several processes the signal reaches each at a different moment, one maybe inside a
    collective (the gradients' all-reduce, a checkpoint's barriers) while another would already
    leave it to save: a hang (the launcher kills them after its grace time, with no new checkpoint)
    or a save the processes do not make together. There the loop calls `defer()`: the signal is
    only noted, each process shares `flag()` with every batch's loss (a gather the loop does
    anyway), and all stop at the same batch once any of them has one."""

    def __init__(self):
        self.received: int | None = None
        self.deferred = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig, defaults in ((signal.SIGINT, (signal.default_int_handler, note_ctrl_c)),
                                  (signal.SIGTERM, (signal.SIG_DFL,))):
                if signal.getsignal(sig) in defaults:  # a handler set elsewhere, or an ignored signal, stays
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def defer(self) -> None:
        """From here on a signal is only noted, for the loop to act on at a batch all processes agree on."""
        self.deferred = True

    def _handle(self, signum, frame) -> None:
        self.received = signum
        CtrlC.seen = True
        if not self.deferred:
            raise KeyboardInterrupt

    def check(self) -> None:
        if self.received is not None and not self.deferred:
            raise KeyboardInterrupt

    def flag(self, device) -> torch.Tensor:
        """1.0 when this process was asked to stop and deferred it, else 0.0: gathered with the batch's
        loss (not deferred, the signal raised at once, or raises at the next `check()`)."""
        return torch.tensor(float(self.deferred and self.received is not None), device=device)

    def gather_losses(self, accelerator, loss: torch.Tensor) -> torch.Tensor:
        """Every process's `loss` of this batch, in process order, gathered with each one's `flag()`:
        KeyboardInterrupt on all processes at once when any of them was asked to stop."""
        shared = accelerator.gather(torch.stack([loss.detach().float().reshape(()), self.flag(loss.device)]))
        if shared[1::2].any():
            raise KeyboardInterrupt
        return shared[0::2]


RUN_ARTEFACTS = ("checkpoints", "samples", "train_log.jsonl", "loss.png", "finished.json")


def clear_previous_run(out_dir: Path, token: str | None = None, name: str | None = None) -> None:
    """Remove what an earlier run left in `out_dir` (its checkpoints, samples, log, curve, epoch
    and step adapters and embeddings) before a new run starts there, so nothing stale is mixed in or
    resumed from; only in a run folder. `token`: the new run's embedding.token; the old run's final
    embedding goes too unless it is that token's, which the new run writes again. `name`: the new
    run's output.name; so does the old run's final adapter, unless the new run writes it again."""
    from .epochs import epoch_files  # epochs checks free space with this module
    from .step_adapters import step_files

    out_dir = Path(out_dir)
    if not (out_dir / "config.yaml").is_file():
        return
    for artefact in RUN_ARTEFACTS:
        path = out_dir / artefact
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    saved = read_saved_config(out_dir / "config.yaml")
    old_name = saved_text(saved, "output", "name") or OutputConfig.name
    old_token = saved_text(saved, "embedding", "token")
    kept = [*epoch_files(out_dir, old_name).values(), *step_files(out_dir, old_name).values()]
    if old_name != name:  # under another name it would stay beside the new run's adapter as if it were one
        finals = (out_dir / f"{old_name}{tail}.safetensors" for tail in ("", ".diffusers"))
        kept.append([path for path in finals if path.is_file()])
    if old_token:  # embeddings/<token>-NNNNNN / -stepNNNNNNNN.safetensors: --compare would draw them as this run's
        where = out_dir / EMBEDDINGS_DIR
        kept += [*epoch_files(where, old_token).values(), *step_files(where, old_token).values()]
        if old_token != token and (where / f"{old_token}.safetensors").is_file():
            # another word's (or none): --compare would pair the new run's final adapter with it
            kept.append([where / f"{old_token}.safetensors"])
    for files in kept:
        for path in files:  # <name>-NNNNNN / <name>-stepNNNNNNNN.safetensors: the old run's kept adapters
            path.unlink()


def check_output_dir(out_dir: Path, overwrite: bool, resuming: bool, name: str = "") -> None:
    """Refuse to write into the folder of another run, or over files of the same names as the run's
    outputs (`name`: output.name) in a folder that holds no run, unless asked to."""
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise ConfigError(f"output.dir: {out_dir} is a file; give a folder for the run's outputs")
    if resuming or overwrite:
        return
    if (Path(out_dir) / "config.yaml").is_file() and _trained_anything(Path(out_dir)):
        raise ConfigError(
            f"output.dir: {out_dir} already holds a run (config.yaml); choose another output.dir, "
            "continue it with train.resume=latest, or replace it with output.overwrite=true"
        )
    if not (Path(out_dir) / "config.yaml").is_file():  # not a run folder: the user's own files may be there
        ours = [*RUN_ARTEFACTS, "captions.jsonl"] + ([f"{name}.safetensors", f"{name}.diffusers.safetensors"]
                                                     if name else [])
        taken = [n for n in ours if (Path(out_dir) / n).exists()]
        if taken:
            raise ConfigError(f"output.dir: {out_dir} already holds {', '.join(taken)}, which this run would replace; "
                              "choose another output.dir or output.name, or replace them with output.overwrite=true")


@contextlib.contextmanager
def record_taken_back(out_dir: Path):
    """Around the dataset scan and the checks after it: a run refused there (a trigger word no caption
    names, a missing validation folder) deletes the captions.jsonl the scan wrote into a folder that
    had none, since that file alone would make check_output_dir refuse the same command, fixed."""
    record = Path(out_dir) / "captions.jsonl"
    existed = record.exists()
    try:
        yield
    except LoraTrainerError:
        if not existed:
            record.unlink(missing_ok=True)
        raise


def _trained_anything(out_dir: Path) -> bool:
    """Whether the run in `out_dir` left a checkpoint, a log line, samples or an adapter. One stopped
    before its first step (Ctrl-C while class images were drawn) leaves only its config and
    captions.jsonl, which the next run rewrites: its own message says to run the same command again."""
    checkpoints = out_dir / "checkpoints"
    return ((checkpoints.is_dir() and any(checkpoints.iterdir())) or (out_dir / "train_log.jsonl").exists()
            or (out_dir / "samples").exists() or any(out_dir.glob("*.safetensors")))


def check_writable(folder: Path, key: str, what: str = "", other: str = "") -> None:
    """Fail before any model loads when `folder` cannot be written to: a read-only or foreign folder
    would otherwise stop the run at its first save or cache write. A missing folder is not made
    here: its nearest existing parent is tried, where it will be made. `what`: what would be
    written there; `other`: another way out, for the message."""
    reason = unwritable_reason(folder)
    if reason:
        raise ConfigError(f"{key}: cannot write {what + ' ' if what else ''}in {folder} ({reason}); "
                          f"set {key} to a folder you can write to{other}")


def check_writable_folders(cfg: RunConfig) -> None:
    """output.dir, the latent disk cache (by default inside the dataset, which may be read-only),
    and the DreamBooth class folder when class images are still to be generated into it (a
    read-only one that already holds them all is only read)."""
    from .caches import latent_cache_dir
    from .prior import existing_class_images

    check_writable(Path(cfg.output.dir), "output.dir")
    if cfg.train.cache_latents_to_disk:
        check_writable(latent_cache_dir(cfg), "train.cache_dir")
    if cfg.prior_preservation:
        folder, wanted = Path(cfg.dreambooth.class_data), cfg.dreambooth.num_class_images
        missing = wanted - len(existing_class_images(folder))
        if missing > 0:  # generated after the base model loads: asked here, not at the first image
            check_writable(folder, "dreambooth.class_data", f"the {missing} missing class images",
                           f", or put {wanted} class images in it")


# What a resumed run may change and still continue the same run: its length, logging and outputs.
_RESUME_MAY_CHANGE = {"train.max_steps", "train.epochs", "train.resume", "train.log_every_n_steps",
                      "train.validate_every_n_steps", "data.num_workers",
                      "train.ema_device"}  # where the EMA is kept, not what it averages


_LENGTH = ("train.max_steps", "train.epochs")
_FLAT_SCHEDULES = ("constant", "constant_with_warmup")  # their rate after warmup does not depend on the length


def warn_resume_changes(saved_config: Path, cfg: RunConfig, checkpoint: Path) -> None:
    """One warning naming the training keys (model, data, dreambooth, lora, train) whose value
    differs from the run folder's config.yaml, the config of the run being resumed; and one when a
    new length reshapes a decaying lr schedule."""
    changed = resume_changes(saved_config, cfg)
    warn = logging.getLogger(__name__).warning
    if changed:
        warn("train.resume: %s continues with a config changed in %s; the result is no longer the run that saved "
             "it (resume with its config.yaml to continue it exactly)", checkpoint, ", ".join(changed))
    longer = resume_changes(saved_config, cfg, keys=_LENGTH)
    if longer and cfg.train.scheduler not in _FLAT_SCHEDULES:
        # The schedule is a function of the step and the run's length, rebuilt from the config: the
        # checkpoint keeps only the step, so the rates from there on are the new length's.
        warn("train.resume: %s continues with %s; the %s lr schedule now spans the new length, so the steps after "
             "the checkpoint take the new schedule's rates at those steps, not the old curve's (the rate jumps "
             "there; train.scheduler=constant or constant_with_warmup has no such jump)", checkpoint,
             ", ".join(longer), cfg.train.scheduler)


def resume_changes(saved_config: Path, cfg: RunConfig, keys: tuple[str, ...] = ()) -> list[str]:
    """The changed training keys as "key (old -> new)", or those of `keys` only; none when
    config.yaml cannot be read."""
    import yaml

    try:
        old = yaml.safe_load(Path(saved_config).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return []

    def flat(node, prefix=""):
        if isinstance(node, dict):
            return {k: v for key, value in node.items() for k, v in flat(value, f"{prefix}{key}.").items()}
        return {prefix.rstrip("."): node}

    def compared(key: str) -> bool:
        if keys:
            return key in keys
        return key.split(".")[0] in ("model", "data", "dreambooth", "lora", "train") and key not in _RESUME_MAY_CHANGE

    before, now = flat(old), flat(cfg.to_dict())
    return [f"{key} ({before[key]!r} -> {value!r})" for key, value in now.items()
            if compared(key) and key in before and before[key] != value]


def check_finite(loss: float, step: int, last_checkpoint: Path | None) -> None:
    if math.isfinite(loss):
        return
    kept = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was saved yet"
    raise TrainingStopped(
        f"loss became {loss} at step {step}; stopped without saving it ({kept}); "
        "lower train.lr, use train.mixed_precision=bf16 instead of fp16, or raise train.max_grad_norm clipping"
    )


def check_free_space(folder: Path, needed_bytes: int, what: str) -> None:
    """Fail before writing `what` when the disk under `folder` has less than twice what it needs."""
    folder = Path(folder)
    probe = folder if folder.exists() else next((p for p in folder.parents if p.exists()), Path("."))
    free = shutil.disk_usage(probe).free
    if free < 2 * needed_bytes:
        raise TrainingStopped(
            f"{folder}: only {_size(free)} free, {what} needs about {_size(needed_bytes)}; "
            "free some space or set output.dir elsewhere"
        )


def _size(n: int) -> str:
    """Bytes for a message: small adapters and nearly full disks are not "0 MiB"."""
    if n >= 10 * 2**20:
        return f"{n / 2**20:.0f} MiB"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def check_environment(cfg: RunConfig) -> None:
    """Settings this machine cannot honour fail here, before any data or model is read."""
    import importlib.util

    from ..processes import check_launch_mode
    from .optimizers import check_optimizer

    check_launch_mode()
    if cfg.train.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.mixed_precision: got 'fp16', which needs a GPU; on CPU use 'bf16' or 'no'")
    check_optimizer(cfg.train)
    if cfg.data.caption.method == "wd14":
        from ..data.wd14 import check_onnxruntime

        check_onnxruntime()
    for key, on, module, extra in (("log.tensorboard", cfg.log.tensorboard, "tensorboard", "tensorboard"),
                                   ("log.wandb", cfg.log.wandb, "wandb", "wandb")):
        if on and importlib.util.find_spec(module) is None:
            raise ConfigError(f"{key}: true needs the {module} package; pip install 'lora-trainer[{extra}]' "
                              f"or set {key}=false")


def check_schedule_options(t: TrainConfig, scheduler) -> None:
    """The options that depend on the base's noise schedule: the timestep range within its length,
    and kohya's v-prediction options against its prediction type (kohya refuses the same)."""
    total = scheduler.config.num_train_timesteps
    if (t.max_timestep or 0) > total or t.min_timestep >= (t.max_timestep or total):
        key = "max_timestep" if t.max_timestep else "min_timestep"
        raise ConfigError(f"train.{key}: got {getattr(t, key)}; the base's schedule has {total} timesteps, "
                          f"and training draws from [train.min_timestep, train.max_timestep) within them")
    v_base = scheduler.config.prediction_type == "v_prediction"
    if t.scale_v_pred_loss_like_noise_pred and not v_base:
        raise ConfigError("train.scale_v_pred_loss_like_noise_pred: got True, but the base predicts "
                          f"{scheduler.config.prediction_type}; it rescales a v-prediction loss, so leave it false "
                          "(for an epsilon base see train.v_pred_like_loss)")
    if t.v_pred_like_loss is not None and v_base:
        raise ConfigError(f"train.v_pred_like_loss: got {t.v_pred_like_loss!r}, but the base predicts v already; "
                          "leave it null (for a v-prediction base see train.scale_v_pred_loss_like_noise_pred)")
