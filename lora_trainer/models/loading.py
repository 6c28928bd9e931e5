"""Base-model loading: a hub id or a diffusers folder, its variant detected, components in one place."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from ..errors import ModelError

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}


@dataclass
class BaseModel:
    """The frozen pieces of a Stable Diffusion pipeline the trainer needs."""

    variant: str
    source: str
    tokenizer: Any
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: Any  # DDPMScheduler built from the base's scheduler config

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type


def weight_dtype_for(model_cfg: ModelConfig, mixed_precision: str) -> torch.dtype:
    """Frozen weights live in the compute dtype: bf16/fp16 under mixed precision, fp32 otherwise."""
    if model_cfg.dtype != "auto":
        return DTYPES[model_cfg.dtype]
    return DTYPES[mixed_precision]


def detect_variant(base: str) -> str:
    """'sd15' or 'sdxl', from the folder's model_index.json; hub ids are read after download."""
    index = Path(base) / "model_index.json"
    if not index.is_file():
        return "sd15"
    try:
        info = json.loads(index.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{index}: cannot read ({exc}); is this a diffusers pipeline folder?") from None
    if "text_encoder_2" in info or "XL" in str(info.get("_class_name", "")):
        return "sdxl"
    return "sd15"


def _check_source(base: str) -> None:
    path = Path(base).expanduser()
    if path.suffix in (".safetensors", ".ckpt"):
        raise ModelError(
            f"model.base: {base!r} is a single-file checkpoint; this version loads diffusers folders "
            "and hub ids only (convert it with diffusers' from_single_file + save_pretrained)"
        )
    if path.exists() and not (path / "model_index.json").is_file():
        raise ModelError(f"model.base: {base!r} is a folder without model_index.json; point it at a diffusers pipeline folder")
    if not path.exists() and (base.startswith((".", "/", "~")) or base.count("/") != 1):
        raise ModelError(f"model.base: {base!r} does not exist and is not a hub id like 'runwayml/stable-diffusion-v1-5'")


def load_base(model_cfg: ModelConfig, weight_dtype: torch.dtype) -> BaseModel:
    """Load tokenizer, text encoder, VAE, UNet (frozen, in `weight_dtype`) and the noise schedule."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    base = model_cfg.base
    _check_source(base)
    variant = model_cfg.variant if model_cfg.variant != "auto" else detect_variant(base)
    if variant != "sd15":
        raise ModelError(f"model.base: {base!r} is an SDXL model; this version trains SD1.x/2.x bases only")
    kw = dict(revision=model_cfg.revision)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer", **kw)
        text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder", torch_dtype=weight_dtype, **kw)
        vae = AutoencoderKL.from_pretrained(base, subfolder="vae", torch_dtype=weight_dtype, **kw)
        unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", torch_dtype=weight_dtype, **kw)
        noise_scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler", **kw)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"model.base: cannot load {base!r}: {first}") from None
    for module in (text_encoder, vae, unet):
        module.requires_grad_(False)
        module.eval()
    return BaseModel(variant, base, tokenizer, text_encoder, vae, unet, noise_scheduler)
