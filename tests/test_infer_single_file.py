"""Single-file (original layout) checkpoints in inference: as a base, and as `merge --single-file` output."""

from __future__ import annotations

import numpy as np
import torch

from lora_trainer.cli import main


def _single_file(model_dir, path):
    from diffusers import StableDiffusionPipeline

    from lora_trainer.models.single_file import save_single_file

    return save_single_file(StableDiffusionPipeline.from_pretrained(model_dir), path)


def _image(generator, **kw):
    [result] = generator.txt2img("geoshape, a red circle", steps=3, width=64, height=64, seed=3, **kw)
    return np.asarray(result.image)


def test_single_file_base_generates_what_its_folder_does(tiny_sd15, trained, tmp_path):
    from lora_trainer.inference.adapters import AdapterSpec
    from lora_trainer.inference.generate import Generator

    path = _single_file(tiny_sd15, tmp_path / "base.safetensors")
    adapter = [AdapterSpec(trained.output_dir / "example-lora.safetensors", 0.8)]
    from_folder = Generator(tiny_sd15, adapter, device="cpu", dtype=torch.float32)
    # The tiny model is not SD1.5-sized: its own folder gives the configs, as model.config_dir does.
    from_file = Generator(path, adapter, device="cpu", dtype=torch.float32, config_dir=tiny_sd15)
    assert from_file.variant == "sd15"
    assert np.array_equal(_image(from_file), _image(from_folder))


def test_merge_single_file_equals_the_merged_folder(tiny_sd15, trained, tmp_path, capsys):
    from lora_trainer.models.single_file import load_single_file

    lora = f"{trained.output_dir / 'example-lora.safetensors'}:0.7"
    assert main(["merge", "--model", str(tiny_sd15), "--lora", lora, "--out", str(tmp_path / "folder")]) == 0
    out = tmp_path / "merged.safetensors"
    assert main(["merge", "--model", str(tiny_sd15), "--lora", lora, "--out", str(out), "--single-file"]) == 0
    parts, _ = load_single_file(out, "sd15", torch.float32, str(tiny_sd15))
    from diffusers import UNet2DConditionModel

    folder_unet = UNet2DConditionModel.from_pretrained(tmp_path / "folder", subfolder="unet")
    g = torch.Generator().manual_seed(0)
    latents, hidden = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    with torch.no_grad():
        a = parts["unet"](latents, torch.tensor([400]), hidden).sample
        b = folder_unet(latents, torch.tensor([400]), hidden).sample
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # a second merge to the same file needs --overwrite
    capsys.readouterr()
    assert main(["merge", "--model", str(tiny_sd15), "--lora", lora, "--out", str(out), "--single-file"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_single_file_error_names_the_infer_flags(tiny_sd15, tmp_path, capsys):
    # The tiny model does not fit the shipped SD1.5 configs: the hint is --config-dir, not model.config_dir.
    path = _single_file(tiny_sd15, tmp_path / "base.safetensors")
    capsys.readouterr()  # the pipeline's loading bar
    rc = main(["infer", "--model", str(path), "--prompt", "x", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err
    assert err.startswith("error: --model: ") and "--config-dir" in err and "model.config_dir" not in err
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:4096])  # a download that stopped early
    assert main(["infer", "--model", str(cut), "--prompt", "x", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --model: {cut} is not a readable .safetensors file (") and "\n" not in err, err
    assert err.endswith("download or copy it again"), err


def test_a_config_dir_of_the_other_family_is_named(tiny_sd15, tiny_sdxl, tmp_path, capsys):
    path = _single_file(tiny_sd15, tmp_path / "base.safetensors")
    capsys.readouterr()
    rc = main(["infer", "--model", str(path), "--config-dir", str(tiny_sdxl), "--prompt", "x",
               "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and err == (
        f"error: --config-dir: {tiny_sdxl} describes an SDXL pipeline but {path} is an SD 1.x checkpoint; "
        "give a folder of its own family")
