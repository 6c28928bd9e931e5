"""The diffusion training objective: noise the latents, predict epsilon or v, weighted MSE."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sample_noise(latents: torch.Tensor, noise_offset: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian noise; a noise offset adds a per-channel constant so the model can learn to shift
    overall brightness (very dark or bright images)."""
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype, device=latents.device)
    if noise_offset:
        b, c = latents.shape[:2]
        offset = torch.randn((b, c, 1, 1), generator=generator, dtype=latents.dtype, device=latents.device)
        noise = noise + noise_offset * offset
    return noise


def perturb(noise: torch.Tensor, amount: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Input perturbation (Ning et al. 2023): the UNet input is noised with noise + amount·ξ while
    the target stays `noise`, which reduces the train/sample mismatch ("exposure bias").
    With amount 0 nothing is drawn, so runs without it keep their random stream."""
    if not amount:
        return noise
    extra = torch.randn(noise.shape, generator=generator, dtype=noise.dtype, device=noise.device)
    return noise + amount * extra


def training_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet must predict, from the base's scheduler config."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r} in the base's scheduler config")


def snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep."""
    alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alphas_cumprod / (1.0 - alphas_cumprod)


def diffusion_loss(
    pred: torch.Tensor, target: torch.Tensor, scheduler, timesteps: torch.Tensor, snr_gamma: float | None
) -> torch.Tensor:
    """Mean squared error, optionally min-SNR-γ weighted (Hang et al. 2023): each sample's loss
    is scaled by min(SNR, γ)/SNR for epsilon targets and min(SNR, γ)/(SNR + 1) for v targets."""
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=list(range(1, pred.ndim)))
    if snr_gamma is None:
        return per_sample.mean()
    s = snr(scheduler, timesteps)
    clipped = torch.clamp(s, max=snr_gamma)
    if scheduler.config.prediction_type == "v_prediction":
        weight = clipped / (s + 1.0)
    else:
        weight = clipped / s
    return (per_sample * weight).mean()
