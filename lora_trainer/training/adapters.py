"""The trained adapters of a run: LoRA (or DoRA) injected into the UNet and, when asked, the text
encoders, with per-sample dropout masks and a checkpointing function that keeps them."""

from __future__ import annotations

import logging

import torch

from ..config import RunConfig
from ..models.dropout import DropoutKeys, use_sample_dropout
from ..export.inspect import misread_attention_alphas
from ..models.lora import inject_lora, layer_alphas, trainable_parameters

log = logging.getLogger(__name__)


def add_adapters(cfg: RunConfig, base, dropout_keys: DropoutKeys) -> tuple[list[torch.nn.Module], list[dict]]:
    """Inject LoRA into the UNet (and the text encoders); return the trained modules and their
    optimizer groups. LoRA dropout draws its masks per sample, from `dropout_keys`."""
    rank, alpha, t = cfg.lora.rank, cfg.lora_alpha, cfg.train
    dora = cfg.lora.use_dora
    if dora:
        log.warning("lora.use_dora: DoRA files load exactly in infer.py, and in diffusers in the diffusers layout "
                    "(output.format=both); A1111 misreads the kohya file and ComfyUI approximates it "
                    "(README: DoRA)")
    inject_lora(base.unet, cfg.lora.unet_targets, rank, alpha, cfg.lora.dropout, "lora.unet_targets", dora,
                conv_rank=cfg.lora.conv_rank, conv_alpha=cfg.conv_alpha)
    if cfg.lora.conv_rank:
        _check_kohya_alphas(cfg, base.unet)
    modules = [base.unet]
    groups = [{"params": trainable_parameters(base.unet), "lr": t.lr}]
    if cfg.lora.train_text_encoder:
        te_lr = t.text_encoder_lr if t.text_encoder_lr is not None else t.lr
        for encoder in base.text_encoders:
            inject_lora(encoder, cfg.lora.text_encoder_targets, rank, alpha, cfg.lora.dropout,
                        "lora.text_encoder_targets", dora)
            modules.append(encoder)
            groups.append({"params": trainable_parameters(encoder), "lr": te_lr})
    if cfg.lora.dropout > 0:
        for name, module in zip(("unet", "text_encoder", "text_encoder_2"), modules):
            use_sample_dropout(module, cfg.lora.dropout, dropout_keys, name)
    if t.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing(dropout_keys.checkpoint)
        for encoder in modules[1:]:
            encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dropout_keys.transformers_kwargs())
    return modules, groups


def _check_kohya_alphas(cfg: RunConfig, unet) -> None:
    """diffusers (0.42) gives a kohya file's attention layers the UNet's most common alpha: warn when
    LoCon's 3x3 convs outnumber the other layers and carry another alpha."""
    common, odd = misread_attention_alphas(layer_alphas(unet))
    if odd and cfg.output.format != "diffusers":
        log.warning("lora.conv_alpha: the UNet has more 3x3 convs than other adapted layers, so diffusers (0.42) "
                    "would load the kohya file's %d attention layers with alpha %g instead of %g (A1111 and "
                    "ComfyUI read it right); use the diffusers layout there (output.format=both)",
                    len(odd), common, cfg.lora_alpha)
