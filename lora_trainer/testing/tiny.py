"""Offline, randomly initialised Stable Diffusion pipelines for tests, the demo and benchmarks.

Each builder saves a real diffusers pipeline with `save_pretrained`, so the trainer loads it through
the same `from_pretrained` path as a real base model; only the layer sizes differ.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

# The SD1.5 noise schedule (what `runwayml/stable-diffusion-v1-5/scheduler` holds).
SD15_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    skip_prk_steps=True,
    steps_offset=1,
    set_alpha_to_one=False,
    clip_sample=False,
    prediction_type="epsilon",
)


def _byte_symbols() -> list[str]:
    """The 256 printable symbols byte-level BPE uses for bytes (printable ASCII/Latin-1 map to
    themselves, the rest are shifted past 255), in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    symbols, shift = [], 0
    for b in range(256):
        if b in keep:
            symbols.append(chr(b))
        else:
            symbols.append(chr(256 + shift))
            shift += 1
    return symbols


def build_clip_tokenizer(model_max_length: int = 77):
    """A CLIP byte-level BPE tokenizer made offline: every byte is a token (alone or word-final),
    plus merges for common lowercase letter pairs so that words are a few tokens, not one per
    letter. Token ids are stable for a given code version."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for sym in _byte_symbols():
        vocab[sym] = len(vocab)
    for sym in _byte_symbols():
        vocab[sym + "</w>"] = len(vocab)
    merges = []
    letters = string.ascii_lowercase
    common = "e t a o i n s r h l d c u m".split()
    for a in common:
        for b in letters:
            for pair, merged in (((a, b), a + b), ((a, b + "</w>"), a + b + "</w>")):
                if merged not in vocab:
                    vocab[merged] = len(vocab)
                    merges.append(pair)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def _clip_text_config(tokens: int, hidden: int, layers: int, heads: int, projection: int, act: str,
                      intermediate: int | None = None, full_vocab: bool = False):
    """A CLIP text encoder config for a tokenizer of `tokens` entries (its last two are BOS, EOS);
    `full_vocab` gives CLIP's real embedding table size, for real-size benchmarks."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=max(tokens, 49408) if full_vocab else tokens, hidden_size=hidden,
        intermediate_size=intermediate or 4 * hidden, num_hidden_layers=layers, num_attention_heads=heads,
        max_position_embeddings=77, projection_dim=projection, hidden_act=act,
        bos_token_id=tokens - 2, eos_token_id=tokens - 1, pad_token_id=tokens - 1,
    )


def _sd_vae(blocks: tuple[int, ...], layers: int, groups: int, sample_size: int, **extra):
    """SD's VAE shape: four blocks, so latents are 1/8 of the image side, with 4 channels."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=blocks,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=layers, latent_channels=4, norm_num_groups=groups, sample_size=sample_size, **extra,
    )


def _tiny_sd15_components(vocab_size: int):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    text_encoder = CLIPTextModel(_clip_text_config(vocab_size, 32, 2, 4, 32, "quick_gelu", intermediate=64))
    return unet, text_encoder, _sd_vae((8, 16, 16, 16), layers=1, groups=8, sample_size=64)


def _full_sd15_components(vocab_size: int):
    """Real SD1.5 layer sizes (UNet ≈ 860 M parameters, CLIP ViT-L/14 text encoder, SD VAE)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel(
        sample_size=64,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
    )
    text_encoder = CLIPTextModel(_clip_text_config(vocab_size, 768, 12, 12, 768, "quick_gelu", full_vocab=True))
    return unet, text_encoder, _sd_vae((128, 256, 512, 512), layers=2, groups=32, sample_size=512)


def make_sd15(out_dir: str | Path, seed: int = 0, full: bool = False) -> Path:
    """Build an SD1.5-shaped pipeline with random weights (seeded) and save it to `out_dir`."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    out_dir = Path(out_dir)
    tokenizer = build_clip_tokenizer()
    torch.manual_seed(seed)
    build = _full_sd15_components if full else _tiny_sd15_components
    unet, text_encoder, vae = build(len(tokenizer))
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler.from_config(SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


# The SDXL base noise schedule (`stabilityai/stable-diffusion-xl-base-1.0/scheduler`).
SDXL_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    steps_offset=1,
    timestep_spacing="leading",
    interpolation_type="linear",
    use_karras_sigmas=False,
    sample_max_value=1.0,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    clip_sample=False,
    prediction_type="epsilon",
)


def _sdxl_components(vocab_size: int, full: bool):
    """SDXL's shape: a UNet with text-time conditioning (pooled text embeds + 6 size/crop numbers),
    cross attention over two concatenated text encoders (CLIP ViT-L + OpenCLIP bigG with projection)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if full:
        te1 = _clip_text_config(vocab_size, 768, 12, 12, 768, "quick_gelu", full_vocab=True)
        te2 = _clip_text_config(vocab_size, 1280, 32, 20, 1280, "gelu", full_vocab=True)
        time_dim, blocks, heads, layers = 256, (320, 640, 1280), (5, 10, 20), (1, 2, 10)
        vae_blocks, vae_layers, vae_groups, sample = (128, 256, 512, 512), 2, 32, 128
    else:
        te1 = _clip_text_config(vocab_size, 32, 2, 4, 32, "quick_gelu")
        te2 = _clip_text_config(vocab_size, 32, 2, 4, 32, "gelu")
        time_dim, blocks, heads, layers = 8, (32, 32, 64), (2, 4, 8), (1, 1, 2)
        vae_blocks, vae_layers, vae_groups, sample = (8, 16, 16, 16), 1, 8, 8
    unet = UNet2DConditionModel(
        sample_size=sample,
        in_channels=4,
        out_channels=4,
        block_out_channels=blocks,
        layers_per_block=2,  # as SDXL: kohya's LDM block numbering depends on it
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=layers,
        attention_head_dim=heads,
        use_linear_projection=True,
        cross_attention_dim=te1.hidden_size + te2.hidden_size,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + te2.projection_dim,
        norm_num_groups=32 if full else 8,
    )
    vae = _sd_vae(vae_blocks, layers=vae_layers, groups=vae_groups, sample_size=1024 if full else 64,
                  scaling_factor=0.13025, force_upcast=True)
    return unet, CLIPTextModel(te1), CLIPTextModelWithProjection(te2), vae


def make_sdxl(out_dir: str | Path, seed: int = 0, full: bool = False) -> Path:
    """Build an SDXL-shaped pipeline with random weights (seeded) and save it to `out_dir`."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    out_dir = Path(out_dir)
    tokenizer = build_clip_tokenizer()
    tokenizer_2 = build_clip_tokenizer()
    tokenizer_2.pad_token = "!"  # OpenCLIP pads with "!", as SDXL's second tokenizer does
    torch.manual_seed(seed)
    unet, text_encoder, text_encoder_2, vae = _sdxl_components(len(tokenizer), full)
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER),
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


VARIANTS = {
    "sd15": lambda out, seed: make_sd15(out, seed, full=False),
    "sd15-full": lambda out, seed: make_sd15(out, seed, full=True),
    "sdxl": lambda out, seed: make_sdxl(out, seed, full=False),
    "sdxl-full": lambda out, seed: make_sdxl(out, seed, full=True),
    "blip2": lambda out, seed: _tiny_blip2().make_blip2(out, seed),  # a BLIP-2 captioner, not a pipeline
    "wd14": lambda out, seed: _tiny_wd14().make_wd14(out, seed),  # a WD14 tagger (needs the onnx package)
}


def _tiny_blip2():
    from . import tiny_blip2  # imported late: it builds on this module's tokenizer pieces

    return tiny_blip2


def _tiny_wd14():
    from . import tiny_wd14  # imported late: only this variant needs it

    return tiny_wd14


def make_tiny_model(variant: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Build the named variant into `out_dir`; see VARIANTS for the names."""
    if variant not in VARIANTS:
        from ..errors import LoraTrainerError

        raise LoraTrainerError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    return VARIANTS[variant](out_dir, seed)
