"""Image files of formats training does not read (GIF, TIFF, HEIC, AVIF, ...) are reported by
check-data, caption and training, never passed over in silence; the caption command on a folder with
no images is an error; one unreadable caption file does not hide the checks of the others."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from lora_trainer.cli import main
from lora_trainer.data.checks import check_dataset
from lora_trainer.data.dataset import scan_dataset
from lora_trainer.errors import DataError

READ = "formats read: png, jpg, jpeg, webp, bmp"


def _noise(seed: int, size=(48, 40)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture()
def mixed(tmp_path):
    """Two PNGs with captions, and a GIF, a TIFF and an AVIF (PIL writes all three) in a subfolder
    or beside them; notes.md and a latent cache are not images and must not be reported."""
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    for i, name in enumerate(["a.png", "b.png"]):
        _noise(i).save(data / name)
        (data / name).with_suffix(".txt").write_text(f"sks, picture {i}", encoding="utf-8")
    _noise(5).save(data / "anim.gif")
    _noise(6).save(data / "sub" / "scan.TIFF")
    _noise(7).save(data / "phone.avif")
    (data / "notes.md").write_text("not an image")
    (data / "a.npz").write_bytes(b"cache")
    return data


def test_check_data_names_unread_formats_and_the_formats_read(mixed, capsys):
    report = check_dataset(mixed, resolution=32)
    [problem] = [p for p in report.problems if p.kind == "unread_format"]
    assert problem.severity == "warning" and report.can_train
    assert problem.files == ["anim.gif", "phone.avif", "sub/scan.TIFF"]
    assert problem.message.startswith("3 image file(s) in a format training does not read (avif, gif, tiff)")
    assert READ in problem.message and "convert them to PNG or JPEG" in problem.message
    assert (report.num_images, report.num_readable, report.num_captioned) == (2, 2, 2)

    assert main(["check-data", str(mixed), "--resolution", "32"]) == 0
    out = capsys.readouterr().out
    assert "warning: 3 image file(s) in a format" in out and "anim.gif, phone.avif, sub/scan.TIFF" in out
    assert main(["check-data", str(mixed), "--resolution", "32", "--strict"]) == 1


def test_a_folder_of_only_unread_formats_is_an_error_naming_them(tmp_path, capsys):
    data = tmp_path / "gifs"
    data.mkdir()
    _noise(1).save(data / "x.gif")
    report = check_dataset(data, resolution=32)
    assert {p.kind: p.severity for p in report.problems} == {"unread_format": "error", "no_images": "error"}
    assert main(["check-data", str(data)]) == 1
    assert "error: 1 image file(s) in a format training does not read (gif)" in capsys.readouterr().out
    with pytest.raises(DataError, match=r"gifs: no images found \(png, jpg, jpeg, webp, bmp\).*"
                                        r"1 image file\(s\) in a format training does not read \(gif\).*: x\.gif$"):
        scan_dataset(data)


def test_training_scan_warns_once_naming_the_unread_files(mixed, caplog):
    with caplog.at_level(logging.WARNING):
        examples = scan_dataset(mixed)
    assert [e.path.name for e in examples] == ["a.png", "b.png"]
    warnings = [r.getMessage() for r in caplog.records if "does not read" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].endswith("anim.gif, phone.avif, sub/scan.TIFF")
    assert "notes.md" not in warnings[0] and "a.npz" not in warnings[0]


def test_caption_command_reports_unread_files_and_empty_folder_is_exit_1(mixed, tmp_path, capsys, caplog):
    # every image has a caption, so no model loads: the report is all that happens
    with caplog.at_level(logging.WARNING):
        assert main(["caption", str(mixed), "--model", str(tmp_path / "no-model"), "--quiet"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "2 image(s): 2 kept"
    assert any("3 image file(s) in a format training does not read" in r.getMessage() for r in caplog.records)

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["caption", str(empty), "--quiet"]) == 1
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err == (f"error: {empty}: no images to caption ({READ}); put the images in this folder or a subfolder")
    assert captured.out == ""


def test_one_unreadable_caption_file_is_an_error_and_the_others_are_still_checked(mixed):
    (mixed / "b.txt").write_bytes("caf\xe9".encode("latin-1"))
    long = " ".join(f"w{a}{b}" for a in "abcdefghij" for b in "abcdefghi")
    (mixed / "a.txt").write_text(long, encoding="utf-8")
    _noise(3).save(mixed / "c.png")  # no caption at all
    report = check_dataset(mixed, resolution=32)
    kinds = {p.kind: p for p in report.problems}
    bad = kinds["bad_caption_file"]
    assert bad.severity == "error" and not report.can_train
    assert "1 caption file(s) cannot be read" in bad.message and "b.txt: not UTF-8 text" in bad.message
    # the readable caption and the missing one are still reported, and only a.txt counts as captioned
    assert report.num_captioned == 1 and report.max_tokens == 90
    assert kinds["long_caption"].files[0].startswith("a.png (90 tokens")
    assert kinds["missing_caption"].files == ["c.png"]
    assert "b.png" not in kinds["missing_caption"].files


def test_class_folder_images_of_unread_formats_are_named(mixed, tmp_path, caplog):
    from conftest import run_config

    from lora_trainer.training.prior import generate_class_images

    classes = tmp_path / "class"
    classes.mkdir()
    for i in range(2):
        _noise(10 + i).save(classes / f"c{i}.png")
    _noise(12).save(classes / "dog.gif")
    cfg = run_config(tmp_path / "unused-base", mixed, tmp_path / "out", "dreambooth.instance_prompt=sks",
                     "dreambooth.class_prompt=a dog", f"dreambooth.class_data={classes}",
                     "dreambooth.num_class_images=2")
    with caplog.at_level(logging.WARNING):
        assert generate_class_images(cfg, base=None) == []  # two PNGs are enough: nothing generated
    [warning] = [r.getMessage() for r in caplog.records if "does not read" in r.getMessage()]
    assert warning.startswith(f"{classes}: 1 image file(s)") and warning.endswith("(gif) are skipped; convert "
                                                                                 f"them to PNG or JPEG ({READ}): dog.gif")


def test_a_mask_in_a_format_not_read_is_named(mixed, tmp_path):
    from lora_trainer.data.masks import attach_masks

    masks = tmp_path / "masks"
    masks.mkdir()
    Image.new("L", (48, 40), 255).save(masks / "a.png")
    Image.new("L", (48, 40), 255).save(masks / "b.tiff")  # as image editors often save them
    with pytest.raises(DataError, match=r"no mask in .* for 1 of 2 image\(s\) \(b\.png\); .*; b\.tiff is in a format "
                                        r"not read: convert to PNG \(png, jpg, jpeg, webp, bmp are read\)$"):
        attach_masks(scan_dataset(mixed), mixed, masks)
