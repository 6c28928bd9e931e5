"""kohya's optimizer and learning-rate schedule arguments (--optimizer_type and the older
--use_8bit_adam / --use_lion_optimizer, --optimizer_args, --lr_scheduler and its options) as
`train.*` keys."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import ConfigError
from .options import KOHYA_DEFAULTS, parse_network_args, parse_number, set_key

if TYPE_CHECKING:
    from .mapping import Args

OPTIMIZERS = {"adamw": "adamw", "adamw8bit": "adamw8bit", "prodigy": "prodigy", "adafactor": "adafactor",
              "transformers.optimization.adafactor": "adafactor", "prodigyopt.prodigy": "prodigy",
              "lion": "lion", "lion8bit": "lion8bit", "lion_pytorch.lion": "lion", "bitsandbytes.optim.lion8bit": "lion8bit"}
# What kohya's Lion runs with when --optimizer_args leaves them out (the packages' own defaults),
# where ours (AdamW's) differ.
LION_DEFAULTS = {"train.adam_beta2": 0.99, "train.weight_decay": 0.0}
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


def scheduler_options(a: "Args", cfg: dict, notes: list[str]) -> None:
    """--lr_scheduler and its options; kohya's cosine_with_min_lr is our cosine with train.min_lr_ratio.
    An option the chosen schedule does not read is noted (kohya ignores it too) unless it is kohya's default."""
    scheduler = a.str("lr_scheduler")
    if scheduler == "cosine_with_min_lr":
        set_key(cfg, "train.scheduler", "cosine")
    elif scheduler in SCHEDULERS:
        set_key(cfg, "train.scheduler", scheduler)
    elif scheduler is not None:
        notes.append(f"--lr_scheduler {scheduler}: not supported (we have {', '.join(SCHEDULERS)}, "
                     "cosine_with_min_lr); constant is used")
    options = (("lr_scheduler_num_cycles", "train.scheduler_cycles", "int", ("cosine_with_restarts",)),
               ("lr_scheduler_power", "train.scheduler_power", "float", ("polynomial",)),
               ("lr_scheduler_min_lr_ratio", "train.min_lr_ratio", "float", ("cosine_with_min_lr",)))
    for kohya, ours, kind, readers in options:
        if not a.has(kohya):
            continue
        value = a.int(kohya) if kind == "int" else a.float(kohya)
        if scheduler in readers:
            if kohya == "lr_scheduler_min_lr_ratio" and not 0 <= value < 1:
                raise ConfigError(f"--{kohya}: {value!r}; expected a number in [0, 1)")
            set_key(cfg, ours, value)
        elif value != KOHYA_DEFAULTS.get(kohya):
            notes.append(f"--{kohya} {a.get(kohya)}: only --lr_scheduler {' or '.join(readers)} reads it "
                         f"(here {ours}); left out")
    if scheduler == "cosine_with_min_lr" and not cfg["train"].get("min_lr_ratio"):
        notes.append("--lr_scheduler cosine_with_min_lr without --lr_scheduler_min_lr_ratio: kohya needs the ratio; "
                     "plain cosine (down to 0) is used, set train.min_lr_ratio (e.g. 0.1)")


def optimizer_options(a: "Args", cfg: dict, notes: list[str]) -> None:
    name = a.str("optimizer_type", "")
    if a.bool("use_8bit_adam"):
        name = name or "AdamW8bit"
    if a.bool("use_lion_optimizer"):
        name = name or "Lion"
    if name:
        ours = OPTIMIZERS.get(name.lower())
        if ours is None:
            notes.append(f"--optimizer_type {name}: not supported (we have AdamW, AdamW8bit, Prodigy, Adafactor, "
                         "Lion, Lion8bit); AdamW is used, so check train.lr")
        else:
            set_key(cfg, "train.optimizer", ours)
            if ours.startswith("lion"):
                for key, value in LION_DEFAULTS.items():
                    set_key(cfg, key, value)  # --optimizer_args below win
    for key, value in parse_network_args(a.get("optimizer_args", [])):
        if key == "weight_decay":
            set_key(cfg, "train.weight_decay", parse_number(value, "--optimizer_args weight_decay"))
        elif key == "betas":
            betas = [parse_number(b, "--optimizer_args betas") for b in value.strip("()[] ").split(",") if b.strip()]
            if len(betas) != 2:
                raise ConfigError(f"--optimizer_args betas={value}: expected two numbers, e.g. betas=0.9,0.999")
            set_key(cfg, "train.adam_beta1", betas[0])
            set_key(cfg, "train.adam_beta2", betas[1])
        elif key == "eps":
            set_key(cfg, "train.adam_epsilon", parse_number(value, "--optimizer_args eps"))
        else:
            notes.append(f"--optimizer_args {key}={value}: not supported; the optimizer's default is used")
