"""A LyCORIS file (LoHa, LoKr, full, LoCon with CP cores) as a plain LoRA: each module's ΔW, then its
best rank-r part by SVD (`lowrank.py`), so tools and consumers that read only LoRA can use it.
`lora-trainer resize` does this when its input is a LyCORIS file, and `merge-loras` (at each ΔW's
own rank, exactly) before it merges one.

ΔW of (IA)^3, OFT, BOFT, GLoRA, norm and DoRA modules depends on the base weights, and a LoRA
cannot hold `diff_b`'s bias change: such modules are refused by name. LoHa and LoKr store a conv's
ΔW flattened to d_out × (d_in·kh·kw) unless they have a CP core; the kernel is then told from the
layer's name (SD UNet 3×3 convs: resnet conv1/conv2, samplers, conv_in/out; SD 1.x proj_in/out and
conv_shortcut are 1×1 convs).
"""

from __future__ import annotations

import collections

import torch

from ..errors import ModelError
from .adapter import Adapter, carried_metadata, module_from_product
from .lowrank import FitReport, check_dynamic, choose_rank, fit, svd_of_matrix, truncated_factors
from .lycoris import LycorisAdapter, LycorisModule
from .lycoris_ortho import KINDS as BASE_DEPENDENT

_CONV_3X3 = ("conv1", "conv2", ".conv", "conv_in", "conv_out")


def layer_shape(component: str, path: str, module: LycorisModule, base: str) -> tuple[int, ...]:
    """The shape of the layer weight `module` changes: from the factors when they carry the kernel,
    else from the layer's name."""
    product_shape = tuple(module._product(torch.float32).shape)
    if len(product_shape) == 4 or module.kind == "full":
        return product_shape
    out, n = product_shape
    if component == "unet" and path.endswith(_CONV_3X3):
        if n % 9:
            raise ModelError(f"{module.name} ({module.kind}) changes a 3x3 conv but holds {n} inputs, not a multiple "
                             "of 9; is it for another model?")
        return (out, n // 9, 3, 3)
    if component == "unet" and (path.endswith("conv_shortcut") or (base == "sd15" and path.endswith(("proj_in", "proj_out")))):
        return (out, n, 1, 1)
    return (out, n)


def why_not_lora(module) -> str | None:
    """Why no LoRA file can hold `module`'s change (None: one can, by SVD of its ΔW)."""
    return ("is (IA)^3, whose change scales the base weights" if module.kind == "IA3" else
            "changes a norm layer's 1-D weight (w_norm), which has no low-rank factors" if module.kind == "norm" else
            f"is {module.kind}, whose change is built from the base weights" if module.kind in BASE_DEPENDENT else
            "has a dora_scale, whose change depends on the base weights" if module.dora_scale is not None else
            "changes the bias (diff_b), which a LoRA cannot hold" if module.bias_delta() is not None else None)


def convert_refusal(path, adapter: LycorisAdapter, to: str) -> ModelError:
    """`convert`'s one-line answer for a LyCORIS file: it rewrites LoRA files only, so name the
    file's types and the command that does handle it."""
    kinds = ", ".join(f"{kind} {n}" for kind, n in adapter.kinds.items())
    blocked = next(((m.name, why) for _, _, m in adapter.items() if (why := why_not_lora(m))), None)
    if blocked:
        return ModelError(f"{path}: a LyCORIS file ({kinds}) and convert rewrites LoRA files only; {blocked[0]} "
                          f"{blocked[1]}: load it with infer.py --lora, or bake it into the base with "
                          "`lora-trainer merge`")
    return ModelError(f"{path}: a LyCORIS file ({kinds}) and convert rewrites LoRA files only; make a LoRA of it "
                      f"with `lora-trainer resize {path} OUT.safetensors --rank R --to {to}` (by SVD, reporting "
                      "what each rank keeps)")


def lycoris_to_lora(adapter: LycorisAdapter, rank: int | None, *, conv_rank: int | None = None,
                    dynamic: str | None = None, param: float | None = None) -> tuple[Adapter, FitReport]:
    """A LoRA `Adapter` whose modules are the best rank-`rank` (3×3 convs: `conv_rank`) parts of
    the LyCORIS modules' ΔW, and the report of the Frobenius norm each keeps. `rank` None keeps each
    ΔW at its own rank: the LoRA then changes every layer exactly as the file does (merge-loras)."""
    if (rank is not None and rank < 1) or (conv_rank is not None and conv_rank < 1):
        raise ModelError(f"--rank {rank} / --conv-rank {conv_rank} must be integers >= 1")
    check_dynamic(dynamic, param)
    for component, path, module in adapter.items():
        why = why_not_lora(module)
        if why:
            raise ModelError(f"{module.name} {why}; it cannot become a LoRA without the base (load the file with "
                             "infer.py or bake it with `lora-trainer merge` instead)")
    conv_rank = rank if conv_rank is None else conv_rank
    report = FitReport()
    parts = []
    for component, path, module in adapter.items():
        shape = layer_shape(component, path, module, adapter.base)
        delta = module.delta(torch.empty(shape))
        u, s, vh = svd_of_matrix(delta)
        is_3x3 = len(shape) == 4 and shape[2:] != (1, 1)
        before = int((s > s[0] * 1e-9).sum()) if len(s) and s[0] > 0 else 0  # ΔW's own rank (LoHa's can reach r²)
        keep = max(before, 1) if rank is None else choose_rank(s, conv_rank if is_3x3 else rank, dynamic, param)
        report.modules.append(fit(component, path, s, before, keep))
        parts.append((component, path, shape, truncated_factors(u, s, vh, keep)))

    common_rank = collections.Counter(f.rank for f in report.modules).most_common(1)[0][0]
    alpha = float(common_rank)  # scale 1 for the most common rank; the factors carry the rest
    modules: dict[str, dict] = {}
    for component, path, shape, (left, right) in parts:
        modules.setdefault(component, {})[path] = module_from_product(left, right, shape, alpha)

    metadata = {k: v for k, v in carried_metadata(adapter.metadata).items() if k != "ss_network_args"}
    kinds = "/".join(adapter.kinds)
    limit = "at each module's own rank" if rank is None else f"at most rank {rank}"
    note = f"converted from LyCORIS {kinds} by SVD, {limit}; retained Frobenius norm {100 * report.retained:.2f}%"
    metadata.update({
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(common_rank) if len({f.rank for f in report.modules}) == 1 else "Dynamic",
        "ss_network_alpha": str(alpha),
        "ss_training_comment": note,
    })
    return Adapter(modules, adapter.base, metadata, "kohya", adapter.base_reason), report
