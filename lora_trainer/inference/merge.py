"""`lora-trainer merge`: fuse adapters at their weights into the base and save a plain model that
any diffusers user (or a later `--model`) loads without adapter support."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import ConfigError
from .adapters import AdapterSpec, AdapterStack
from .pipelines import load_base


def merge_to_folder(model: str, loras: list[AdapterSpec], out: str | Path, *, single_file: bool = False,
                    overwrite: bool = False, dtype: torch.dtype = torch.float32) -> Path:
    """Load `model`, fuse `loras` at their weights, drop the adapter layers and save the result as a
    diffusers folder at `out`. The folder appears complete or not at all (saved beside it, renamed)."""
    out = Path(out)
    if single_file:
        # Writing original-layout checkpoints belongs to models/ (the single-file loader/saver);
        # until it is wired in, say so instead of writing a half-supported file.
        raise ConfigError("--single-file: this version saves merged models as diffusers folders only; "
                          "drop --single-file")
    if not loras:
        raise ConfigError("merge: give at least one --lora FILE[:WEIGHT] to merge into the base")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"--out: {out} exists and is not empty; choose a new folder or pass --overwrite")
    pipe, _ = load_base(model, "cpu", dtype)
    stack = AdapterStack(pipe)
    for spec in loras:
        stack.load(spec)
    stack.bake()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
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
