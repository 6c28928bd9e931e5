"""--vae for infer and merge, Generator(vae=...): the images it decodes, A1111's VAE keys in the PNG,
the merged model that carries it, the SDXL refiner decoding with it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from infer_helpers import one_line_error, run_infer
from lora_trainer.cli import main
from lora_trainer.inference.generate import Generator, Request
from lora_trainer.pnginfo import parse_a1111_parameters
from lora_trainer.testing.tiny_vae import make_vae

REQUEST = dict(prompt="a red circle", steps=3, width=64, height=64, seed=7)


@pytest.fixture(scope="module")
def other_vae(tiny_sd15, tmp_path_factory) -> Path:
    return make_vae(tiny_sd15, tmp_path_factory.mktemp("vae") / "other-vae.safetensors", seed=5, single_file=True)


def test_vae_changes_the_image_to_its_own_decoding_of_the_same_latents(tiny_sd15, other_vae):
    from lora_trainer.models.vae import load_vae

    plain, swapped = Generator(tiny_sd15, device="cpu"), Generator(tiny_sd15, device="cpu", vae=other_vae)
    latents = plain.generate(Request(**REQUEST), output_type="latent")[0].image
    torch.testing.assert_close(swapped.generate(Request(**REQUEST), output_type="latent")[0].image, latents)
    image = np.asarray(swapped.generate(Request(**REQUEST))[0].image)
    assert not np.array_equal(image, np.asarray(plain.generate(Request(**REQUEST))[0].image))
    # by hand: the other VAE decodes the base's latents
    vae = load_vae(str(other_vae), plain.pipe.vae, torch.float32)
    with torch.no_grad():
        decoded = vae.decode(latents[None] / vae.config.scaling_factor).sample
    by_hand = np.asarray(plain.pipe.image_processor.postprocess(decoded, output_type="pil")[0])
    assert np.abs(image.astype(int) - by_hand.astype(int)).max() <= 1


def test_infer_vae_writes_a1111_vae_keys(tiny_sd15, other_vae, tmp_path):
    assert run_infer(tmp_path, tiny_sd15, "--vae", str(other_vae)) == 0
    [png] = (tmp_path / "out").glob("*.png")
    text = Image.open(png).text["parameters"]
    digest = hashlib.sha256(other_vae.read_bytes()).hexdigest()
    assert f"Model: {Path(tiny_sd15).name}, VAE hash: {digest[:10]}, VAE: other-vae.safetensors" in text
    info = parse_a1111_parameters(text)
    assert (info.vae_name, info.vae_hash, info.extra.get("VAE")) == ("other-vae.safetensors", digest[:10], None)
    assert run_infer(tmp_path / "plain", tiny_sd15) == 0
    [png] = (tmp_path / "plain" / "out").glob("*.png")
    assert "VAE" not in Image.open(png).text["parameters"]  # the model's own VAE: no keys, as A1111


def test_infer_vae_refusals_are_one_line_before_the_base_loads(tiny_sd15, tmp_path, capsys, monkeypatch):
    from diffusers import StableDiffusionPipeline

    (tmp_path / "vae.pt").write_bytes(b"pickle")
    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", lambda *a, **k: pytest.fail("the base loaded"))
    for source, says in ((tmp_path / "missing.safetensors", "does not exist"), (tmp_path / "vae.pt", "is a pickle")):
        assert run_infer(tmp_path, tiny_sd15, "--vae", str(source)) == 2
        err = one_line_error(capsys)
        assert "--vae: " in err and says in err, err


def test_a_vae_that_does_not_fit_is_refused_in_one_line(tiny_sd15, tmp_path, capsys):
    wide = make_vae(tiny_sd15, tmp_path / "wide", seed=1, latent_channels=16)
    assert run_infer(tmp_path, tiny_sd15, "--vae", str(wide)) == 2
    assert "latent channels 16, the base's VAE 4" in one_line_error(capsys)


def test_merge_vae_carries_it_in_the_folder_and_the_single_file(tiny_sd15, random_adapters, other_vae, tmp_path):
    from diffusers import AutoencoderKL

    from lora_trainer.models.vae import load_vae

    want = load_vae(str(other_vae), AutoencoderKL.from_pretrained(tiny_sd15, subfolder="vae"), torch.float32)
    want = want.state_dict()
    lora = str(random_adapters["a"])
    assert main(["merge", "--model", str(tiny_sd15), "--lora", lora, "--vae", str(other_vae),
                 "--out", str(tmp_path / "merged")]) == 0
    merged = AutoencoderKL.from_pretrained(tmp_path / "merged", subfolder="vae").state_dict()
    assert all(torch.equal(merged[k], want[k]) for k in want)
    single = tmp_path / "merged.safetensors"
    assert main(["merge", "--model", str(tiny_sd15), "--lora", lora, "--vae", str(other_vae), "--single-file",
                 "--out", str(single)]) == 0
    # the checkpoint's first_stage_model.* tensors are that VAE
    back = load_vae(str(single), AutoencoderKL.from_pretrained(tiny_sd15, subfolder="vae"), torch.float32)
    assert all(torch.equal(back.state_dict()[k], want[k]) for k in want)


def test_merge_vae_alone_bakes_it_into_the_base(tiny_sd15, other_vae, tmp_path, capsys):
    # a checkpoint with the fixed VAE: no --lora, the rest of the base unchanged
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from lora_trainer.models.vae import load_vae

    want = load_vae(str(other_vae), AutoencoderKL.from_pretrained(tiny_sd15, subfolder="vae"), torch.float32)
    want = want.state_dict()
    assert main(["merge", "--model", str(tiny_sd15), "--vae", str(other_vae), "--out", str(tmp_path / "baked")]) == 0
    merged = AutoencoderKL.from_pretrained(tmp_path / "baked", subfolder="vae").state_dict()
    assert merged.keys() == want.keys() and all(torch.equal(merged[k], want[k]) for k in want)
    base_unet = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet").state_dict()
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "baked", subfolder="unet").state_dict()
    assert all(torch.equal(unet[k], base_unet[k]) for k in base_unet)
    single = tmp_path / "baked.safetensors"
    assert main(["merge", "--model", str(tiny_sd15), "--vae", str(other_vae), "--single-file",
                 "--out", str(single)]) == 0
    back = load_vae(str(single), AutoencoderKL.from_pretrained(tiny_sd15, subfolder="vae"), torch.float32)
    assert all(torch.equal(back.state_dict()[k], want[k]) for k in want)
    # neither --lora nor --vae: the save would be the base itself
    capsys.readouterr()
    assert main(["merge", "--model", str(tiny_sd15), "--out", str(tmp_path / "same")]) == 2
    err = one_line_error(capsys)
    assert "give at least one --lora FILE[:WEIGHT] to fuse, or --vae VAE" in err and not (tmp_path / "same").exists()


def test_sdxl_refiner_decodes_with_the_vae_too(tiny_sdxl, tmp_path):
    from lora_trainer.testing.inference_models import make_sdxl_refiner

    refiner = make_sdxl_refiner(tiny_sdxl, tmp_path / "refiner")
    vae = make_vae(tiny_sdxl, tmp_path / "sdxl-vae", seed=3)
    gen = Generator(tiny_sdxl, refiner=refiner, device="cpu", vae=vae)
    assert gen.refiner.vae is gen.pipe.vae
    plain = Generator(tiny_sdxl, refiner=refiner, device="cpu")
    request = Request(**REQUEST, refiner_start=0.5)
    image = np.asarray(gen.generate(request)[0].image)
    assert not np.array_equal(image, np.asarray(plain.generate(request)[0].image))

