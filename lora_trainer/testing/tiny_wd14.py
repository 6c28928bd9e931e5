"""An offline, randomly initialised WD14-style tagger for tests and the demo: a tiny torch conv net
exported to ONNX with a selected_tags.csv beside it.

It has the real taggers' contract (NHWC float32 BGR 0-255 input, one sigmoid confidence per tag,
ratings, general and character tags in the csv), so data.caption.method wd14 loads it exactly like
SmilingWolf/wd-vit-tagger-v3; only the input side (32, read from the model) and the tags differ.
Exporting needs the onnx package (the dev extra).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Sequence

import torch

from ..fileio import atomic_path, write_text_atomic

IMAGE_SIZE = 32
# (name, category) in output order: 9 rating, 0 general, 4 character, as in SmilingWolf's lists.
TINY_TAGS = (
    ("general", 9), ("sensitive", 9), ("questionable", 9), ("explicit", 9),
    ("1girl", 0), ("solo", 0), ("long_hair", 0), ("smile", 0), ("^_^", 0), (">_<", 0), ("(o)_(o)", 0),
    ("blue_sky", 0), ("simple_background", 0),
    ("hatsune_miku", 4), ("kaname_madoka", 4),
)


class TinyTagger(torch.nn.Module):
    """Two strided convolutions, a mean over the image and one linear layer: a confidence per tag
    that differs from image to image (weights drawn wide so they spread over (0, 1))."""

    def __init__(self, num_tags: int, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.conv1 = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.head = torch.nn.Linear(8, num_tags)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * (1.5 if p.dim() > 1 else 0.5))

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # [N, H, W, 3] BGR 0-255
        x = images.permute(0, 3, 1, 2) / 127.5 - 1.0
        x = torch.tanh(self.conv2(torch.tanh(self.conv1(x))))
        return torch.sigmoid(self.head(x.mean(dim=(2, 3))))


class RegionProbe(torch.nn.Module):
    """A "tagger" whose tag k is the mean of one channel of the input over one region, divided by
    255: what the tagger was fed (padding, channel order) shows in its tags."""

    def __init__(self, regions: Sequence[tuple[int, int, int, int, int]]):
        super().__init__()
        self.regions = list(regions)  # (top, bottom, left, right, channel) in input pixels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        means = [images[:, t:b, l:r, ch].mean(dim=(1, 2)) for t, b, l, r, ch in self.regions]
        return torch.stack(means, dim=1) / 255.0


def export_tagger(net: torch.nn.Module, out_dir: str | Path, tags: Sequence[tuple[str, int]],
                  size: int = IMAGE_SIZE, fixed_batch: int | None = None) -> Path:
    """Write `net` as `out_dir/model.onnx` (input [batch, size, size, 3], the batch dynamic unless
    `fixed_batch`) and its `selected_tags.csv`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dynamic = None if fixed_batch else {"input": {0: "batch"}, "output": {0: "batch"}}
    example = torch.zeros(fixed_batch or 1, size, size, 3)
    with atomic_path(out_dir / "model.onnx") as tmp:
        torch.onnx.export(net.eval(), (example,), str(tmp), input_names=["input"], output_names=["output"],
                          dynamic_axes=dynamic, dynamo=False)  # the TorchScript exporter: no onnxscript needed
    rows = io.StringIO()
    writer = csv.writer(rows, lineterminator="\n")
    writer.writerow(["tag_id", "name", "category", "count"])
    writer.writerows([i, name, category, 1000 - i] for i, (name, category) in enumerate(tags))
    write_text_atomic(out_dir / "selected_tags.csv", rows.getvalue())
    return out_dir


def make_wd14(out_dir: str | Path, seed: int = 0) -> Path:
    """The tiny tagger (TinyTagger with `seed`, TINY_TAGS, 32-pixel input) saved to `out_dir`."""
    return export_tagger(TinyTagger(len(TINY_TAGS), seed), out_dir, TINY_TAGS)
