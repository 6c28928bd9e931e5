"""Resize an adapter to a new rank: the SVD of each module's scaled ΔW = (alpha / r) · up @ down,
truncated to a fixed rank or by one of kohya's dynamic rules, with the kept Frobenius norm reported.

A rank at or above a module's own rank keeps it exactly (up to float rounding).
"""

from __future__ import annotations

import collections
import json

from .adapter import Adapter, carried_metadata, module_from_product
from .lowrank import FitReport, check_dynamic, check_ranks, choose_rank, fit, svd_of_product, truncated_factors


def resize_adapter(adapter: Adapter, rank: int, *, conv_rank: int | None = None, dynamic: str | None = None,
                   param: float | None = None) -> tuple[Adapter, FitReport]:
    """The resized adapter and a report of each module's kept norm.

    `rank` is the new rank (with `dynamic`, the most any module may keep); `conv_rank` the same for
    3×3 conv modules (default `rank`). The output shares one alpha, chosen as kohya does for a fixed
    rank (alpha' = (alpha / r) · r', so the scale users know is unchanged); factors absorb the rest.
    """
    check_ranks(rank, conv_rank)
    check_dynamic(dynamic, param)
    adapter.refuse_dora("resized", adapter.metadata.get("ss_output_name", "the adapter"))
    conv_rank = rank if conv_rank is None else conv_rank
    report = FitReport()
    parts = []
    for component, path, module in adapter.items():
        left, right = module.factors()
        u, s, vh = svd_of_product(left, right)
        is_3x3 = module.is_conv and module.down.shape[2:] != (1, 1)
        limit = min(conv_rank if is_3x3 else rank, module.rank)
        new_rank = choose_rank(s, limit, dynamic, param)
        report.modules.append(fit(component, path, s, module.rank, new_rank))
        parts.append((component, path, module, truncated_factors(u, s, vh, new_rank)))

    common_scale = collections.Counter(m.scale for _, _, m in adapter.items()).most_common(1)[0][0]
    common_rank = collections.Counter(f.rank for f in report.modules).most_common(1)[0][0]
    alpha = common_scale * common_rank
    modules: dict[str, dict] = {}
    for component, path, module, (left, right) in parts:
        modules.setdefault(component, {})[path] = module_from_product(left, right, module.weight_shape, alpha)

    how = f"dynamic {dynamic} {param}, at most rank {rank}" if dynamic else f"rank {rank}"
    metadata = carried_metadata(adapter.metadata)
    note = (f"resized from rank {adapter.common_rank()} ({how}); retained Frobenius norm "
            f"{100 * report.retained:.2f}%")
    previous = metadata.get("ss_training_comment")
    linear = [m.rank for _, _, m in _split(modules, False)] or [f.rank for f in report.modules]
    metadata.update({
        # As kohya's resize: "Dynamic" after a dynamic resize; else the rank (the largest, as
        # ss_network_dim is lora.rank for a file whose blocks have their own ranks; 3x3 convs apart)
        "ss_network_dim": "Dynamic" if dynamic else str(max(linear)),
        "ss_network_alpha": str(float(alpha)),  # every module shares it
        "ss_training_comment": f"{note}; {previous}" if previous and previous != "None" else note,
    })
    _resize_network_args(metadata, modules, rank, conv_rank, alpha, bool(dynamic))
    return Adapter(modules, adapter.base, metadata, adapter.layout, adapter.base_reason), report


def _split(modules: dict[str, dict], conv_3x3: bool):
    """The (component, path, module) of the 3x3 conv modules (`conv_3x3`) or of all the others."""
    return [(c, p, m) for c, mods in modules.items() for p, m in mods.items()
            if (m.is_conv and m.down.shape[2:] != (1, 1)) == conv_3x3]


def _resize_network_args(metadata: dict[str, str], modules: dict[str, dict], rank: int, conv_rank: int,
                         alpha: float, dynamic: bool) -> None:
    """Make `ss_network_args` describe the resized file: LoCon's conv_dim/conv_alpha and the block
    ranks/alphas (each block's rank capped at the new rank, or "Dynamic" when the ranks were chosen per
    module), every alpha the one all modules now share. Other arguments (LoRA+, lr weights) stay."""
    try:
        args = json.loads(metadata.get("ss_network_args") or "{}")
    except ValueError:
        return  # someone else's text: left as it is
    if not isinstance(args, dict) or not args:
        return
    shown = f"{alpha:g}"
    convs = [m.rank for _, _, m in _split(modules, True)]
    if "conv_dim" in args and convs:
        args["conv_dim"] = "Dynamic" if dynamic else str(max(convs))
    if "conv_alpha" in args:
        args["conv_alpha"] = shown
    for key, cap in (("block_dims", rank), ("conv_block_dims", conv_rank)):
        if key in args:
            try:
                old = [int(float(v)) for v in str(args[key]).split(",")]
            except ValueError:
                continue
            args[key] = "Dynamic" if dynamic else ",".join(str(min(r, cap)) for r in old)
    for key in ("block_alphas", "conv_block_alphas"):
        if key in args:
            args[key] = ",".join([shown] * len(str(args[key]).split(",")))
    metadata["ss_network_args"] = json.dumps(args)
