"""Convert an adapter file between the kohya and diffusers layouts (and precisions).

Tensors pass through untouched unless a dtype is asked for, so kohya -> diffusers -> kohya gives
back the same tensor bytes; alphas travel as kohya `alpha` tensors or as the diffusers LoraConfig.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import ModelError
from .adapter import check_output, read_adapter_for
from .bundle import read_bundle, write_with_bundle
from .lycoris import read_lycoris
from .lycoris_lowrank import convert_refusal
from .lycoris_names import needs_lycoris_reader


def convert_file(src: str | os.PathLike, dst: str | os.PathLike, to: str, *, dtype: torch.dtype | None = None,
                 base: str | None = None, overwrite: bool = False) -> Path:
    """Write `src` to `dst` in layout `to` ('kohya' or 'diffusers'); dtype None keeps the file's.

    Metadata is kept, except what describes only the source file (its hashes, the diffusers
    LoraConfig): kohya files get fresh `sshs_*` hashes, diffusers files a LoraConfig with the alphas.
    Bundled embeddings stay in a kohya output and go beside a diffusers one, as
    `embeddings/<TOKEN>.safetensors` (see `bundle.write_with_bundle`).
    """
    if to not in ("kohya", "diffusers"):
        raise ModelError(f"--to {to!r} is not kohya or diffusers")
    if Path(src).resolve() == Path(dst).resolve():
        raise ModelError(f"{dst} is the input file; write the converted adapter to another name")
    check_output(dst, overwrite)
    if Path(src).is_file() and needs_lycoris_reader(src):  # LoHa, OFT, ...: not a layout change
        raise convert_refusal(src, read_lycoris(src, base=base, header_only=True), to)
    adapter = read_adapter_for(src, base)
    return write_with_bundle(dst, adapter, to, dtype, read_bundle(src), overwrite=overwrite)[0]
