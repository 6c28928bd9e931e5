"""Generation jobs on the tiny models: img2img, inpainting, outpainting, ControlNet + canny, samplers,
seeds and batches, the adapter sweep grid, PNG parameters and the SDXL refiner."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from lora_trainer.cli import main
from lora_trainer.inference.generate import Generator, Request
from lora_trainer.inference.images import canny, extend_canvas
from lora_trainer.inference.schedulers import SAMPLERS
from lora_trainer.inference.sweep import sweep_grid
from lora_trainer.pnginfo import GenerationInfo, a1111_parameters, parse_a1111_parameters

FAST = dict(steps=3, width=64, height=64, seed=7)


@pytest.fixture(scope="module")
def gen(tiny_sd15, random_adapters, tiny_controlnet):
    return Generator(tiny_sd15, [f"{random_adapters['a']}:0.8", f"{random_adapters['b']}:0.5"], device="cpu")


@pytest.fixture(scope="module")
def picture() -> Image.Image:
    image = Image.new("RGB", (64, 64), (40, 90, 200))
    ImageDraw.Draw(image).ellipse((12, 12, 52, 52), fill=(220, 40, 30))
    return image


def _vae_round_trip(pipe, image):
    with torch.no_grad():
        pixels = pipe.image_processor.preprocess(image)
        return pipe.vae.decode(pipe.vae.encode(pixels).latent_dist.mode()).sample


def test_img2img_strength_zero_returns_the_init_image(gen, picture):
    out = gen.img2img("a red circle", picture, strength=0.0, **FAST)[0]
    want = gen.pipe.image_processor.postprocess(_vae_round_trip(gen.pipe, picture), output_type="pil")[0]
    assert np.array_equal(np.asarray(out.image), np.asarray(want))
    changed = gen.img2img("a red circle", picture, strength=0.9, **FAST)[0]
    assert not np.array_equal(np.asarray(changed.image), np.asarray(want))
    assert "Denoising strength: 0.9" in a1111_parameters(changed.info)


def test_img2img_of_an_image_whose_sides_are_not_multiples_of_8_keeps_its_size_and_geometry(gen, picture, tmp_path,
                                                                                             capsys):
    odd = picture.crop((0, 0, 60, 52))
    out = gen.img2img("a red circle", odd, strength=0.5, steps=2, seed=7)[0]  # diffusers made 56x48 of it
    assert out.image.size == (60, 52) and (out.info.width, out.info.height) == (60, 52)
    # Strength 0 shows what the sampler starts from: the image padded by its edge pixels (not
    # resampled), through the VAE, cut back. A resize to 56x48 and back would give other pixels.
    kept = np.asarray(gen.img2img("a red circle", odd, strength=0.0, steps=2, seed=7)[0].image)
    padded = Image.fromarray(np.pad(np.asarray(odd), ((0, 4), (0, 4), (0, 0)), mode="edge"))
    want = gen.pipe.image_processor.postprocess(_vae_round_trip(gen.pipe, padded), output_type="pil")[0]
    assert np.array_equal(kept, np.asarray(want)[:52, :60])
    shrunk = gen.pipe.image_processor.postprocess(_vae_round_trip(gen.pipe, odd.resize((56, 48), Image.LANCZOS)),
                                                  output_type="pil")[0].resize((60, 52), Image.LANCZOS)
    assert np.abs(kept.astype(int) - np.asarray(shrunk, dtype=int)).max() > 8
    # --width and --height resize the init image to that size; one of them alone is refused
    assert gen.img2img("a red circle", odd, strength=0.5, steps=2, seed=7, width=32, height=40)[0].image.size == (32, 40)
    odd.save(tmp_path / "init.png")
    rc = main(["infer", "--model", str(tmp_path / "no-model-needed"), "--prompt", "x", "--out", str(tmp_path / "out"),
               "--init-image", str(tmp_path / "init.png"), "--width", "64"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "--width with --init-image needs --height too" in err
    assert not (tmp_path / "out").exists()


def test_inpainting_keeps_everything_outside_the_mask(gen, picture):
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((0, 0, 31, 63), fill=255)  # repaint the left half (latent cols 0-3)
    req = Request(prompt="a blue square", init_image=picture, mask=mask, strength=1.0, steps=3, seed=7)
    latents = gen.generate(req, output_type="latent")[0].image
    # Outside the mask the final latents are the init image's own latents (diffusers encodes it
    # with the first draw of the seed's generator).
    pixels = gen.pipe.image_processor.preprocess(picture)
    with torch.no_grad():
        encoded = gen.pipe.vae.encode(pixels).latent_dist.sample(torch.Generator().manual_seed(7))
    want = encoded[0] * gen.pipe.vae.config.scaling_factor
    torch.testing.assert_close(latents[:, :, 4:], want[:, :, 4:], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(latents[:, :, :4], want[:, :, :4], atol=1e-2)
    # and the saved pixels there are the original ones, exactly (A1111's paste-back)
    image = np.asarray(gen.generate(Request(**{**req.__dict__, "mask_blur": 0}))[0].image)
    assert np.array_equal(image[:, 32:], np.asarray(picture)[:, 32:])
    assert not np.array_equal(image[:, :32], np.asarray(picture)[:, :32])


def test_inpainting_an_image_whose_sides_are_not_multiples_of_8_keeps_its_size_and_pixels(gen, picture):
    odd = picture.crop((0, 0, 60, 52))
    mask = Image.new("L", odd.size, 0)
    ImageDraw.Draw(mask).rectangle((0, 0, 29, 51), fill=255)
    out = gen.generate(Request(prompt="a blue square", init_image=odd, mask=mask, strength=1.0, steps=2, seed=7,
                               mask_blur=0))[0]
    image = np.asarray(out.image)
    assert out.image.size == (60, 52) and (out.info.width, out.info.height) == (60, 52)
    assert np.array_equal(image[:, 30:], np.asarray(odd)[:, 30:])  # kept as they were, not resampled
    assert not np.array_equal(image[:, :30], np.asarray(odd)[:, :30])


def test_outpainting_extends_the_canvas_and_keeps_the_original(gen, picture):
    canvas, mask = extend_canvas(picture, 16, 4, 0, 8)  # right grows to 8 so the width is a multiple of 8
    assert canvas.size == (88, 72) and np.asarray(mask)[:64, 16:80].max() == 0 and np.asarray(mask)[:, :16].min() == 255
    out = gen.outpaint("sky", picture, left=16, right=4, bottom=8, steps=3, seed=1, mask_blur=0)[0].image
    assert out.size == (88, 72)
    assert np.array_equal(np.asarray(out)[:64, 16:80], np.asarray(picture))


def test_same_seed_same_image_whatever_the_batch_size(gen):
    batch = gen.txt2img("a red circle", batch_size=2, **FAST)
    alone = gen.txt2img("a red circle", **{**FAST, "seed": 8})[0]
    assert [r.info.seed for r in batch] == [7, 8]
    a, b = np.asarray(batch[1].image, dtype=int), np.asarray(alone.image, dtype=int)
    assert np.abs(a - b).max() <= 1  # batched convolutions may round differently in the last bit
    again = gen.txt2img("a red circle", **FAST)[0]
    assert np.array_equal(np.asarray(again.image), np.asarray(gen.txt2img("a red circle", **FAST)[0].image))


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_runs_under_its_a1111_name(gen, sampler):
    out = gen.txt2img("a circle", sampler=sampler, steps=2, width=32, height=32, seed=1, guidance_scale=1.5)[0]
    assert out.image.size == (32, 32) and np.asarray(out.image).std() > 0
    assert out.info.sampler == SAMPLERS[sampler][2]


def test_canny_finds_the_outline_of_a_square():
    image = Image.new("RGB", (48, 48), "black")
    ImageDraw.Draw(image).rectangle((12, 12, 35, 35), fill="white")
    edges = np.asarray(canny(image))[:, :, 0] > 0
    assert edges[10:38, 10:38].sum() > 60  # the outline
    assert not edges[16:32, 16:32].any() and not edges[:6].any() and not edges[:, 42:].any()
    assert set(np.unique(np.asarray(canny(image)))) <= {0, 255}


def test_controlnet_scale_zero_is_plain_txt2img_and_scale_one_steers(gen, tiny_sd15, tiny_controlnet, picture,
                                                                       random_adapters):
    cn = Generator(tiny_sd15, [f"{random_adapters['a']}:0.8", f"{random_adapters['b']}:0.5"],
                   controlnet=tiny_controlnet, device="cpu")
    plain = np.asarray(gen.txt2img("a red circle", **FAST)[0].image)
    zero = cn.txt2img("a red circle", control_image=picture, control_scale=0.0, control_preprocess="canny", **FAST)[0]
    one = cn.txt2img("a red circle", control_image=picture, control_scale=1.0, control_preprocess="canny", **FAST)[0]
    assert np.abs(np.asarray(zero.image, dtype=int) - plain).max() <= 1
    assert not np.array_equal(np.asarray(one.image), plain)
    assert "ControlNet 0: \"Module: canny, Model: model, Weight: 1\"" in a1111_parameters(one.info)
    inpaint = cn.inpaint("x", picture, Image.new("L", (64, 64), 255), control_image=picture, steps=2, seed=1)[0]
    assert inpaint.image.size == (64, 64)
    # img2img of sides not multiples of 8: the map is padded as the init image is, so the two still match
    odd = picture.crop((0, 0, 60, 52))
    assert cn.img2img("x", odd, control_image=odd, steps=2, seed=1)[0].image.size == (60, 52)
    # a map of another shape is cut around its centre, not stretched: a 120x52 map whose middle 60
    # columns are white (black at both sides) gives an all-white map over a 60x52 init image
    wide = Image.new("RGB", (120, 52), "black")
    ImageDraw.Draw(wide).rectangle((30, 0, 89, 51), fill="white")
    kw = cn._call_kwargs(Request(prompt="x", init_image=odd, control_image=wide), "img2img")
    fed = np.asarray(kw["control_image"])
    assert kw["control_image"].size == (64, 56) and fed.min() == 255  # padded by repeating the edge


def test_sweep_grid_holds_each_weight_rendered_alone(gen):
    prompts, weights = ["a red circle", "a blue square"], [0.0, 0.5, 1.0]
    sweep = sweep_grid(gen, prompts, weights, adapter="a", request=Request(prompt="", **FAST))
    grid, boxes = sweep.grid.image, sweep.grid.boxes
    assert len(boxes) == 2 and len(boxes[0]) == 3
    assert grid.size[0] > 3 * 64 and grid.size[1] > 2 * 64
    assert gen.adapters.specs["a"].weight == 0.8  # put back afterwards
    gen.set_weight("a", 0.5)
    try:
        alone = gen.txt2img("a blue square", **FAST)[0].image
    finally:
        gen.set_weight("a", 0.8)
    assert np.array_equal(np.asarray(grid.crop(boxes[1][1])), np.asarray(alone))
    assert not np.array_equal(np.asarray(grid.crop(boxes[1][0])), np.asarray(alone))
    assert sweep.info.extra["Sweep"] == "a: 0,0.5,1"


def test_png_parameters_round_trip(gen, tmp_path):
    args = ["infer", "--model", str(gen.model), "--lora", f"{gen.adapters.specs['a'].path}:0.6",
            "--prompt", "a (red:1.2) circle, sky", "--negative-prompt", "blurry, text", "--steps", "2",
            "--scheduler", "euler_a", "--clip-skip", "2", "--seed", "11", "--width", "32", "--height", "32",
            "--out", str(tmp_path)]
    assert main(args) == 0
    text = Image.open(tmp_path / "00000-11.png").text["parameters"]
    info = parse_a1111_parameters(text)
    assert (info.prompt, info.negative_prompt, info.steps, info.sampler, info.seed, info.clip_skip) == (
        "a (red:1.2) circle, sky", "blurry, text", 2, "Euler a", 11, 2)
    assert (info.width, info.height) == (32, 32) and info.adapters[0][:2] == ("a", 0.6)
    assert len(info.adapters[0][2]) == 12  # A1111's short adapter hash
    assert a1111_parameters(info) == text
    assert main(args) == 0 and (tmp_path / "00001-11.png").exists()  # a second run never overwrites
    # the numbers go on across runs whatever the seed, so the folder lists its images in the order made
    assert main(["3" if a == "11" else a for a in args]) == 0  # --seed 3
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["00000-11.png", "00001-11.png", "00002-3.png"]


def test_sdxl_refiner_runs_as_second_stage(tiny_sdxl, tmp_path):
    from lora_trainer.testing.inference_models import make_sdxl_refiner

    refiner = make_sdxl_refiner(tiny_sdxl, tmp_path / "refiner")
    gen = Generator(tiny_sdxl, refiner=refiner, device="cpu")
    base_only = Generator(tiny_sdxl, device="cpu").txt2img("a red circle", **FAST)[0]
    out = gen.txt2img("a red circle", refiner_start=0.5, **FAST)[0]
    assert out.image.size == (64, 64)
    assert not np.array_equal(np.asarray(out.image), np.asarray(base_only.image))
    assert out.info.extra["Refiner switch at"] == "0.5"


@pytest.mark.parametrize("extra, needle", [
    (["--scheduler", "karras"], "--scheduler"),
    (["--outpaint", "1,2"], "--outpaint"),
    (["--mask", "m.png"], "--mask"),
    (["--init-image", "missing.png"], "missing.png"),
    (["--sweep", "0,a"], "--sweep"),
    (["--width", "65"], "--width"),
])
def test_bad_infer_flags_are_one_line_errors(tiny_sd15, tmp_path, capsys, extra, needle):
    rc = main(["infer", "--model", str(tiny_sd15), "--prompt", "x", "--out", str(tmp_path), *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and needle in err and "\n" not in err


@pytest.mark.parametrize("name, meant", [("eular", "euler"), ("dpmpp_2m_karras", "dpm++_2m_karras"),
                                         ("euler_ancestral", "euler_a"), ("k_euler_a", "euler_a"), ("karras", None)])
def test_an_unknown_sampler_name_suggests_the_one_meant(tmp_path, capsys, name, meant):
    # refused before the base would load
    rc = main(["infer", "--model", str(tmp_path / "no-model-needed"), "--prompt", "x", "--scheduler", name,
               "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and f"--scheduler: {name!r} is not a known sampler; " in err, err
    assert (f"did you mean {meant}? choose one of ddim," in err) if meant else ("did you mean" not in err)


def test_a_mask_of_another_shape_is_refused_and_one_of_the_same_shape_is_scaled(tmp_path, capsys):
    from lora_trainer.inference.images import read_mask

    Image.new("RGB", (64, 64)).save(tmp_path / "init.png")
    Image.new("L", (32, 48), 255).save(tmp_path / "tall.png")
    rc = main(["infer", "--model", str(tmp_path / "no-model-needed"), "--prompt", "x", "--out", str(tmp_path / "out"),
               "--init-image", str(tmp_path / "init.png"), "--mask", str(tmp_path / "tall.png")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and err == (
        f"error: --mask: {tmp_path / 'tall.png'} is 32x48 but --init-image is 64x64, another shape, so it would be "
        "stretched over other pixels; give a 64x64 mask (or one of the same shape)")
    assert not (tmp_path / "out").exists()
    half = Image.new("L", (32, 32))
    half.paste(255, (0, 0, 16, 32))  # the left half
    half.save(tmp_path / "half.png")
    scaled = np.asarray(read_mask(tmp_path / "half.png", (64, 64)))
    assert scaled.shape == (64, 64) and (scaled[:, :32] == 255).all() and (scaled[:, 32:] == 0).all()


def test_outpaint_with_another_size_is_refused_rather_than_squashed(tiny_sd15, picture, tmp_path, capsys):
    picture.save(tmp_path / "init.png")
    rc = main(["infer", "--model", str(tiny_sd15), "--prompt", "x", "--out", str(tmp_path / "out"),
               "--init-image", str(tmp_path / "init.png"), "--outpaint", "0,32,0,0", "--width", "64", "--height", "64"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "96x64 canvas" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_a_missing_controlnet_hint_names_a_controlnet(tiny_sd15, picture, tmp_path, capsys):
    picture.save(tmp_path / "map.png")
    rc = main(["infer", "--model", str(tiny_sd15), "--prompt", "x", "--out", str(tmp_path / "out"),
               "--controlnet", str(tmp_path / "nope"), "--control-image", str(tmp_path / "map.png")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: --controlnet:") and "sd-controlnet" in err and "\n" not in err


def test_png_parameters_of_an_empty_prompt_read_back():
    info = parse_a1111_parameters(a1111_parameters(GenerationInfo(prompt="", steps=3, seed=9, width=64, height=64)))
    assert (info.prompt, info.steps, info.seed, info.width) == ("", 3, 9, 64)
    lone = parse_a1111_parameters("Steps: in the hills, a path")  # a prompt that merely starts like one
    assert lone.prompt == "Steps: in the hills, a path"
