"""Hires. fix, as A1111 has it: a txt2img image drawn at the size the model knows, upscaled and
redrawn larger by an img2img pass at `hires_strength`. Here: the sizes, the checks and the PNG
parameters; `Generator.generate` runs the two passes on the same modules."""

from __future__ import annotations

import math

from PIL import Image

from ..errors import ConfigError

UPSCALER = "Lanczos"  # the name A1111 gives PIL's Lanczos resize among its upscalers


def hires_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """`size` times `scale`, each side rounded to the nearest multiple of 8 (the VAE's step)."""
    return tuple(max(8, int(round(side * scale) / 8 + 0.5) * 8) for side in size)  # type: ignore[return-value]


def upscale(image: Image.Image, scale: float) -> Image.Image:
    return image.resize(hires_size(image.size, scale), Image.LANCZOS)


def check_hires(req) -> None:
    """One-line errors for a hires fix no pass can draw, naming the CLI flag; nothing without a scale."""
    if req.hires_scale is None:
        return
    checks = [
        (math.isfinite(req.hires_scale) and req.hires_scale > 1, "--hires-scale", req.hires_scale,
         "a number above 1, e.g. 1.5 or 2 (the size of the second pass over the first)"),
        (0 < req.hires_strength <= 1, "--hires-strength", req.hires_strength, "a number above 0, at most 1"),
        (req.hires_steps is None or req.hires_steps >= 1, "--hires-steps", req.hires_steps, "an integer >= 1"),
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
            "Hires steps": req.hires_steps or req.steps, "Hires upscaler": UPSCALER}
