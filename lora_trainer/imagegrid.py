"""Labelled image grids (rows × columns with text labels), shared by training's end-of-run weight
sweep and inference's --sweep. PIL only."""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

# PIL's default bitmap font: about 6 px a character, 11 px a line.
_CHAR_W, _LINE_H = 6, 12


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
    """Cells in rows × columns, column labels on top, row labels on the left (both wrapped to fit)."""
    w, h = images[0][0].size
    rows, cols = len(images), len(images[0])
    # Small cells (64 px previews) cannot hold "name: 0.5" on one line: wrap, and make room.
    col_text = [_wrap(label, max(4, (w - 4) // _CHAR_W), max_lines=3) for label in col_labels]
    label_height = max(label_height, _LINE_H * max((t.count("\n") + 1 for t in col_text), default=1) + 6)
    size = (label_width + cols * (w + gap), label_height + rows * (h + gap))
    grid = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    boxes = []
    for c, label in enumerate(col_text):
        draw.multiline_text((label_width + c * (w + gap) + 2, 3), label, fill="black", font=font)
    for r, row in enumerate(images):
        top = label_height + r * (h + gap)
        draw.multiline_text((4, top + 2), _wrap(row_labels[r], max(8, (label_width - 8) // _CHAR_W)), fill="black", font=font)
        boxes.append([])
        for c, cell in enumerate(row):
            left = label_width + c * (w + gap)
            grid.paste(cell, (left, top))
            boxes[-1].append((left, top, left + w, top + h))
    return Grid(grid, boxes)
