"""The Hires. fix's latent upscalers (`--hires-upscaler Latent`, ...): txt2img latents, interpolated
with A1111's mode for the name, then img2img from them, equal to those steps done by hand with
diffusers and torch; names, default strength, refusals and PNG parameters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from infer_helpers import one_line_error
from infer_helpers import run_infer as _infer
from lora_trainer.cli import main
from lora_trainer.errors import ConfigError
from lora_trainer.inference.generate import Generator, Request, check_request
from lora_trainer.inference.hires import LATENT_UPSCALERS, upscale_latents, upscaler_name
from lora_trainer.pnginfo import a1111_parameters, parse_a1111_parameters

PROMPT, NEGATIVE = "a red circle", "blurry"
HIRES = dict(prompt=PROMPT, negative_prompt=NEGATIVE, steps=3, width=32, height=32, seed=5, sampler="euler",
             hires_scale=2, hires_steps=4)
# A1111's table (modules/shared_items: latent_upscale_modes), written out here on its own
A1111_MODES = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
CLASSES = {"sd15": ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", dict(safety_checker=None)),
           "sdxl": ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", {})}


def _pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=int)


def _by_hand(model, variant, mode, antialias, strength=0.7) -> Image.Image:
    """diffusers' txt2img to latents at 32 px, torch's interpolate to 64 px latents, diffusers' img2img
    from them (the same seed, strength, steps and guidance)."""
    import diffusers
    from diffusers import EulerDiscreteScheduler

    first_class, second_class, extra = CLASSES[variant]
    pipe = getattr(diffusers, first_class).from_pretrained(model, **extra)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    kw = dict(prompt=PROMPT, negative_prompt=NEGATIVE, guidance_scale=7.5)
    latents = pipe(**kw, num_inference_steps=3, width=32, height=32, generator=torch.Generator().manual_seed(5),
                   output_type="latent").images
    assert latents.shape[-2:] == (4, 4)
    latents = torch.nn.functional.interpolate(latents, size=(8, 8), mode=mode, antialias=antialias)
    second = getattr(diffusers, second_class).from_pipe(pipe)
    second.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    return second(**kw, image=latents, strength=strength, num_inference_steps=4,
                  generator=torch.Generator().manual_seed(5)).images[0]


@pytest.mark.parametrize("variant, name", [("sd15", "latent (nearest-exact)"),
                                           ("sdxl", "Latent (bicubic antialiased)")])
def test_latent_hires_is_txt2img_latents_interpolated_then_img2img_as_by_hand(request, variant, name):
    model = request.getfixturevalue(f"tiny_{variant}")
    gen = Generator(model, device="cpu")
    out = gen.generate(Request(**HIRES, hires_upscaler=name))[0]
    assert out.image.size == (64, 64)
    # A1111's default strength after a latent upscaler, and its spelling of the name
    assert out.info.denoising_strength == 0.7 and out.info.extra["Hires upscaler"] == upscaler_name(name)
    want = _by_hand(model, variant, *A1111_MODES[upscaler_name(name)])
    assert np.abs(_pixels(out.image) - _pixels(want)).max() <= 1
    # the Lanczos fix at the same strength decodes, resizes pixels and encodes again: another image
    lanczos = gen.generate(Request(**HIRES, hires_strength=0.7))[0]
    assert lanczos.info.extra["Hires upscaler"] == "Lanczos"
    assert np.abs(_pixels(out.image) - _pixels(lanczos.image)).mean() > 5


def test_every_latent_upscaler_interpolates_with_a1111s_mode():
    assert set(LATENT_UPSCALERS) == set(A1111_MODES)
    latents = torch.randn(1, 4, 5, 7, generator=torch.Generator().manual_seed(0))
    # 1.6x up (where nearest and nearest-exact part), and down (where antialiasing shows: on an
    # upscale torch's antialiased bilinear is plain bilinear, to float rounding)
    for pixels, side in (((88, 64), (8, 11)), ((24, 16), (2, 3))):
        outs = {}
        for name, (mode, antialias) in A1111_MODES.items():
            got = upscale_latents(latents[0], pixels, name.upper())  # (C, h, w) in; any case, as A1111 spells it
            want = torch.nn.functional.interpolate(latents, size=side, mode=mode, antialias=antialias)
            assert got.shape == (1, 4, *side) and torch.equal(got, want), name
            outs[name] = got
        if side == (2, 3):  # six modes, six results: a swapped mode could not pass above
            names = list(outs)
            assert all(not torch.allclose(outs[a], outs[b], atol=1e-3) for i, a in enumerate(names)
                       for b in names[i + 1:])


def test_half_precision_latents_are_upscaled_too():
    """fp16 latents (a GPU run's), which torch's antialiased kernels refuse on the CPU, come back fp16."""
    latents = torch.randn(1, 4, 5, 7, generator=torch.Generator().manual_seed(0))
    got = upscale_latents(latents.half(), (88, 64), "Latent (antialiased)")
    want = torch.nn.functional.interpolate(latents.half().float(), size=(8, 11), mode="bilinear", antialias=True)
    assert got.dtype == torch.float16 and torch.equal(got, want.half())


def test_the_refiner_ends_a_latent_hires_pass(tiny_sdxl, tmp_path):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline

    from lora_trainer.testing.inference_models import make_sdxl_refiner

    gen = Generator(tiny_sdxl, refiner=make_sdxl_refiner(tiny_sdxl, tmp_path / "refiner"), device="cpu")
    out = gen.generate(Request(**HIRES, hires_upscaler="Latent", refiner_start=0.5))[0].image
    # by hand: the base's latents (no refiner in the first pass), bilinear to 64 px latents, the
    # base's img2img to half the steps, the refiner from there
    gen.pipe.scheduler = EulerDiscreteScheduler.from_config(gen.pipe.scheduler.config)
    kw = dict(prompt=PROMPT, negative_prompt=NEGATIVE, guidance_scale=7.5)
    first = gen.pipe(**kw, num_inference_steps=3, width=32, height=32, generator=torch.Generator().manual_seed(5),
                     output_type="latent").images
    latents = torch.nn.functional.interpolate(first, size=(8, 8), mode="bilinear")
    second = StableDiffusionXLImg2ImgPipeline.from_pipe(gen.pipe)
    second.scheduler = EulerDiscreteScheduler.from_config(gen.pipe.scheduler.config)
    gen.refiner.scheduler = EulerDiscreteScheduler.from_config(gen.refiner.scheduler.config)
    kw.update(strength=0.7, num_inference_steps=4)
    mid = second(**kw, image=latents, denoising_end=0.5, output_type="latent",
                 generator=torch.Generator().manual_seed(5)).images
    want = gen.refiner(**kw, image=mid, denoising_start=0.5, generator=torch.Generator().manual_seed(5)).images[0]
    assert out.size == (64, 64) and np.abs(_pixels(out) - _pixels(want)).max() <= 1


def test_a_latent_pass_with_no_step_left_is_the_upscaled_latents_decoded(tiny_sd15):
    """int(1 step × 0.7) = 0 steps: img2img draws nothing, so the image is the interpolated latents decoded."""
    gen = Generator(tiny_sd15, device="cpu")
    req = Request(**{**HIRES, "hires_steps": 1}, hires_upscaler="Latent")
    out = gen.generate(req)[0].image
    first = gen.generate(Request(**{**HIRES, "hires_scale": None}), output_type="latent")[0].image
    up = torch.nn.functional.interpolate(first[None], size=(8, 8), mode="bilinear")
    decoded = gen.pipe.vae.decode(up / gen.pipe.vae.config.scaling_factor).sample
    want = gen.pipe.image_processor.postprocess(decoded.detach(), output_type="pil")[0]
    assert np.abs(_pixels(out) - _pixels(want)).max() <= 1
    assert torch.allclose(gen.generate(req, output_type="latent")[0].image, up[0], atol=1e-5)


def test_a_controlnet_map_is_scaled_to_the_latent_pass(tiny_sd15, tiny_controlnet):
    plain = Generator(tiny_sd15, device="cpu").generate(Request(**HIRES, hires_upscaler="Latent"))[0].image
    cn = Generator(tiny_sd15, controlnet=tiny_controlnet, device="cpu")
    control = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    off = cn.generate(Request(**HIRES, hires_upscaler="Latent", control_image=control, control_scale=0.0))[0].image
    on = cn.generate(Request(**HIRES, hires_upscaler="Latent", control_image=control))[0].image
    assert off.size == on.size == (64, 64)
    assert np.abs(_pixels(off) - _pixels(plain)).max() <= 1 and np.abs(_pixels(on) - _pixels(plain)).mean() > 2


def test_png_parameters_name_the_latent_upscaler(tiny_sd15, tmp_path):
    assert main(["infer", "--model", str(tiny_sd15), "--prompt", PROMPT, "--steps", "2", "--width", "32",
                 "--height", "40", "--seed", "3", "--hires-scale", "1.5", "--hires-upscaler", "LATENT (BICUBIC)",
                 "--out", str(tmp_path / "out")]) == 0
    png = Image.open(tmp_path / "out" / "00000-3.png")
    assert png.size == (48, 64)
    text = png.text["parameters"]
    assert "Size: 32x40" in text and "Denoising strength: 0.7" in text
    assert text.endswith("Hires upscale: 1.5, Hires resize: 48x64, Hires steps: 2, Hires upscaler: Latent (bicubic)")
    info = parse_a1111_parameters(text)
    assert info.extra["Hires upscaler"] == "Latent (bicubic)" and a1111_parameters(info) == text


def test_a_given_strength_is_kept_after_a_latent_upscaler(tiny_sd15):
    out = Generator(tiny_sd15, device="cpu").generate(Request(**HIRES, hires_upscaler="Latent", hires_strength=0.4))
    assert out[0].info.denoising_strength == 0.4


@pytest.mark.parametrize("extra, message", [
    (["--hires-upscaler", "Latent"], "--hires-upscaler needs --hires-scale; without it the flag would change nothing"),
    (["--hires-scale", "2", "--hires-upscaler", "ESRGAN_4x"],
     "--hires-upscaler: 'ESRGAN_4x' is not known; choose one of Lanczos, Latent, Latent (antialiased), "
     "Latent (bicubic), Latent (bicubic antialiased), Latent (nearest), Latent (nearest-exact)"),
    (["--hires-scale", "2", "--hires-upscaler", "Latent", "--hires-strength", "0"],
     "--hires-strength: 0.0 is not allowed; give a number above 0"),
])
def test_latent_upscaler_flags_that_cannot_work_are_refused_before_the_base_loads(tmp_path, capsys, extra, message):
    assert _infer(tmp_path, tmp_path / "no-model-needed", *extra) == 2  # a base that does not exist
    assert message in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_an_unknown_upscaler_is_refused_from_python_too():
    with pytest.raises(ConfigError, match=r"^--hires-upscaler: 'bilinear' is not known; choose one of Lanczos, "):
        check_request(Request(**HIRES, hires_upscaler="bilinear"))
