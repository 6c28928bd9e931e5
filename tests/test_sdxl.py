"""SDXL training on the tiny SDXL-shaped model: the conditioning is what diffusers' SDXL pipeline
computes, and the kohya file (lora_te1_/lora_te2_, LDM block names) loads in
StableDiffusionXLPipeline to the trained UNet and text-encoder outputs."""

from __future__ import annotations

import pytest
import safetensors
import torch
from conftest import run_config


def _pipeline(model_dir):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sdxl_run(tiny_sdxl, example_data, tmp_path_factory):
    from lora_trainer.training.loop import train

    out = tmp_path_factory.mktemp("sdxl") / "out"
    cfg = run_config(tiny_sdxl, example_data, out, "lora.train_text_encoder=true", "train.max_steps=6",
                     "train.text_encoder_lr=5e-3", "output.dtype=fp32", "output.format=both",
                     "sample.steps=2")
    return train(cfg, show_progress=False)


def _inputs():
    g = torch.Generator().manual_seed(5)
    return dict(sample=torch.randn(2, 4, 8, 8, generator=g), timestep=torch.tensor([50, 800]),
                encoder_hidden_states=torch.randn(2, 77, 64, generator=g),
                added_cond_kwargs={"text_embeds": torch.randn(2, 32, generator=g),
                                   "time_ids": torch.tensor([[64.0, 96, 0, 16, 64, 64]] * 2)})


def _outputs(unet, te1, te2):
    ids = torch.randint(0, 400, (1, 77), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return (unet(**_inputs()).sample, te1(ids, output_hidden_states=True).hidden_states[-2],
                te2(ids)[0])


def test_sdxl_conditioning_matches_the_diffusers_pipeline(tiny_sdxl):
    from lora_trainer.config import ModelConfig
    from lora_trainer.models.loading import load_base
    from lora_trainer.training.conditioning import encode_prompts, time_ids

    base = load_base(ModelConfig(base=str(tiny_sdxl)), torch.float32)
    assert base.variant == "sdxl"
    captions = ["a red circle", ""]
    with torch.no_grad():
        hidden, pooled = encode_prompts(base, base.text_encoders, captions, torch.device("cpu"))
        theirs = _pipeline(tiny_sdxl).encode_prompt(captions, do_classifier_free_guidance=False)
    torch.testing.assert_close(hidden, theirs[0])
    torch.testing.assert_close(pooled, theirs[2])
    ids = time_ids(torch.tensor([[600, 800]]), torch.tensor([[0, 37]]), (64, 96))
    assert ids.tolist() == [[600, 800, 0, 37, 64, 96]]  # (orig h, w, crop top, left, target h, w)


def test_sdxl_kohya_file_loads_in_diffusers_with_trained_outputs(sdxl_run, tiny_sdxl):
    assert all(torch.isfinite(torch.tensor(sdxl_run.losses))) and len(sdxl_run.losses) == 6
    for m in (sdxl_run.unet, sdxl_run.text_encoder, sdxl_run.text_encoder_2):
        m.eval()
    reference = _outputs(sdxl_run.unet, sdxl_run.text_encoder, sdxl_run.text_encoder_2)
    base = _pipeline(tiny_sdxl)
    base_out = _outputs(base.unet, base.text_encoder, base.text_encoder_2)
    for ref, plain in zip(reference, base_out):
        assert (ref - plain).abs().max() > 1e-4  # every component really changed

    for name in ("example-lora.safetensors", "example-lora.diffusers.safetensors"):
        pipe = _pipeline(tiny_sdxl)
        pipe.load_lora_weights(str(sdxl_run.output_dir / name), adapter_name="mine")
        loaded = _outputs(pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
        for got, ref in zip(loaded, reference):
            assert (got - ref).abs().max() < 1e-4, name
        pipe.set_adapters(["mine"], [0.0])
        zero = _outputs(pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
        for got, plain in zip(zero, base_out):
            assert torch.equal(got, plain), name


def test_sdxl_file_uses_kohya_sdxl_names_and_metadata(sdxl_run):
    with safetensors.safe_open(str(sdxl_run.output_dir / "example-lora.safetensors"), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    prefixes = {k.split("_")[0] + "_" + k.split("_")[1] for k in keys}
    assert prefixes == {"lora_unet", "lora_te1", "lora_te2"}
    assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q") for k in keys)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_1_self_attn_out_proj") for k in keys)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["ss_resolution"] == "(64, 64)"
    assert (sdxl_run.output_dir / "samples" / "step_00006" / "00.png").is_file()


def test_resolution_defaults_to_the_variants_native_size(tiny_sdxl, tiny_sd15):
    from lora_trainer.config import load_config
    from lora_trainer.models.loading import resolve_variant
    from lora_trainer.training.loop import _for_variant

    for model, native in ((tiny_sdxl, 1024), (tiny_sd15, 512)):
        cfg = load_config(None, [f"model.base={model}", "data.path=x", "train.max_steps=1"])
        assert cfg.data.resolution is None
        resolved = _for_variant(cfg, resolve_variant(cfg.model))
        assert resolved.data.resolution == native


def test_sdxl_base_loaded_as_sd15_is_one_line_error(tiny_sdxl):
    from lora_trainer.config import ModelConfig
    from lora_trainer.errors import ModelError
    from lora_trainer.models.loading import load_base

    with pytest.raises(ModelError, match="model.variant.*SDXL UNet; set model.variant=sdxl") as err:
        load_base(ModelConfig(base=str(tiny_sdxl), variant="sd15"), torch.float32)
    assert "\n" not in str(err.value)
