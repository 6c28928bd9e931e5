"""Dataset stage: scanning, captions, image modes and the training Dataset."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lora_trainer.data import (
    Example,
    ImageCaptionDataset,
    dataset_summary,
    load_image,
    scan_dataset,
    tag_frequency,
)
from lora_trainer.errors import DataError

REPO = Path(__file__).resolve().parent.parent


def save_rgb(path: Path, colour=(200, 30, 30), size=(48, 32)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def gradient(size=(48, 32)) -> Image.Image:
    w, h = size
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None].repeat(w, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], -1).astype(np.uint8))


# --- captions -------------------------------------------------------------------------------

def test_sidecar_captions_are_stripped_and_missing_ones_are_empty(tmp_path):
    save_rgb(tmp_path / "a.png")
    save_rgb(tmp_path / "b.jpg")
    (tmp_path / "a.txt").write_text("  a red square, flat  \n", encoding="utf-8")
    examples = scan_dataset(tmp_path)
    assert [(e.path.name, e.caption) for e in examples] == [("a.png", "a red square, flat"),
                                                            ("b.jpg", "")]
    assert dataset_summary(examples) == {"num_images": 2, "num_captioned": 1, "num_uncaptioned": 1}


def test_the_uncaptioned_count_names_blank_caption_files_too(tmp_path, caplog):
    save_rgb(tmp_path / "a.png")
    save_rgb(tmp_path / "b.png")
    (tmp_path / "a.txt").write_text("  \n", encoding="utf-8")  # there, but blank: not "no .txt file"
    caplog.set_level(logging.INFO)
    scan_dataset(tmp_path)
    assert "2 of 2 images have no caption (no metadata.jsonl entry or .txt file, or a blank one)" in caplog.text
    caplog.clear()
    scan_dataset(tmp_path, report_missing=False)  # an instance prompt captions them all
    assert "no caption" not in caplog.text


def test_metadata_jsonl_wins_over_sidecar_and_reaches_subfolders(tmp_path):
    save_rgb(tmp_path / "a.png")
    save_rgb(tmp_path / "sub" / "b.png")
    save_rgb(tmp_path / "c.png")
    (tmp_path / "a.txt").write_text("from sidecar", encoding="utf-8")
    (tmp_path / "c.txt").write_text("only sidecar", encoding="utf-8")
    lines = [{"file_name": "a.png", "text": "from jsonl"},
             {"file_name": "sub/b.png", "text": "nested"}]
    (tmp_path / "metadata.jsonl").write_text(
        "\n".join(json.dumps(line) for line in lines) + "\n\n", encoding="utf-8")
    captions = {e.path.relative_to(tmp_path).as_posix(): e.caption for e in scan_dataset(tmp_path)}
    assert captions == {"a.png": "from jsonl", "sub/b.png": "nested", "c.png": "only sidecar"}


@pytest.mark.parametrize("line, expected", [
    ("{not json", "line 2"),
    ('{"text": "no file name"}', "file_name"),
])
def test_bad_metadata_line_names_file_and_line(tmp_path, line, expected):
    save_rgb(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text(
        json.dumps({"file_name": "a.png", "text": "ok"}) + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=expected) as info:
        scan_dataset(tmp_path)
    assert "metadata.jsonl" in str(info.value) and "line 2" in str(info.value)


def test_scan_is_sorted_recursive_and_skips_hidden_and_cache(tmp_path):
    for rel in ["b.PNG", "a/z.jpeg", "a/c.webp", "d.bmp", ".hidden.png", ".git/x.png",
                "a/.cache/y.png", ".cache/w.png"]:
        save_rgb(tmp_path / rel)
    (tmp_path / "notes.txt").write_text("not an image")
    Image.new("RGB", (8, 8)).save(tmp_path / "e.gif")  # readable, but not a training format
    names = [e.path.relative_to(tmp_path).as_posix() for e in scan_dataset(tmp_path)]
    assert names == ["a/c.webp", "a/z.jpeg", "b.PNG", "d.bmp"]


def test_tag_frequency_counts_comma_separated_tags():
    examples = [Example(Path("a.png"), "sks, Red, circle"), Example(Path("b.png"), "sks,  red ,"),
                Example(Path("c.png"), "")]
    assert tag_frequency(examples) == {"red": 2, "sks": 2, "circle": 1}


# --- image modes ----------------------------------------------------------------------------

def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (48, 32), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 16, 16))  # marker in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    image.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    loaded = load_image(tmp_path / "rot.jpg")
    assert loaded.size == (32, 48)
    r, g, b = loaded.getpixel((28, 4))  # top-left moved to the top-right
    assert r > 200 and b < 60
    assert loaded.getpixel((4, 44))[2] > 200


def test_transparent_pixels_become_white(tmp_path):
    rgba = Image.new("RGBA", (32, 32), (255, 0, 0, 0))
    rgba.paste((0, 128, 0, 255), (0, 0, 16, 32))
    rgba.save(tmp_path / "t.png")
    loaded = load_image(tmp_path / "t.png")
    assert loaded.mode == "RGB"
    assert loaded.getpixel((24, 10)) == (255, 255, 255)
    assert loaded.getpixel((4, 10)) == (0, 128, 0)


def test_palette_with_transparency_becomes_white(tmp_path):
    p = Image.new("P", (32, 32), 0)
    p.putpalette([10, 20, 30, 200, 0, 0] + [0] * 762)
    p.paste(1, (0, 0, 16, 32))
    p.save(tmp_path / "p.png", transparency=0)
    loaded = load_image(tmp_path / "p.png")
    assert loaded.getpixel((4, 4)) == (200, 0, 0)
    assert loaded.getpixel((24, 4)) == (255, 255, 255)


def test_cmyk_jpeg_loads_as_rgb_with_sane_colour(tmp_path):
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    r, g, b = load_image(tmp_path / "c.jpg").getpixel((16, 16))
    assert r > 200 and g < 60 and b < 60


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    values = np.full((32, 32), 32768, dtype=np.uint16)
    values[:, 16:] = 65535
    Image.fromarray(values).save(tmp_path / "g16.png")
    loaded = np.asarray(load_image(tmp_path / "g16.png"))
    assert loaded.shape == (32, 32, 3)
    assert abs(int(loaded[0, 0, 0]) - 128) <= 1 and loaded[0, 31, 0] == 255


@pytest.mark.parametrize("mode", ["L", "LA", "1", "I", "F"])
def test_other_modes_convert_to_rgb(tmp_path, mode):
    # Pillow writes I and F only to TIFF; load_image reads whatever Pillow can open.
    if mode == "1":
        image = Image.new("1", (32, 32), 1)
    else:
        image = Image.new("L", (32, 32), 100).convert(mode)
    path = tmp_path / ("x.tif" if mode in ("I", "F") else "x.png")
    image.save(path)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (32, 32)
    expected = 255 if mode == "1" else 100
    assert loaded.getpixel((3, 3)) == (expected,) * 3


def test_truncated_image_raises_data_error(tmp_path):
    gradient((64, 64)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cut.png: cannot read image"):
        load_image(tmp_path / "cut.png")


# --- scanning bad folders -------------------------------------------------------------------

def test_bad_images_are_skipped_with_one_warning(tmp_path, caplog):
    save_rgb(tmp_path / "good.png")
    (tmp_path / "noise.png").write_bytes(np.random.default_rng(0).bytes(500))
    (tmp_path / "empty.jpg").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="lora_trainer"):
        examples = scan_dataset(tmp_path)
    assert [e.path.name for e in examples] == ["good.png"]
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "noise.png" in message and "empty.jpg" in message and "good.png" not in message


def test_missing_empty_and_all_bad_folders_raise(tmp_path):
    with pytest.raises(DataError, match="not found"):
        scan_dataset(tmp_path / "nope")
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    (empty / "readme.txt").write_text("hi")
    with pytest.raises(DataError, match=r"empty_folder: no images found \(png, jpg"):
        scan_dataset(empty)
    bad = tmp_path / "bad_folder"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"not an image")
    (bad / "b.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="bad_folder") as info:
        scan_dataset(bad)
    assert "a.png" in str(info.value) and "b.jpg" in str(info.value)


# --- the torch Dataset ----------------------------------------------------------------------

@pytest.fixture
def examples(tmp_path):
    gradient((48, 32)).save(tmp_path / "wide.png")
    gradient((32, 56)).save(tmp_path / "tall.png")
    (tmp_path / "wide.txt").write_text("a gradient", encoding="utf-8")
    return scan_dataset(tmp_path)


def test_items_are_square_tensors_in_range(examples):
    ds = ImageCaptionDataset(examples, resolution=24, repeats=3)
    assert len(ds) == 6
    item = ds[4]
    assert item["pixel_values"].shape == (3, 24, 24) and item["pixel_values"].dtype == torch.float32
    assert item["pixel_values"].min() >= -1 and item["pixel_values"].max() <= 1
    assert item["index"] == 0 and item["caption"] == examples[0].caption
    assert item["flipped"] is False
    batch = torch.utils.data.default_collate([ds[0], ds[1]])
    assert batch["pixel_values"].shape == (2, 3, 24, 24)
    with pytest.raises(IndexError):
        ds[6]


def test_center_crop_is_deterministic_and_centred(examples):
    wide = next(e for e in examples if e.path.name == "wide.png")
    ds = ImageCaptionDataset([wide], resolution=32, center_crop=True)
    items = [ds[0]]
    ds.set_epoch(5)
    items.append(ImageCaptionDataset([wide], resolution=32, seed=9)[0])
    items.append(ds[0])
    assert all(torch.equal(items[0]["pixel_values"], it["pixel_values"]) for it in items)
    assert items[0]["crop_top_left"].tolist() == [0, 8]
    middle = np.asarray(gradient((48, 32)), dtype=np.float32)[:, 8:40] / 127.5 - 1
    assert torch.allclose(items[0]["pixel_values"], torch.from_numpy(middle).permute(2, 0, 1))


def test_random_crop_and_flip_vary_but_replay_for_same_seed_and_epoch(examples):
    def make(seed):
        return ImageCaptionDataset(examples, resolution=16, center_crop=False, random_flip=True,
                                   repeats=8, seed=seed)
    ds, twin = make(0), make(0)
    ds.set_epoch(2)
    twin.set_epoch(2)
    for i in range(len(ds)):
        assert torch.equal(ds[i]["pixel_values"], twin[i]["pixel_values"])
    flips = [ds[i]["flipped"] for i in range(len(ds))]
    assert any(flips) and not all(flips)
    crops = {tuple(ds[i]["crop_top_left"].tolist()) for i in range(len(ds))}
    assert len(crops) > 1
    before = [ds[i]["pixel_values"] for i in range(4)]
    ds.set_epoch(3)
    assert any(not torch.equal(b, ds[i]["pixel_values"]) for i, b in enumerate(before))


def test_flip_mirrors_the_image(examples):
    ds = ImageCaptionDataset(examples[:1], resolution=32, random_flip=True, repeats=16)
    items = [ds[i] for i in range(len(ds))]
    plain = next(it for it in items if not it["flipped"])["pixel_values"]
    flipped = next(it for it in items if it["flipped"])["pixel_values"]
    assert torch.equal(flipped, plain.flip(-1))


def test_caption_prefix_and_dropout(examples):
    wide, tall = sorted(examples, key=lambda e: e.path.name != "wide.png")
    ds = ImageCaptionDataset([wide, tall], resolution=16, caption_prefix="sks, ")
    assert ds[0]["caption"] == "sks, a gradient"
    assert ds[1]["caption"] == "sks"
    dropped = ImageCaptionDataset([wide], resolution=16, caption_prefix="sks, ",
                                  caption_dropout=1.0)
    assert dropped[0]["caption"] == ""


def test_bundled_example_dataset_scans_cleanly():
    root = REPO / "datasets" / "example"
    examples = scan_dataset(root)
    assert len(examples) == 8 and all("geometric style" in e.caption for e in examples)
    assert not list((REPO / "datasets").rglob("__init__.py"))
    assert sum(p.stat().st_size for p in root.iterdir()) < 200_000
