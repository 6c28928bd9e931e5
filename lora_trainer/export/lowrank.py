"""The low-rank algebra behind resize, merge-loras and extract: the SVD of a ΔW, the rank to keep
(fixed, or kohya's dynamic rules), and how much of ΔW's Frobenius norm the kept part retains.

By Eckart–Young, keeping the k largest singular values is the best rank-k approximation, and
||ΔW_k||_F² = Σ_{i<k} σ_i², so the retained fraction sqrt(Σ_{i<k} σ_i² / Σ σ_i²) is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import ModelError

DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")


def svd_of_product(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, Vh) of left @ right (d_out × R times R × n) without forming the d_out × n product:
    QR of both factors, then the SVD of the small R × R core. Exact, and cheap for LoRA ranks."""
    q_left, r_left = torch.linalg.qr(left)
    q_right, r_right = torch.linalg.qr(right.T)
    u, s, vh = torch.linalg.svd(r_left @ r_right.T, full_matrices=False)
    return q_left @ u, s, vh @ q_right.T


def svd_of_matrix(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, Vh) of a dense ΔW, flattened to d_out × (d_in·kh·kw) for convs."""
    return torch.linalg.svd(delta.reshape(delta.shape[0], -1), full_matrices=False)


def check_ranks(rank: int | None, conv_rank: int | None) -> None:
    """--rank and --conv-rank as resize and merge-loras take them: integers >= 1, --conv-rank only with --rank."""
    bad = [f"--{name} {value}" for name, value in (("rank", rank), ("conv-rank", conv_rank))
           if value is not None and value < 1]
    if bad:
        raise ModelError(f"{' and '.join(bad)}: expected an integer >= 1")
    if conv_rank is not None and rank is None:
        raise ModelError("--conv-rank needs --rank (without --rank every module keeps all its ranks)")


def check_dynamic(dynamic: str | None, param: float | None) -> None:
    """Validate a dynamic-rank rule before any work, with the message the CLI shows."""
    if dynamic is None:
        if param is not None:
            raise ModelError("--dynamic-param needs --dynamic sv_ratio, sv_fro or sv_cumulative")
        return
    if dynamic not in DYNAMIC_METHODS:
        raise ModelError(f"--dynamic {dynamic!r} is not one of {', '.join(DYNAMIC_METHODS)}")
    if param is None:
        raise ModelError(f"--dynamic {dynamic} needs --dynamic-param (sv_ratio: e.g. 2; sv_fro, sv_cumulative: "
                         "a fraction such as 0.9)")
    if dynamic == "sv_ratio" and not param >= 1:
        raise ModelError(f"--dynamic-param {param} for sv_ratio must be >= 1 (largest/smallest kept singular value)")
    if dynamic != "sv_ratio" and not 0 < param <= 1:
        raise ModelError(f"--dynamic-param {param} for {dynamic} must be in (0, 1]")


def choose_rank(s: torch.Tensor, max_rank: int, dynamic: str | None = None, param: float | None = None) -> int:
    """How many singular values to keep, at most `max_rank`, at least 1.

    kohya's rules: sv_ratio keeps σ_i > σ_0 / param; sv_fro keeps the fewest whose squares reach
    param² of Σσ² (param = retained Frobenius fraction); sv_cumulative the fewest whose sum reaches
    param of Σσ.
    """
    keep = max_rank
    total_sq = float((s * s).sum())
    if dynamic == "sv_ratio":
        keep = int((s > s[0] / param).sum()) if len(s) else 0
    elif dynamic == "sv_fro" and total_sq > 0:
        keep = int(torch.searchsorted(torch.cumsum(s * s, 0) / total_sq, torch.tensor(param**2, dtype=s.dtype))) + 1
    elif dynamic == "sv_cumulative" and total_sq > 0:
        keep = int(torch.searchsorted(torch.cumsum(s, 0) / s.sum(), torch.tensor(param, dtype=s.dtype))) + 1
    return max(1, min(keep, max_rank, len(s)))


def truncated_factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(left, right) of the rank-`rank` part, √σ on each side so both factors have similar scale."""
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


@dataclass
class ModuleFit:
    """How one module came out: its ranks and how much of its ΔW (Frobenius norm) was kept."""

    component: str
    path: str
    rank_before: int
    rank: int
    norm: float  # ||ΔW||_F of the input (or of the model difference, for extract)
    kept: float  # ||ΔW_kept||_F

    @property
    def retained(self) -> float:
        return self.kept / self.norm if self.norm > 0 else 1.0


def fit(component: str, path: str, s: torch.Tensor, rank_before: int, rank: int) -> ModuleFit:
    total, kept = float((s * s).sum()), float((s[:rank] * s[:rank]).sum())
    return ModuleFit(component, path, rank_before, rank, math.sqrt(total), math.sqrt(kept))


@dataclass
class FitReport:
    """Per-module fits and the overall retained Frobenius norm, sqrt(Σ kept² / Σ norm²)."""

    modules: list[ModuleFit] = field(default_factory=list)

    @property
    def retained(self) -> float:
        total = sum(m.norm**2 for m in self.modules)
        return math.sqrt(sum(m.kept**2 for m in self.modules) / total) if total > 0 else 1.0

    def as_dict(self) -> dict:
        return {"retained_fro": self.retained,
                "modules": [{"component": m.component, "module": m.path, "rank_before": m.rank_before,
                             "rank": m.rank, "norm": m.norm, "retained_fro": m.retained} for m in self.modules]}

    def summary(self) -> str:
        """One line: ranks before -> after, overall and worst retained norm."""
        if not self.modules:
            return "no modules"
        before = sorted({m.rank_before for m in self.modules})
        after = sorted({m.rank for m in self.modules})
        span = lambda r: str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}"  # noqa: E731
        worst = min(self.modules, key=lambda m: m.retained)
        return (f"{len(self.modules)} modules, rank {span(before)} -> {span(after)}; retained Frobenius norm "
                f"{100 * self.retained:.2f}% overall, lowest {100 * worst.retained:.2f}% "
                f"({worst.component}.{worst.path})")

    def lines(self) -> list[str]:
        """One line per module, for `--verbose`."""
        return [f"{m.component}.{m.path}: rank {m.rank_before} -> {m.rank}, retained {100 * m.retained:.2f}%"
                for m in self.modules]
