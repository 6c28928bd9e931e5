"""Merge several adapters, each at a weight, into one file.

ΔW = Σ_i w_i · (alpha_i / r_i) · up_i @ down_i is itself a product of stacked factors,
[√|c_1|·sign(c_1)·up_1, √|c_2|·sign(c_2)·up_2, ...] @ [√|c_1|·down_1; √|c_2|·down_2; ...] with
c_i = w_i · alpha_i / r_i, so the exact merge concatenates ranks and loads exactly like the stacked
adapters. With a target rank, the SVD of that product keeps the best rank-k part.
"""

from __future__ import annotations

import collections
import math
from pathlib import Path
from typing import Sequence

import torch

from ..errors import ModelError
from .adapter import Adapter, LoraModule, module_from_product
from .lowrank import FitReport, check_ranks, choose_rank, fit, svd_of_product, truncated_factors
from .metadata import ARCHITECTURES, kohya_metadata

_VERSIONS = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}


def _stacked(parts: Sequence[tuple[LoraModule, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    lefts, rights = [], []
    for module, weight in parts:
        left, right = module.factors()
        c = weight  # `left` already carries alpha / r
        root = math.sqrt(abs(c))
        lefts.append(left * (root if c >= 0 else -root))
        rights.append(right * root)
    return torch.cat(lefts, 1), torch.cat(rights, 0)


def merge_adapters(inputs: Sequence[tuple[Adapter, float]], rank: int | None = None,
                   conv_rank: int | None = None, names: Sequence[str] | None = None,
                   ) -> tuple[Adapter, FitReport | None]:
    """One adapter equal to the weighted sum of `inputs` ([(adapter, weight)]).

    Without `rank` the merge is exact (module rank = sum of the inputs' ranks, alpha = that rank, so
    scale 1). With `rank` (and `conv_rank` for 3×3 convs) each module is the best approximation of
    that rank, and the report says how much of each ΔW's Frobenius norm it keeps. `names` label the
    inputs in errors and metadata.
    """
    if not inputs:
        raise ModelError("merge-loras needs at least one adapter")
    names = list(names or [f"adapter {i + 1}" for i in range(len(inputs))])
    for name, (adapter, _) in zip(names, inputs):
        adapter.refuse_dora("merged", name)
    bases = {adapter.base for adapter, _ in inputs}
    if len(bases) > 1:
        listed = ", ".join(f"{n} ({a.base})" for n, (a, _) in zip(names, inputs))
        raise ModelError(f"cannot merge adapters for different bases: {listed}")
    check_ranks(rank, conv_rank)

    grouped: dict[tuple[str, str], list[tuple[LoraModule, float]]] = {}
    for name, (adapter, weight) in zip(names, inputs):
        for component, path, module in adapter.items():
            group = grouped.setdefault((component, path), [])
            if group and group[0][0].weight_shape != module.weight_shape:
                raise ModelError(f"{name}: {component}.{path} changes a {tuple(module.weight_shape)} weight, "
                                 f"another input a {tuple(group[0][0].weight_shape)} one; are they for the same base?")
            group.append((module, weight))

    report = FitReport() if rank is not None else None
    products = {}
    for (component, path), parts in grouped.items():
        left, right = _stacked(parts)
        total_rank = left.shape[1]
        if rank is not None:
            u, s, vh = svd_of_product(left, right)
            is_3x3 = parts[0][0].is_conv and parts[0][0].down.shape[2:] != (1, 1)
            keep = choose_rank(s, conv_rank if (is_3x3 and conv_rank) else rank)
            report.modules.append(fit(component, path, s, total_rank, keep))
            left, right = truncated_factors(u, s, vh, keep)
        products[(component, path)] = (left, right, parts[0][0].weight_shape)

    ranks = collections.Counter(left.shape[1] for left, _, _ in products.values())
    alpha = float(ranks.most_common(1)[0][0])  # scale 1 for the common rank
    modules: dict[str, dict[str, LoraModule]] = {}
    for (component, path), (left, right, shape) in products.items():
        modules.setdefault(component, {})[path] = module_from_product(left, right, shape, alpha)

    base = bases.pop()
    how = "exactly (ranks concatenated)" if rank is None else f"by SVD to rank {rank}"
    sources = ", ".join(f"{Path(n).name}:{w:g}" for n, (_, w) in zip(names, inputs))
    # Keep an SD 2.x input's version: its keys look like SD 1.x's.
    version = inputs[0][0].metadata.get("ss_base_model_version")
    version = version if version in ARCHITECTURES and (version.startswith("sdxl") == (base == "sdxl")) else _VERSIONS[base]
    metadata = kohya_metadata(rank=int(alpha), alpha=alpha, base_model_version=version,
                              training_comment=f"merged {how} from {sources}")
    if len(ranks) > 1:
        metadata["ss_network_dim"] = "Dynamic"
    return Adapter(modules, base, metadata, inputs[0][0].layout, inputs[0][0].base_reason), report
