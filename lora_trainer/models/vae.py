"""A VAE other than the base's own (`model.vae`, `--vae`): a diffusers VAE folder, a diffusers
model folder (its `vae/`), a hub id of either, or one `.safetensors` file in the original layout
(what A1111 and ComfyUI keep in models/VAE), checked to fit the base before anything uses it."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Optional

import safetensors
import safetensors.torch
import torch

from ..errors import DAMAGED, ModelError, first_line, looked_in
from ..hubcheck import check_hub_model

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_LDM_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
SDXL_SCALING = 0.13025  # SDXL's VAE scaling factor (SD1.x: 0.18215)
_IGNORED = ("model_ema.", "loss.")  # training leftovers some VAE files carry, which A1111 skips too
_HUB_EXAMPLE = "madebyollin/sdxl-vae-fp16-fix"


def is_vae_file(source: str) -> bool:
    return Path(source).suffix.lower() == ".safetensors"


def check_vae_source(source: str, key: str = "model.vae") -> None:
    """One-line errors for a VAE reference that cannot load, before any model is read: a missing
    file or folder, a pickle, a folder with no VAE config, a malformed or unreachable hub id."""
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES or is_vae_file(source):
        if not path.is_file():
            raise ModelError(f"{key}: {source!r} does not exist{looked_in(source)}; give a VAE .safetensors file, "
                             "a diffusers VAE folder or a hub id")
        if suffix in PICKLE_SUFFIXES:
            raise ModelError(f"{key}: {source!r} is a pickle ({suffix}), which can run code when loaded; "
                             "re-save it as .safetensors (or use the .safetensors release of that VAE)")
        return
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "vae" / "config.json").is_file():
            raise ModelError(f"{key}: {source!r} is a folder with neither config.json (a diffusers VAE) nor "
                             "vae/config.json (a diffusers model); point it at one of those")
        return
    if path.exists():
        raise ModelError(f"{key}: {source!r} is not a .safetensors file; give a VAE .safetensors file, "
                         "a diffusers VAE folder or a hub id")
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise ModelError(f"{key}: {source!r} does not exist{looked_in(source)} and is not a hub id "
                         f"like '{_HUB_EXAMPLE}'")
    try:
        check_hub_model(source, key, "config.json")  # a VAE repo
    except ModelError as err:
        try:
            check_hub_model(source, key, "model_index.json")  # a whole model's repo: its vae/
        except ModelError:
            raise err from None


def vae_name(source: str) -> str:
    """How the VAE is named to users and tools: a file's or folder's name, or the hub id."""
    path = Path(source).expanduser()
    return path.name if path.exists() else source


def vae_file_hashes(source: str) -> Optional[dict[str, str]]:
    """For a VAE file: its full SHA-256 (kohya's `ss_new_vae_hash`, whose first 10 hex digits are
    A1111's 'VAE hash') and the old 8-digit A1111 hash of 64 KiB at 1 MiB (kohya's `ss_vae_hash`).
    None for a folder or hub id, which are no one file. Read once per file version (each save and
    sample asks)."""
    path = Path(source).expanduser()
    if not path.is_file():
        return None
    stat = path.stat()
    return dict(_file_hashes(str(path.resolve()), stat.st_size, stat.st_mtime_ns))


@functools.lru_cache(maxsize=8)
def _file_hashes(path: str, size: int, mtime_ns: int) -> dict[str, str]:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
        fh.seek(0x100000)
        legacy = hashlib.sha256(fh.read(0x10000)).hexdigest()[:8]
    return {"sha256": digest.hexdigest(), "legacy": legacy}


def png_vae_fields(source: Optional[str]) -> dict[str, str]:
    """GenerationInfo's `vae_name` and `vae_hash` (A1111's 'VAE' and 'VAE hash': the first 10 hex
    digits of the file's SHA-256; a folder or hub id has a name only); none without a separate VAE,
    as A1111 writes none for the model's own."""
    if not source:
        return {}
    hashes = vae_file_hashes(source)
    return {"vae_name": vae_name(source), **({"vae_hash": hashes["sha256"][:10]} if hashes else {})}


def load_vae(source: str, like, dtype: torch.dtype, key: str = "model.vae", revision: Optional[str] = None):
    """The VAE `source` names as an AutoencoderKL in `dtype`, frozen. `like` is the base's own VAE:
    a single file is read into a VAE built from its config (the one the shipped SD1.5/SDXL configs
    give single-file bases), and whatever loads must make latents the base's UNet reads."""
    check_vae_source(source, key)
    try:
        if is_vae_file(source):
            vae = _from_single_file(Path(source).expanduser(), like, dtype, key)
        else:
            vae = _from_diffusers(source, dtype, key, revision)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{key}: cannot load {source!r} as a VAE: {first_line(exc)}") from None
    check_vae_fits(vae, like, source, key)
    vae.requires_grad_(False)
    return vae.eval()


def check_vae_fits(vae, like, source: str, key: str = "model.vae", against: str = "the base's VAE") -> None:
    """A VAE for another family makes latents the UNet cannot read (other channels or downscaling,
    or another scale): refused by name. SD1.x's and SDXL's VAEs share their shapes, so only the
    scaling factor of a folder's config tells them apart."""
    ours, base = vae.config, like.config
    checks = (("latent channels", ours.latent_channels, base.latent_channels),
              ("downscaling blocks", len(ours.block_out_channels), len(base.block_out_channels)),
              ("scaling factor", ours.scaling_factor, base.scaling_factor))
    for what, have, want in checks:
        if have != want:
            raise ModelError(f"{key}: {source} has {what} {have}, {against} {want}; it is a VAE for another model "
                             "family (SD1.x VAEs scale by 0.18215, SDXL's by 0.13025); use one made for this base")


def _from_diffusers(source: str, dtype: torch.dtype, key: str, revision: Optional[str]):
    """A diffusers VAE folder, a model folder's vae/, or the same on the hub; all weights must fit."""
    from diffusers import AutoencoderKL

    from .loading import diffusers_dtype

    path = Path(source).expanduser()
    target = str(path) if path.is_dir() else source
    try:  # a VAE's own folder or repo (config.json at the top), else a whole model's vae/
        subfolder, config = None, AutoencoderKL.load_config(target, revision=revision)
    except (OSError, ValueError):
        subfolder = "vae"
        config = AutoencoderKL.load_config(target, subfolder=subfolder, revision=revision)
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise ModelError(f"{key}: {source} holds a {config['_class_name']}, not a VAE (AutoencoderKL); "
                         "point it at a VAE folder or a model folder with vae/")
    vae, info = AutoencoderKL.from_pretrained(target, subfolder=subfolder, revision=revision,
                                              output_loading_info=True, **diffusers_dtype(dtype))
    wrong = [(what, keys) for what, keys in (("missing", info["missing_keys"]),
                                             ("unexpected", info["unexpected_keys"])) if keys]
    if wrong:
        raise ModelError(f"{key}: {source}: its weights do not fit its config ("
                         + "; ".join(f"{len(keys)} {what}, e.g. {sorted(keys)[0]}" for what, keys in wrong)
                         + f"); {DAMAGED}")
    return vae


def _from_single_file(path: Path, like, dtype: torch.dtype, key: str):
    """An original-layout VAE file (`encoder.*`, `decoder.*`, `quant_conv.*`, `post_quant_conv.*`,
    or the same under `first_stage_model.` as inside a whole checkpoint), or a diffusers-layout one,
    into a VAE of the base's config: every tensor must have its place, and every place a tensor."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL

    from .single_file import VAE_PREFIX, _load_into, _take, vae_names

    try:
        state = safetensors.torch.load_file(str(path))
    except Exception as exc:
        raise ModelError(f"{key}: {path} is not a readable .safetensors file ({first_line(exc)}); {DAMAGED}") from None
    if any(k.startswith(VAE_PREFIX) for k in state):  # a whole checkpoint: its VAE
        _check_checkpoint_family(state, like, path, key)
        state = {k[len(VAE_PREFIX):]: v for k, v in state.items() if k.startswith(VAE_PREFIX)}
    state = {k: v for k, v in state.items() if not k.startswith(_IGNORED)}
    if not any(k.startswith(_LDM_PARTS) for k in state):
        raise ModelError(f"{key}: {path} has no encoder.*/decoder.* tensors; it is not a VAE (is it a LoRA or "
                         "an embedding?)")
    with init_empty_weights():
        vae = AutoencoderKL.from_config(like.config)
    own = vae.state_dict()
    if any(".down_blocks." in k or ".up_blocks." in k for k in state):  # saved in diffusers' names
        names = {k: k for k in own}
    else:
        names = {k: name[len(VAE_PREFIX):] for k, name in vae_names(vae).items()}
    missing = [orig for orig in names.values() if orig not in state]
    unexpected = sorted(set(state) - set(names.values()))
    wrong_size = [orig for k, orig in names.items() if orig in state and state[orig].numel() != own[k].numel()]
    for what, found in (("lacks", missing), ("has unexpected", unexpected), ("has wrongly sized", wrong_size)):
        if found:
            raise ModelError(f"{key}: {path} {what} tensors for the base's VAE ({len(found)}, e.g. {found[0]}); "
                             "it is a VAE of another architecture, or not a VAE")
    return _load_into(vae, _take(state, names, vae, "VAE"), dtype)


def _check_checkpoint_family(state: dict, like, path: Path, key: str) -> None:
    """SD1.x and SDXL VAEs share their shapes, so only a whole checkpoint's text encoders tell which
    family its VAE is for (a VAE file alone says nothing): the other family's is refused by name."""
    from .single_file import CLIP_PREFIX, OPENCLIP_PREFIX

    family = ("sdxl" if any(k.startswith(OPENCLIP_PREFIX) for k in state)
              else "sd15" if any(k.startswith(CLIP_PREFIX["sd15"]) for k in state) else None)
    base = "sdxl" if like.config.scaling_factor == SDXL_SCALING else "sd15"
    if family is not None and family != base:
        names = {"sd15": "SD1.x", "sdxl": "SDXL"}
        raise ModelError(f"{key}: {path} is a whole {names[family]} checkpoint and the base is {names[base]}: its VAE "
                         f"scales latents for {names[family]}; use a VAE made for this base")
