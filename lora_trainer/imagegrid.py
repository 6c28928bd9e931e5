"""Labelled image grids (rows × columns with text labels), shared by training's end-of-run weight
sweep and inference's --sweep. PIL only."""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

@dataclass
class Grid:
    image: Image.Image
    boxes: list[list[tuple[int, int, int, int]]]  # [row][col] → (left, top, right, bottom) of each cell


def _wrap(text: str, width_chars: int, max_lines: int = 4) -> str:
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width_chars:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: max(0, width_chars - 1)] + "…"
    return "\n".join(lines)


def labelled_grid(images: list[list[Image.Image]], row_labels: list[str], col_labels: list[str],
                  label_width: int = 160, label_height: int = 24, gap: int = 2) -> Grid:
    """Cells in rows × columns, column labels on top, row labels on the left (wrapped)."""
    w, h = images[0][0].size
    rows, cols = len(images), len(images[0])
    size = (label_width + cols * (w + gap), label_height + rows * (h + gap))
    grid = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    boxes = []
    for c, label in enumerate(col_labels):
        draw.text((label_width + c * (w + gap) + 4, 4), label, fill="black", font=font)
    for r, row in enumerate(images):
        top = label_height + r * (h + gap)
        draw.multiline_text((4, top + 2), _wrap(row_labels[r], max(8, label_width // 7)), fill="black", font=font)
        boxes.append([])
        for c, cell in enumerate(row):
            left = label_width + c * (w + gap)
            grid.paste(cell, (left, top))
            boxes[-1].append((left, top, left + w, top + h))
    return Grid(grid, boxes)
