"""The diffusion training objective: noise the latents (plain, offset or multi-resolution noise),
predict epsilon or v, and score the prediction (l2, l1, huber, smooth_l1) with per-sample weights
(min-SNR-γ, kohya's v-prediction scalings, debiased estimation)."""

from __future__ import annotations

import copy
import logging
import math

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# SNR bounds of debiased estimation: kohya caps SNR at 1000 (it is ~1175 at t = 0 on SD's schedule);
# the floor keeps 1/sqrt(SNR) finite where a zero-terminal-SNR schedule reaches SNR 0.
DEBIASED_SNR_RANGE = (1e-3, 1000.0)


def sample_noise(latents: torch.Tensor, noise_offset: float, generator: torch.Generator | None = None,
                 multires_iterations: int = 0, multires_discount: float = 0.3, *, random_strength: bool = False,
                 adaptive_scale: float | None = None) -> torch.Tensor:
    """Gaussian noise; a noise offset adds a per-channel constant so the model can learn to shift
    overall brightness (very dark or bright images). Multi-resolution noise comes last, over the
    offset noise, as kohya applies them.

    kohya's offset options: `random_strength` draws the offset's strength uniformly in
    [0, noise_offset) (before the offset itself); `adaptive_scale` adds adaptive_scale × |mean of
    each channel of `latents`| to it, clamped at 0, so a latent far from zero mean gets a larger
    offset. Only then are the contents of `latents` read (else only its shape)."""
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype, device=latents.device)
    if noise_offset:
        b, c = latents.shape[:2]
        strength = noise_offset
        if random_strength:
            strength = noise_offset * torch.rand((), generator=generator, device=latents.device).item()
        if adaptive_scale is not None:  # one strength per item and channel
            channel_mean = latents.float().mean(dim=(2, 3), keepdim=True).abs()
            strength = torch.clamp(strength + adaptive_scale * channel_mean, min=0.0).to(latents.dtype)
        offset = torch.randn((b, c, 1, 1), generator=generator, dtype=latents.dtype, device=latents.device)
        noise = noise + strength * offset
    if multires_iterations:
        noise = pyramid_noise(noise, multires_iterations, multires_discount, generator)
    return noise


def pyramid_noise(noise: torch.Tensor, iterations: int, discount: float,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Multi-resolution noise (J. Whitaker's "pyramid" noise, kohya's --multires_noise_iterations):
    `noise` plus, for level i = 0, 1, ..., noise drawn at the size divided by r^i (r uniform in
    [2, 4) per level; level 0 is full size) and upsampled bilinearly, weighted by discount^i; it
    stops after `iterations` levels or at a 1-pixel side. The sum is divided by its standard
    deviation (over the whole tensor: call it per item to keep items independent of their batch).
    Low frequencies get more power, so the model also learns large-scale structure and contrast."""
    b, c, h, w = noise.shape
    total = noise.float()
    for i in range(iterations):
        ratio = 1.0 if i == 0 else 2.0 + 2.0 * torch.rand((), generator=generator, device=noise.device).item()
        size = (max(1, int(h / ratio ** i)), max(1, int(w / ratio ** i)))
        level = torch.randn((b, c, *size), generator=generator, dtype=torch.float32, device=noise.device)
        if size != (h, w):
            level = F.interpolate(level, size=(h, w), mode="bilinear", align_corners=False)
        total = total + level * discount ** i
        if 1 in size:
            break
    return (total / total.std()).to(noise.dtype)


def perturb(noise: torch.Tensor, amount: float, generator: torch.Generator | None = None,
            random_strength: bool = False) -> torch.Tensor:
    """Input perturbation (Ning et al. 2023): the UNet input is noised with noise + amount·ξ while
    the target stays `noise`, which reduces the train/sample mismatch ("exposure bias").
    `random_strength` (kohya's --ip_noise_gamma_random_strength) draws the amount uniformly in
    [0, amount) first. With amount 0 nothing is drawn, so runs without it keep their random stream."""
    if not amount:
        return noise
    if random_strength:
        amount = amount * torch.rand((), generator=generator, device=noise.device).item()
    extra = torch.randn(noise.shape, generator=generator, dtype=noise.dtype, device=noise.device)
    return noise + amount * extra


def zero_terminal_snr_betas(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023 (Algorithm 1): shift sqrt(alpha_bar) so the last timestep is 0 (pure noise,
    SNR 0) and scale it so the first keeps its value; return the betas of that schedule."""
    root = torch.cumprod(1.0 - betas.double(), dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    alphas_cumprod = root ** 2
    alphas = torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return (1.0 - alphas).to(betas.dtype)


def training_scheduler(scheduler, zero_terminal_snr: bool):
    """The noise schedule training uses: the base's own, or (zero_terminal_snr) a rescaled copy,
    so that sampling and class images keep the base's schedule."""
    if not zero_terminal_snr:
        return scheduler
    if scheduler.config.prediction_type == "epsilon":
        log.warning("train.zero_terminal_snr: the base predicts epsilon; zero terminal SNR is meant for "
                    "v-prediction (at SNR 0 the noise is the input, so epsilon there teaches nothing)")
    rescaled = copy.deepcopy(scheduler)
    rescaled.betas = zero_terminal_snr_betas(scheduler.betas)
    rescaled.alphas = 1.0 - rescaled.betas
    rescaled.alphas_cumprod = torch.cumprod(rescaled.alphas, dim=0)
    return rescaled


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


def huber_threshold(scheduler, timesteps: torch.Tensor, schedule: str, c: float, scale: float = 1.0) -> torch.Tensor:
    """The huber/smooth_l1 threshold of each sample, as kohya schedules it:
    constant c·scale; exponential scale·c^(t/T) (scale at t = 0, c·scale at t = T);
    snr (1 - c)/(1 + σ_t)² + c with σ_t = sqrt((1 - alpha_bar)/alpha_bar): near 1 for clean
    latents, c for pure noise (scale is not used)."""
    t = timesteps.float()
    if schedule == "constant":
        values = torch.full_like(t, c * scale)
    elif schedule == "exponential":
        values = scale * torch.exp(math.log(c) * t / scheduler.config.num_train_timesteps)
    elif schedule == "snr":
        alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
        sigma = ((1.0 - alphas_cumprod) / alphas_cumprod).sqrt()  # inf at SNR 0: c exactly
        values = (1.0 - c) / (1.0 + sigma) ** 2 + c
    else:
        raise ValueError(f"unknown huber schedule {schedule!r}")
    return values


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str,
                     c: torch.Tensor | None = None) -> torch.Tensor:
    """The loss of every element (fp32). huber: 2c·(sqrt(d² + c²) - c), about d² for |d| << c
    and 2c·|d| beyond; smooth_l1: the same divided by c, 2·(sqrt(d² + c²) - c) (kohya's
    pseudo-Huber forms); `c` holds one threshold per sample."""
    pred, target = pred.float(), target.float()
    if loss_type == "l2":
        return F.mse_loss(pred, target, reduction="none")
    if loss_type == "l1":
        return F.l1_loss(pred, target, reduction="none")
    c = c.view(-1, *([1] * (pred.ndim - 1)))
    smooth = 2.0 * (torch.sqrt((pred - target) ** 2 + c ** 2) - c)
    if loss_type == "smooth_l1":
        return smooth
    if loss_type == "huber":
        return c * smooth
    raise ValueError(f"unknown loss type {loss_type!r}")


def min_snr_weight(s: torch.Tensor, gamma: float, v_prediction: bool) -> torch.Tensor:
    """Min-SNR-γ (Hang et al. 2023): min(SNR, γ)/SNR for epsilon targets, min(SNR, γ)/(SNR + 1)
    for v targets. At SNR 0 (a zero-terminal-SNR schedule's last step) the epsilon weight is its
    limit 1, not 0/0; the v weight is 0 there, as the formula says."""
    clipped = torch.clamp(s, max=gamma)
    if v_prediction:
        return clipped / (s + 1.0)
    return torch.where(s > 0, clipped / s, torch.ones_like(s))


def debiased_weight(s: torch.Tensor) -> torch.Tensor:
    """Debiased estimation (Yu et al. 2023, kohya's --debiased_estimation_loss): 1/sqrt(SNR), with
    SNR clamped to DEBIASED_SNR_RANGE so neither end of the schedule gives an infinite weight."""
    low, high = DEBIASED_SNR_RANGE
    return 1.0 / torch.sqrt(torch.clamp(s, min=low, max=high))


def snr_scale(s: torch.Tensor) -> torch.Tensor:
    """SNR / (SNR + 1) (= alpha_bar, the ratio of an epsilon error to a v error), with SNR clamped to
    DEBIASED_SNR_RANGE: kohya caps it at 1000; the floor keeps its inverse finite at SNR 0."""
    low, high = DEBIASED_SNR_RANGE
    s = torch.clamp(s, min=low, max=high)
    return s / (s + 1.0)


def extra_weight_options(t) -> dict:
    """diffusion_loss's keywords for kohya's v-prediction scalings in the train config `t`, only
    those that are on (a run without them calls diffusion_loss as it always did)."""
    options = (("scale_v_like_noise", t.scale_v_pred_loss_like_noise_pred), ("v_pred_like", t.v_pred_like_loss))
    return {key: value for key, value in options if value}


def diffusion_loss(
    pred: torch.Tensor, target: torch.Tensor, scheduler, timesteps: torch.Tensor, snr_gamma: float | None,
    *, loss_type: str = "l2", huber_c: float = 0.1, huber_schedule: str = "snr", huber_scale: float = 1.0,
    debiased: bool = False, mask: torch.Tensor | None = None, scale_v_like_noise: bool = False,
    v_pred_like: float | None = None,
) -> torch.Tensor:
    """The batch loss: each sample's mean element loss, times its weights, averaged over the batch.
    The weights come in kohya's order: min-SNR-γ (`snr_gamma`); SNR/(SNR + 1) (`scale_v_like_noise`,
    kohya's scale_v_pred_loss_like_noise_pred: a v loss weighted like an epsilon loss); the
    v-prediction-like term, loss · (1 + v_pred_like · (SNR + 1)/SNR) (`v_pred_like`, kohya's
    v_pred_like_loss: an epsilon loss plus that much of the v loss the same error would give);
    1/sqrt(SNR) (`debiased`).

    `mask` (B, 1, h, w) on the latent grid (data.alpha_mask) weights every element first; the mean
    is then over all elements, as kohya's masked loss takes it (mean(loss · mask), not divided by
    the mask's area): a mostly transparent image weighs less in the batch."""
    c = huber_threshold(scheduler, timesteps, huber_schedule, huber_c, huber_scale).to(pred.device) \
        if loss_type in ("huber", "smooth_l1") else None
    elements = elementwise_loss(pred, target, loss_type, c)
    if mask is not None:
        elements = elements * mask.to(elements.device, elements.dtype)
    per_sample = elements.mean(dim=list(range(1, pred.ndim)))
    if snr_gamma is None and not debiased and not scale_v_like_noise and v_pred_like is None:
        return per_sample.mean()
    s = snr(scheduler, timesteps)
    if snr_gamma is not None:
        per_sample = per_sample * min_snr_weight(s, snr_gamma, scheduler.config.prediction_type == "v_prediction")
    if scale_v_like_noise:
        per_sample = per_sample * snr_scale(s).to(per_sample.device)
    if v_pred_like is not None:
        per_sample = per_sample + per_sample / snr_scale(s).to(per_sample.device) * v_pred_like
    if debiased:
        per_sample = per_sample * debiased_weight(s)
    return per_sample.mean()
