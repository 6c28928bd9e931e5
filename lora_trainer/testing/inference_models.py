"""Tiny offline extras for inference tests and benchmarks: random (non-zero) adapters in either
layout, a ControlNet made from a tiny UNet, and an SDXL-refiner-shaped pipeline. All are saved and
loaded through the real diffusers/peft file paths."""

from __future__ import annotations

from pathlib import Path

import torch

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def make_random_adapter(model_dir: str | Path, out_path: str | Path, *, variant: str = "sd15",
                        layout: str = "kohya", rank: int = 4, alpha: float = 2.0, seed: int = 0,
                        text_encoder: bool = True, std: float = 0.05) -> Path:
    """An adapter with random A and B (ΔW ≠ 0, unlike a fresh training start) for the model in
    `model_dir`, written with the exporter as a trained one would be."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    from ..export.files import adapter_states, save_adapter
    from ..models.lora import inject_lora, lora_layers

    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    te = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder") if text_encoder else None
    gen = torch.Generator().manual_seed(seed)
    for module, targets in ((unet, UNET_TARGETS), (te, TE_TARGETS)):
        if module is None:
            continue
        inject_lora(module, targets, rank=rank, alpha=alpha, dropout=0.0, key="lora")
        with torch.no_grad():
            for layer in lora_layers(module).values():
                for part in (layer.lora_A["default"], layer.lora_B["default"]):
                    part.weight.copy_(torch.randn(part.weight.shape, generator=gen) * std * 4)
    states = adapter_states(unet, te)
    return save_adapter(out_path, states, rank, alpha, layout=layout, dtype=torch.float32, base=variant)


def make_controlnet(model_dir: str | Path, out_dir: str | Path, seed: int = 0) -> Path:
    """`ControlNetModel.from_unet` of the model's UNet, with its zero convolutions given random
    weights (a fresh ControlNet adds exactly nothing, which would make every test pass)."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 32, 32))
    gen = torch.Generator().manual_seed(seed)
    zero_convs = [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]
    with torch.no_grad():
        for conv in zero_convs:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * 0.05)
    net.save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)


def make_sdxl_refiner(sdxl_dir: str | Path, out_dir: str | Path, seed: int = 0) -> Path:
    """An SDXL-refiner-shaped pipeline: only the second text encoder, and a UNet conditioned on it
    alone plus 5 size/crop/aesthetic-score numbers (the real refiner's layout), random weights."""
    from diffusers import AutoencoderKL, StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    sdxl_dir = Path(sdxl_dir)
    te2 = CLIPTextModelWithProjection.from_pretrained(sdxl_dir, subfolder="text_encoder_2")
    config = dict(UNet2DConditionModel.load_config(sdxl_dir, subfolder="unet"))
    time_dim = config["addition_time_embed_dim"]
    config.update(cross_attention_dim=te2.config.hidden_size,
                  projection_class_embeddings_input_dim=5 * time_dim + te2.config.projection_dim)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(config)
    base = StableDiffusionXLImg2ImgPipeline.from_pretrained(sdxl_dir)
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=AutoencoderKL.from_pretrained(sdxl_dir, subfolder="vae"), text_encoder=None, text_encoder_2=te2,
        tokenizer=None, tokenizer_2=CLIPTokenizer.from_pretrained(sdxl_dir, subfolder="tokenizer_2"), unet=unet,
        scheduler=base.scheduler, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)
