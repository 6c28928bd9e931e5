"""Max-norm regularisation of the adapters (kohya's `--scale_weight_norms`): after an update, each
adapted layer whose ΔW = (alpha/r)·B·A has a Frobenius norm above the limit is scaled back onto
it, B and A each by sqrt(limit / norm), so ΔW by limit / norm. Layers under the limit are left alone.

The norm comes from the r × r Gram matrices, ‖B·A‖² = Σ (BᵀB) ⊙ (A·Aᵀ), in float64: no
d_out × d_in product is formed. Every process holds the same adapter after a step and does the
same arithmetic on it in the same order, so the adapters stay identical across processes.
With DoRA the limit applies to the same ΔW; the magnitude vectors are left as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..models.lora import ADAPTER_NAME, lora_layers


@dataclass
class NormStats:
    keys_scaled: int  # layers scaled back this step
    average: float  # mean ‖ΔW‖ over the layers, after scaling
    maximum: float

    def record(self) -> dict[str, float]:
        """The step-log fields, under kohya's tracker names."""
        return {"max_norm/keys_scaled": self.keys_scaled, "max_norm/average_key_norm": self.average,
                "max_norm/max_key_norm": self.maximum}


def delta_norm(layer: torch.nn.Module) -> float:
    """‖(alpha/r)·B·A‖ (Frobenius) of one peft LoRA layer, linear or conv."""
    down = layer.lora_A[ADAPTER_NAME].weight
    up = layer.lora_B[ADAPTER_NAME].weight
    rank = down.shape[0]
    a = down.detach().reshape(rank, -1).double()
    b = up.detach().reshape(up.shape[0], rank).double()
    squared = float(((b.T @ b) * (a @ a.T)).sum())
    return abs(layer.scaling[ADAPTER_NAME]) * math.sqrt(max(squared, 0.0))


@torch.no_grad()
def apply_max_norm(modules: list[torch.nn.Module], limit: float) -> NormStats:
    """Scale every adapted layer of `modules` whose ‖ΔW‖ exceeds `limit` back to `limit`."""
    norms, scaled = [], 0
    for module in modules:
        for layer in lora_layers(module).values():
            norm = delta_norm(layer)
            if norm > limit:
                gain = math.sqrt(limit / norm)
                layer.lora_A[ADAPTER_NAME].weight.mul_(gain)
                layer.lora_B[ADAPTER_NAME].weight.mul_(gain)
                scaled, norm = scaled + 1, limit
            norms.append(norm)
    if not norms:
        return NormStats(0, 0.0, 0.0)
    return NormStats(scaled, sum(norms) / len(norms), max(norms))
