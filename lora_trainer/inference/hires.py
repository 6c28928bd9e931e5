"""Hires. fix, as A1111 has it: a txt2img image drawn at the size the model knows, upscaled (PIL's
Lanczos on the image, or one of A1111's latent upscalers on the latents) and redrawn larger by an
img2img pass at `hires_strength`. Here: the upscalers, sizes, checks, PNG parameters and the two
passes, which run on the Generator's own modules."""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from PIL import Image

from ..errors import ConfigError
from .schedulers import MAX_STEPS

LANCZOS = "Lanczos"  # the name A1111 gives PIL's Lanczos resize among its upscalers
# A1111's latent upscalers (its names, as its PNGs write them): torch's interpolation mode, antialias
LATENT_UPSCALERS = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
UPSCALERS = (LANCZOS, *LATENT_UPSCALERS)
# Interpolated latents are soft and need more redrawing than a sharp Lanczos image: A1111's 0.7
# for the first, 0.5 for the second, unless hires_strength says otherwise
DEFAULT_STRENGTH = {True: 0.7, False: 0.5}


def upscaler_name(name: str) -> str:
    """`name` as A1111 spells it (matched whatever its case), or a one-line error listing the names."""
    found = next((known for known in UPSCALERS if known.lower() == str(name).strip().lower()), None)
    if found is None:
        raise ConfigError(f"--hires-upscaler: {name!r} is not known; choose one of {', '.join(UPSCALERS)}")
    return found


def is_latent(name: str) -> bool:
    return upscaler_name(name) in LATENT_UPSCALERS


def hires_strength(req) -> float:
    """The hires pass's denoising strength: `req.hires_strength`, or the default for its upscaler."""
    if req.hires_strength is not None:
        return req.hires_strength
    return DEFAULT_STRENGTH[is_latent(req.hires_upscaler)]


def hires_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """`size` times `scale`, each side rounded to the nearest multiple of 8 (the VAE's step)."""
    return tuple(max(8, int(round(side * scale) / 8 + 0.5) * 8) for side in size)  # type: ignore[return-value]


def upscale(image: Image.Image, scale: float) -> Image.Image:
    return image.resize(hires_size(image.size, scale), Image.LANCZOS)


def upscale_latents(latents: torch.Tensor, size: tuple[int, int], name: str, factor: int = 8) -> torch.Tensor:
    """Latents (C, h, w) or (N, C, h, w) interpolated to the latents of a `size` image (width, height),
    with the mode of the latent upscaler `name`; (N, C, H, W) out, in the latents' dtype."""
    mode, antialias = LATENT_UPSCALERS[upscaler_name(name)]
    batch = latents if latents.ndim == 4 else latents[None]
    # in float32: torch has no half-precision antialiased kernels on the CPU
    return torch.nn.functional.interpolate(batch.float(), size=(size[1] // factor, size[0] // factor), mode=mode,
                                           antialias=antialias).to(batch.dtype)


def check_hires(req) -> None:
    """One-line errors for a hires fix no pass can draw, naming the CLI flag; nothing without a scale."""
    upscaler_name(req.hires_upscaler)  # a typo is named even before --hires-scale is
    if req.hires_scale is None:
        return
    strength = hires_strength(req)
    checks = [
        (math.isfinite(req.hires_scale) and req.hires_scale > 1, "--hires-scale", req.hires_scale,
         "a number above 1, e.g. 1.5 or 2 (the size of the second pass over the first)"),
        (0 < strength <= 1, "--hires-strength", strength, "a number above 0, at most 1"),
        (req.hires_steps is None or 1 <= req.hires_steps <= MAX_STEPS, "--hires-steps", req.hires_steps,
         f"1 to {MAX_STEPS}"),
    ]
    for ok, flag, value, allowed in checks:
        if not ok:
            raise ConfigError(f"{flag}: {value!r} is not allowed; give {allowed}")
    if req.init_image is not None:
        job = "inpainting" if req.mask is not None else "img2img"
        raise ConfigError(f"--hires-scale redraws a txt2img image larger, not an {job} one; for a larger {job} "
                          "result resize the image with --width/--height, or leave out --hires-scale")
    if req.width and req.height:
        check_growth((req.width, req.height), req.hires_scale)


def check_growth(size: tuple[int, int], scale: float) -> None:
    """A scale whose sides round back to the first pass's size would redraw the image for nothing."""
    if hires_size(size, scale) == tuple(size):
        raise ConfigError(f"--hires-scale: {scale:g} leaves a {size[0]}x{size[1]} image at {size[0]}x{size[1]} (sides "
                          "are rounded to multiples of 8); give a larger scale")


def hires_parameters(req, size: tuple[int, int]) -> dict[str, str | int]:
    """A1111's settings for a hires fix of a first pass of `size`; 'Size' stays the first pass's, as
    A1111 writes it, and 'Hires resize' holds the final size (A1111 draws at it when pasted back,
    our rounding to multiples of 8 included)."""
    w, h = hires_size(size, req.hires_scale)
    return {"Hires upscale": f"{req.hires_scale:g}", "Hires resize": f"{w}x{h}",
            "Hires steps": req.hires_steps or req.steps, "Hires upscaler": upscaler_name(req.hires_upscaler)}


def hires_fix(gen, req, output_type: str) -> list:
    """A1111's Hires. fix on the Generator `gen`: each txt2img image (the base's alone: a refiner takes
    the hires pass from `refiner_start`) upscaled and redrawn by img2img with its own seed. A latent
    upscaler interpolates the first pass's latents and img2img starts from them, as A1111's does:
    no VAE decode and encode between the passes."""
    from .generate import Generated

    factor = gen.pipe.vae_scale_factor
    native = gen.pipe.unet.config.sample_size * factor  # diffusers' default size
    check_growth((req.width or native, req.height or native), req.hires_scale)
    latent = is_latent(req.hires_upscaler)
    drawn, used = gen._draw(req, "txt2img", "latent" if latent else "pil", refine=False)
    results = []
    for k, (seed, first) in enumerate(drawn):
        size = (first.shape[-1] * factor, first.shape[-2] * factor) if latent else first.size
        start = (upscale_latents(first, hires_size(size, req.hires_scale), req.hires_upscaler, factor) if latent
                 else upscale(first, req.hires_scale))
        second = replace(req, init_image=start, strength=hires_strength(req), steps=req.hires_steps or req.steps,
                         seed=seed, batch_size=1, batch_count=1, width=None, height=None, hires_scale=None)
        [(_, final)], _ = gen._draw(second, "img2img", output_type)
        results.append(Generated(final, gen._info(req, seed, size, "txt2img", k, used)))
    return results
