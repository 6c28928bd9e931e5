"""Resize an adapter to a new rank: the SVD of each module's scaled ΔW = (alpha / r) · up @ down,
truncated to a fixed rank or by one of kohya's dynamic rules, with the kept Frobenius norm reported.

A rank at or above a module's own rank keeps it exactly (up to float rounding).
"""

from __future__ import annotations

import collections

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

    uniform = len({f.rank for f in report.modules}) == 1
    how = f"dynamic {dynamic} {param}, at most rank {rank}" if dynamic else f"rank {rank}"
    metadata = carried_metadata(adapter.metadata)
    note = (f"resized from rank {adapter.common_rank()} ({how}); retained Frobenius norm "
            f"{100 * report.retained:.2f}%")
    previous = metadata.get("ss_training_comment")
    metadata.update({
        # kohya writes "Dynamic" when module ranks differ.
        "ss_network_dim": str(common_rank) if uniform else "Dynamic",
        "ss_network_alpha": str(float(alpha)),
        "ss_training_comment": f"{note}; {previous}" if previous and previous != "None" else note,
    })
    return Adapter(modules, adapter.base, metadata, adapter.layout, adapter.base_reason), report
