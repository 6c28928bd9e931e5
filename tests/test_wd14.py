"""WD14 tagging on the tiny ONNX tagger: the tags written are the torch net's own on the same pixels
(thresholds, order, underscores, undesired tags, rating), the image is padded white and fed BGR,
user captions are kept, a missing onnxruntime is one line, and a run tags its images first."""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil

import numpy as np
import pytest
import torch
from conftest import REPO, run_config
from PIL import Image

from lora_trainer.cli import main
from lora_trainer.config import CaptionConfig, load_config
from lora_trainer.data.captioning import caption_folder
from lora_trainer.data.images import load_image
from lora_trainer.data.wd14 import load_wd14, preprocess, tag_images, tag_name
from lora_trainer.errors import ConfigError
from lora_trainer.testing.tiny_wd14 import IMAGE_SIZE, TINY_TAGS, RegionProbe, TinyTagger, export_tagger


@pytest.fixture()
def folder(example_data, tmp_path):
    """The 8 example images, none captioned."""
    data = tmp_path / "data"
    data.mkdir()
    for png in sorted(example_data.glob("*.png")):
        shutil.copy(png, data / png.name)
    return data


def _reference(path, *, general=0.35, character=0.35, rating=False, underscores=True, undesired=()) -> str:
    """The caption by hand: the torch net (seed 0, as make_wd14) on the same pixels, then the rules."""
    pixels = torch.from_numpy(preprocess(load_image(path), IMAGE_SIZE))[None]
    with torch.no_grad():
        p = TinyTagger(len(TINY_TAGS), seed=0)(pixels)[0].tolist()

    def spelled(name):
        kaomoji = name in ("^_^", ">_<", "(o)_(o)")
        return name if kaomoji or not underscores else name.replace("_", " ")

    def picked(category, threshold):
        found = [(p[i], i) for i, (_, cat) in enumerate(TINY_TAGS) if cat == category and p[i] >= threshold]
        return [TINY_TAGS[i][0] for _, i in sorted(found, key=lambda x: (-x[0], x[1]))]

    ratings = [i for i, (_, cat) in enumerate(TINY_TAGS) if cat == 9]
    names = [TINY_TAGS[max(ratings, key=lambda i: p[i])][0]] if rating else []
    names += picked(4, character) + picked(0, general)
    return ", ".join(spelled(n) for n in names if n not in undesired and n.replace("_", " ") not in undesired)


@pytest.mark.parametrize("options, reference", [
    ({}, {}),
    ({"general_threshold": 0.5, "character_threshold": 0.6, "rating_tag": True, "replace_underscores": False,
      "undesired_tags": ["simple background, solo", "kaname_madoka"]},
     {"general": 0.5, "character": 0.6, "rating": True, "underscores": False,
      "undesired": ("simple background", "solo", "kaname_madoka")}),
])
def test_tags_written_are_the_torch_nets_on_the_same_pixels(tiny_wd14, folder, options, reference):
    c = CaptionConfig(method="wd14", model=str(tiny_wd14), prefix="sks, ", batch_size=3, **options)
    results = caption_folder(folder, c, show_progress=False)

    assert {r.status for r in results} == {"generated"} and len(results) == 8
    captions = []
    for r in results:
        expected = "sks, " + _reference(r.path, **reference)
        assert r.caption == expected
        assert r.path.with_suffix(".txt").read_text(encoding="utf-8") == expected + "\n"
        captions.append(expected)
    assert len(set(captions)) > 3  # the images differ, and so do their tags
    text = " ".join(captions)
    if options:
        assert "long_hair" not in text and ("blue_sky" in text or "(o)_(o)" in text)
        assert "solo" not in text and "kaname" not in text and any(c.split(", ")[1] in ("general", "questionable")
                                                                   for c in captions)
    else:
        assert captions[0].startswith("sks, kaname madoka, ") and "blue sky" in text and "^_^" in text
        assert not any(t in text for t in ("general", "sensitive", "questionable", "explicit"))


def test_underscores_become_spaces_but_kaomoji_keep_theirs():
    assert [tag_name(n, True) for n in ("long_hair", "blue_sky", "^_^", ">_<", "o_o", "(o)_(o)", "<|>_<|>")] == [
        "long hair", "blue sky", "^_^", ">_<", "o_o", "(o)_(o)", "<|>_<|>"]
    assert tag_name("long_hair", False) == "long_hair"


def test_an_rgba_image_is_padded_white_to_a_square_and_fed_as_bgr(tmp_path):
    # Rows 0-7 and 24-31 of the 32-pixel input are padding; columns 0-15 the opaque red left half,
    # 16-31 the transparent right half (black under alpha 0), which reads as white.
    regions = {"padding_blue": (0, 6, 0, 32, 0), "bottom_padding_red": (26, 32, 0, 32, 2),
               "red_part_blue": (12, 20, 2, 14, 0), "red_part_red": (12, 20, 2, 14, 2),
               "clear_part_blue": (12, 20, 18, 30, 0), "clear_part_green": (12, 20, 18, 30, 1)}
    tagger_dir = export_tagger(RegionProbe(list(regions.values())), tmp_path / "probe", [(n, 0) for n in regions])
    pixels = np.zeros((32, 64, 4), dtype=np.uint8)
    pixels[:, :32] = (255, 0, 0, 255)
    data = tmp_path / "data"
    data.mkdir()
    Image.fromarray(pixels, "RGBA").save(data / "wide.png")

    tagger = load_wd14(CaptionConfig(method="wd14", model=str(tagger_dir)))
    fed = preprocess(load_image(data / "wide.png"), 32)
    probabilities = tagger.session.run(None, {tagger.input_name: fed[None]})[0]
    assert np.allclose(probabilities, [[1, 1, 0, 1, 1, 1]], atol=1e-6)
    [result] = caption_folder(data, CaptionConfig(method="wd14", model=str(tagger_dir), replace_underscores=False),
                              show_progress=False)
    assert result.caption == "padding_blue, bottom_padding_red, red_part_red, clear_part_blue, clear_part_green"


def test_a_model_made_for_one_image_at_a_time_tags_a_batch_the_same(tiny_wd14, folder, tmp_path):
    single = export_tagger(TinyTagger(len(TINY_TAGS), seed=0), tmp_path / "single", TINY_TAGS, fixed_batch=1)
    images = [load_image(p) for p in sorted(folder.glob("*.png"))[:3]]
    batched = load_wd14(CaptionConfig(method="wd14", model=str(tiny_wd14)))
    one_by_one = load_wd14(CaptionConfig(method="wd14", model=str(single)))
    assert one_by_one.fixed_batch == 1 and batched.fixed_batch is None
    assert tag_images(one_by_one, images) == tag_images(batched, images)


def test_user_captions_are_kept_and_bad_images_skipped_with_a_message(tiny_wd14, folder, caplog):
    first = sorted(folder.glob("*.png"))[0]
    first.with_suffix(".txt").write_bytes(b"my own words\r\n")
    (folder / "broken.png").write_bytes(b"not a png")
    c = CaptionConfig(method="wd14", model=str(tiny_wd14))
    with caplog.at_level(logging.WARNING):
        results = {r.path.name: r for r in caption_folder(folder, c, show_progress=False)}
    assert results[first.name].status == "kept" and first.with_suffix(".txt").read_bytes() == b"my own words\r\n"
    assert results["broken.png"].status == "unreadable" and not (folder / "broken.txt").exists()
    assert any("not captioned" in r.getMessage() and "broken.png" in r.getMessage() for r in caplog.records)

    c.overwrite = True
    again = {r.path.name: r for r in caption_folder(folder, c, show_progress=False)}
    assert again[first.name].status == "replaced" and (folder / (first.stem + ".txt.bak")).read_bytes() == \
        b"my own words\r\n"
    assert first.with_suffix(".txt").read_text(encoding="utf-8") == _reference(first) + "\n"
    assert not list(folder.glob(".*.tmp"))


def test_caption_command_with_method_wd14(tiny_wd14, folder, capsys):
    rc = main(["caption", str(folder), "--method", "wd14", "--model", str(tiny_wd14), "--quiet", "--rating-tag",
               "--undesired-tags", "solo, kaname madoka", "--general-threshold", "0.5"])
    out = capsys.readouterr().out.splitlines()
    assert rc == 0 and out[-1] == "8 image(s): 8 generated"
    first = sorted(folder.glob("*.png"))[0]
    expected = _reference(first, general=0.5, rating=True, undesired=("solo", "kaname madoka"))
    assert out[0].split()[:2] == [first.name, "generated"] and out[0].endswith(expected)
    assert first.with_suffix(".txt").read_text(encoding="utf-8") == expected + "\n"


@pytest.mark.parametrize("args, needle", [
    (["--general-threshold", "0.5", "--rating-tag"], "--general-threshold, --rating-tag: tagger options, read with "
                                                     "--method wd14 only; add --method wd14, or leave them out"),
    (["--method", "wd14", "--num-beams", "3", "--prompt", "a photo of"],
     "--prompt, --num-beams: BLIP-2 options, which --method wd14 does not read; leave them out (or use --method blip2)"),
])
def test_caption_flags_of_the_other_method_stop_the_command_before_any_model_loads(folder, capsys, args, needle):
    # --rating-tag without --method wd14 went on to BLIP-2 (a 15 GB download by default), thresholds ignored
    assert main(["caption", str(folder), "--model", "/nowhere/tagger", "--quiet", *args]) == 2
    assert capsys.readouterr().err.strip() == f"error: {needle}"
    assert not list(folder.glob("*.txt"))


def test_without_onnxruntime_wd14_stops_in_one_line_before_any_work(tiny_sd15, tiny_wd14, folder, tmp_path,
                                                                      monkeypatch, capsys):
    from lora_trainer.training.loop import train

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    rc = main(["caption", str(folder), "--method", "wd14", "--model", str(tiny_wd14), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == ("error: data.caption.method (--method): wd14 needs the onnxruntime package; "
                               "pip install 'lora-trainer[wd14]' (onnxruntime-gpu for a CUDA GPU)")
    assert not list(folder.glob("*.txt"))

    cfg = run_config(tiny_sd15, folder, tmp_path / "out", "data.caption.method=wd14", f"data.caption.model={tiny_wd14}")
    with pytest.raises(ConfigError, match=r"^data\.caption\.method \(--method\): wd14 needs the onnxruntime package"):
        train(cfg, show_progress=False)
    assert not (tmp_path / "out").exists() and not list(folder.glob("*.txt"))


def test_config_defaults_checks_and_the_warning_for_tagger_options_of_another_method(tmp_path, monkeypatch, caplog):
    from huggingface_hub import constants

    with caplog.at_level(logging.WARNING, logger="lora_trainer"):
        load_config(REPO / "configs" / "example.yaml", ["data.caption.method=blip2", "data.caption.rating_tag=true"])
    assert [r.getMessage() for r in caplog.records] == [
        "command line: data.caption.rating_tag: got True with data.caption.method 'blip2', which does not read it; "
        "it is for data.caption.method=wd14"]

    cfg = load_config(REPO / "configs" / "example.yaml",
                      ["data.caption.method=wd14", "data.caption.undesired_tags=solo"])
    c = cfg.data.caption
    assert (c.model, c.general_threshold, c.character_threshold, c.rating_tag, c.replace_underscores) == \
        (None, 0.35, 0.35, False, True)
    assert c.undesired_tags == ["solo"]
    with pytest.raises(ConfigError, match=r"data\.caption\.general_threshold: got 1\.5; expected a number in \[0, 1\]"):
        load_config(REPO / "configs" / "example.yaml", ["data.caption.general_threshold=1.5"])
    # Unset, wd14's model is SmilingWolf's tagger, looked for in the cache like any hub id.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(Exception, match=r"^data\.caption\.model \(--model\): 'SmilingWolf/wd-vit-tagger-v3' is not in "
                                        r"the local Hugging Face cache"):
        load_wd14(c)


def test_a_cached_hub_tagger_loads_offline(tiny_wd14, tmp_path, monkeypatch):
    from huggingface_hub import constants

    snapshot = tmp_path / "models--someone--tagger" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (tmp_path / "models--someone--tagger" / "refs").mkdir()
    (tmp_path / "models--someone--tagger" / "refs" / "main").write_text("0" * 40)
    for name in ("model.onnx", "selected_tags.csv"):
        shutil.copy(tiny_wd14 / name, snapshot / name)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    tagger = load_wd14(CaptionConfig(method="wd14", model="someone/tagger"))
    assert (tagger.size, len(tagger.names)) == (IMAGE_SIZE, len(TINY_TAGS))


def test_training_tags_uncaptioned_images_first(tiny_sd15, tiny_wd14, example_data, tmp_path):
    from lora_trainer.training.loop import train

    data = tmp_path / "data"
    data.mkdir()
    for png in sorted(example_data.glob("*.png"))[:4]:
        shutil.copy(png, data / png.name)
    out = tmp_path / "out"
    cfg = run_config(tiny_sd15, data, out, "data.caption.method=wd14", f"data.caption.model={tiny_wd14}",
                     "data.caption.prefix=sks, ", "data.caption_prefix=", "train.max_steps=2", "sample.prompts=[]")
    result = train(cfg, show_progress=False)

    assert result.steps == 2 and (out / "example-lora.safetensors").is_file()
    record = [json.loads(line) for line in (out / "captions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(record) == 4 and all(r["generated"] for r in record)
    for r in record:
        assert r["caption"] == "sks, " + _reference(data / r["file"])
        assert (data / r["file"]).with_suffix(".txt").read_text(encoding="utf-8") == r["caption"] + "\n"


def test_make_tiny_wd14_variant_is_a_tagger(tmp_path, capsys):
    assert main(["make-tiny", "--variant", "wd14", str(tmp_path / "wd14")]) == 0
    tagger = load_wd14(CaptionConfig(method="wd14", model=str(tmp_path / "wd14")))
    assert (tagger.size, tagger.names, tagger.categories) == (IMAGE_SIZE, [n for n, _ in TINY_TAGS],
                                                               [c for _, c in TINY_TAGS])
