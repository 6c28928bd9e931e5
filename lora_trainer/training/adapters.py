"""The trained adapters of a run: LoRA (or DoRA) injected into the UNet and/or, when asked, the text
encoders, with per-sample dropout masks and a checkpointing function that keeps them."""

from __future__ import annotations

import logging
import re

import torch

from ..config import RunConfig
from ..models.dropout import DropoutKeys, use_sample_dropout
from ..models.kohya_dropout import KohyaDropout, use_kohya_dropout
from ..export.inspect import misread_attention_alphas
from ..models.blocks import block_lr_weights, block_plan, module_ranks
from ..models.lora import candidate_layers, inject_lora, is_locon_3x3, layer_alphas, lora_layers, trainable_parameters
from ..models.lycoris import LYCORIS_TYPES, inject_lycoris, lycoris_layers, type_name, whole_factor_count
from .block_groups import block_groups
from .components import Trained
from .tracking import GROUP_NAMES

log = logging.getLogger(__name__)


def add_adapters(cfg: RunConfig, base, dropout_keys: DropoutKeys) -> tuple[Trained, list[dict], list[str]]:
    """Inject LoRA into the UNet (unless lora.train_unet is false) and the text encoders (when
    lora.train_text_encoder); return the trained modules by component, their optimizer groups and a
    name for each group (what the logs call them). With block lr weights the UNet has one group per
    weight (`unet_w0.5`, ...), else one. LoRA dropout (lora.dropout and kohya's neuron, rank and module
    dropouts) draws its masks per sample, from `dropout_keys`. lora.type loha/lokr puts LyCORIS'
    LoHa/LoKr on the same layers instead (config checks refused what they do not support)."""
    rank, alpha, t = cfg.lora.rank, cfg.lora_alpha, cfg.train
    kind = cfg.lora.type
    dora = cfg.lora.use_dora
    if dora:
        log.warning("lora.use_dora: DoRA files load exactly in infer.py, and in diffusers in the diffusers layout "
                    "(output.format=both); A1111 misreads the kohya file and ComfyUI approximates it "
                    "(README: DoRA)")
    named: dict[str, torch.nn.Module] = {}
    groups, names = [], []
    if cfg.lora.train_unet:
        weights = block_lr_weights(cfg.lora, base.variant)
        if kind in LYCORIS_TYPES:
            inject_lycoris(base.unet, kind, cfg.lora.unet_targets, rank, alpha, "lora.unet_targets",
                           cfg.lora.lokr_factor, cfg.lora.conv_rank, cfg.conv_alpha)
        else:
            inject_lora(base.unet, cfg.lora.unet_targets, rank, alpha, cfg.lora.dropout, "lora.unet_targets", dora,
                        conv_rank=cfg.lora.conv_rank, conv_alpha=cfg.conv_alpha,
                        ranks=_block_ranks(cfg, base, weights))
        if kind == "lora" and (cfg.lora.conv_rank or cfg.lora.block_alphas or cfg.lora.conv_block_ranks):
            _check_kohya_alphas(cfg, base.unet)  # diffusers' reading of kohya LoRA files; it reads no LoHa/LoKr
        named["unet"] = base.unet
        if weights is None:
            groups, names = [{"params": trainable_parameters(base.unet), "lr": t.lr}], [GROUP_NAMES[0]]
        else:
            groups, names = block_groups(base.unet, weights, t.lr, base.variant, _layers_per_block(base.unet))
    elif cfg.lora.train_text_encoder:
        log.info("lora.train_unet false: the UNet stays frozen without an adapter; only the text encoder(s) train")
    if cfg.lora.train_text_encoder:
        te_lr = t.text_encoder_lr if t.text_encoder_lr is not None else t.lr
        for i, encoder in enumerate(base.text_encoders, start=1):
            if kind in LYCORIS_TYPES:
                inject_lycoris(encoder, kind, cfg.lora.text_encoder_targets, rank, alpha,
                               "lora.text_encoder_targets", cfg.lora.lokr_factor)
            else:
                inject_lora(encoder, cfg.lora.text_encoder_targets, rank, alpha, cfg.lora.dropout,
                            "lora.text_encoder_targets", dora)
            if i == 2:
                _check_openclip_attention(encoder, kind)
            named[GROUP_NAMES[i]] = encoder
            groups.append({"params": trainable_parameters(encoder), "lr": te_lr})
            names.append(GROUP_NAMES[i])
    kohya = KohyaDropout(cfg.lora.neuron_dropout, cfg.lora.rank_dropout, cfg.lora.module_dropout)
    for name, module in named.items():
        if cfg.lora.dropout > 0:
            use_sample_dropout(module, cfg.lora.dropout, dropout_keys, name)
        if kohya:  # after use_sample_dropout: it hooks the final lora_dropout modules
            use_kohya_dropout(module, kohya, dropout_keys, name)
    if t.gradient_checkpointing:
        # the frozen UNet too: a text-encoder-only run still backpropagates through it
        base.unet.enable_gradient_checkpointing(dropout_keys.checkpoint)
        for name, encoder in named.items():
            if name != "unet":
                encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dropout_keys.transformers_kwargs())
    if groups:
        log.info("trainable %s parameters: %d (rank %d, alpha %g%s%s)",
                 "DoRA" if dora else type_name(kind),
                 sum(p.numel() for g in groups for p in g["params"]), rank, alpha,
                 f"; 3x3 convs rank {cfg.lora.conv_rank}, alpha {cfg.conv_alpha:g}" if cfg.lora.conv_rank else "",
                 _whole_factor_note(named) if kind == "lokr" else "")
    else:
        log.info("no LoRA: only the embedding trains (textual inversion)")
    return Trained(named), groups, names


def _whole_factor_note(named: dict[str, torch.nn.Module]) -> str:
    """The log's word on LoKr modules of two whole factors: rank and alpha do not act on them (scale 1,
    as in LyCORIS), which `rank 100000, alpha 1` alone would hide."""
    whole = sum(whole_factor_count(module) for module in named.values())
    if not whole:
        return ""
    total = sum(len(lycoris_layers(module)) for module in named.values())
    count = f"all {whole} modules are" if whole == total else f"{whole} of {total} modules are"
    return (f"; {count} two whole factors, "
            "trained at scale 1 whatever rank and alpha say, as in LyCORIS")


def _layers_per_block(unet) -> int:
    return int(getattr(unet.config, "layers_per_block", 2))


def _block_ranks(cfg: RunConfig, base, weights) -> dict[str, tuple[int, float]] | None:
    """{UNet module path: (rank, alpha)} when per-block ranks are in use (block ranks or block lr
    weights set, as kohya), else None."""
    plan = block_plan(cfg.lora, base.variant, cfg.lora_alpha, cfg.conv_alpha, weights)
    if plan is None:
        return None
    locon = bool(cfg.lora.conv_rank or cfg.lora.conv_block_ranks)
    paths = candidate_layers(base.unet, cfg.lora.unet_targets, locon)
    ranks = module_ranks(paths, is_locon_3x3, plan, base.variant, (cfg.lora.rank, cfg.lora_alpha),
                         _layers_per_block(base.unet))
    left_out = sorted(p for p, (r, _) in ranks.items() if r == 0)
    if left_out:
        log.info("%d UNet layers are left out (their block has rank 0 or lr weight 0), e.g. %s",
                 len(left_out), left_out[0])
    return ranks


def _check_kohya_alphas(cfg: RunConfig, unet) -> None:
    """diffusers (0.42) gives a kohya file's attention layers the UNet's most common alpha: warn when
    some carry another one (LoCon's 3x3 convs outnumbering them, or per-block alphas)."""
    common, odd = misread_attention_alphas(layer_alphas(unet))
    if odd and cfg.output.format != "diffusers":
        key = "lora.block_alphas" if cfg.lora.block_alphas or cfg.lora.conv_block_ranks else "lora.conv_alpha"
        log.warning("%s: %d attention layers have an alpha other than the UNet's most common one (%g), which "
                    "diffusers (0.42) would load them with from the kohya file (A1111, ComfyUI and infer.py read it "
                    "right); give diffusers users the diffusers layout (output.format=both)", key, len(odd), common)


_ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")


def _check_openclip_attention(encoder, kind: str) -> None:
    """SDXL's second text encoder is OpenCLIP in the original checkpoints, whose attention A1111 patches
    as one layer: it applies a file's q/k/v/out_proj modules there only when all four are present, and
    skips the layer silently otherwise. Warn when the targets adapt some of them but not all."""
    layers = lycoris_layers(encoder) if kind in LYCORIS_TYPES else lora_layers(encoder)
    found: dict[str, set[str]] = {}
    for path in layers:
        if m := re.search(r"layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj|out_proj)$", path):
            found.setdefault(m[1], set()).add(m[2])
    partial = sorted({p for have in found.values() if len(have) < 4 for p in have})
    if partial:
        missing = [p for p in _ATTENTION_PROJECTIONS if p not in partial]
        log.warning("lora.text_encoder_targets: the second text encoder's attention is adapted in %s only; A1111 "
                    "applies those modules only when q_proj, k_proj, v_proj and out_proj all have one (SDXL's "
                    "OpenCLIP attention is one layer there) and otherwise skips them (ComfyUI, diffusers and infer.py "
                    "read them); add %s", ", ".join(partial), ", ".join(missing))
