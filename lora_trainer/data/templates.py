"""Caption templates for textual inversion (embedding.templates): instead of its own caption, each
image, each time it is drawn, is captioned by a short sentence chosen at random with the trigger
word in it ("a photo of a {}" for an object, "a painting in the style of {}" for a style), so the
vectors learn the subject or the look and not the wording of a few captions."""

from __future__ import annotations

import random
from typing import Sequence

PLACE = "{}"  # where the trigger word goes in a template

# A subject: the word names the thing the images show.
OBJECT_TEMPLATES = (
    "a photo of a {}",
    "a photo of the {}",
    "a rendering of a {}",
    "a rendering of the {}",
    "a cropped photo of the {}",
    "a cropped photo of a {}",
    "a close-up photo of a {}",
    "a close-up photo of the {}",
    "a bright photo of the {}",
    "a dark photo of the {}",
    "a good photo of the {}",
    "a clean photo of a {}",
    "a dirty photo of a {}",
    "a photo of my {}",
    "a photo of one {}",
    "a photo of a nice {}",
    "a photo of a small {}",
    "a photo of a large {}",
    "a blurry photo of the {}",
    "a weird photo of a {}",
    "a picture of a {}",
    "an image of the {}",
)

# A look: the word names the style the images share.
STYLE_TEMPLATES = (
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a picture in the style of {}",
    "an image in the style of {}",
    "a cropped painting in the style of {}",
    "a close-up painting in the style of {}",
    "a painting of a thing in the style of {}",
    "a painting of the thing in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a large painting in the style of {}",
    "a good painting in the style of {}",
    "a dark painting in the style of {}",
    "a bright painting in the style of {}",
    "a weird painting in the style of {}",
    "a cool painting in the style of {}",
    "an illustration in the style of {}",
    "artwork in the style of {}",
)

NAMED = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}


def template_list(templates: str | Sequence[str] | None) -> list[str]:
    """embedding.templates as a list: a named set, the given list (one string: a list of one), or []
    for the captions."""
    if templates is None:
        return []
    if isinstance(templates, str):
        return list(NAMED[templates]) if templates in NAMED else [templates]
    return list(templates)


def template_captions(templates: str | Sequence[str] | None, token: str) -> list[str]:
    """The captions the templates make, each with the trigger word in its place."""
    return [t.replace(PLACE, token) for t in template_list(templates)]


def describe_templates(templates: str | Sequence[str] | None) -> str | None:
    """A short name for the metadata and the logs: "object", "style" or "custom (N)"; None without."""
    if templates is None:
        return None
    return templates if templates in NAMED else f"custom ({len(template_list(templates))})"


def pick_template(captions: Sequence[str], seed: int, epoch: int, item: int) -> str:
    """The template caption of dataset item `item` in `epoch`: a function of (seed, epoch, item) on a
    stream of its own, as the dataset's other draws, so resumed and multi-process runs agree."""
    return captions[random.Random(f"{seed}:{epoch}:{item}:template").randrange(len(captions))]
