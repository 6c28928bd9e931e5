"""The offline tiny models: real diffusers pipelines, seeded, loadable with from_pretrained."""

from __future__ import annotations

import hashlib

from lora_trainer.cli import main


def _digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.safetensors"))}


def test_same_seed_same_weights(tiny_sd15, tmp_path):
    assert main(["make-tiny", "--variant", "sd15", str(tmp_path / "again")]) == 0
    assert _digest(tmp_path / "again") == _digest(tiny_sd15)
    assert main(["make-tiny", "--variant", "sd15", "--seed", "1", str(tmp_path / "other")]) == 0
    assert _digest(tmp_path / "other") != _digest(tiny_sd15)


def test_sd15_pipeline_shapes(tiny_sd15):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15)
    assert pipe.tokenizer.model_max_length == 77
    assert pipe.vae_scale_factor == 8
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    ids = pipe.tokenizer("a red circle").input_ids
    assert ids[0] == pipe.tokenizer.bos_token_id and ids[-1] == pipe.tokenizer.eos_token_id


def test_sdxl_pipeline_shapes(tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    hidden = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert pipe.unet.config.cross_attention_dim == hidden
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert pipe.unet.config.layers_per_block == 2
    assert pipe.tokenizer_2.pad_token == "!"


def test_unknown_variant_is_one_line_error(tmp_path, capsys):
    assert main(["make-tiny", "--variant", "sd3", str(tmp_path / "x")]) == 2
    assert "sd3" in capsys.readouterr().err
