"""Image reading for the dataset: one function that turns any image file a user might drop into
a dataset folder into an upright 8-bit RGB picture, or a DataError saying which file and why."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from lora_trainer.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Image formats people drop into datasets that training does not read (animated, layered, HDR,
# camera raw, or needing a codec plugin): a file of one of these is reported, never passed over
# in silence. Any other file (captions, notes, latent caches) is simply not an image.
UNREAD_IMAGE_EXTENSIONS = (".gif", ".apng", ".tif", ".tiff", ".heic", ".heif", ".avif", ".jxl", ".jfif", ".jpe",
                           ".jp2", ".j2k", ".tga", ".ico", ".psd", ".svg", ".exr", ".hdr", ".qoi", ".dds",
                           ".ppm", ".pgm", ".pbm", ".pnm", ".dng", ".cr2", ".cr3", ".nef", ".arw", ".raf",
                           ".orf", ".rw2")

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
_SRGB = ImageCms.createProfile("sRGB")


def is_image_file(path: str | os.PathLike) -> bool:
    """True when the file name has one of IMAGE_EXTENSIONS (any case)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def is_unread_image_file(path: str | os.PathLike) -> bool:
    """True for an image file of a format training does not read (UNREAD_IMAGE_EXTENSIONS, any case)."""
    return Path(path).suffix.lower() in UNREAD_IMAGE_EXTENSIONS


def unread_formats_message(files: Sequence[str]) -> str:
    """One line for image files training does not read: how many, which formats, what to do, and
    the formats it reads (the file names are listed by the caller)."""
    formats = sorted({Path(f).suffix.lower().lstrip(".") for f in files})
    read = ", ".join(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)
    return (f"{len(files)} image file(s) in a format training does not read ({', '.join(formats)}) are "
            f"skipped; convert them to PNG or JPEG (formats read: {read})")


def unread_files_note(unread: Sequence[Path], root: Path, shown: int = 10) -> str:
    """`unread_formats_message` followed by the first `shown` of the files (relative to root)."""
    names = [p.relative_to(root).as_posix() for p in unread]
    more = f", ... {len(names) - shown} more" if len(names) > shown else ""
    return f"{unread_formats_message(names)}: {', '.join(names[:shown])}{more}"


def load_image(path: str | os.PathLike) -> Image.Image:
    """Read `path` fully into memory as an upright RGB image (EXIF orientation applied).

    Transparent pixels are composited over white, 16-bit and float images are scaled to 8 bits,
    and embedded colour profiles (CMYK, Display P3, Adobe RGB) are converted to sRGB.
    Raises DataError for empty, truncated, corrupt or unsupported files.
    """
    path = Path(path)
    try:
        return _read_rgb(path)
    # Decoders for broken files raise whatever their parsing hits (OSError, SyntaxError,
    # struct.error, IndexError, ...), so everything is turned into one user-facing error here.
    except Exception as err:  # noqa: BLE001
        raise DataError(
            f"{path}: cannot read image ({_describe(path, err)}); re-save it as PNG or JPEG, "
            "or remove it from the dataset"
        ) from err


def load_image_and_alpha(path: str | os.PathLike) -> tuple[Image.Image, Image.Image | None]:
    """`load_image`'s RGB picture (composited over white, exactly as training reads it) and the
    image's own alpha channel as an upright 8-bit "L" image, or None when it has no alpha
    (data.alpha_mask)."""
    path = Path(path)
    try:
        return _read(path, lambda image: (to_rgb(image), image.convert("RGBA").getchannel("A")
                                          if _has_alpha(image) else None))
    except Exception as err:  # noqa: BLE001 (as load_image)
        raise DataError(
            f"{path}: cannot read image ({_describe(path, err)}); re-save it as PNG or JPEG, "
            "or remove it from the dataset"
        ) from err


def load_mask(path: str | os.PathLike) -> Image.Image:
    """A loss-mask image (data.mask_dir) as an upright 8-bit "L" image: grayscale as it is, 16-bit and
    float scaled to 8 bits, and of colour images the first (red) channel with any alpha ignored, as
    kohya reads its masks. Raises DataError as `load_image` does."""
    path = Path(path)
    try:
        return _read(path, mask_channel)
    except Exception as err:  # noqa: BLE001 (as load_image)
        raise DataError(
            f"{path}: cannot read mask image ({_describe(path, err)}); re-save it as a grayscale PNG"
        ) from err


def mask_channel(image: Image.Image) -> Image.Image:
    """The 8-bit weight channel of an already loaded mask image (see `load_mask`)."""
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "I":
        return _gray_to_rgb(_scale_int_gray(np.asarray(image))).getchannel("R")
    if image.mode == "F":
        return _gray_to_rgb(_scale_float_gray(np.asarray(image))).getchannel("R")
    if image.mode == "L":
        return image.copy()
    if image.mode in ("LA", "La"):
        return image.getchannel("L")
    # Palette, RGBA, CMYK, 1-bit...: PIL's plain conversion (no compositing), then the red channel.
    return image.convert("RGB").getchannel("R")


def _read_rgb(path: Path) -> Image.Image:
    return _read(path, to_rgb)


def _read(path: Path, convert):
    """`convert` of the decoded, upright image (called while the file is open: a closed PIL image
    can no longer be read)."""
    if path.stat().st_size == 0:
        raise ValueError("file is empty")
    with Image.open(path) as image:
        # Image.open only parses the header; load() decodes so truncated data fails now,
        # not halfway through training.
        image.load()
        try:
            image = ImageOps.exif_transpose(image)
        # Malformed EXIF is common in edited photos; the pixels are still good, so keep them.
        except (ValueError, TypeError, KeyError, SyntaxError, OSError):
            pass
        return convert(image)


def _describe(path: Path, err: Exception) -> str:
    if isinstance(err, FileNotFoundError):
        return "file not found"
    if isinstance(err, UnidentifiedImageError):
        return "not a recognised image format"
    message = str(err).replace(str(path), "").strip(" :'\"")
    return message or type(err).__name__


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert an already loaded image of any PIL mode to 8-bit sRGB "RGB"."""
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        return _gray_to_rgb(_scale_int_gray(np.asarray(image)))
    if mode == "F":
        return _gray_to_rgb(_scale_float_gray(np.asarray(image)))
    image = _to_srgb(image)
    if image.mode == "RGB":
        return image
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _has_alpha(image: Image.Image) -> bool:
    # Palette and grayscale PNGs mark transparency in info, not in the mode name.
    return image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info


def _scale_int_gray(values: np.ndarray) -> np.ndarray:
    sixteen_bit = values.dtype == np.uint16
    values = values.astype(np.float64)
    # Mode "I" carries no bit depth; files whose values fit in 8 bits are taken as they are,
    # anything larger is treated as 16-bit (the common case: scientific or scanner PNG/TIFF).
    if not sixteen_bit and values.size and 0 <= values.min() and values.max() <= 255:
        return values
    return values * (255.0 / 65535.0)


def _scale_float_gray(values: np.ndarray) -> np.ndarray:
    values = np.nan_to_num(values.astype(np.float64))
    # Float images are usually normalised to [0, 1]; larger values are taken as 8-bit levels.
    if values.size and values.max() <= 1.0:
        return values * 255.0
    return values


def _gray_to_rgb(values: np.ndarray) -> Image.Image:
    gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(np.stack([gray] * 3, axis=-1), mode="RGB")


def _to_srgb(image: Image.Image) -> Image.Image:
    """Apply an embedded ICC profile so colours match what an image viewer shows.

    Without this, CMYK photos come out oversaturated and wide-gamut phone photos washed out.
    Broken or unusual profiles fall back to PIL's plain conversion rather than failing.
    """
    icc = image.info.get("icc_profile")
    if not icc or image.mode not in ("RGB", "CMYK"):
        return image
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        converted = ImageCms.profileToProfile(image, source, _SRGB, outputMode="RGB")
    except (ImageCms.PyCMSError, OSError, ValueError):
        return image
    return converted if converted is not None else image
