"""Single-file bases: a tiny pipeline saved in the original SD layout by our converter loads back
(by us, and by diffusers' own from_single_file) to the same weights and outputs, and trains."""

from __future__ import annotations

import pytest
import torch
from conftest import run_config

from lora_trainer.config import ModelConfig
from lora_trainer.models.loading import load_base
from lora_trainer.models.single_file import CONFIGS, OPENCLIP_PREFIX, original_state_dict, save_single_file

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def _pipeline(model_dir, sdxl):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return (StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline).from_pretrained(model_dir)


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k].to(sa[k].dtype)) for k in sa)


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def saved(request, tiny_sd15, tiny_sdxl, tmp_path_factory):
    sdxl = request.param == "sdxl"
    model_dir = tiny_sdxl if sdxl else tiny_sd15
    pipe = _pipeline(model_dir, sdxl)
    path = save_single_file(pipe, tmp_path_factory.mktemp("single") / f"{request.param}.safetensors")
    return request.param, model_dir, pipe, path


def test_single_file_loads_back_to_the_same_model(saved):
    variant, model_dir, pipe, path = saved
    base = load_base(ModelConfig(base=str(path), config_dir=str(model_dir)), torch.float32)
    assert base.variant == variant
    for name in COMPONENTS:
        if name in pipe.components:
            assert _same_weights(pipe.components[name], getattr(base, name)), name
    assert base.noise_scheduler.config.prediction_type == "epsilon"
    g = torch.Generator().manual_seed(0)
    latents, hidden = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=g)
    extra = {}
    if variant == "sdxl":
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(1, 32, generator=g),
                                       "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}}
    with torch.no_grad():  # same weights; only the tensors' memory layout may differ
        torch.testing.assert_close(base.unet(latents, 10, hidden, **extra).sample,
                                   pipe.unet(latents, 10, hidden, **extra).sample, rtol=1e-5, atol=1e-6)
    ids = base.tokenizer("a red circle", return_tensors="pt").input_ids
    assert ids.tolist() == pipe.tokenizer("a red circle", return_tensors="pt").input_ids.tolist()


def test_diffusers_reads_our_single_file_the_same_way(saved):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    variant, model_dir, pipe, path = saved
    if variant == "sd15":
        theirs = type(pipe).from_single_file(str(path), config=str(model_dir), local_files_only=True)
        for name in ("unet", "vae", "text_encoder"):
            assert _same_weights(pipe.components[name], theirs.components[name]), name
        return
    # diffusers picks SDXL's text encoders by hidden size, which the tiny model's two encoders
    # share; its UNet and VAE readers and its OpenCLIP key converter are checked one by one.
    unet = UNet2DConditionModel.from_single_file(str(path), config=str(model_dir), subfolder="unet", local_files_only=True)
    vae = AutoencoderKL.from_single_file(str(path), config=str(model_dir), subfolder="vae", local_files_only=True)
    assert _same_weights(pipe.unet, unet) and _same_weights(pipe.vae, vae)
    state = original_state_dict(pipe.components)
    converted = convert_open_clip_checkpoint(pipe.text_encoder_2, state, prefix=OPENCLIP_PREFIX)
    own = pipe.text_encoder_2.state_dict()
    assert converted.keys() == own.keys() and all(torch.equal(converted[k], own[k]) for k in own)


def test_shipped_configs_give_the_real_checkpoint_layouts():
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    counts = {}
    for variant in ("sd15", "sdxl"):
        folder = CONFIGS / variant
        with init_empty_weights():
            parts = {"unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")),
                     "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")),
                     "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))}
            if variant == "sdxl":
                parts["text_encoder_2"] = CLIPTextModelWithProjection(
                    CLIPTextConfig.from_pretrained(folder / "text_encoder_2"))
        state = original_state_dict(parts)
        counts[variant] = (sum(k.startswith("model.diffusion_model.") for k in state), len(state))
        upsampler = "output_blocks.2.1.conv.weight" if variant == "sd15" else "output_blocks.2.2.conv.weight"
        assert f"model.diffusion_model.{upsampler}" in state
    # The tensor counts of v1-5-pruned and sd_xl_base_1.0 (less position_ids / logit_scale).
    assert counts == {"sd15": (686, 1130), "sdxl": (1680, 2513)}
    tokenizer = CLIPTokenizer.from_pretrained(CONFIGS / "clip-tokenizer")
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_training_from_a_single_file_base(tiny_sd15, example_data, tmp_path):
    from lora_trainer.training.loop import train

    path = save_single_file(_pipeline(tiny_sd15, False), tmp_path / "base.safetensors")
    result = train(run_config(path, example_data, tmp_path / "sf", f"model.config_dir={tiny_sd15}",
                              "train.max_steps=2", "sample.prompts=[]"), show_progress=False)
    assert result.adapter_paths[0].is_file() and len(result.losses) == 2
