"""LoRA injection with peft: W' = W + (alpha / r) · B·A on the targeted linear layers.

peft's LoRA layer holds A as `lora_A` (r × d_in, "down") and B as `lora_B` (d_out × r, "up") and
multiplies their product by `scaling = lora_alpha / r`; we only choose where they go.
With DoRA (`use_dora`) peft also learns a magnitude m per output channel (`lora_magnitude_vector`,
initialised to the row norms of W): W' = m · (W + scaling · B·A) / ‖W + scaling · B·A‖ (row-wise).
"""

from __future__ import annotations

import torch
from peft import LoraConfig as PeftLoraConfig

from ..errors import ConfigError

ADAPTER_NAME = "default"


def lora_layers(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The peft LoRA-wrapped layers of `module`, by module path."""
    return {name: m for name, m in module.named_modules() if hasattr(m, "lora_A") and ADAPTER_NAME in m.lora_A}


def inject_lora(
    module: torch.nn.Module, targets: list[str], rank: int, alpha: float, dropout: float, key: str,
    use_dora: bool = False,
) -> int:
    """Add a trainable LoRA (or, with `use_dora`, DoRA) adapter to the layers of `module` whose names
    end with one of `targets`; return the number of wrapped layers. `key` names the config key for errors."""
    config = PeftLoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        init_lora_weights="gaussian",  # A ~ N(0, 1/r), B = 0: training starts at ΔW = 0
        target_modules=list(targets),
        **({"use_dora": True} if use_dora else {}),
    )
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
    layers = lora_layers(module)
    # Adapter weights train in fp32 whatever the frozen weights' dtype.
    for layer in layers.values():
        layer.lora_A[ADAPTER_NAME].float()
        layer.lora_B[ADAPTER_NAME].float()
        if ADAPTER_NAME in getattr(layer, "lora_magnitude_vector", {}):
            layer.lora_magnitude_vector[ADAPTER_NAME].float()
    return len(layers)


def trainable_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def expected_lora_parameters(module: torch.nn.Module, rank: int, use_dora: bool = False) -> int:
    """Σ r·(d_in + d_out) over the wrapped layers (+ d_out for DoRA's magnitudes): the count a
    LoRA of rank r must have."""
    total = 0
    for layer in lora_layers(module).values():
        base = layer.get_base_layer()
        total += rank * (base.in_features + base.out_features) + (base.out_features if use_dora else 0)
    return total
