"""Tiny VAEs beside a tiny model, for `model.vae` / `--vae`: the base's own VAE or another one of
its shape with other random weights, as a diffusers folder or an original-layout single file."""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch


def make_vae(model_dir: str | Path, out: str | Path, seed: int | None = None, single_file: bool = False,
             prefix: str = "", **config_changes) -> Path:
    """Write a VAE shaped as `model_dir`'s (with `config_changes`): its own weights when `seed` is
    None, else new random ones from `seed`. `single_file` writes `out` as one .safetensors in the
    original layout (`encoder.*`, ...; `prefix` "first_stage_model." as inside a checkpoint); else
    `out` is a diffusers VAE folder."""
    from diffusers import AutoencoderKL

    from ..models.single_file import VAE_PREFIX, original_vae_state_dict

    own = AutoencoderKL.from_pretrained(model_dir, subfolder="vae")
    if seed is None and not config_changes:
        vae = own
    else:
        torch.manual_seed(seed or 0)
        vae = AutoencoderKL.from_config({**own.config, **config_changes})
        with torch.no_grad():  # the default init leaves norms at 1 and biases at 0: make them differ too
            for tensor in vae.parameters():
                tensor.add_(torch.randn_like(tensor) * 0.02)
    out = Path(out)
    if not single_file:
        vae.save_pretrained(out, safe_serialization=True)
        return out
    state = {prefix + k[len(VAE_PREFIX):]: v.contiguous() for k, v in original_vae_state_dict(vae).items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(state, str(out))
    return out
