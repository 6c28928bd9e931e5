"""`--vae-tiling` (Generator(vae_tiling=True)): images larger than the VAE's tile (its config's
sample_size: 64 px on the tiny models) are decoded, and encoded for img2img, in tiles; the image stays
close to the untiled one, and one that fits a tile is unchanged."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lora_trainer.cli import main
from lora_trainer.inference.generate import Generator

DRAW = dict(prompt="a red circle", steps=2, seed=1, sampler="euler")


def _pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=int)


def _count_calls(monkeypatch, vae, method: str) -> list:
    calls: list = []
    real = getattr(vae, method)
    monkeypatch.setattr(vae, method, lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


@pytest.mark.parametrize("variant", ["sd15", "sdxl"])
def test_a_tiled_decode_is_close_to_the_untiled_one(request, monkeypatch, variant):
    model = request.getfixturevalue(f"tiny_{variant}")
    plain, tiled = Generator(model, device="cpu"), Generator(model, device="cpu", vae_tiling=True)
    assert tiled.pipe.vae.tile_sample_min_size == tiled.pipe.vae.config.sample_size == 64
    tiles = _count_calls(monkeypatch, tiled.pipe.vae, "tiled_decode")
    big = dict(DRAW, width=128, height=128)
    want, got = _pixels(plain.txt2img(**big)[0].image), _pixels(tiled.txt2img(**big)[0].image)
    assert tiles == [1] and got.shape == want.shape == (128, 128, 3)
    # Tiles decode apart (a random VAE's attention and norms see less), so not equal, but close: far
    # nearer than an image of another seed, and the same picture by correlation
    other = _pixels(plain.txt2img(**{**big, "seed": 2})[0].image)
    assert 0 < np.abs(got - want).mean() < np.abs(other - want).mean() / 3
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.9
    # an image that fits one tile is decoded whole: the same pixels
    small = dict(DRAW, width=64, height=64)
    assert np.array_equal(_pixels(tiled.txt2img(**small)[0].image), _pixels(plain.txt2img(**small)[0].image))
    assert tiles == [1]


def test_img2img_encodes_in_tiles_too(tiny_sd15, monkeypatch):
    gen = Generator(tiny_sd15, device="cpu", vae_tiling=True)
    encodes = _count_calls(monkeypatch, gen.pipe.vae, "_tiled_encode")
    init = Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8))
    out = gen.img2img("a red circle", init, strength=0.5, steps=2, sampler="euler")[0]
    assert encodes == [1] and out.image.size == (128, 96)


def test_the_refiner_decodes_in_tiles_too(tiny_sdxl, tmp_path):
    from lora_trainer.testing.inference_models import make_sdxl_refiner

    gen = Generator(tiny_sdxl, refiner=make_sdxl_refiner(tiny_sdxl, tmp_path / "refiner"), device="cpu",
                    vae_tiling=True)
    assert gen.pipe.vae.use_tiling and gen.refiner.vae is not gen.pipe.vae and gen.refiner.vae.use_tiling
    assert not Generator(tiny_sdxl, device="cpu").pipe.vae.use_tiling  # off by default


def test_the_flag_tiles_a_latent_hires_fix(tiny_sd15, tmp_path, monkeypatch):
    from diffusers import AutoencoderKL

    tiles = _count_calls(monkeypatch, AutoencoderKL, "tiled_decode")
    assert main(["infer", "--model", str(tiny_sd15), "--prompt", "x", "--steps", "2", "--width", "64", "--height",
                 "64", "--hires-scale", "2", "--hires-upscaler", "Latent", "--vae-tiling", "--out",
                 str(tmp_path / "out")]) == 0
    assert Image.open(tmp_path / "out" / "00000-0.png").size == (128, 128) and tiles == [1]
