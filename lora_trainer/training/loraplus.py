"""LoRA+ (Hayou et al. 2024, kohya's `loraplus_lr_ratio` network argument): the up factor B of
each adapter learns at lr × ratio, the down factor A at lr, one optimizer group each.

B starts at zero and maps the rank-r features out to the layer's width, A maps the input in; the
paper shows that with one learning rate for both, B learns too slowly in wide layers. DoRA's
magnitude vectors go with B, as peft's `create_loraplus_optimizer` groups them (kohya's LoRA has no
magnitudes). Off (no ratio set), the groups are exactly those of `add_adapters`.
"""

from __future__ import annotations

import torch

from ..config import TrainConfig
from .tracking import GROUP_NAMES

PLUS = "_plus"  # the B group of a component: lr/unet_plus in the logs


def loraplus_ratios(t: TrainConfig) -> tuple[float | None, float | None]:
    """(UNet ratio, text-encoder ratio): the component's own key, else `loraplus_lr_ratio`."""
    unet = t.loraplus_unet_lr_ratio if t.loraplus_unet_lr_ratio is not None else t.loraplus_lr_ratio
    te = t.loraplus_text_encoder_lr_ratio if t.loraplus_text_encoder_lr_ratio is not None else t.loraplus_lr_ratio
    return unet, te


def _is_up(name: str) -> bool:
    return ".lora_B." in name or "lora_magnitude_vector" in name


def loraplus_groups(t: TrainConfig, modules: list[torch.nn.Module], groups: list[dict],
                    names: list[str] | None = None) -> tuple[list[dict], list[str]]:
    """The optimizer groups and a name for each (what the logs call them). `groups` train `modules`
    (in GROUP_NAMES order); `names` (default: one group per module, `GROUP_NAMES`) tell
    UNet groups (`unet...`, several with block lr weights) from the encoders'. A group whose component
    has a ratio becomes two: A at its lr, then B (and DoRA magnitudes) at lr × ratio."""
    unet_ratio, te_ratio = loraplus_ratios(t)
    names = list(names) if names is not None else list(GROUP_NAMES[:len(groups)])
    param_names = {id(p): n for module in modules for n, p in module.named_parameters()}
    out, out_names = [], []
    for name, group in zip(names, groups):
        ratio = unet_ratio if name.startswith(GROUP_NAMES[0]) else te_ratio
        if ratio is None:
            out.append(group)
            out_names.append(name)
            continue
        up = [p for p in group["params"] if _is_up(param_names[id(p)])]
        down = [p for p in group["params"] if not _is_up(param_names[id(p)])]
        out += [{**group, "params": down}, {**group, "params": up, "lr": group["lr"] * ratio}]
        out_names += [name, name + PLUS]
    return out, out_names
