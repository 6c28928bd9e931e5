"""DreamBooth with prior preservation: class images are generated once by the base model (and
resumed, not redone), the prior loss is logged, and weight 0 trains exactly as without class data."""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image
from conftest import run_config

DB = ["dreambooth.instance_prompt=a photo of sks shape", "dreambooth.class_prompt=a photo of a shape",
      "dreambooth.num_class_images=3", "dreambooth.class_batch_size=2", "dreambooth.class_steps=2",
      "sample.prompts=[]", "output.dtype=fp32", "data.random_flip=false"]


def _digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.png"))}


def _log(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_class_images_are_generated_once_and_resumed(tiny_sd15, example_data, tmp_path):
    from lora_trainer.training.loop import train

    classes = tmp_path / "class"
    train(run_config(tiny_sd15, example_data, tmp_path / "a", *DB, f"dreambooth.class_data={classes}",
                     "train.max_steps=2"), show_progress=False)
    first = _digests(classes)
    assert sorted(first) == ["class-00000.png", "class-00001.png", "class-00002.png"]
    mtimes = {p.name: p.stat().st_mtime_ns for p in classes.iterdir()}
    lost = np.asarray(Image.open(classes / "class-00001.png"), dtype=np.int16)

    # A lost image is made again, with the same seed, and only that one.
    (classes / "class-00001.png").unlink()
    out = tmp_path / "b"
    train(run_config(tiny_sd15, example_data, out, *DB, f"dreambooth.class_data={classes}", "train.max_steps=3",
                     "dreambooth.prior_loss_weight=0.5"), show_progress=False)
    again = _digests(classes)
    assert again.keys() == first.keys()
    assert all(again[k] == first[k] for k in first if k != "class-00001.png")
    # Same seed, same prompt; only the batch size differed (2 then 1), which moves the floats a little.
    remade = np.asarray(Image.open(classes / "class-00001.png"), dtype=np.int16)
    assert np.abs(remade - lost).max() <= 2
    assert {p.name: p.stat().st_mtime_ns for p in classes.iterdir() if p.name != "class-00001.png"} == \
        {k: v for k, v in mtimes.items() if k != "class-00001.png"}

    records = _log(out)
    assert len(records) == 3
    for r in records:
        assert r["loss"] > 0 and r["prior_loss"] > 0
        assert abs(r["loss"] - (r["instance_loss"] + 0.5 * r["prior_loss"])) < 1e-5
    meta = safetensors.safe_open(str(out / "example-lora.safetensors"), "pt").metadata()
    assert meta["ss_num_reg_images"] == "3" and meta["ss_prior_loss_weight"] == "0.5"
    assert meta["modelspec.trigger_phrase"] == "a photo of sks shape"


def test_prior_weight_zero_equals_training_without_class_data(tiny_sd15, example_data, tmp_path):
    from lora_trainer.training.loop import train

    common = ["train.max_steps=3", "dreambooth.instance_prompt=a photo of sks shape", "sample.prompts=[]",
              "output.dtype=fp32"]
    with_prior = train(run_config(tiny_sd15, example_data, tmp_path / "p", *common, *DB[1:5],
                                  f"dreambooth.class_data={tmp_path / 'class'}", "dreambooth.prior_loss_weight=0"),
                       show_progress=False)
    without = train(run_config(tiny_sd15, example_data, tmp_path / "n", *common), show_progress=False)
    assert [r["instance_loss"] for r in _log(tmp_path / "p")] == without.losses
    assert all(r["prior_loss"] > 0 for r in _log(tmp_path / "p"))  # the class batch did run
    a = safetensors.torch.load_file(str(with_prior.adapter_paths[0]))
    b = safetensors.torch.load_file(str(without.adapter_paths[0]))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sdxl_dreambooth_generates_class_images_with_the_sdxl_base(tiny_sdxl, example_data, tmp_path):
    from lora_trainer.training.loop import train

    classes = tmp_path / "class"
    result = train(run_config(tiny_sdxl, example_data, tmp_path / "x", *DB, f"dreambooth.class_data={classes}",
                              "train.max_steps=2", "dreambooth.num_class_images=2"), show_progress=False)
    images = sorted(classes.glob("*.png"))
    assert len(images) == 2 and Image.open(images[0]).size == (64, 64)
    assert "a photo of a shape" in Image.open(images[0]).info["parameters"]
    assert all(r["prior_loss"] > 0 for r in _log(tmp_path / "x"))
    assert result.adapter_paths[0].is_file()


def test_uncaptioned_instance_images_are_not_reported_as_training_uncaptioned(tiny_sd15, tmp_path, caplog):
    """The instance prompt captions every image, so the run's data summary must neither warn that
    images have no caption nor say they train on the empty caption; it counts the prompt's tokens."""
    from lora_trainer.data.prepare import prepare_examples

    root = tmp_path / "dog"
    root.mkdir()
    for i in range(2):
        Image.fromarray(np.full((40, 48, 3), 60 * i, np.uint8)).save(root / f"{i}.jpg")
    caplog.set_level("INFO")
    cfg = run_config(tiny_sd15, root, tmp_path / "out", DB[0])
    examples = prepare_examples(cfg, show_progress=False)
    assert [ex.caption for ex in examples] == ["", ""]  # the prompt is applied when training reads them
    text = caplog.text
    assert "no caption" not in text and "empty caption" not in text
    assert re.search(r"longest caption: [1-9]\d* tokens", text)  # the prompt's, with example.yaml's prefix
    records = [json.loads(line) for line in (tmp_path / "out" / "captions.jsonl").read_text().splitlines()]
    assert {r["caption"] for r in records} == {"geoshape, a photo of sks shape"}


def test_a_class_folder_that_cannot_be_written_stops_the_run_before_the_model_loads(tiny_sd15, example_data,
                                                                                     tmp_path, capsys, monkeypatch):
    """A folder under a file stands for a read-only one (permissions do not stop root)."""
    from conftest import REPO

    from lora_trainer.cli import main

    def refused(*args, **kwargs):
        raise AssertionError("the base model was loaded")

    monkeypatch.setattr("lora_trainer.training.loop.load_base", refused)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for folder in (blocker / "class", blocker):  # cannot be made; is a file
        rc = main(["train", str(REPO / "configs" / "example.yaml"), f"model.base={tiny_sd15}",
                   f"data.path={example_data}", f"output.dir={tmp_path / 'out'}", *DB,
                   f"dreambooth.class_data={folder}"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and "\n" not in err, err
        assert err.startswith(f"error: dreambooth.class_data: cannot write the 3 missing class images in {folder} "
                              f"(cannot be made: {blocker} is a file); set dreambooth.class_data to a folder you "
                              "can write to, or put 3 class images in it"), err


def test_a_read_only_class_folder_is_refused_only_when_images_are_missing(tiny_sd15, example_data, tmp_path,
                                                                           monkeypatch):
    from lora_trainer.errors import ConfigError
    from lora_trainer.training import guards

    classes = tmp_path / "class"
    classes.mkdir()
    for k in range(2):
        Image.new("RGB", (64, 64), (k * 90, 40, 200)).save(classes / f"mine-{k}.png")
    # the class folder read-only, everything else writable
    monkeypatch.setattr(guards, "unwritable_reason",
                        lambda folder: "cannot be written to (Read-only file system)" if folder == classes else None)
    for count, refused in ((2, False), (1, False), (3, True)):
        cfg = run_config(tiny_sd15, example_data, tmp_path / "out", *DB, f"dreambooth.class_data={classes}",
                         f"dreambooth.num_class_images={count}")
        if refused:
            with pytest.raises(ConfigError, match=r"^dreambooth.class_data: cannot write the 1 missing class images "
                                                  r"in .*Read-only file system"):
                guards.check_writable_folders(cfg)
        else:
            guards.check_writable_folders(cfg)
