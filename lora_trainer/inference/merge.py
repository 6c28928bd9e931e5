"""`lora-trainer merge`: fuse adapters at their weights into the base and save a plain model that
any diffusers user (or a later `--model`) loads without adapter support."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import ConfigError
from ..fileio import new_dir_mode, unwritable_reason
from .adapters import AdapterSpec, AdapterStack, check_adapter_file
from .pipelines import load_base


def merge_to_folder(model: str, loras: list[AdapterSpec], out: str | Path, *, single_file: bool = False,
                    overwrite: bool = False, dtype: torch.dtype = torch.float32, config_dir: str | None = None) -> Path:
    """Load `model`, fuse `loras` at their weights, drop the adapter layers and save the result as a
    diffusers folder at `out` (or, with `single_file`, one original-layout `.safetensors` checkpoint
    as A1111 and ComfyUI load). It appears complete or not at all (written beside it, renamed)."""
    out = Path(out)
    if single_file and out.suffix.lower() != ".safetensors":
        raise ConfigError(f"--out: {out} must be a .safetensors file name with --single-file")
    if not loras:
        raise ConfigError("merge: give at least one --lora FILE[:WEIGHT] to merge into the base")
    if single_file and out.is_dir():
        raise ConfigError(f"--out: {out} is a folder; give a .safetensors file name with --single-file")
    if not single_file and out.exists() and not out.is_dir():
        raise ConfigError(f"--out: {out} is a file; give a folder name for the merged model "
                          "(or --single-file to write one checkpoint file)")
    if out.exists() and (out.is_file() or any(out.iterdir())) and not overwrite:
        raise ConfigError(f"--out: {out} exists; choose a new name or pass --overwrite")
    unwritable = unwritable_reason(out.parent)
    if unwritable:
        raise ConfigError(f"--out: {out.parent} {unwritable}; give a place you can write to")
    for spec in loras:  # before the base loads
        check_adapter_file(spec.path)
    pipe, _ = load_base(model, "cpu", dtype, config_dir=config_dir)
    stack = AdapterStack(pipe)
    for spec in loras:
        stack.load(spec)
    stack.bake()
    if single_file:
        from ..models.single_file import save_single_file

        return save_single_file(pipe, out)  # atomic: temp file + rename
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        os.chmod(tmp, new_dir_mode())  # mkdtemp's folder is private (0o700)
        pipe.save_pretrained(tmp, safe_serialization=True)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
