"""The string metadata adapter files carry: kohya's `ss_*` training keys, Stability's `modelspec.*`
keys, and the `sshs_*` hashes that A1111 / the AddNet extension use to identify a LoRA.

Values follow what kohya sd-scripts writes (`str()` of the Python value, JSON for the dataset
tables), because the tools that show them were written against kohya's files.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from typing import Mapping

import safetensors.torch
import torch

# kohya's `ss_base_model_version` -> Stability model-spec architecture (before the `/lora` suffix).
ARCHITECTURES = {
    "sd_v1": "stable-diffusion-v1",
    "sd_v2": "stable-diffusion-v2-512",
    "sdxl_base_v1-0": "stable-diffusion-xl-v1-base",
}
# kohya's `library/sai_model_spec.py`: SD1/2 LoRAs name diffusers as their implementation, SDXL
# LoRAs (trained on the SGM UNet) name Stability's generative-models repository.
_IMPLEMENTATION_SGM = "https://github.com/Stability-AI/generative-models"

_LEGACY_OFFSET, _LEGACY_LENGTH = 0x100000, 0x10000  # 64 KiB at 1 MiB, the old A1111 hash window


def _resolution_pair(resolution: int | tuple[int, int] | list[int] | str) -> tuple[int, int]:
    if isinstance(resolution, str):  # kohya's command-line spelling, "512" or "512,768"
        resolution = [int(r) for r in resolution.split(",")]
    if isinstance(resolution, int):
        return resolution, resolution
    if len(resolution) == 1:
        return resolution[0], resolution[0]
    width, height = resolution
    return int(width), int(height)


def _iso_date(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(int(timestamp), datetime.timezone.utc).isoformat()


def kohya_metadata(
    *,
    rank: int,
    alpha: float,
    base_model_version: str = "sd_v1",
    base_model_name: str | None = None,
    vae_name: str | None = None,
    vae_hash: str | None = None,
    new_vae_hash: str | None = None,
    resolution: int | tuple[int, int] | None = None,
    num_train_images: int | None = None,
    num_reg_images: int | None = None,
    num_epochs: int | None = None,
    epoch: int | None = None,
    steps: int | None = None,
    max_train_steps: int | None = None,
    learning_rate: float | None = None,
    unet_lr: float | None = None,
    text_encoder_lr: float | None = None,
    lr_scheduler: str | None = None,
    optimizer: str | None = None,
    mixed_precision: str | None = None,
    seed: int | None = None,
    clip_skip: int | None = None,
    max_token_length: int | None = None,
    noise_offset: float | None = None,
    min_snr_gamma: float | None = None,
    ip_noise_gamma: float | None = None,
    loss_type: str | None = None,
    huber_schedule: str | None = None,
    huber_c: float | None = None,
    huber_scale: float | None = None,
    debiased_estimation: bool | None = None,
    zero_terminal_snr: bool | None = None,
    multires_noise_iterations: int | None = None,
    multires_noise_discount: float | None = None,
    noise_offset_random_strength: bool | None = None,
    ip_noise_gamma_random_strength: bool | None = None,
    adaptive_noise_scale: float | None = None,
    v_pred_like_loss: float | None = None,
    scale_v_pred_loss_like_noise_pred: bool | None = None,
    min_timestep: int | None = None,
    max_timestep: int | None = None,
    prior_loss_weight: float | None = None,
    scale_weight_norms: float | None = None,
    loraplus_lr_ratio: float | None = None,
    loraplus_unet_lr_ratio: float | None = None,
    loraplus_text_encoder_lr_ratio: float | None = None,
    ema_decay: float | None = None,
    ema_warmup: bool | None = None,
    enable_bucket: bool | None = None,
    min_bucket_reso: int | None = None,
    max_bucket_reso: int | None = None,
    bucket_no_upscale: bool | None = None,
    caption_tag_dropout_rate: float | None = None,
    caption_dropout_every_n_epochs: int | None = None,
    weighted_captions: bool | None = None,
    alpha_mask: bool | None = None,
    masked_loss: bool | None = None,
    cache_latents: bool | None = None,
    training_started_at: float | None = None,
    training_finished_at: float | None = None,
    output_name: str | None = None,
    training_comment: str | None = None,
    tag_frequency: Mapping[str, Mapping[str, int]] | None = None,
    dataset_dirs: Mapping[str, Mapping[str, int]] | None = None,
    prediction_type: str = "epsilon",
    title: str | None = None,
    author: str | None = None,
    description: str | None = None,
    trigger_phrase: str | None = None,
    license: str | None = None,
    tags: str | list[str] | None = None,
    thumbnail: str | None = None,
    date: str | None = None,
    network_module: str = "networks.lora",
    network_args: Mapping[str, str] | None = None,
    network_dropout: float | None = None,
    network_train_unet_only: bool | None = None,
    network_train_text_encoder_only: bool | None = None,
) -> dict[str, str]:
    """Build the `ss_*` and `modelspec.*` metadata of LORA_FORMATS.md; every value is a string.

    Arguments left as None are left out (kohya writes the string "None" instead; nothing reads it).
    `tag_frequency` is {dataset dir: {tag: count}}, `dataset_dirs` is
    {dir: {"n_repeats": n, "img_count": m}}; times are unix seconds. `network_args` is kohya's
    `--network_args` as key -> string (LoCon: {"conv_dim": "8", "conv_alpha": "4"}; LoRA+ ratios; rank_dropout,
    module_dropout), stored as JSON; `network_dropout` is kohya's --network_dropout (dropout of the down output).
    """
    if base_model_version not in ARCHITECTURES:
        raise ValueError(f"base_model_version {base_model_version!r} is not one of {', '.join(ARCHITECTURES)}")
    if prediction_type not in ("epsilon", "v"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v', not {prediction_type!r}")
    v2 = base_model_version == "sd_v2"
    ss = {
        "ss_network_module": network_module,
        "ss_network_dim": rank,
        "ss_network_alpha": float(alpha),  # kohya's alpha argument is a float: "8.0"
        "ss_network_args": json.dumps(dict(network_args)) if network_args else None,
        "ss_network_dropout": network_dropout,
        # which models the adapter holds (kohya's --network_train_unet_only / _text_encoder_only)
        "ss_network_train_unet_only": network_train_unet_only,
        "ss_network_train_text_encoder_only": network_train_text_encoder_only,
        "ss_base_model_version": base_model_version,
        "ss_v2": v2,
        "ss_sd_model_name": base_model_name,
        # a separate VAE (kohya's --vae): its name; for a file, the old A1111 hash and the full SHA-256
        "ss_vae_name": vae_name,
        "ss_vae_hash": vae_hash,
        "ss_new_vae_hash": new_vae_hash,
        "ss_resolution": _resolution_pair(resolution) if resolution is not None else None,
        "ss_num_train_images": num_train_images,
        "ss_num_reg_images": num_reg_images,
        "ss_num_epochs": num_epochs,
        "ss_epoch": epoch,
        "ss_steps": steps,
        "ss_max_train_steps": max_train_steps,
        "ss_learning_rate": learning_rate,
        "ss_unet_lr": unet_lr,
        "ss_text_encoder_lr": text_encoder_lr,
        "ss_lr_scheduler": lr_scheduler,
        "ss_optimizer": optimizer,
        "ss_mixed_precision": mixed_precision,
        "ss_seed": seed,
        "ss_clip_skip": clip_skip,
        "ss_max_token_length": max_token_length,
        "ss_noise_offset": noise_offset,
        "ss_min_snr_gamma": min_snr_gamma,
        # the loss and noise options, under kohya's names (ss_min/max_timestep follow its naming;
        # kohya itself does not record the timestep range)
        "ss_ip_noise_gamma": ip_noise_gamma,
        "ss_loss_type": loss_type,
        "ss_huber_schedule": huber_schedule,
        "ss_huber_c": huber_c,
        "ss_huber_scale": huber_scale,
        "ss_debiased_estimation": debiased_estimation,
        "ss_zero_terminal_snr": zero_terminal_snr,
        "ss_multires_noise_iterations": multires_noise_iterations,
        "ss_multires_noise_discount": multires_noise_discount,
        "ss_noise_offset_random_strength": noise_offset_random_strength,
        "ss_ip_noise_gamma_random_strength": ip_noise_gamma_random_strength,
        "ss_adaptive_noise_scale": adaptive_noise_scale,
        # kohya's argument names (kohya itself does not record these two)
        "ss_v_pred_like_loss": v_pred_like_loss,
        "ss_scale_v_pred_loss_like_noise_pred": scale_v_pred_loss_like_noise_pred,
        "ss_min_timestep": min_timestep,
        "ss_max_timestep": max_timestep,
        "ss_prior_loss_weight": prior_loss_weight,
        "ss_scale_weight_norms": scale_weight_norms,
        "ss_loraplus_lr_ratio": loraplus_lr_ratio,
        "ss_loraplus_unet_lr_ratio": loraplus_unet_lr_ratio,
        "ss_loraplus_text_encoder_lr_ratio": loraplus_text_encoder_lr_ratio,
        # the tensors are an EMA of the trained weights (SimpleTuner's --ema_decay; kohya has none): only when on
        "ss_ema_decay": ema_decay,
        "ss_ema_warmup": ema_warmup,
        "ss_enable_bucket": enable_bucket,
        "ss_min_bucket_reso": min_bucket_reso,
        "ss_max_bucket_reso": max_bucket_reso,
        "ss_bucket_no_upscale": bucket_no_upscale,
        "ss_caption_tag_dropout_rate": caption_tag_dropout_rate,
        "ss_caption_dropout_every_n_epochs": caption_dropout_every_n_epochs,
        "ss_weighted_captions": weighted_captions,
        # kohya records --masked_loss (on whenever --alpha_mask or mask images train) and alpha_mask per subset
        "ss_masked_loss": masked_loss if masked_loss is not None else alpha_mask,
        "ss_alpha_mask": alpha_mask,
        "ss_cache_latents": cache_latents,
        "ss_training_started_at": training_started_at,
        "ss_training_finished_at": training_finished_at,
        "ss_output_name": output_name,
        "ss_training_comment": training_comment,
        "ss_tag_frequency": json.dumps(tag_frequency) if tag_frequency is not None else None,
        "ss_dataset_dirs": json.dumps(dataset_dirs) if dataset_dirs is not None else None,
    }
    metadata = {key: str(value) for key, value in ss.items() if value is not None}

    architecture = ARCHITECTURES[base_model_version]
    if v2 and prediction_type == "v":
        architecture = "stable-diffusion-v2-768-v"
    sdxl = base_model_version.startswith("sdxl")
    width, height = _resolution_pair(resolution) if resolution is not None else ((1024,) * 2 if sdxl else (512,) * 2)
    when = training_finished_at if training_finished_at is not None else training_started_at
    spec = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{architecture}/lora",
        "modelspec.implementation": _IMPLEMENTATION_SGM if sdxl else "diffusers",
        "modelspec.title": title or output_name or "LoRA",
        "modelspec.author": author,
        "modelspec.description": description,
        "modelspec.date": date or (_iso_date(when) if when is not None else None),
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.prediction_type": prediction_type,
        "modelspec.trigger_phrase": trigger_phrase,
        "modelspec.license": license,
        "modelspec.tags": ", ".join(tags) if isinstance(tags, (list, tuple)) else tags,
        "modelspec.thumbnail": thumbnail,
        "modelspec.encoder_layer": clip_skip,
    }
    metadata.update({key: str(value) for key, value in spec.items() if value is not None})
    return metadata


def check_metadata(metadata: Mapping[str, object]) -> None:
    """safetensors headers hold only strings; say which key is not one instead of a Rust error."""
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(f"metadata {key!r} must map a string to a string, got {type(value).__name__}")


def model_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> tuple[str, str]:
    """(`sshs_model_hash`, `sshs_legacy_hash`) as kohya's `precalculate_safetensors_hashes` makes them.

    Both are taken over the tensors serialised with only the `ss_*` metadata, so that users adding
    their own keys later (titles, thumbnails) does not change them. The model hash covers only
    the bytes after the header (the tensor data); the legacy hash is the first 8 hex digits of
    the SHA-256 of the 64 KiB at offset 1 MiB of that serialisation (of fewer bytes, or none, for
    smaller files: the AddNet extension reads the same way).
    """
    training_only = {k: v for k, v in (metadata or {}).items() if k.startswith("ss_")}
    blob = safetensors.torch.save(dict(tensors), metadata=training_only)
    header_len = int.from_bytes(blob[:8], "little")
    model_hash = hashlib.sha256(blob[8 + header_len :]).hexdigest()
    legacy_hash = hashlib.sha256(blob[_LEGACY_OFFSET : _LEGACY_OFFSET + _LEGACY_LENGTH]).hexdigest()[:8]
    return model_hash, legacy_hash


def with_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> dict[str, str]:
    """A copy of `metadata` with `sshs_model_hash` and `sshs_legacy_hash` set for `tensors`."""
    out = dict(metadata or {})
    out["sshs_model_hash"], out["sshs_legacy_hash"] = model_hashes(tensors, out)
    return out
