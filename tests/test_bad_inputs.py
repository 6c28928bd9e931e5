"""Bad inputs end in the documented behaviour: bad images are skipped with one warning, an empty or
all-bad dataset stops with one line naming the folder, before any model loads."""

from __future__ import annotations

import logging

import numpy as np
from conftest import REPO
from PIL import Image

from lora_trainer.cli import main


def _png(path, color, mode="RGB", size=(48, 40)):
    Image.new(mode, size, color).save(path)


def test_mixed_bad_dataset_trains_on_the_good_images(tiny_sd15, tmp_path, caplog):
    data = tmp_path / "data"
    data.mkdir()
    _png(data / "good.png", (200, 30, 30))
    Image.new("CMYK", (48, 48), (0, 200, 200, 0)).save(data / "cmyk.jpg")
    rgba = Image.new("RGBA", (48, 48), (0, 0, 255, 0))
    rgba.save(data / "transparent.png")
    (data / "corrupt.png").write_bytes(np.random.default_rng(0).bytes(500))
    (data / "empty.jpg").write_bytes(b"")
    for name in ("good", "cmyk", "transparent"):
        (data / f"{name}.txt").write_text(f"a {name} picture")
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        rc = main(["train", str(REPO / "configs" / "example.yaml"), f"model.base={tiny_sd15}", f"data.path={data}",
                   f"output.dir={out}", "train.max_steps=3", "sample.prompts=[]", "--quiet"])
    assert rc == 0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "corrupt.png" in r.getMessage()]
    assert len(warnings) == 1 and "empty.jpg" in warnings[0].getMessage()
    assert (out / "example-lora.safetensors").is_file()
    from lora_trainer.config import load_config
    import safetensors

    with safetensors.safe_open(str(out / "example-lora.safetensors"), "pt") as f:
        assert f.metadata()["ss_num_train_images"] == "3"
    assert load_config(out / "config.yaml").data.path == str(data)


def test_empty_folder_stops_with_one_line_naming_it(tiny_sd15, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    rc = main(["train", str(REPO / "configs" / "example.yaml"), f"model.base={tiny_sd15}", f"data.path={empty}",
               f"output.dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and str(empty) in err and "no images" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_all_bad_folder_stops_with_one_line(tiny_sd15, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"not a png")
    (bad / "b.jpg").write_bytes(b"")
    rc = main(["train", str(REPO / "configs" / "example.yaml"), f"model.base={tiny_sd15}", f"data.path={bad}",
               f"output.dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and str(bad) in err and "a.png" in err and "b.jpg" in err and "\n" not in err


def test_missing_base_model_is_one_line(tmp_path, example_data, capsys):
    rc = main(["train", str(REPO / "configs" / "example.yaml"), f"model.base={tmp_path / 'nope'}",
               f"data.path={example_data}", f"output.dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "model.base" in err and "nope" in err and "\n" not in err


def test_unknown_target_module_is_one_line(tiny_sd15, example_data, tmp_path, capsys):
    rc = main(["train", str(REPO / "configs" / "example.yaml"), f"model.base={tiny_sd15}",
               f"data.path={example_data}", f"output.dir={tmp_path / 'out'}", "lora.unet_targets=[query]"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "lora.unet_targets" in err and "query" in err and "\n" not in err
    assert not list((tmp_path / "out").glob("*.safetensors"))


def test_a_missing_base_stops_before_the_data_is_scanned(tmp_path, capsys):
    (tmp_path / "empty").mkdir()  # scanned first, this would be the error
    rc = main(["train", str(REPO / "configs" / "example.yaml"), "model.base=/nonexistent",
               f"data.path={tmp_path / 'empty'}", f"output.dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: model.base: '/nonexistent' does not exist") and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_relative_paths_not_found_say_which_folder_they_were_read_from(tiny_sd15, tmp_path, capsys, monkeypatch):
    """configs/example.yaml run from outside the repository: its relative data.path and model.base
    are read from the folder the command runs in, and the errors say so."""
    import huggingface_hub.constants

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # 'tiny-models/sd15' is a hub id too
    config = str(REPO / "configs" / "example.yaml")
    note = f"(looked for in {elsewhere}: relative paths are read from the folder the command runs in)"
    for overrides, start in (([], "error: model.base: 'tiny-models/sd15' is not in the local Hugging Face cache"),
                             ([f"model.base={tiny_sd15}"], "error: datasets/example: dataset folder not found")):
        rc = main(["train", config, *overrides, f"output.dir={tmp_path / 'out'}"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.startswith(start) and note in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_folders_that_cannot_be_written_stop_the_run_before_the_model_loads(tiny_sd15, example_data, tmp_path, capsys):
    """A folder under a file stands for a read-only one (permissions do not stop root)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for overrides, key in (([f"output.dir={blocker / 'run'}"], "output.dir"),
                           ([f"output.dir={tmp_path / 'out'}", "train.cache_latents_to_disk=true",
                             f"train.cache_dir={blocker / 'cache'}"], "train.cache_dir")):
        rc = main(["train", str(REPO / "configs" / "example.yaml"), f"model.base={tiny_sd15}",
                   f"data.path={example_data}", *overrides])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and err.startswith(f"error: {key}: cannot write in {blocker}") and "\n" not in err
        assert err.endswith(f"set {key} to a folder you can write to")


def test_a_full_disk_met_while_writing_is_one_line(monkeypatch, tmp_path, capsys):
    import errno

    def disk_full(cfg, show_progress=True, loss_hook=None):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "example-lora.safetensors"))

    monkeypatch.setattr("lora_trainer.training.loop.train", disk_full)
    assert main(["train", str(REPO / "configs" / "example.yaml"), f"output.dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {tmp_path / 'out' / 'example-lora.safetensors'}: No space left on device; "
                   "free some space or write to another disk (output.dir, train.cache_dir)")
