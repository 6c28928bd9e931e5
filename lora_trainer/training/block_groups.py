"""Block-wise learning rates (kohya's down/mid/up_lr_weight): the UNet adapter's parameters split
into one optimizer group per block weight, each at lr × weight. Blocks of weight 0 have no adapter
(models/blocks.py leaves them out), so every group here trains."""

from __future__ import annotations

import logging

import torch

from ..models.blocks import OUTSIDE, block_index

log = logging.getLogger(__name__)


def group_name(weight: float) -> str:
    """The log name of the UNet group at `weight`: lr/unet_w0.5 (LoRA+ adds _plus)."""
    return f"unet_w{weight:g}"


def block_groups(unet: torch.nn.Module, weights: list[float], lr: float, variant: str,
                 layers_per_block: int = 2) -> tuple[list[dict], list[str]]:
    """([{"params", "lr"}], names): the UNet's trainable parameters by the lr weight of their block
    (`weights[block_index]`; layers outside the numbered blocks at 1), groups in the order their first
    parameter comes in the UNet, parameters in module order: the same groups on every run."""
    by_weight: dict[float, list[torch.nn.Parameter]] = {}
    blocks: dict[float, set[int]] = {}
    for name, param in unet.named_parameters():
        if not param.requires_grad:
            continue
        path = name.split(".lora_")[0]  # lora_A / lora_B / lora_magnitude_vector of the layer at `path`
        index = block_index(path, variant, layers_per_block)
        weight = 1.0 if index == OUTSIDE else float(weights[index])
        by_weight.setdefault(weight, []).append(param)
        blocks.setdefault(weight, set()).add(index)
    for weight, found in blocks.items():
        log.info("UNet blocks %s train at lr × %g", ", ".join(map(str, sorted(found))), weight)
    groups = [{"params": params, "lr": lr * weight} for weight, params in by_weight.items()]
    return groups, [group_name(w) for w in by_weight]
