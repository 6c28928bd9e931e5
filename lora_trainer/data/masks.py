"""Loss-mask images (data.mask_dir, kohya's --masked_loss with a conditioning_data_dir): each training
image has a mask of its size and file stem, white where the loss counts, black where it is ignored.

A mask is looked for beside the image's own place under the dataset folder (`masks/10_dog/a.png` for
`img/10_dog/a.jpg`), then directly in the mask folder (`masks/a.png`, kohya's layout: one folder per
subset). Every image needs one, as kohya requires; a missing or mis-sized mask stops the run before
any model loads."""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from PIL import Image

from lora_trainer.data.buckets import upright_size
from lora_trainer.data.images import IMAGE_EXTENSIONS, is_unread_image_file, load_mask
from lora_trainer.errors import DataError, looked_in

if TYPE_CHECKING:  # the dataset reads masks through this module
    from lora_trainer.data.dataset import Example

_SHOWN = 3  # file names listed in an error before "..."


def find_mask(image: Path, root: Path, mask_dir: Path, listings: dict | None = None) -> Path | None:
    """The mask of `image` (under `root`) in `mask_dir`: `<its folder under root>/<stem>.<ext>`, else
    `<stem>.<ext>` at the top; the first extension of IMAGE_EXTENSIONS (any case) that exists.
    `listings` keeps each folder's file names between calls."""
    listings = {} if listings is None else listings
    relative = image.relative_to(root).parent
    for folder in dict.fromkeys((mask_dir / relative, mask_dir)):
        if folder not in listings:
            listings[folder] = ({p.name.lower(): p for p in folder.iterdir() if p.is_file()}
                                if folder.is_dir() else {})
        by_name = listings[folder]
        for ext in IMAGE_EXTENSIONS:
            found = by_name.get(f"{image.stem}{ext}".lower())
            if found is not None:
                return found
    return None


def attach_masks(examples: Sequence[Example], root: str | os.PathLike, mask_dir: str | os.PathLike,
                 key: str = "data.mask_dir") -> list[Example]:
    """`examples` with their mask files; one DataError naming the images without a mask or with a
    mask of another size (kohya refuses both)."""
    root, folder = Path(root), Path(mask_dir)
    if not folder.is_dir():
        raise DataError(f"{key}: {folder} is not a folder{looked_in(folder)}; point it at the folder of mask images "
                        "(one per training image, with its file name)")
    listings: dict = {}
    masks = [find_mask(ex.path, root, folder, listings) for ex in examples]
    missing = [ex.path.relative_to(root).as_posix() for ex, mask in zip(examples, masks) if mask is None]
    problems = []  # both kinds in one message, so a user fixes them in one go
    if missing:
        # a mask saved as TIFF or GIF (common from image editors) is there but not read: say so
        stems = {Path(m).stem.lower() for m in missing}
        unread = sorted(p.name for names in listings.values() for p in names.values()
                        if p.stem.lower() in stems and is_unread_image_file(p))
        formats = (f"; {_listed(unread)} {'is' if len(unread) == 1 else 'are'} in a format not read: convert "
                   f"to PNG ({', '.join(e.lstrip('.') for e in IMAGE_EXTENSIONS)} are read)") if unread else ""
        problems.append(f"{key}: no mask in {folder} for {len(missing)} of {len(examples)} image(s) "
                        f"({_listed(missing)}); add a mask of the same name (e.g. {Path(missing[0]).stem}.png, "
                        f"white = train, black = ignore) for each, as kohya needs one per image{formats}")
    wrong = []
    for ex, mask in zip(examples, masks):
        if mask is None:
            continue
        try:
            size = upright_size(mask)
        except Exception as err:  # noqa: BLE001 (broken files raise whatever their decoder hits)
            raise DataError(f"{mask}: cannot read mask image ({type(err).__name__}: {err}); re-save it as a "
                            "grayscale PNG") from err
        expected = upright_size(ex.path)  # the scan has read the image already
        if size != expected:
            wrong.append(f"{mask.name} is {size[1]}x{size[0]}, its image {ex.path.name} {expected[1]}x{expected[0]}")
    if wrong:
        problems.append(f"{key}: {len(wrong)} mask(s) in {folder} differ in size from their image "
                        f"({_listed(wrong)}); resize each mask to its image's size (kohya refuses them too)")
    if problems:
        raise DataError("; and ".join(problems))
    return [replace(ex, mask=mask) for ex, mask in zip(examples, masks)]


def read_mask(path: Path, digests: dict[Path, str] | None = None) -> tuple[Image.Image, str]:
    """The mask as an 8-bit "L" image (see `load_mask`) and the SHA-256 of the file, which keys the
    latent cache entries that carry it, so an edited mask never meets a stale entry. `digests`
    keeps each file's hash for the run, as the latent cache keeps its images' hashes: a mask is
    hashed once, not at every step that draws its image."""
    digest = digests.get(path) if digests is not None else None
    if digest is None:
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError as err:
            raise DataError(f"{path}: cannot read mask image ({err.strerror or err}); check data.mask_dir") from err
        if digests is not None:
            digests[path] = digest
    return load_mask(path), digest


def _listed(names: list[str]) -> str:
    return ", ".join(names[:_SHOWN]) + (", ..." if len(names) > _SHOWN else "")
