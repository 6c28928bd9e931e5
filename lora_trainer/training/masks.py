"""Loss masks from the images' alpha channels (data.alpha_mask): the dataset's full-size alpha,
area-averaged to the latent grid, so a latent pixel weighs as much as the opaque share of the
pixels it stands for (kohya's --alpha_mask reads it the same way)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def latent_scale(vae) -> int:
    """Pixels per latent pixel along a side: 8 for SD's VAEs (one halving per block after the first)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def latent_mask(alpha: torch.Tensor, scale: int) -> torch.Tensor:
    """(B, 1, H, W) alpha in [0, 1] as (B, 1, H/scale, W/scale) weights: the mean of each cell."""
    height, width = alpha.shape[-2] // scale, alpha.shape[-1] // scale
    return F.interpolate(alpha.float(), size=(height, width), mode="area")
