"""Draw the bundled example dataset (datasets/example/): 8 small geometric images with captions.

Deterministic, so `python scripts/make_example_dataset.py` regenerates the committed files.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 64
# Drawing at 4x and shrinking gives smooth edges without PIL's (absent) antialiased shapes.
SUPERSAMPLE = 4

COLOURS = {
    "red": (220, 40, 40), "blue": (40, 80, 210), "green": (40, 160, 70), "yellow": (240, 200, 30),
    "purple": (140, 60, 180), "orange": (240, 130, 30),
}
BACKGROUNDS = {
    "light blue": (200, 225, 250), "pale pink": (250, 215, 225), "mint green": (210, 245, 225),
    "cream": (250, 245, 215),
}
# (shape, colour, background, centre x, centre y, radius) as fractions of the image size.
IMAGES = [
    ("circle", "red", "light blue", 0.50, 0.50, 0.30),
    ("square", "blue", "pale pink", 0.45, 0.55, 0.28),
    ("triangle", "green", "cream", 0.50, 0.55, 0.34),
    ("circle", "yellow", "mint green", 0.40, 0.45, 0.26),
    ("square", "purple", "light blue", 0.55, 0.45, 0.25),
    ("triangle", "orange", "pale pink", 0.48, 0.52, 0.32),
    ("circle", "blue", "cream", 0.55, 0.55, 0.24),
    ("square", "red", "mint green", 0.50, 0.50, 0.30),
]

LICENSE = """The images and captions in this folder were generated procedurally by this project's
script scripts/make_example_dataset.py (simple shapes drawn with Pillow); no photographs or
third-party artwork were used.

They are dedicated to the public domain under CC0 1.0 Universal:
https://creativecommons.org/publicdomain/zero/1.0/
"""


def draw(shape: str, colour: str, background: str, cx: float, cy: float, r: float) -> Image.Image:
    big = SIZE * SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUNDS[background])
    pen = ImageDraw.Draw(image)
    x, y, radius = cx * big, cy * big, r * big
    fill = COLOURS[colour]
    # A dark outline gives the set its one shared "style" trait besides the flat colours.
    outline, width = (40, 40, 50), 3 * SUPERSAMPLE
    if shape == "circle":
        pen.ellipse((x - radius, y - radius, x + radius, y + radius), fill, outline, width)
    elif shape == "square":
        pen.rectangle((x - radius, y - radius, x + radius, y + radius), fill, outline, width)
    else:
        points = [(x + radius * math.sin(a), y - radius * math.cos(a))
                  for a in (0, 2 * math.pi / 3, 4 * math.pi / 3)]
        pen.polygon(points, fill, outline, width)
    return image.resize((SIZE, SIZE), Image.Resampling.LANCZOS)


def make_example_dataset(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for number, (shape, colour, background, cx, cy, r) in enumerate(IMAGES, start=1):
        stem = out_dir / f"{number:02d}_{colour}_{shape}"
        draw(shape, colour, background, cx, cy, r).save(stem.with_suffix(".png"), optimize=True)
        caption = f"a {colour} {shape} on a {background} background, geometric style\n"
        stem.with_suffix(".txt").write_text(caption, encoding="utf-8")
    (out_dir / "LICENSE.txt").write_text(LICENSE, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(__file__).resolve().parent.parent / "datasets" / "example"
    parser.add_argument("out_dir", nargs="?", type=Path, default=default)
    make_example_dataset(parser.parse_args().out_dir)


if __name__ == "__main__":
    main()
