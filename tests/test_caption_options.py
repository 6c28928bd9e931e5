"""kohya's caption options: caption files of another extension (kohya reads `.caption`), a suffix
added at training time, and tag dropout; through the config, the dataset, check-data, captioning
and from-kohya."""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path

import pytest
from conftest import REPO, run_config
from PIL import Image

from lora_trainer.cli import main
from lora_trainer.config import CaptionConfig, load_config
from lora_trainer.data import Example, ImageCaptionDataset, scan_dataset
from lora_trainer.data.captioning import caption_folder
from lora_trainer.data.checks import check_dataset
from lora_trainer.data.tags import drop_tags
from lora_trainer.errors import ConfigError
from lora_trainer.kohya.setup import config_from_kohya, parse_command_line

EXAMPLE = REPO / "datasets" / "example"


@pytest.fixture()
def caption_files(tmp_path) -> Path:
    """Four example images captioned the kohya way: `<stem>.caption` files, no .txt."""
    data = tmp_path / "data"
    data.mkdir()
    for png in sorted(EXAMPLE.glob("*.png"))[:4]:
        shutil.copy(png, data / png.name)
        (data / f"{png.stem}.caption").write_text(png.with_suffix(".txt").read_text(encoding="utf-8"),
                                                  encoding="utf-8")
    return data


def _texts(folder: Path) -> list[str]:
    return [(EXAMPLE / f"{png.stem}.txt").read_text(encoding="utf-8").strip() for png in sorted(folder.glob("*.png"))]


def test_caption_files_of_the_configured_extension_are_what_trains(tiny_sd15, caption_files, tmp_path):
    from lora_trainer.data.prepare import prepare_examples
    from lora_trainer.training.loaders import make_dataset

    cfg = run_config(tiny_sd15, caption_files, tmp_path / "out", "data.caption_extension=caption",
                     "data.caption_prefix=", "data.random_flip=false")
    assert cfg.data.caption_extension == ".caption"  # normalised
    dataset = make_dataset(cfg, prepare_examples(cfg, show_progress=False), seed=0)
    assert [dataset[i]["caption"] for i in range(len(dataset))] == _texts(caption_files)

    report = check_dataset(caption_files, resolution=64, caption_extension=".caption")
    assert report.num_captioned == 4 and not report.problems
    assert "4 readable, 4 captioned (.caption files)" in report.format_text()
    assert report.tag_frequency["geometric style"] == 4


def test_captions_of_another_extension_are_named_in_one_warning(caption_files, caplog):
    with caplog.at_level(logging.WARNING, logger="lora_trainer"):
        examples = scan_dataset(caption_files)  # .txt, the default
    assert [ex.caption for ex in examples] == [""] * 4
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "no image has a .txt caption file, but 4 have .caption files" in warnings[0]
    assert "set data.caption_extension=.caption" in warnings[0]

    report = check_dataset(caption_files, resolution=64)
    found = {p.kind: p.message for p in report.problems}
    assert "data.caption_extension=.caption" in found["caption_extension"] and "missing_caption" in found
    # One stray .txt: the other three .caption files are still named (they are not read).
    (caption_files / "01_red_circle.txt").write_text("a red circle", encoding="utf-8")
    found = {p.kind: p.message for p in check_dataset(caption_files, resolution=64).problems}
    assert found["caption_extension"].startswith("3 image(s) have no .txt file but a .caption file")
    # Every image with a .txt: the .caption files beside them are not mentioned.
    for png in caption_files.glob("*.png"):
        png.with_suffix(".txt").write_text("x", encoding="utf-8")
    assert "caption_extension" not in {p.kind for p in check_dataset(caption_files, resolution=64).problems}


def test_check_data_reads_the_extension_and_counts_the_suffix(caption_files, capsys):
    assert main(["check-data", str(caption_files), "--resolution", "64", "--caption-extension", "caption",
                 "--suffix", ", flat colours", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["num_captioned"], report["caption_extension"]) == (4, ".caption")
    assert report["tag_frequency"]["flat colours"] == 4 and report["problems"] == []

    assert main(["check-data", str(caption_files), "--resolution", "64"]) == 0
    printed = capsys.readouterr().out
    assert "set --caption-extension=.caption" in printed and "no .txt file" in printed

    assert main(["check-data", str(caption_files), "--caption-extension", "a/b"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --caption-extension: got 'a/b'") and "\n" not in err


@pytest.mark.parametrize("value", ["", ".", "sub/x", "..\\\\x", ".png", "JPG"])
def test_a_bad_caption_extension_is_a_one_line_config_error(value):
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs" / "example.yaml", [f"data.caption_extension={value}"])
    assert "data.caption_extension: got" in str(err.value) and "\n" not in str(err.value)


def test_captioning_writes_files_of_the_extension_and_backs_them_up(tiny_blip2, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i, name in enumerate(["a", "b", "c"]):
        Image.new("RGB", (32, 32), (80 * i, 100, 200)).save(data / f"{name}.png")
    (data / "a.caption").write_bytes(b"my own words ")
    (data / "c.txt").write_bytes(b"another tool's words")
    options = CaptionConfig(model=str(tiny_blip2), max_length=6, min_length=6)
    results = {r.path.name: r for r in caption_folder(data, options, show_progress=False,
                                                        caption_extension=".caption")}
    assert {name: r.status for name, r in results.items()} == {"a.png": "kept", "b.png": "generated",
                                                                "c.png": "generated"}
    assert (data / "a.caption").read_bytes() == b"my own words "
    assert (data / "b.caption").read_text(encoding="utf-8") == results["b.png"].caption + "\n"
    assert (data / "c.txt").read_bytes() == b"another tool's words" and not (data / "b.txt").exists()

    options.overwrite = True
    again = {r.path.name: r for r in caption_folder(data, options, show_progress=False, caption_extension=".caption")}
    assert again["a.png"].status == "replaced" and again["a.png"].backup == data / "a.caption.bak"
    assert (data / "a.caption.bak").read_bytes() == b"my own words "
    assert (data / "a.caption").read_text(encoding="utf-8") == again["a.png"].caption + "\n"


def _dataset_image(tmp_path) -> Path:
    path = tmp_path / "img.png"
    Image.new("RGB", (8, 8), (10, 200, 30)).save(path)
    return path


def test_suffix_ends_every_caption_and_stays_out_of_shuffling(tmp_path):
    tags = ["red", "circle", "blue background", "flat", "simple"]
    dataset = ImageCaptionDataset([Example(_dataset_image(tmp_path), ", ".join(tags))] * 2, 8,
                                  caption_prefix="geoshape, ", caption_suffix=", in mystyle", shuffle_tags=True,
                                  keep_tokens=1)
    captions = set()
    for epoch in range(6):
        dataset.set_epoch(epoch)
        for i in range(len(dataset)):
            caption = dataset[i]["caption"]
            assert caption.startswith("geoshape, ") and caption.endswith(", in mystyle")
            middle = caption[len("geoshape, "):-len(", in mystyle")].split(", ")
            assert sorted(middle) == sorted(tags)
            captions.add(caption)
    assert len(captions) > 3  # shuffled, the suffix still last
    empty = ImageCaptionDataset([Example(_dataset_image(tmp_path), "")], 8, caption_prefix="sks, ",
                                caption_suffix=", in mystyle")
    assert empty[0]["caption"] == "sks, in mystyle"
    dropped = ImageCaptionDataset([Example(_dataset_image(tmp_path), "red")], 8, caption_suffix=", x",
                                  caption_dropout=1.0)
    assert dropped[0]["caption"] == ""


def test_a_suffix_repeated_in_generated_captions_is_a_config_error():
    with pytest.raises(ConfigError, match="data.caption.suffix: got ', in mystyle', which repeats"):
        load_config(REPO / "configs" / "example.yaml", ["data.caption_suffix=, in mystyle", "data.caption.method=blip2",
                                                        "data.caption.suffix=, in mystyle"])


def test_tag_dropout_drops_about_p_of_the_tags_and_keeps_the_leading_ones():
    tags = [f"tag{k}" for k in range(20)]
    caption = "sks, " + ", ".join(tags)
    kept = 0
    for k in range(500):
        out = drop_tags(caption, 1, 0.3, random.Random(k)).split(", ")
        assert out[0] == "sks" and out[1:] == [t for t in tags if t in out[1:]]  # order kept
        kept += len(out) - 1
    assert abs(1 - kept / (500 * 20) - 0.3) < 0.02  # 10 000 draws: the standard deviation is 0.005
    assert drop_tags(caption, 1, 1.0, random.Random(0)) == "sks"
    assert drop_tags(caption, 0, 0.0, random.Random(0)) == caption


def test_tag_dropout_is_a_function_of_seed_epoch_and_item(tmp_path):
    image = _dataset_image(tmp_path)
    caption = "a, b, c, d, e, f, g, h"

    def make():
        return ImageCaptionDataset([Example(image, caption)] * 3, 8, caption_prefix="sks, ", caption_suffix=", z",
                                   caption_tag_dropout=0.5, keep_tokens=1, seed=7)

    first, second = make(), make()
    seen = set()
    for epoch in (0, 1, 2):
        first.set_epoch(epoch)
        second.set_epoch(epoch)
        for i in range(3):
            expected = drop_tags("sks, " + caption, 1, 0.5, random.Random(f"7:{epoch}:{i}:tag-dropout")) + ", z"
            assert first[i]["caption"] == second[i]["caption"] == expected
            seen.add(expected)
    assert len(seen) > 3


def test_tag_dropout_turns_off_the_embedding_cache():
    from lora_trainer.training.caches import embedding_cache_reason

    cfg = load_config(REPO / "configs" / "example.yaml", ["data.caption_tag_dropout=0.1"])
    assert embedding_cache_reason(cfg) == "data.caption_tag_dropout changes the captions every epoch"
    assert embedding_cache_reason(load_config(REPO / "configs" / "example.yaml")) is None
    with pytest.raises(ConfigError, match="data.caption_tag_dropout: got 1.5"):
        load_config(REPO / "configs" / "example.yaml", ["data.caption_tag_dropout=1.5"])


def _kohya(folder: Path, extra: str = "") -> tuple[dict, list[str]]:
    return config_from_kohya(parse_command_line(
        f"python train_network.py --pretrained_model_name_or_path m --train_data_dir {folder} --network_alpha 4 "
        f"--learning_rate 1e-4 --max_train_steps 10 {extra}"))


def test_from_kohya_reads_the_caption_extension_given_or_kohyas_default(tmp_path):
    img = tmp_path / "img"
    (img / "10_sks dog").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(img / "10_sks dog" / "a.png")
    (img / "10_sks dog" / "a.txt").write_text("a dog", encoding="utf-8")
    for extra, expected in [("--caption_extension .caption", ".caption"), ("--caption_extention caption", ".caption"),
                            ("--caption_extension .txt", ".txt")]:
        cfg, notes = _kohya(img, extra)
        assert cfg["data"]["caption_extension"] == expected and not any("caption_exten" in n for n in notes)
    # Not given: kohya reads .caption files. None here: .txt stays, and a note says so.
    cfg, notes = _kohya(img)
    assert "caption_extension" not in cfg["data"]
    assert [n for n in notes if "caption_extension" in n] == [
        f"--caption_extension not given: kohya's default would have read .caption files, and none were found in "
        f"{img}; captions are read from .txt files (set data.caption_extension for another extension)"]
    (img / "10_sks dog" / "a.caption").write_text("a dog", encoding="utf-8")
    cfg, notes = _kohya(img)
    assert cfg["data"]["caption_extension"] == ".caption" and not any("caption_extension" in n for n in notes)
    with pytest.raises(ConfigError, match="--caption_extension: got 'x/y'"):
        _kohya(img, "--caption_extension x/y")


def test_from_kohya_subsets_with_other_extensions_keep_their_own(tmp_path):
    for name in ("1_a", "2_b"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / name / "x.png")
    dataset = {"datasets": [{"subsets": [{"image_dir": str(tmp_path / "1_a"), "num_repeats": 1,
                                          "caption_extension": ".txt"},
                                         {"image_dir": str(tmp_path / "2_b"), "num_repeats": 2}]}]}
    cfg, notes = config_from_kohya({"pretrained_model_name_or_path": "m", "network_alpha": 4, "learning_rate": 1e-4,
                                    "max_train_steps": 10}, dataset)
    assert cfg["data"]["caption_extension"] == ".txt"  # the first subset's, kohya's .caption for the second
    assert cfg["data"]["subsets"] == [{"path": str(tmp_path / "1_a")},
                                      {"path": str(tmp_path / "2_b"), "repeats": 2, "caption_extension": ".caption"}]
    assert not any("caption_extension" in n for n in notes), notes


def test_from_kohya_maps_suffix_prefix_and_tag_dropout(tmp_path):
    cfg, notes = _kohya(tmp_path, "--caption_extension .txt --caption_prefix sks --caption_suffix 'in mystyle' "
                                  "--caption_tag_dropout_rate 0.1")
    d = cfg["data"]
    # kohya puts a space between each and the caption; ours are taken literally
    assert (d["caption_prefix"], d["caption_suffix"], d["caption_tag_dropout"]) == ("sks ", " in mystyle", 0.1)
    assert not any(key in n for n in notes for key in ("caption_suffix", "caption_tag_dropout", "caption_prefix"))
