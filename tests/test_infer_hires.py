"""Hires. fix (`--hires-scale`): txt2img, a Lanczos upscale, then img2img at the larger size on the same
modules, equal to those three steps done by hand with diffusers; adapters, refiner and PNG parameters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from infer_helpers import one_line_error
from infer_helpers import run_infer as _infer
from lora_trainer.cli import main
from lora_trainer.errors import ConfigError
from lora_trainer.inference.generate import Generator, Request
from lora_trainer.pnginfo import a1111_parameters, parse_a1111_parameters

PROMPT, NEGATIVE = "a red circle", "blurry"
HIRES = dict(prompt=PROMPT, negative_prompt=NEGATIVE, steps=3, width=32, height=32, seed=5, sampler="euler",
             hires_scale=2, hires_strength=0.6, hires_steps=4)


def _pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=int)


def _first_pass(pipe) -> Image.Image:
    """The hires fix's first pass by hand: diffusers' txt2img at 32 px."""
    from diffusers import EulerDiscreteScheduler

    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    return pipe(prompt=PROMPT, negative_prompt=NEGATIVE, guidance_scale=7.5, num_inference_steps=3, width=32,
                height=32, generator=torch.Generator().manual_seed(5)).images[0]


def _second_pass(pipe, img2img_class, first, refiner=None, refiner_start=None) -> Image.Image:
    """Then PIL's Lanczos to 64 px and diffusers' img2img with the same seed (the refiner on its last part)."""
    from diffusers import EulerDiscreteScheduler

    second = img2img_class.from_pipe(pipe)
    second.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    kw = dict(prompt=PROMPT, negative_prompt=NEGATIVE, guidance_scale=7.5, image=first.resize((64, 64), Image.LANCZOS),
              strength=0.6, num_inference_steps=4, generator=torch.Generator().manual_seed(5))
    if refiner is None:
        return second(**kw).images[0]
    latents = second(**kw, denoising_end=refiner_start, output_type="latent").images
    refiner.scheduler = EulerDiscreteScheduler.from_config(refiner.scheduler.config)
    return refiner(**{**kw, "image": latents}, denoising_start=refiner_start).images[0]


def _by_hand(pipe, img2img_class, **refiner) -> Image.Image:
    return _second_pass(pipe, img2img_class, _first_pass(pipe), **refiner)


@pytest.mark.parametrize("variant", ["sd15", "sdxl"])
def test_hires_fix_is_txt2img_then_lanczos_then_img2img_as_by_hand(request, variant):
    import diffusers

    model = request.getfixturevalue(f"tiny_{variant}")
    gen = Generator(model, device="cpu")
    out = gen.generate(Request(**HIRES))[0]
    assert out.image.size == (64, 64)
    classes = {"sd15": ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", dict(safety_checker=None)),
               "sdxl": ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", {})}[variant]
    pipe = getattr(diffusers, classes[0]).from_pretrained(model, **classes[2])
    pipe.set_progress_bar_config(disable=True)
    want = _by_hand(pipe, getattr(diffusers, classes[1]))
    assert np.abs(_pixels(out.image) - _pixels(want)).max() <= 1
    plain = gen.txt2img(PROMPT, negative_prompt=NEGATIVE, steps=3, width=64, height=64, seed=5, sampler="euler")[0]
    assert np.abs(_pixels(out.image) - _pixels(plain.image)).mean() > 5  # not a plain draw at the large size


def test_the_adapters_draw_the_hires_pass_too(tiny_sd15, random_adapters):
    from diffusers import StableDiffusionImg2ImgPipeline

    gen = Generator(tiny_sd15, f"{random_adapters['a']}:0.8", device="cpu")
    out = _pixels(gen.generate(Request(**HIRES))[0].image)
    # by hand on the Generator's own modules: the adapter at 0.8 in both passes
    assert np.abs(out - _pixels(_by_hand(gen.pipe, StableDiffusionImg2ImgPipeline))).max() <= 1
    # had the second pass run without it, the image would be another
    first = _first_pass(gen.pipe)
    gen.set_enabled("a", False)
    try:
        first_only = _pixels(_second_pass(gen.pipe, StableDiffusionImg2ImgPipeline, first))
        bare = _pixels(gen.generate(Request(**HIRES))[0].image)
    finally:
        gen.set_enabled("a", True)
    assert np.abs(out - first_only).mean() > 2 and np.abs(out - bare).mean() > 2
    gen.merge()  # fused into the weights the img2img pipeline shares
    assert np.abs(_pixels(gen.generate(Request(**HIRES))[0].image) - out).max() <= 2


def test_the_refiner_takes_the_last_part_of_the_hires_pass(tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    from lora_trainer.testing.inference_models import make_sdxl_refiner

    gen = Generator(tiny_sdxl, refiner=make_sdxl_refiner(tiny_sdxl, tmp_path / "refiner"), device="cpu")
    out = gen.generate(Request(**HIRES, refiner_start=0.5))[0]
    assert out.image.size == (64, 64) and out.info.extra["Refiner switch at"] == "0.5"
    # the first pass is the base's alone; the refiner shares its VAE and second text encoder
    want = _by_hand(gen.pipe, StableDiffusionXLImg2ImgPipeline, refiner=gen.refiner, refiner_start=0.5)
    assert np.abs(_pixels(out.image) - _pixels(want)).max() <= 1


def test_png_parameters_carry_a1111s_hires_keys(tiny_sd15, random_adapters, tmp_path):
    from safetensors.torch import save_file

    save_file({"emb_params": torch.randn(2, 32, generator=torch.Generator().manual_seed(0))},
              str(tmp_path / "mytok.safetensors"))
    assert main(["infer", "--model", str(tiny_sd15), "--prompt", "a mytok circle", "--steps", "2", "--width", "32",
                 "--height", "40", "--seed", "3", "--hires-scale", "1.5", "--hires-strength", "0.4",
                 "--lora", f"{random_adapters['b']}:0.7", "--merge", "--embedding", str(tmp_path / "mytok.safetensors"),
                 "--out", str(tmp_path / "out")]) == 0
    png = Image.open(tmp_path / "out" / "00000-3.png")
    assert png.size == (48, 64)  # 40 × 1.5 = 60, rounded to the nearest multiple of 8
    text = png.text["parameters"]
    # A1111 writes the first pass's size under Size; the final one is under Hires resize
    assert ("Size: 32x40" in text and "Denoising strength: 0.4" in text and "TI hashes: " in text
            and text.endswith("Hires upscale: 1.5, Hires resize: 48x64, Hires steps: 2, Hires upscaler: Lanczos"))
    info = parse_a1111_parameters(text)
    assert info.denoising_strength == 0.4 and info.extra["Hires resize"] == "48x64"
    assert a1111_parameters(info) == text


@pytest.mark.parametrize("extra, message", [
    (["--hires-strength", "0.4"], "--hires-strength needs --hires-scale; without it the flag would change nothing"),
    (["--hires-steps", "4"], "--hires-steps needs --hires-scale; without it the flag would change nothing"),
    (["--hires-scale", "two"], "--hires-scale: 'two' is not a number"),
    (["--hires-scale", "1"], "--hires-scale: 1.0 is not allowed; give a number above 1, e.g. 1.5 or 2"),
    (["--hires-scale", "nan"], "--hires-scale: nan is not allowed; give a number above 1"),
    (["--hires-scale", "1.05"], "--hires-scale: 1.05 leaves a 64x64 image at 64x64 (sides are rounded to multiples "
                                "of 8); give a larger scale"),
    (["--hires-scale", "2", "--hires-strength", "0"], "--hires-strength: 0.0 is not allowed; give a number above 0"),
    (["--hires-scale", "2", "--hires-strength", "1.5"], "--hires-strength: 1.5 is not allowed"),
    (["--hires-scale", "2", "--hires-steps", "0"], "--hires-steps: 0 is not allowed; give 1 to 1000"),
    # more steps than the base's 1000 noise levels stopped deep in the sampler with a traceback
    (["--hires-scale", "2", "--hires-steps", "1001"], "--hires-steps: 1001 is not allowed; give 1 to 1000"),
    (["--steps", "1001"], "--steps: 1001 is not allowed; give 1 to 1000 (the noise levels a base knows)"),
    (["--hires-scale", "2", "--hires-steps", "2.5"], "--hires-steps: '2.5' is not an integer"),
    (["--hires-scale", "2", "--init-image", "{img}"], "--hires-scale redraws a txt2img image larger, not an img2img"),
    (["--hires-scale", "2", "--init-image", "{img}", "--mask", "{img}"], "not an inpainting one"),
    # the inpainting line advised --width/--height, which --outpaint refuses
    (["--hires-scale", "2", "--init-image", "{img}", "--outpaint", "0,16,0,0"],
     "--hires-scale redraws a txt2img image larger, not an outpainted one; leave out --hires-scale, or outpaint "
     "a larger --init-image"),
])
def test_hires_flags_that_cannot_work_are_refused_before_the_base_loads(tmp_path, capsys, extra, message):
    Image.new("RGB", (64, 64)).save(tmp_path / "in.png")
    extra = [e.format(img=tmp_path / "in.png") for e in extra]
    assert _infer(tmp_path, tmp_path / "no-model-needed", *extra) == 2  # a base that does not exist
    assert message in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_a_scale_that_leaves_the_models_own_size_is_refused_before_drawing(tiny_sd15):
    gen = Generator(tiny_sd15, device="cpu")
    with pytest.raises(ConfigError, match=r"^--hires-scale: 1.05 leaves a 64x64 image at 64x64"):
        gen.generate(Request(prompt="x", hires_scale=1.05))  # no --width/--height: the model's 64 px
    with pytest.raises(ConfigError, match="not an img2img one"):
        gen.img2img("x", Image.new("RGB", (32, 32)), hires_scale=2)


def test_a_controlnet_guides_both_passes(tiny_sd15, tiny_controlnet):
    plain = Generator(tiny_sd15, device="cpu").generate(Request(**HIRES))[0].image
    cn = Generator(tiny_sd15, controlnet=tiny_controlnet, device="cpu")
    rng = np.random.default_rng(0)
    control = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    off = cn.generate(Request(**HIRES, control_image=control, control_scale=0.0))[0].image
    on = cn.generate(Request(**HIRES, control_image=control))[0].image
    assert off.size == on.size == (64, 64)  # the 32 px map is scaled to the second pass's size
    assert np.abs(_pixels(off) - _pixels(plain)).max() <= 1 and np.abs(_pixels(on) - _pixels(plain)).mean() > 2
