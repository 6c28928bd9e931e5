"""Dataset checks: every planted problem is reported with its files, the command's exit codes and
JSON, and the cut part of a long caption is what training's tokenizer really drops."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from lora_trainer.cli import main
from lora_trainer.data.checks import aspect_name, check_dataset, count_tokens, load_clip_tokenizer

WORDS = [f"w{a}{b}" for a in "abcdefghij" for b in "abcdefghi"]  # 90 one-token words (no digits: CLIP splits those)
LONG = " ".join(WORDS)


def _noise_png(path, seed, size=(64, 64)):
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture()
def planted(tmp_path):
    """One of each problem, beside two good images."""
    data = tmp_path / "data"
    data.mkdir()
    for i, name in enumerate(["good1.png", "good2.png", "nocap.png", "empty.png", "long.png"]):
        _noise_png(data / name, i, size=(96, 64) if name == "good2.png" else (64, 64))
    Image.open(data / "good1.png").save(data / "copy.png", pnginfo=None, compress_level=1)  # same pixels, other bytes
    _noise_png(data / "tiny.png", 9, size=(40, 20))
    (data / "corrupt.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    for name, text in [("good1", "sks, a dog, grass"), ("good2", "sks, a dog"), ("copy", "sks, a dog, grass"),
                       ("tiny", "sks, small"), ("empty", "  "), ("long", LONG)]:
        (data / f"{name}.txt").write_text(text, encoding="utf-8")
    return data


def test_check_data_reports_each_planted_problem(planted):
    report = check_dataset(planted, resolution=64)
    found = {p.kind: (p.severity, p.files) for p in report.problems}
    assert found == {
        "unreadable": ("warning", ["corrupt.jpg"]),
        "too_small": ("warning", ["tiny.png (40x20)"]),
        "duplicate": ("warning", ["copy.png = good1.png"]),
        "missing_caption": ("warning", ["nocap.png"]),
        "empty_caption": ("warning", ["empty.png"]),
        "long_caption": ("warning", [f"long.png (90 tokens, cut: {' '.join(WORDS[75:])!r})"]),
    }
    assert report.can_train and (report.num_images, report.num_readable, report.num_captioned) == (8, 7, 5)
    assert report.aspect_ratios == {"1:1": 5, "3:2": 1, "2:1": 1}
    assert report.sizes == {"smallest": "40x20", "largest": "96x64", "median": "64x64"}
    assert report.tag_frequency["sks"] == 4 and report.tag_frequency["a dog"] == 3
    assert report.max_tokens == 90 and report.token_counter == "estimate"


def test_prefix_counts_towards_tags_and_length(planted):
    report = check_dataset(planted, resolution=64, caption_prefix="trig, ")
    assert report.tag_frequency["trig"] == 5
    assert report.max_tokens == 92  # "trig" and "," are two more tokens


def test_cut_text_is_what_the_training_tokenizer_drops(tiny_sd15):
    tokenizer = load_clip_tokenizer(str(tiny_sd15))
    assert tokenizer is not None and len(tokenizer) > 100
    caption = "a red circle on a light blue background, " * 12
    n, cut = count_tokens(caption, tokenizer)
    assert n == len(tokenizer(caption, add_special_tokens=False).input_ids) > 75
    # What the trainer encodes: the first 77 tokens with start/end, as in training/loop.py.
    ids = tokenizer(caption, max_length=77, truncation=True).input_ids
    kept = tokenizer.decode(ids, skip_special_tokens=True)
    assert (kept + cut).replace(" ", "") == caption.replace(" ", "")


def test_missing_tokenizer_is_not_faked(tmp_path):
    assert load_clip_tokenizer(str(tmp_path)) is None
    assert load_clip_tokenizer("nobody/no-such-model") is None
    assert load_clip_tokenizer("model.safetensors") is None


@pytest.mark.parametrize("size, name", [((640, 480), "4:3"), ((1920, 1080), "16:9"), ((512, 512), "1:1"),
                                        ((832, 1216), "2:3"), ((235, 100), "2.35:1")])
def test_aspect_ratio_names(size, name):
    assert aspect_name(*size) == name


def test_check_data_command_exit_codes_and_json(planted, tmp_path, capsys):
    assert main(["check-data", str(planted), "--resolution", "64"]) == 0
    text = capsys.readouterr().out
    assert "copy.png = good1.png" in text and "result: can train (6 warning(s))" in text
    assert main(["check-data", str(planted), "--resolution", "64", "--strict"]) == 1
    capsys.readouterr()

    assert main(["check-data", str(planted), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["can_train"] is True and report["num_images"] == 8

    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(planted / "corrupt.jpg", broken)
    assert main(["check-data", str(broken)]) == 1
    assert "error: 1 unreadable image(s)" in capsys.readouterr().out
    (planted / "metadata.jsonl").write_text("{not json\n")
    assert main(["check-data", str(planted), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["can_train"] is False and report["problems"][-1]["kind"] == "metadata"
    assert main(["check-data", str(tmp_path / "nope")]) == 1
    assert "error: dataset folder not found" in capsys.readouterr().out
    # a file given for the folder is called a file, by check-data, caption and training alike
    assert main(["check-data", str(planted / "good1.png")]) == 1
    assert "error: a file, not a dataset folder" in capsys.readouterr().out
    assert main(["caption", str(planted / "good1.png"), "--quiet"]) == 2
    assert "good1.png: is a file, not a folder; give a folder of images" in capsys.readouterr().err


def test_check_data_checks_the_masks_training_would_read(tmp_path, capsys):
    data, masks = tmp_path / "data", tmp_path / "masks"
    (data / "10_dog").mkdir(parents=True)
    (masks / "10_dog").mkdir(parents=True)
    for i, name in enumerate(["a", "b"]):
        _noise_png(data / "10_dog" / f"{name}.png", i)
        (data / "10_dog" / f"{name}.txt").write_text("sks ||| dog", encoding="utf-8")
    Image.new("L", (64, 64), 255).save(masks / "10_dog" / "a.png")
    Image.new("L", (64, 64), 0).save(masks / "b.png")  # kohya's layout: directly in the mask folder
    report = check_dataset(data, 64, mask_dir=masks, separator="|||")
    assert report.can_train and not [p for p in report.problems if p.kind == "masks"]
    assert report.tag_frequency == {"sks": 2, "dog": 2}  # the separator is not a tag
    # a check that passes says so: which folder, how many masks
    assert f"masks: one for each of the 2 readable image(s), of its size, in {masks}" in report.format_text()

    Image.new("L", (32, 64), 0).save(masks / "b.png")
    assert main(["check-data", str(data), "--resolution", "64", "--mask-dir", str(masks)]) == 1
    out = capsys.readouterr().out
    assert "1 mask(s) in" in out and "b.png is" in out and "resize each mask to its image's size" in out
    (masks / "b.png").unlink()
    report = check_dataset(data, 64, mask_dir=masks)
    [problem] = [p for p in report.problems if p.kind == "masks"]
    assert "no mask in" in problem.message and "10_dog/b.png" in problem.message
    assert report.masks == "" and "masks:" not in report.format_text()
    Image.new("L", (64, 32), 0).save(masks / "10_dog" / "a.png")  # and a's mask of another size: both named
    [problem] = [p for p in check_dataset(data, 64, mask_dir=masks).problems if p.kind == "masks"]
    assert "no mask in" in problem.message and "10_dog/b.png" in problem.message
    assert "; and mask folder: 1 mask(s) in" in problem.message and "a.png is 64x32, its image a.png 64x64" in problem.message
    report = check_dataset(data, 64, mask_dir=data / "10_dog")
    assert not report.can_train and "inside the dataset folder" in report.problems[-1].message
    assert not [p for p in check_dataset(data, 64).problems if p.kind == "masks"]  # no mask_dir: not checked


def test_long_caption_limit_follows_max_token_length(planted):
    report = check_dataset(planted, resolution=64, token_limit=150)
    assert "long_caption" not in {p.kind for p in report.problems}
    assert "of 150" in report.format_text()
