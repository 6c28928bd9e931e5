"""`lora-trainer merge`: fuse adapters at their weights into the base and save a plain model that
any diffusers user (or a later `--model`) loads without adapter support.

Embeddings bundled in an adapter file cannot be fused into weights (they are new words, not a
change of any layer): they are written with the model as `embeddings/<TOKEN>.safetensors`, inside
the diffusers folder or beside the single file, for `--embedding` and A1111's embeddings folder."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import ConfigError, ModelError
from ..export.bundle import check_embedding_files, merge_bundles, read_bundle, write_embedding_files
from ..fileio import new_dir_mode, unwritable_reason
from .adapters import AdapterSpec, AdapterStack, check_adapter_file
from .block_weights import check_file_count
from .pipelines import load_base

log = logging.getLogger(__name__)


def merge_to_folder(model: str, loras: list[AdapterSpec], out: str | Path, *, single_file: bool = False,
                    overwrite: bool = False, dtype: torch.dtype = torch.float32, config_dir: str | None = None,
                    vae: str | None = None) -> Path:
    """Load `model` (its VAE replaced by `vae` when given), fuse `loras` at their weights, drop the
    adapter layers and save the result as a diffusers folder at `out` (or, with `single_file`, one
    original-layout `.safetensors` checkpoint as A1111 and ComfyUI load), with that VAE. No `loras`
    with a `vae` bakes the VAE alone into the base; neither is refused (the save would be the base).
    It appears complete or not at all (written beside it, renamed)."""
    out = Path(out)
    if single_file and out.suffix.lower() != ".safetensors":
        raise ConfigError(f"--out: {out} must be a .safetensors file name with --single-file")
    if not loras and not vae:
        raise ConfigError("merge: give at least one --lora FILE[:WEIGHT] to fuse, or --vae VAE to bake into the "
                          "base; with neither the saved model would be the base itself")
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
        check_file_count(spec)
    try:
        bundle = merge_bundles([(str(spec.path), read_bundle(spec.path)) for spec in loras])
        if single_file:
            check_embedding_files(bundle, out.parent, overwrite)
    except ModelError as exc:
        raise ConfigError(f"merge: {exc}") from None
    _warn_run_embeddings(loras)
    pipe, _ = load_base(model, "cpu", dtype, config_dir=config_dir, vae=vae)
    if loras:  # a VAE alone: the loaded base already carries it
        stack = AdapterStack(pipe)
        for spec in loras:
            stack.load(spec)
        stack.bake()
    if single_file:
        from ..models.single_file import save_single_file

        save_single_file(pipe, out)  # atomic: temp file + rename
        _say_embeddings(write_embedding_files(bundle, out.parent, overwrite))
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        os.chmod(tmp, new_dir_mode())  # mkdtemp's folder is private (0o700)
        pipe.save_pretrained(tmp, safe_serialization=True)
        written = write_embedding_files(bundle, tmp)
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
    _say_embeddings([out / p.relative_to(tmp) for p in written])
    return out


def _warn_run_embeddings(loras: list[AdapterSpec]) -> list[str]:
    """Warn (one line each) about an adapter of a pivotal run whose embedding is a file of its own
    (OUT/embeddings/, not bundled): the merged model knows nothing of its trigger word's vectors, so
    it must be given with the model. Returns the warnings."""
    from .paired import separate_embedding

    warnings = []
    for spec in loras:
        found = separate_embedding(spec.path)
        if found is None:
            continue
        own, token = found
        warnings.append(f"--lora: {spec.path} was trained with the embedding {own}, which a merged model cannot "
                        f"hold; use it with the model: --embedding {own}:{token} (A1111/ComfyUI: its embeddings "
                        f"folder, as {token}.safetensors)")
    for warning in warnings:
        log.warning("%s", warning)
    return warnings


def _say_embeddings(paths: list[Path]) -> None:
    if paths:
        log.info("the adapters' bundled embeddings are no part of the merged weights; written as %s: use them with "
                 "--embedding FILE (A1111/ComfyUI: copy them to the embeddings folder)",
                 ", ".join(str(p) for p in paths))
