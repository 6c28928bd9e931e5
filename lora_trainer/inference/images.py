"""Image helpers for generation: reading inputs, the canny preprocessor, outpaint canvases and
pasting unmasked pixels back. numpy + PIL only (no OpenCV, no torchvision). Labelled grids live in
lora_trainer.imagegrid (training draws them too)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from ..data.images import load_image
from ..errors import ConfigError, DataError


def read_image(path: str | Path, flag: str) -> Image.Image:
    """An input image as RGB; a missing or unreadable file is a one-line error naming the flag."""
    try:
        return load_image(path)
    except DataError as exc:
        reason = str(exc).split("(", 1)[-1].split(")", 1)[0]
        raise ConfigError(f"{flag}: {path}: cannot read image ({reason}); give a PNG or JPEG file") from None


def read_mask(path: str | Path, size: tuple[int, int]) -> Image.Image:
    """A mask as "L": white = repaint, black = keep; resized to the init image's size when it has
    its shape (a mask drawn at another resolution, as A1111 takes it). A mask of another shape is
    refused: stretched, it would mark other pixels than the ones drawn."""
    mask = read_image(path, "--mask").convert("L")
    fitted = fit_mask(mask, size)
    if fitted is None:
        (w, h), (mw, mh) = size, mask.size
        raise ConfigError(f"--mask: {path} is {mw}x{mh} but --init-image is {w}x{h}, another shape, so it would be "
                          f"stretched over other pixels; give a {w}x{h} mask (or one of the same shape)")
    return fitted


def fit_mask(mask: Image.Image, size: tuple[int, int]) -> Image.Image | None:
    """`mask` at `size` (width, height): as it is, or resized when it has that shape; None when its
    shape differs (stretched, it would mark other pixels than the ones drawn)."""
    if mask.size == size:
        return mask
    (w, h), (mw, mh) = size, mask.size
    if abs(mw * h / w - mh) > 1:  # more than rounding apart
        return None
    return mask.resize(size, Image.NEAREST)


# ----------------------------------------------------------------------------- canny
def _blur(gray: np.ndarray, sigma: float) -> np.ndarray:
    radius = max(1, int(round(3 * sigma)))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-(x ** 2) / (2 * sigma ** 2))
    kernel /= kernel.sum()
    padded = np.pad(gray, radius, mode="edge")
    rows = sum(kernel[k] * padded[:, k:k + gray.shape[1]] for k in range(2 * radius + 1))
    return sum(kernel[k] * rows[k:k + gray.shape[0], :] for k in range(2 * radius + 1))


def canny(image: Image.Image, low: float = 100, high: float = 200, sigma: float = 1.4) -> Image.Image:
    """Canny edges (white on black, RGB) as ControlNet's canny models expect.

    Thresholds are on the gradient magnitude of 0-255 grey values, as the usual 100/200 defaults.
    Steps: Gaussian blur, Sobel gradients, thinning to local maxima along the gradient, then
    hysteresis (weak edges are kept only where they touch strong ones)."""
    gray = np.asarray(image.convert("L"), dtype=np.float64)
    g = np.pad(_blur(gray, sigma), 1, mode="edge")
    gx = (g[:-2, 2:] + 2 * g[1:-1, 2:] + g[2:, 2:]) - (g[:-2, :-2] + 2 * g[1:-1, :-2] + g[2:, :-2])
    gy = (g[2:, :-2] + 2 * g[2:, 1:-1] + g[2:, 2:]) - (g[:-2, :-2] + 2 * g[:-2, 1:-1] + g[:-2, 2:])
    mag = np.hypot(gx, gy)

    # Compare each pixel with its two neighbours along the gradient (direction in 4 bins).
    angle = (np.rad2deg(np.arctan2(gy, gx)) + 180) % 180
    bins = ((angle + 22.5) // 45).astype(int) % 4  # 0: horizontal gradient, 1: 45°, 2: vertical, 3: 135°
    m = np.pad(mag, 1)
    h, w = mag.shape
    shift = {(dy, dx): m[1 + dy:1 + dy + h, 1 + dx:1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1)}
    pairs = {0: ((0, 1), (0, -1)), 1: ((1, 1), (-1, -1)), 2: ((1, 0), (-1, 0)), 3: ((1, -1), (-1, 1))}
    keep = np.zeros_like(mag, dtype=bool)
    for b, (p, q) in pairs.items():
        keep |= (bins == b) & (mag >= shift[p]) & (mag >= shift[q])
    thin = np.where(keep, mag, 0)

    strong = thin >= high
    weak = thin >= low
    edges = strong.copy()
    while True:  # grow strong edges into touching weak pixels until nothing changes
        grown = np.pad(edges, 1)
        near = np.zeros_like(edges)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                near |= grown[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
        new = near & weak
        if (new == edges).all():
            break
        edges = new | edges
    out = (edges * 255).astype(np.uint8)
    return Image.fromarray(np.stack([out] * 3, axis=-1))


PREPROCESSORS = ("none", "canny")


def preprocess_control(image: Image.Image, how: str) -> Image.Image:
    """`canny` runs the edge detector; `none` passes a map the user made (depth, pose,
    segmentation, scribble, normal) through unchanged."""
    if how == "canny":
        return canny(image)
    if how == "none":
        return image
    raise ConfigError(f"--control-preprocess: {how!r} is not known; choose one of {', '.join(PREPROCESSORS)}")


# ----------------------------------------------------------------------------- in/outpainting
def extend_canvas(image: Image.Image, left: int, right: int, top: int, bottom: int,
                  ) -> tuple[Image.Image, Image.Image]:
    """(canvas, mask) for outpainting: the image on a larger canvas whose new border repeats the
    edge pixels (a neutral start for the sampler), and a mask that is white over the new area.
    Right/bottom grow a little more when needed so both sides are multiples of 8 (the VAE's step)."""
    if min(left, right, top, bottom) < 0 or not any((left, right, top, bottom)):
        raise ConfigError(f"--outpaint: {left},{right},{top},{bottom}: give four pixel counts >= 0, not all 0")
    w, h = image.size
    right += -(w + left + right) % 8
    bottom += -(h + top + bottom) % 8
    pixels = np.pad(np.asarray(image), ((top, bottom), (left, right), (0, 0)), mode="edge")
    mask = np.full(pixels.shape[:2], 255, dtype=np.uint8)
    mask[top:top + h, left:left + w] = 0
    return Image.fromarray(pixels), Image.fromarray(mask)


def pad_to_multiple(image: Image.Image, multiple: int = 8) -> Image.Image:
    """`image` grown right and down to sides that are multiples of `multiple` (what the VAE takes),
    the new pixels repeating the edge; unchanged when its sides already are. Inpainting pads rather
    than resizes, so the original pixels can be cut out again unchanged."""
    w, h = image.size
    size = (-(-w // multiple) * multiple, -(-h // multiple) * multiple)
    if size == image.size:
        return image
    pixels = np.asarray(image)
    pad = ((0, size[1] - h), (0, size[0] - w)) + ((0, 0),) * (pixels.ndim - 2)
    return Image.fromarray(np.pad(pixels, pad, mode="edge"), mode=image.mode)


def crop_and_resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """`image` scaled to cover `size` and cut to it around its centre (A1111 ControlNet's default
    "Crop and Resize"): a map of another shape keeps its proportions instead of being stretched."""
    if image.size == size:
        return image
    (w, h), (iw, ih) = size, image.size
    scale = max(w / iw, h / ih)
    sw, sh = max(w, round(iw * scale)), max(h, round(ih * scale))
    left, top = (sw - w) // 2, (sh - h) // 2
    return image.resize((sw, sh), Image.LANCZOS).crop((left, top, left + w, top + h))


def paste_outside_mask(result: Image.Image, original: Image.Image, mask: Image.Image, blur: int = 0) -> Image.Image:
    """Keep the original pixels where the mask is black, as A1111 does after inpainting: the VAE
    round trip would otherwise shift colours there. `blur` softens the seam (pixels the blurred
    mask does not reach are still exactly the original)."""
    mask = mask.convert("L").resize(result.size, Image.NEAREST)
    if blur:
        mask = mask.filter(ImageFilter.GaussianBlur(blur))
    original = original.convert("RGB").resize(result.size, Image.LANCZOS) if original.size != result.size else original
    return Image.composite(result, original.convert("RGB"), mask)
