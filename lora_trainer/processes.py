"""What the process layout implies, shared by the stages that start accelerate (data preparation
and training) so both make the same choice."""

from __future__ import annotations

import logging
import os

import torch

from .errors import ConfigError

log = logging.getLogger(__name__)

# What `accelerate launch` sets for the sharding modes (its FSDP and DeepSpeed configs).
_SHARDED_LAUNCHES = (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"))


def multiprocess_without_gpu() -> bool:
    """Several processes (torchrun, `accelerate launch`) on a machine without CUDA: accelerate only
    picks its gloo CPU backend when told the run is on CPU, and the first state created fixes it."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def check_launch_mode() -> None:
    """Refuse FSDP and DeepSpeed launches in one line, before any data or model is read.

    Both shard or re-wrap the models, while the checkpoints and the exported adapter are read from
    each process's own, whole adapter weights; and a LoRA run has little to shard (the frozen base is
    held once in the compute precision, the trainable state is a few MB). Data parallel (DDP) with
    bf16 and gradient checkpointing is the way to run large bases on several GPUs."""
    if one_process_of_several():
        log.warning("accelerate launch was asked for several processes (--num_processes) but started one: "
                    "without GPUs (or with --cpu) it runs a single process; for several CPU processes launch "
                    "with `accelerate launch --multi_gpu --num_processes N` (gloo, no GPU needed) or "
                    "`torchrun --nproc_per_node N`")
    for variable, name in _SHARDED_LAUNCHES:
        if os.environ.get(variable, "").strip().lower() in ("1", "true", "yes"):
            raise ConfigError(f"accelerate launch: {name} is not supported for LoRA training; launch with "
                              "configs/accelerate/multi-gpu.yaml (DDP) and, for a large base, "
                              "train.mixed_precision=bf16 train.gradient_checkpointing=true")


def one_process_of_several() -> bool:
    """`accelerate launch --num_processes N` (N > 1) that started one process: its simple launcher,
    used without GPUs or with --cpu, sets ACCELERATE_USE_CPU and, for N > 1, MASTER_ADDR, but starts
    only this process (no WORLD_SIZE), unless mpirun started it."""
    env = os.environ
    return ("ACCELERATE_USE_CPU" in env and "MASTER_ADDR" in env and "WORLD_SIZE" not in env
            and "OMPI_COMM_WORLD_SIZE" not in env and "PMI_SIZE" not in env)


def check_device(device: str, flag: str = "--device") -> str:
    """`device` when torch can place tensors there, else a one-line ConfigError naming `flag`: a typo,
    or a GPU this machine (or this torch build) does not have."""
    try:
        where = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"{flag}: {device!r} is not a device; use cpu, cuda, cuda:N or mps") from None
    if where.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            build = "" if torch.backends.cuda.is_built() else f" (this torch {torch.__version__} is built without CUDA)"
            raise ConfigError(f"{flag}: {device!r} but no CUDA GPU is visible{build}; use {flag} cpu")
        if where.index is not None and where.index >= count:
            raise ConfigError(f"{flag}: {device!r} but only {count} CUDA GPU(s) are visible (cuda:0 to cuda:{count - 1})")
    elif where.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{flag}: 'mps' but Apple's Metal backend is not available here; use {flag} cpu")
    elif where.type not in ("cpu", "cuda", "mps", "xpu"):
        raise ConfigError(f"{flag}: {device!r} is not supported here; use cpu, cuda, cuda:N or mps")
    return device
