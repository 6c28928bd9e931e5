"""BLIP-2 captioning on the tiny random BLIP-2: files written, user captions kept byte for byte,
backups, seeded generation, the caption command, and captions generated when training starts."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import safetensors
from conftest import REPO, run_config
from PIL import Image

from lora_trainer.cli import main
from lora_trainer.config import CaptionConfig, load_config
from lora_trainer.data.captioning import (
    caption_folder,
    clean_caption,
    generate_captions,
    join_caption,
    load_blip2,
)
from lora_trainer.errors import ConfigError


def _noise_png(path, seed, size=(40, 32)):
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def captioner(tiny_blip2):
    return load_blip2(CaptionConfig(model=str(tiny_blip2)))


@pytest.fixture()
def folder(tmp_path):
    """a.png with a hand-written caption (BOM, odd spacing, no newline), b.png with a blank .txt,
    c.png and sub/d.png with none."""
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    for i, name in enumerate(["a.png", "b.png", "c.png", "sub/d.png"]):
        _noise_png(data / name, i)
    (data / "a.txt").write_bytes("\ufeffmy  own words,  kept ".encode("utf-8"))
    (data / "b.txt").write_bytes(b"  \n")
    return data


def test_captioning_writes_missing_captions_with_prefix_and_keeps_existing_bytes(tiny_blip2, folder):
    original = (folder / "a.txt").read_bytes()
    options = CaptionConfig(model=str(tiny_blip2), prefix="sks dog, ", suffix=", photo", batch_size=2)
    results = caption_folder(folder, options, show_progress=False)

    assert [(r.path.relative_to(folder).as_posix(), r.status) for r in results] == [
        ("a.png", "kept"), ("b.png", "generated"), ("c.png", "generated"), ("sub/d.png", "generated")]
    assert (folder / "a.txt").read_bytes() == original
    for r in results[1:]:
        text = r.path.with_suffix(".txt").read_text(encoding="utf-8")
        assert text == r.caption + "\n"
        assert text.startswith("sks dog, ") and text.endswith(", photo\n")
        assert len(text) > len("sks dog, , photo\n") and "\n" not in text[:-1]
    assert not list(folder.rglob("*.bak*")) and not list(folder.rglob("*.tmp"))
    # A second run finds nothing to do and does not even load the model.
    again = caption_folder(folder, CaptionConfig(model="/nonexistent/blip2"), show_progress=False)
    assert {r.status for r in again} == {"kept"}


def test_overwrite_keeps_a_backup_and_never_replaces_an_older_one(tiny_blip2, folder):
    original = (folder / "a.txt").read_bytes()
    options = CaptionConfig(model=str(tiny_blip2), overwrite=True, do_sample=True, seed=1)
    first = {r.path.name: r for r in caption_folder(folder, options, show_progress=False)}
    assert first["a.png"].status == "replaced"
    assert (folder / "a.txt.bak").read_bytes() == original
    assert first["b.png"].status == "generated"  # a blank file holds no words to keep
    assert not (folder / "b.txt.bak").exists()

    options.seed = 2
    second = {r.path.name: r for r in caption_folder(folder, options, show_progress=False)}
    assert (folder / "a.txt.bak").read_bytes() == original
    assert (folder / "a.txt.bak1").read_text(encoding="utf-8") == first["a.png"].caption + "\n"
    assert second["a.png"].backup == folder / "a.txt.bak1"


def test_metadata_captions_are_not_recaptioned(tiny_blip2, folder):
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "c.png", "text": "from metadata"}) + "\n")
    results = {r.path.name: r for r in caption_folder(folder, CaptionConfig(model=str(tiny_blip2), overwrite=True),
                                                      show_progress=False)}
    assert (results["c.png"].status, results["c.png"].caption) == ("metadata", "from metadata")
    assert not (folder / "c.txt").exists()


def test_captions_are_seeded_and_batching_does_not_change_greedy_captions(captioner):
    images = [Image.open(p).convert("RGB") for p in sorted((REPO / "datasets" / "example").glob("*.png"))[:4]]
    captioner.options = CaptionConfig(model="tiny", max_length=12)
    greedy = generate_captions(captioner, images)
    assert all(greedy) and len(set(greedy)) > 1  # different images, different captions
    assert [generate_captions(captioner, [im])[0] for im in images] == greedy

    import torch

    def sampled(seed):
        torch.manual_seed(seed)
        return generate_captions(captioner, images)

    captioner.options = CaptionConfig(model="tiny", max_length=12, do_sample=True, top_p=0.95)
    assert sampled(3) == sampled(3)
    assert sampled(3) != sampled(4)


def test_prompt_starts_the_caption_unless_dropped(captioner):
    image = Image.open(REPO / "datasets" / "example" / "01_red_circle.png").convert("RGB")
    captioner.options = CaptionConfig(model="tiny", prompt="a photo of", max_length=8)
    kept = generate_captions(captioner, [image])[0]
    captioner.options = CaptionConfig(model="tiny", prompt="a photo of", keep_prompt=False, max_length=8)
    dropped = generate_captions(captioner, [image])[0]
    assert kept.startswith("a photo of ") and kept == clean_caption("a photo of " + dropped)
    assert not dropped.startswith("a photo of")


def test_clean_caption_makes_one_line_and_prefixes_get_a_space():
    assert clean_caption("  a dog\non the\tbeach\x00 \ufffd ") == "a dog on the beach"
    assert join_caption("sks,", "a dog", "photo") == "sks, a dog photo"
    assert join_caption("sks dog, ", "a dog", ", photo") == "sks dog, a dog, photo"
    assert join_caption("", "a dog", "") == "a dog"


def test_caption_command_prints_table_and_summary(tiny_blip2, folder, capsys):
    rc = main(["caption", str(folder), "--model", str(tiny_blip2), "--prefix", "sks, ", "--quiet",
               "--max-length", "6", "--min-length", "6", "--num-beams", "2"])
    out = capsys.readouterr().out.splitlines()
    assert rc == 0
    assert out[0].split()[:2] == ["a.png", "kept"] and out[0].endswith("my  own words,  kept")
    assert out[2].split()[:3] == ["c.png", "generated", "sks,"]
    assert out[-1] == "4 image(s): 3 generated, 1 kept"


def test_caption_command_leaves_parked_folders_out_as_training_does(tiny_blip2, folder, capsys, caplog):
    # kohya's 0_<name> folders do not train (data.folder_repeats): captioning them was wasted work
    (folder / "0_parked" / "deep").mkdir(parents=True)
    (folder / "3_dog").mkdir()
    for i, name in enumerate(["0_parked/e.png", "0_parked/deep/f.png", "3_dog/g.png"]):
        _noise_png(folder / name, 10 + i)
    args = ["caption", str(folder), "--model", str(tiny_blip2), "--quiet", "--max-length", "4", "--min-length", "4"]
    with caplog.at_level(logging.WARNING, logger="lora_trainer.data.captioning"):
        assert main(args) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "5 image(s): 4 generated, 1 kept"
    assert (folder / "3_dog" / "g.txt").is_file() and (folder / "c.txt").is_file()
    assert not (folder / "0_parked" / "e.txt").exists() and not (folder / "0_parked" / "deep" / "f.txt").exists()
    [line] = [r.getMessage() for r in caplog.records if "0_<name>" in r.getMessage()]
    assert line == f"{folder}: leaving out 1 folder(s) named 0_<name> (2 image(s)), as training does: 0_parked"
    assert main([*args, "--no-folder-repeats"]) == 0  # caption them too
    assert (folder / "0_parked" / "e.txt").is_file() and (folder / "0_parked" / "deep" / "f.txt").is_file()


@pytest.mark.parametrize("args, expected", [
    (["--batch-size", "0"], "--batch-size: got 0; expected an integer >= 1"),
    (["--dtype", "fp16", "--device", "cpu"], "data.caption.dtype (--dtype): got 'fp16', which needs a GPU"),
    (["--load-in-8bit", "--device", "cpu"], "data.caption.load_in_8bit (--load-in-8bit): true needs a CUDA GPU"),
    (["--model", "/nonexistent/blip2"], "data.caption.model (--model): cannot load a BLIP-2 model from"),
    (["--caption-extension", ".png"], "--caption-extension: got '.png', an image extension"),
])
def test_bad_caption_options_are_one_line_errors(folder, capsys, args, expected):
    rc = main(["caption", str(folder), "--quiet", *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and expected in err and "\n" not in err
    assert not (folder / "c.txt").exists()


def test_caption_prefix_repeating_the_trigger_is_a_config_error():
    with pytest.raises(ConfigError, match=r"data.caption.prefix: got 'sks, a photo,', which repeats"):
        load_config(REPO / "configs" / "example.yaml", ["data.caption_prefix=sks, ", "data.caption.method=blip2",
                                                        "data.caption.prefix=sks, a photo, "])
    with pytest.raises(ConfigError, match="data.caption.beams: unknown key"):
        load_config(REPO / "configs" / "example.yaml", ["data.caption.beams=2"])


def test_training_captions_missing_images_first_records_them_and_warns_once_of_unread_files(tiny_sd15, tiny_blip2, example_data, tmp_path,
                                                                 caplog):
    from lora_trainer.training.loop import train

    data = tmp_path / "data"
    data.mkdir()
    for png in sorted(example_data.glob("*.png"))[:4]:
        shutil.copy(png, data / png.name)
    (data / "01_red_circle.txt").write_text("hand written", encoding="utf-8")
    _noise_png(data / "anim.png", 3)
    (data / "anim.png").rename(data / "anim.gif")  # a format training does not read: said once
    out = tmp_path / "out"
    cfg = run_config(tiny_sd15, data, out, "data.caption.method=blip2", f"data.caption.model={tiny_blip2}",
                     "data.caption.prefix=sks, ", "data.caption_prefix=", "train.max_steps=2", "sample.prompts=[]")
    with caplog.at_level(logging.INFO, logger="lora_trainer"):
        train(cfg, show_progress=False)

    record = [json.loads(line) for line in (out / "captions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["file"] for r in record] == sorted(p.name for p in data.glob("*.png"))
    assert record[0] == {"file": "01_red_circle.png", "caption": "hand written", "generated": False, "repeats": 1}
    for r in record[1:]:
        assert r["generated"] and r["caption"].startswith("sks, ")
        assert (data / r["file"]).with_suffix(".txt").read_text(encoding="utf-8") == r["caption"] + "\n"
    with safetensors.safe_open(str(out / "example-lora.safetensors"), "pt") as f:
        tags = json.loads(f.metadata()["ss_tag_frequency"])["data"]
    assert tags["sks"] == 3 and tags["hand written"] == 1
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"dataset {data}")]
    assert len(summary) == 1 and "4 captioned" in summary[0] and "result: can train" in summary[0]
    unread = [r.getMessage() for r in caplog.records
              if r.levelno == logging.WARNING and "format training does not read" in r.getMessage()]
    assert len(unread) == 1 and unread[0].endswith("(formats read: png, jpg, jpeg, webp, bmp): anim.gif")


def test_make_tiny_blip2_variant_loads_with_from_pretrained(tmp_path, capsys):
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    assert main(["make-tiny", "--variant", "blip2", str(tmp_path / "blip2")]) == 0
    processor = Blip2Processor.from_pretrained(tmp_path / "blip2")
    model = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "blip2")
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token.content)
    assert processor.num_query_tokens == model.config.num_query_tokens == 4
    assert model.config.image_token_index == image_token < model.config.text_config.vocab_size
    assert sum(p.numel() for p in model.parameters()) < 500_000


def test_caption_files_in_utf16_are_read_and_kept_and_latin1_is_named(tiny_blip2, folder, capsys):
    (folder / "c.txt").write_bytes("café, naïve\r\n".encode("utf-16"))  # Notepad's "Unicode", with its BOM
    (folder / "sub" / "d.txt").write_bytes("\ufeffd words".encode("utf-8"))
    saved = (folder / "c.txt").read_bytes()
    results = {r.path.name: r for r in caption_folder(folder, CaptionConfig(model=str(tiny_blip2)), show_progress=False)}
    assert (results["c.png"].status, results["c.png"].caption) == ("kept", "café, naïve")
    assert results["d.png"].caption == "d words" and (folder / "c.txt").read_bytes() == saved

    (folder / "c.txt").write_bytes("café au lait".encode("latin-1"))
    capsys.readouterr()
    assert main(["caption", str(folder), "--model", str(tiny_blip2), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("c.txt: not UTF-8 text (invalid continuation byte at byte 3); re-save it as UTF-8")


def test_max_length_alone_below_the_default_min_length_works(tiny_blip2, folder, capsys):
    assert main(["caption", str(folder), "--model", str(tiny_blip2), "--quiet", "--max-length", "3"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "4 image(s): 3 generated, 1 kept"
    assert main(["caption", str(folder), "--quiet", "--max-length", "3", "--min-length", "4"]) == 2
    assert "--min-length: got 4; expected an integer in [0, max_length=3]" in capsys.readouterr().err
