"""LoHa and LoKr injection with peft (LyCORIS' types, `lora.type`), on the layers LoRA would adapt:

- LoHa: ΔW = (w1_a·w1_b) ⊙ (w2_a·w2_b) · alpha/r, each pair d_out × r · r × d_in. peft draws w1_a,
  w1_b and w2_a (Kaiming) and zeroes w2_b, so training starts at ΔW = 0.
- LoKr: ΔW = kron(w1, w2) · alpha/r, d_out = a·b and d_in = c·d split by LyCORIS' factorization
  (`lokr_factor`: a and c near it; -1: near √d); w1 (a × c) is whole, w2 (b × d) whole when
  r ≥ max(b, d)/2, else the pair w2_a·w2_b (b × r · r × d). peft zeroes w1: ΔW = 0 at the start.
  A module of two whole factors has no rank to divide by: LyCORIS trains and applies it at scale 1
  whatever alpha says, and so do we (`whole_factor_scale`), so kohya's full-matrix recipe
  (network_dim 100000, network_alpha 1) trains here as there.

A Conv2d target gets the product flattened to d_out × (d_in·k·k) and reshaped to the kernel (peft's
default, which LyCORIS writes the same way without CP cores).
"""

from __future__ import annotations

import torch

from .lora import ADAPTER_NAME, add_adapter, locon_targets

# lora.type -> the LyCORIS name of the type (what files and `inspect` call it)
LYCORIS_TYPES = {"loha": "LoHa", "lokr": "LoKr"}


def type_name(lora_type: str) -> str:
    """What an adapter of lora.type `lora_type` is called: "LoHa", "LoKr" (LyCORIS' types, which
    diffusers' `load_lora_weights` does not read), else "LoRA"."""
    return LYCORIS_TYPES.get(lora_type, "LoRA")


def lycoris_layers(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The peft LoHa/LoKr-wrapped layers of `module`, by module path."""
    from peft.tuners.lycoris_utils import LycorisLayer

    return {name: m for name, m in module.named_modules()
            if isinstance(m, LycorisLayer) and ADAPTER_NAME in m._available_adapters}


def layer_parts(layer: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """{part name (`hada_w1_a`, `lokr_w1`, ...): parameter} of one wrapped layer's adapter."""
    return {name: getattr(layer, name)[ADAPTER_NAME] for name in layer.adapter_layer_names
            if ADAPTER_NAME in getattr(layer, name)}


def inject_lycoris(module: torch.nn.Module, kind: str, targets: list[str], rank: int, alpha: float, key: str,
                   factor: int = -1, conv_rank: int = 0, conv_alpha: float | None = None) -> int:
    """Add a trainable LoHa (`kind` "loha") or LoKr ("lokr", with `factor`) adapter at `rank` and
    `alpha` to the layers of `module` whose names end with one of `targets`; return the number of
    wrapped layers. `key` names the config key for errors. `conv_rank` > 0 adds LoCon's layers (the
    ResNet blocks and samplers, as LyCORIS' conv_dim does), the 3x3 convs at `conv_rank` and
    `conv_alpha` (default: conv_rank)."""
    from peft import LoHaConfig, LoKrConfig

    extra = {}
    if conv_rank:
        targets, extra = locon_targets(targets, conv_rank, conv_alpha)
    if kind == "loha":
        config = LoHaConfig(r=rank, alpha=alpha, target_modules=list(targets), **extra)
    elif kind == "lokr":
        config = LoKrConfig(r=rank, alpha=alpha, target_modules=list(targets), decompose_factor=factor, **extra)
    else:
        raise ValueError(f"kind must be one of {', '.join(LYCORIS_TYPES)}, not {kind!r}")
    add_adapter(module, config, targets, key)
    layers = lycoris_layers(module)
    # Adapter weights train in fp32 whatever the frozen weights' dtype (peft casts the frozen
    # layer's input to them and the sum back to the input's dtype).
    for layer in layers.values():
        parts = layer_parts(layer)
        for part in parts.values():
            part.data = part.data.float()
        if whole_factors(parts):
            whole_factor_scale(layer)
    return len(layers)


def whole_factors(parts) -> bool:
    """Whether a LoKr module's parts (by name) are two whole factors: no low-rank pair, so no rank
    (LyCORIS: scale 1)."""
    return "lokr_w1" in parts and "lokr_w2" in parts


def whole_factor_count(module: torch.nn.Module) -> int:
    """How many of `module`'s LoKr layers are two whole factors (trained at scale 1, alpha and rank unused)."""
    return sum(whole_factors(layer_parts(layer)) for layer in lycoris_layers(module).values())


def lycoris_alphas(module: torch.nn.Module) -> dict[str, float]:
    """{module path: alpha} of the LoHa/LoKr-wrapped layers, as trained (conv patterns applied; r for
    a LoKr of whole factors, which trains at scale 1): what the file writes."""
    return {name: float(layer.alpha[ADAPTER_NAME]) for name, layer in lycoris_layers(module).items()}


def whole_factor_scale(layer: torch.nn.Module) -> None:
    """Give a LoKr layer of two whole factors LyCORIS' scale 1: peft scales by alpha / r, so its alpha
    becomes r (peft's weight scaling for the sweep and its reset keep reading alpha / r)."""
    layer.alpha[ADAPTER_NAME] = layer.r[ADAPTER_NAME]
    layer.scaling[ADAPTER_NAME] = 1.0
