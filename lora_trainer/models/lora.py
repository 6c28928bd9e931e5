"""LoRA injection with peft: W' = W + (alpha / r) · B·A on the targeted linear layers.

peft's LoRA layer holds A as `lora_A` (r × d_in, "down") and B as `lora_B` (d_out × r, "up") and
multiplies their product by `scaling = lora_alpha / r`; we only choose where they go.
With DoRA (`use_dora`) peft also learns a magnitude m per output channel (`lora_magnitude_vector`,
initialised to the row norms of W): W' = m · (W + scaling · B·A) / ‖W + scaling · B·A‖ (row-wise).

A Conv2d layer (d_out × d_in × k × k) gets the same product as convolutions: A is a conv with the
layer's kernel, stride and padding (r × d_in × k × k), B a 1x1 conv (d_out × r × 1 × 1), so
ΔW = scaling · B·A on the weight flattened to d_out × (d_in·k·k). LoCon (kohya's `conv_dim`) puts such
adapters on the UNet's ResNet blocks and samplers, with the 3x3 convs at their own rank and alpha.
"""

from __future__ import annotations

import re
from typing import Mapping

import torch
from peft import LoraConfig as PeftLoraConfig

from ..errors import ConfigError

ADAPTER_NAME = "default"
# kohya's LoCon (networks/lora.py with conv_dim) adds every Linear and Conv2d of the UNet's
# ResnetBlock2D, Downsample2D and Upsample2D blocks: the 3x3 convs at conv rank/alpha, the rest
# (resnet time_emb_proj, 1x1 conv_shortcut) at the normal rank/alpha.
LOCON_3X3_TARGETS = ("conv1", "conv2", "downsamplers.0.conv", "upsamplers.0.conv")
LOCON_TARGETS = (*LOCON_3X3_TARGETS, "time_emb_proj", "conv_shortcut")


def lora_layers(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The peft LoRA-wrapped layers of `module`, by module path."""
    return {name: m for name, m in module.named_modules() if hasattr(m, "lora_A") and ADAPTER_NAME in m.lora_A}


def is_locon_3x3(path: str) -> bool:
    """Whether the module at `path` is one of the 3x3 convs LoCon adapts at its own rank."""
    return any(path == t or path.endswith("." + t) for t in LOCON_3X3_TARGETS)


def add_adapter(module: torch.nn.Module, config, targets: list[str], key: str) -> None:
    """`module.add_adapter(config)` under our adapter name; targets that name no layer of `module`
    are one line naming `key` (the config key) and the names to use."""
    try:
        module.add_adapter(config, adapter_name=ADAPTER_NAME)
    except ValueError as exc:
        if "not found" in str(exc) or "Target modules" in str(exc):
            raise ConfigError(
                f"{key}: none of {targets} names a layer of the {type(module).__name__}; "
                "use attention projection names such as to_q, to_k, to_v, to_out.0 (UNet) or "
                "q_proj, k_proj, v_proj, out_proj (text encoder)"
            ) from None
        raise


def locon_targets(targets: list[str], conv_rank: int, conv_alpha: float | None) -> tuple[list[str], dict]:
    """`targets` with LoCon's layers added, and peft's rank_pattern/alpha_pattern that give the 3x3
    convs `conv_rank` and `conv_alpha` (default: conv_rank)."""
    # peft matches a pattern P against the end of a module path, as `(.*\.)?P$`
    patterns = [re.escape(t) for t in LOCON_3X3_TARGETS]
    return list(dict.fromkeys([*targets, *LOCON_TARGETS])), {
        "rank_pattern": {p: conv_rank for p in patterns},
        "alpha_pattern": {p: float(conv_rank if conv_alpha is None else conv_alpha) for p in patterns}}


def inject_lora(
    module: torch.nn.Module, targets: list[str], rank: int, alpha: float, dropout: float, key: str,
    use_dora: bool = False, conv_rank: int = 0, conv_alpha: float | None = None,
    ranks: Mapping[str, tuple[int, float]] | None = None,
) -> int:
    """Add a trainable LoRA (or, with `use_dora`, DoRA) adapter to the layers of `module` whose names
    end with one of `targets`; return the number of wrapped layers. `key` names the config key for errors.
    `conv_rank` > 0 adds kohya's LoCon layers (`LOCON_TARGETS`), the 3x3 convs at `conv_rank` and
    `conv_alpha` (default: conv_rank) through peft's per-module rank_pattern/alpha_pattern.
    `ranks` ({module path: (rank, alpha)}, see `candidate_layers`) replaces `targets` and the conv
    options: exactly those modules, each at its own rank and alpha; rank 0 ones are left out."""
    extra = {}
    if use_dora:
        extra["use_dora"] = True
    if ranks is not None:
        kept = {path: ra for path, ra in ranks.items() if ra[0] > 0}
        if not kept:
            raise ConfigError(f"{key}: every targeted layer is in a block of rank 0 or lr weight 0, so nothing "
                              "would train; raise lora.block_ranks or lora.block_lr_weights somewhere")
        targets = sorted(kept)  # whole paths: peft matches a target as the path or its dotted suffix
        # peft matches a pattern P as `(.*\.)?P$`; whole paths match only their own module
        extra["rank_pattern"] = {re.escape(p): r for p, (r, _) in kept.items() if r != rank}
        extra["alpha_pattern"] = {re.escape(p): float(a) for p, (_, a) in kept.items() if a != alpha}
    elif conv_rank:
        targets, patterns = locon_targets(targets, conv_rank, conv_alpha)
        extra.update(patterns)
    config = PeftLoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        init_lora_weights="gaussian",  # A ~ N(0, 1/r), B = 0: training starts at ΔW = 0
        target_modules=list(targets),
        **extra,
    )
    add_adapter(module, config, targets, key)
    layers = lora_layers(module)
    # Adapter weights train in fp32 whatever the frozen weights' dtype.
    for layer in layers.values():
        layer.lora_A[ADAPTER_NAME].float()
        layer.lora_B[ADAPTER_NAME].float()
        if ADAPTER_NAME in getattr(layer, "lora_magnitude_vector", {}):
            layer.lora_magnitude_vector[ADAPTER_NAME].float()
    return len(layers)


def candidate_layers(module: torch.nn.Module, targets: list[str], locon: bool) -> list[str]:
    """The paths of the Linear and Conv2d layers that `targets` (with `locon`, also LOCON_TARGETS)
    name, as peft would select them: the path itself or one ending in `.<target>`."""
    names = list(dict.fromkeys([*targets, *(LOCON_TARGETS if locon else ())]))
    return [path for path, layer in module.named_modules()
            if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d))
            and any(path == t or path.endswith("." + t) for t in names)]


def trainable_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def expected_lora_parameters(module: torch.nn.Module, rank: int, use_dora: bool = False, conv_rank: int = 0) -> int:
    """Σ r·(d_in·k·k + d_out) over the wrapped layers (+ d_out for DoRA's magnitudes), r = `conv_rank`
    for LoCon's 3x3 convs when it is > 0, else `rank`: the count such an adapter must have."""
    total = 0
    for name, layer in lora_layers(module).items():
        weight = layer.get_base_layer().weight  # (d_out, d_in) or (d_out, d_in, k, k)
        r = conv_rank if conv_rank and is_locon_3x3(name) else rank
        total += r * (weight[0].numel() + weight.shape[0]) + (weight.shape[0] if use_dora else 0)
    return total


def layer_alphas(module: torch.nn.Module) -> dict[str, float]:
    """{module path: alpha} of the wrapped layers, as peft set them (rank/alpha patterns applied)."""
    return {name: float(layer.lora_alpha[ADAPTER_NAME]) for name, layer in lora_layers(module).items()}
