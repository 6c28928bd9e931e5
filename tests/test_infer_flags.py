"""Generation flags that cannot work are refused in one line naming the flag: a device the machine
lacks, a clip skip past the text encoder, a ControlNet or refiner for another base, a flag that
would change nothing without its partner, a merge target of the wrong kind."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from infer_helpers import one_line_error as _one_line_error
from infer_helpers import run_infer as _infer
from lora_trainer.cli import main


@pytest.mark.parametrize("extra, needle", [
    (["--strength", "0.5"], "--strength needs --init-image"),
    (["--sweep-adapter", "style"], "--sweep-adapter needs --sweep"),
    (["--refiner-start", "0.5"], "--refiner-start needs --refiner"),
    (["--mask-blur", "-2"], "--mask-blur: -2"),
    (["--sweep", "0,1", "--merge", "--num-images", "2"], "leave out --merge, --num-images"),
    (["--clip-skip", "0"], "--clip-skip: 0"),
    (["--device", "gpu0"], "--device: 'gpu0' is not a device"),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "no CUDA GPU is visible")]))
def test_flags_that_cannot_work_stop_before_anything_loads(tmp_path, capsys, extra, needle):
    assert _infer(tmp_path, tmp_path / "no-model-needed", *extra) == 2
    assert needle in _one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_clip_skip_past_the_text_encoder_names_its_layer_count(tiny_sd15, tmp_path, capsys):
    layers = json.loads((tiny_sd15 / "text_encoder" / "config.json").read_text())["num_hidden_layers"]
    assert _infer(tmp_path, tiny_sd15, "--clip-skip", str(layers + 1)) == 2
    assert f"--clip-skip: got {layers + 1}; expected 1 to {layers}" in _one_line_error(capsys)
    assert _infer(tmp_path, tiny_sd15, "--clip-skip", str(layers)) == 0  # the last one allowed still draws


def test_an_sd15_controlnet_on_an_sdxl_base_is_named(tiny_sdxl, tiny_controlnet, tmp_path, capsys):
    Image.new("RGB", (64, 64), "white").save(tmp_path / "map.png")
    rc = _infer(tmp_path, tiny_sdxl, "--controlnet", str(tiny_controlnet), "--control-image", str(tmp_path / "map.png"))
    assert rc == 2
    assert "is a ControlNet for SD 1.x, but --model is SDXL" in _one_line_error(capsys)


def test_a_refiner_that_is_not_sdxl_is_named(tiny_sdxl, tiny_sd15, tmp_path, capsys):
    assert _infer(tmp_path, tiny_sdxl, "--refiner", str(tiny_sd15)) == 2
    assert "is not an SDXL refiner" in _one_line_error(capsys)


def test_merge_never_turns_a_file_into_a_folder_or_the_reverse(tiny_sd15, random_adapters, tmp_path, capsys):
    picture = tmp_path / "picture.png"
    Image.new("RGB", (8, 8), "red").save(picture)
    before = picture.read_bytes()
    args = ["merge", "--model", str(tiny_sd15), "--lora", str(random_adapters["a"])]
    assert main([*args, "--out", str(picture), "--overwrite"]) == 2
    assert "is a file; give a folder name" in _one_line_error(capsys)
    assert picture.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["picture.png"]

    (tmp_path / "folder.safetensors").mkdir()
    assert main([*args, "--out", str(tmp_path / "folder.safetensors"), "--single-file", "--overwrite"]) == 2
    assert "is a folder; give a .safetensors file name" in _one_line_error(capsys)
    assert (tmp_path / "folder.safetensors").is_dir()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_extract_on_a_gpu_the_machine_lacks_is_one_line(tmp_path, capsys):
    rc = main(["extract", "--base", str(tmp_path / "a"), "--tuned", str(tmp_path / "b"), "--rank", "4",
               "--device", "cuda", "--out", str(tmp_path / "x.safetensors")])
    assert rc == 2 and "--device: 'cuda' but no CUDA GPU is visible" in _one_line_error(capsys)


def test_sweep_adapter_takes_the_files_stem_and_names_the_choices_before_loading(tiny_sd15, random_adapters,
                                                                                 tmp_path, capsys):
    import shutil

    dotted = tmp_path / "style.v2.safetensors"  # its adapter name is style_v2 (peft refuses dots)
    shutil.copy(random_adapters["b"], dotted)
    loras = ["--lora", str(random_adapters["a"]), "--lora", str(dotted), "--sweep", "0,1"]
    assert _infer(tmp_path, tmp_path / "no-model-needed", *loras, "--sweep-adapter", "style") == 2
    assert _one_line_error(capsys) == ("error: --sweep-adapter: 'style' is none of the --lora files; give one's name "
                                       "(its file's stem): a, style.v2")
    assert not (tmp_path / "out").exists()
    for name in ("style.v2", str(dotted)):
        assert _infer(tmp_path, tiny_sd15, *loras, "--sweep-adapter", name) == 0
    params = [Image.open(p).text["parameters"] for p in sorted((tmp_path / "out").glob("sweep-*.png"))]
    assert len(params) == 2 and all(p.endswith("Sweep: \"style_v2: 0,1\"") for p in params), params


def test_a_pipeline_given_as_a_controlnet_and_a_controlnet_given_as_the_base_are_named(tiny_sd15, tiny_controlnet,
                                                                                        tmp_path, capsys):
    Image.new("RGB", (64, 64)).save(tmp_path / "map.png")
    assert _infer(tmp_path, tiny_sd15, "--controlnet", str(tiny_sd15), "--control-image", str(tmp_path / "map.png")) == 2
    assert _one_line_error(capsys) == (f"error: --controlnet: '{tiny_sd15}' is a whole pipeline's folder "
                                       "(model_index.json), not a single model's; point it at a diffusers folder "
                                       "with config.json")
    assert _infer(tmp_path, tiny_controlnet) == 2
    assert _one_line_error(capsys) == (f"error: --model: '{tiny_controlnet}' is a single model's folder (config.json), "
                                       "not a whole pipeline's; point it at a diffusers folder with model_index.json")


def test_seed_minus_one_draws_a_seed_the_png_keeps_and_that_remakes_the_image(tiny_sd15, tmp_path, monkeypatch):
    """A1111's seed -1: a random seed, drawn once, written in the PNG parameters; that seed re-makes the
    image. A grid's seed axis draws one for -1 the same way."""
    import numpy as np

    from lora_trainer.inference import schedulers
    from lora_trainer.inference.xyz_axes import parse_axis
    from lora_trainer.pnginfo import parse_a1111_parameters

    monkeypatch.setattr(schedulers.random, "randrange", lambda n: 123456789)
    assert _infer(tmp_path / "random", tiny_sd15, "--seed", "-1") == 0
    [drawn] = sorted((tmp_path / "random" / "out").glob("*.png"))
    info = parse_a1111_parameters(Image.open(drawn).info["parameters"])
    assert info.seed == 123456789 and drawn.name == "00000-123456789.png"
    assert _infer(tmp_path / "again", tiny_sd15, "--seed", "123456789") == 0
    [again] = sorted((tmp_path / "again" / "out").glob("*.png"))
    assert np.array_equal(np.asarray(Image.open(drawn)), np.asarray(Image.open(again)))
    assert parse_axis("seed=-1,2").values == [123456789, 2]
