"""kohya's sampling and output arguments (sample prompts and cadence, output folder and name, save
precision, adapter files per N steps or epochs, logging) as `sample.*`, `output.*` and `log.*` keys."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError
from .options import read_sample_prompts, set_key

if TYPE_CHECKING:
    from .mapping import Args

SAVE_PRECISIONS = {"float": "fp32", "fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}
# kohya's --sample_sampler choices -> sample.scheduler (infer.py's --scheduler names). Where ours is only
# the nearest, the note says why; None: nothing here is near, the default (DPM++ 2M) is kept.
KOHYA_SAMPLERS: dict[str, tuple[str | None, str]] = {
    "ddim": ("ddim", ""), "pndm": ("pndm", ""), "euler": ("euler", ""), "k_euler": ("euler", ""),
    "euler_a": ("euler_a", ""), "k_euler_a": ("euler_a", ""), "heun": ("heun", ""), "dpmsolver++": ("dpm++_2m", ""),
    "dpmsolver": ("dpm++_2m", "DPM-Solver++ 2M, the nearest (kohya's is the first DPM-Solver multistep)"),
    "dpmsingle": ("dpm++_2m", "DPM-Solver++ 2M, the nearest (kohya's is its single-step form)"),
    "dpm_2": ("heun", "Heun, the nearest (also a second-order sampler, two model calls a step)"),
    "k_dpm_2": ("heun", "Heun, the nearest (also a second-order sampler, two model calls a step)"),
    "dpm_2_a": ("euler_a", "Euler a, the nearest ancestral sampler (fresh noise every step)"),
    "k_dpm_2_a": ("euler_a", "Euler a, the nearest ancestral sampler (fresh noise every step)"),
    "lms": (None, "no LMS sampler here; samples use DPM++ 2M (set sample.scheduler to choose another)"),
    "k_lms": (None, "no LMS sampler here; samples use DPM++ 2M (set sample.scheduler to choose another)"),
}


def sample_options(a: "Args", cfg: dict, notes: list[str], base_dir: Path) -> None:
    """--sample_prompts (a file, looked up from the current folder, then `base_dir`) and the sampling cadence."""
    if a.has("sample_prompts"):
        name = a.str("sample_prompts")
        path = next((p for p in (Path(name), base_dir / name) if p.is_file()), None)
        if path is None:
            notes.append(f"--sample_prompts {name}: file not found; copy its lines into sample.prompts")
        else:
            set_key(cfg, "sample.prompts", read_sample_prompts(path, notes))
    for kohya, ours in (("sample_every_n_steps", "sample.every_n_steps"),
                        ("sample_every_n_epochs", "sample.every_n_epochs")):
        if a.has(kohya):
            if a.int(kohya) and not a.has("sample_prompts"):  # kohya draws nothing without prompts either
                notes.append(f"{a.name(kohya)} {a.int(kohya)}: no --sample_prompts, so nothing is drawn until "
                             "sample.prompts is set")
            set_key(cfg, ours, a.int(kohya))
    if a.has("sample_at_first"):
        set_key(cfg, "sample.at_start", a.bool("sample_at_first"))
    if a.has("sample_sampler"):
        _sampler(a.str("sample_sampler"), cfg, notes)


def _sampler(name: str, cfg: dict, notes: list[str]) -> None:
    """kohya's --sample_sampler as sample.scheduler: the same sampler, or the nearest with a note."""
    if name.lower() not in KOHYA_SAMPLERS:
        raise ConfigError(f"--sample_sampler: {name!r} is not one of kohya's samplers ({', '.join(KOHYA_SAMPLERS)})")
    ours, why = KOHYA_SAMPLERS[name.lower()]
    if ours is not None:
        set_key(cfg, "sample.scheduler", ours)
    if why:
        notes.append(f"--sample_sampler {name}: " + (f"sample.scheduler {ours}: {why}" if ours else why))


def _step_saves(a: "Args", cfg: dict, notes: list[str]) -> None:
    """kohya's adapter file every n steps, kept: our checkpoint every n steps with its adapter kept
    beside the final one. --save_last_n_steps is a span of steps in kohya (files older than the
    current step minus it are removed), which is a number of files here."""
    every = a.int("save_every_n_steps") or 0
    if every:
        set_key(cfg, "output.save_every_n_steps", every)
        set_key(cfg, "output.save_step_adapters", True)
    span = a.int("save_last_n_steps") or 0
    if span and every:
        set_key(cfg, "output.save_last_n_step_adapters", span // every + 1)
    elif span:
        notes.append(f"--save_last_n_steps {span}: no step files are saved (no --save_every_n_steps); left out")


def _epoch_saves(a: "Args", cfg: dict, notes: list[str]) -> None:
    """An adapter file every n epochs, the newest kept. kohya's save_n_epoch_ratio (that many files
    over the run) wins over save_every_n_epochs, as in kohya, when the epochs are known."""
    every = a.int("save_every_n_epochs") or 0
    ratio = a.int("save_n_epoch_ratio") or 0
    if ratio and cfg["train"].get("epochs"):
        every = cfg["train"]["epochs"] // ratio or 1
    elif ratio:
        a.used.discard("save_n_epoch_ratio")  # noted with the other leftovers: the epochs come from the steps
    if every:
        set_key(cfg, "output.save_every_n_epochs", every)
    keep = a.int("save_last_n_epochs") or 0
    if keep and every:
        set_key(cfg, "output.save_last_n_epochs", keep)
    elif keep:
        notes.append(f"--save_last_n_epochs {keep}: no epoch files are saved (no --save_every_n_epochs); left out")


def output_options(a: "Args", cfg: dict, notes: list[str]) -> None:
    """The output folder, name and precision, the adapter files per N steps / epochs, and logging."""
    if a.has("output_dir"):
        set_key(cfg, "output.dir", a.str("output_dir"))
    if a.has("output_name"):
        set_key(cfg, "output.name", a.str("output_name"))
    precision = a.str("save_precision")
    if precision is not None:
        if precision not in SAVE_PRECISIONS:
            raise ConfigError(f"--save_precision: {precision!r}; expected float, fp16 or bf16")
        set_key(cfg, "output.dtype", SAVE_PRECISIONS[precision])
    _step_saves(a, cfg, notes)
    _epoch_saves(a, cfg, notes)
    model_as = a.str("save_model_as")
    if model_as not in (None, "safetensors"):
        notes.append(f"--save_model_as {model_as}: adapters are written as .safetensors (kohya layout)")
    if a.has("resume"):
        notes.append(f"--resume {a.get('resume')}: a kohya state folder cannot be resumed here; start a new run, "
                     "or continue from its adapter with lora.init_from=FILE.safetensors (the optimizer starts afresh)")
    log_with = (a.str("log_with") or "").lower()
    if a.has("logging_dir"):
        notes.append(f"--logging_dir {a.get('logging_dir')}: logs go to output.dir/logs")
        log_with = log_with or "tensorboard"  # kohya logs to tensorboard when only a folder is given
    if log_with in ("tensorboard", "all"):
        set_key(cfg, "log.tensorboard", True)
    if log_with in ("wandb", "all"):
        set_key(cfg, "log.wandb", True)
    if log_with and log_with not in ("tensorboard", "wandb", "all"):
        notes.append(f"--log_with {log_with}: not supported (tensorboard, wandb); left out")
    if a.has("log_tracker_name"):
        set_key(cfg, "log.project", a.str("log_tracker_name"))
    if a.has("wandb_api_key"):
        a.get("wandb_api_key")
        notes.append("--wandb_api_key: not copied into the config; set WANDB_API_KEY in the environment")
