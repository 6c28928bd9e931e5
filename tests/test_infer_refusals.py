"""infer flags that would do nothing are refused in one line: ControlNet options without
--controlnet (whose defaults still apply with it), and pickled adapters, named before any model loads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from infer_helpers import one_line_error as _one_line_error
from infer_helpers import run_infer as _infer
from infer_helpers import unwritable_folder
from lora_trainer.cli import main
from lora_trainer.errors import ModelError


@pytest.mark.parametrize("extra, needle", [
    (["--control-scale", "0.5"], "--control-scale needs --controlnet"),
    (["--control-preprocess", "none"], "--control-preprocess needs --controlnet"),
    (["--control-preprocess", "canny"], "--control-preprocess needs --controlnet"),
])
def test_controlnet_options_without_a_controlnet_are_refused(tmp_path, capsys, extra, needle):
    # the base does not exist: the flags are refused before anything would load it
    assert _infer(tmp_path, tmp_path / "no-model-needed", *extra) == 2
    assert needle in _one_line_error(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin"])
def test_a_pickled_adapter_is_refused_by_name_before_the_base_loads(tmp_path, capsys, suffix):
    pickle = tmp_path / f"style{suffix}"
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, pickle)
    # a base that does not exist: had it been loaded first, the error would be about the base
    assert _infer(tmp_path, tmp_path / "no-model-needed", "--lora", f"{pickle}:0.7") == 2
    err = _one_line_error(capsys)
    assert err == (f"error: --lora: {pickle} is a pickle ({suffix}), which can run code when loaded and is not "
                   "read here; save it as .safetensors first")
    assert main(["merge", "--model", str(tmp_path / "no-model-needed"), "--lora", str(pickle),
                 "--out", str(tmp_path / "merged")]) == 2
    assert f"--lora: {pickle} is a pickle ({suffix})" in _one_line_error(capsys)
    assert not (tmp_path / "merged").exists()


def test_a_missing_adapter_is_named_before_the_base_loads(tmp_path):
    from lora_trainer.inference.generate import Generator

    with pytest.raises(ModelError, match=r"^--lora: .*gone\.safetensors: file not found$"):
        Generator(tmp_path / "no-model-needed", [f"{tmp_path / 'gone.safetensors'}:0.5"], device="cpu")


def test_with_a_controlnet_the_defaults_are_scale_1_and_no_preprocessing(tiny_sd15, tiny_controlnet, tmp_path):
    from lora_trainer.pnginfo import parse_a1111_parameters

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "map.png")
    common = ["--controlnet", str(tiny_controlnet), "--control-image", str(tmp_path / "map.png")]
    images = {}
    for name, extra in [("default", []), ("explicit", ["--control-scale", "1", "--control-preprocess", "none"]),
                        ("half", ["--control-scale", "0.5"])]:
        assert _infer(tmp_path / name, tiny_sd15, *common, *extra) == 0
        [png] = sorted((tmp_path / name / "out").glob("*.png"))
        images[name] = np.asarray(Image.open(png), dtype=np.int16)
        if name == "default":
            info = parse_a1111_parameters(Image.open(png).text["parameters"])
            assert info.extra["ControlNet 0"].startswith("Module: none, Model: ")
            assert info.extra["ControlNet 0"].endswith("Weight: 1")
    assert np.array_equal(images["default"], images["explicit"])
    assert not np.array_equal(images["default"], images["half"])  # the scale does reach the pipeline


def test_an_out_folder_that_cannot_be_written_is_refused_before_the_base_loads(tmp_path, capsys):
    out = unwritable_folder(tmp_path)
    assert main(["infer", "--model", str(tmp_path / "no-model-needed"), "--prompt", "x", "--out", str(out)]) == 2
    err = _one_line_error(capsys)
    assert err.startswith(f"error: --out: {out} cannot be written to (") and err.endswith(
        "; give a folder you can write to"), err


@pytest.mark.parametrize("extra, needle", [
    (["--lora", "{a}:nan"], "'nan' is not a weight; write FILE:WEIGHT with a finite number"),
    (["--lora", "{a}:inf"], "'inf' is not a weight; write FILE:WEIGHT with a finite number"),
    (["--lora", "{a}", "--sweep", "0,nan"], "--sweep: '0,nan' is not a comma-separated list of numbers"),
])
def test_a_weight_that_is_not_a_finite_number_is_refused_before_the_base_loads(tmp_path, capsys, random_adapters,
                                                                              extra, needle):
    extra = [e.format(a=random_adapters["a"]) for e in extra]
    assert _infer(tmp_path, tmp_path / "no-model-needed", *extra) == 2
    assert needle in _one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_a_whole_checkpoint_given_as_an_adapter_is_named_as_one(tiny_sd15, tmp_path, capsys):
    from safetensors.torch import save_file

    checkpoint = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4),
               "first_stage_model.decoder.conv_in.weight": torch.zeros(4, 4)}, str(checkpoint))
    assert _infer(tmp_path, tiny_sd15, "--lora", str(checkpoint)) == 2
    assert _one_line_error(capsys) == (
        f"error: --lora: {checkpoint}: a whole Stable Diffusion checkpoint (its UNet, VAE and text encoder weights), "
        "not an adapter; give it as the base model (--model / model.base), or make an adapter of it with "
        "`lora-trainer extract`")


@pytest.mark.parametrize("tensors", [{"emb_params": (2, 32)}, {"clip_l": (2, 32), "clip_g": (2, 32)}])
def test_an_embedding_given_as_an_adapter_is_named_as_one(tiny_sd15, tmp_path, capsys, tensors):
    from safetensors.torch import save_file

    embedding = tmp_path / "ohwx.safetensors"
    save_file({k: torch.zeros(shape) for k, shape in tensors.items()}, str(embedding))
    assert _infer(tmp_path, tiny_sd15, "--lora", str(embedding)) == 2
    assert _one_line_error(capsys) == (
        f"error: --lora: {embedding}: a textual-inversion embedding ({', '.join(sorted(tensors))}), not an adapter; "
        "infer.py takes it with --embedding FILE[:TOKEN] (A1111/ComfyUI: their embeddings folder), "
        "`lora-trainer inspect` reads it")
    assert not (tmp_path / "out").exists()
