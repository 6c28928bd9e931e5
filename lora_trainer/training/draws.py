"""The random draws of a training step (latent sample, noise, noise offset and its random strength,
multi-resolution noise, timestep, input perturbation and its random strength), each item from its
own generator seeded by (seed, epoch, dataset item, stream). Options that are off draw nothing, so
they leave the other draws unchanged.

Nothing comes from the global RNG, so an item gets the same draws whichever process, batch or
resumed run it lands in: a 2-process run equals a 1-process run of the same global batch, and a
resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from .loss import perturb, sample_noise


def item_seed(seed: int, epoch: int, item: int, stream: str) -> int:
    """A 63-bit seed from the four parts (SHA-256, stable across runs, platforms and versions)."""
    digest = hashlib.sha256(f"{seed}:{epoch}:{item}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass
class StepDraws:
    eps: torch.Tensor  # standard normal, for the latent sample mean + std·eps
    noise: torch.Tensor  # the noise the model must predict (with the noise offset)
    model_noise: torch.Tensor  # what the input is noised with (noise, or perturbed noise)
    timesteps: torch.Tensor


def extra_draw_options(t) -> dict:
    """draw_step's keywords for kohya's random strengths and adaptive noise scale in the train config
    `t`, only those that are on (a run without them calls draw_step as it always did)."""
    options = (("offset_random_strength", t.noise_offset_random_strength),
               ("adaptive_noise_scale", t.adaptive_noise_scale),
               ("perturbation_random_strength", t.input_perturbation_random_strength))
    return {key: value for key, value in options if value}


def draw_step(latent_shape: tuple[int, ...], items: list[int], seed: int, epoch: int, stream: str,
              noise_offset: float, input_perturbation: float, num_timesteps: int,
              eps_dtype: torch.dtype, dtype: torch.dtype, device: torch.device, *, min_timestep: int = 0,
              multires_iterations: int = 0, multires_discount: float = 0.3, offset_random_strength: bool = False,
              adaptive_noise_scale: float | None = None,
              latent_parts: tuple[torch.Tensor, torch.Tensor, float] | None = None,
              perturbation_random_strength: bool = False) -> StepDraws:
    """Draws for a batch of `latent_shape` = (B, C, H, W), item by item in a fixed order; timesteps
    are uniform in [min_timestep, num_timesteps). Multi-resolution noise is normalised per item.

    kohya's random strengths (noise offset, input perturbation) are drawn per item from its own
    generator. `adaptive_noise_scale` needs each item's latent: `latent_parts` = (mean, std,
    scaling) of the batch's latent distributions, the latent being (mean + std·eps)·scaling in
    `dtype`, as the loop computes it."""
    parts = []
    one = (1, *latent_shape[1:])
    offset_options = {}
    if offset_random_strength:
        offset_options["random_strength"] = True
    for k, item in enumerate(items):
        g = torch.Generator(device=device).manual_seed(item_seed(seed, epoch, item, stream))
        eps = torch.randn(one, generator=g, dtype=eps_dtype, device=device)
        latent = torch.empty(one, dtype=dtype, device=device)  # only its shape is read, unless adaptive
        if adaptive_noise_scale is not None:
            mean, std, scaling = latent_parts
            latent = ((mean[k:k + 1] + std[k:k + 1] * eps) * scaling).to(dtype)
            offset_options["adaptive_scale"] = adaptive_noise_scale
        noise = sample_noise(latent, noise_offset, g, multires_iterations, multires_discount, **offset_options)
        t = torch.randint(min_timestep, num_timesteps, (1,), device=device, generator=g)
        parts.append((eps, noise, perturb(noise, input_perturbation, g, perturbation_random_strength), t))
    eps, noise, model_noise, timesteps = (torch.cat(column) for column in zip(*parts))
    return StepDraws(eps, noise, model_noise, timesteps)
