"""LyCORIS types whose change is built from the layer's own base weight W (read by `lycoris.py`):

- OFT: block-diagonal orthogonal rotations of W's output rows. `oft_blocks` (n × b × b, n·b = d_out)
  holds a raw block B; Q = B − Bᵀ is skew-symmetric and R = (I + Q)(I − Q)⁻¹ (Cayley) is orthogonal.
  Row block k of W becomes R_kᵀ · W_k; with `rescale` (d_out × 1…) each row is then scaled.
  `alpha` is no scale here but a constraint on Q: c = alpha · d_out, and Q is shrunk to norm c when
  it is longer (LyCORIS: only when ‖Q‖ > c, alpha 0 = none; kohya's `oft_unet_` files: always
  Q · min(‖Q‖, c)/‖Q‖, so alpha 0 means no rotation). LyCORIS' first OFT (`oft_diag`) stored R.
- BOFT: `oft_blocks` (m × n × b × b): m butterfly stages. Stage i pairs rows 2^i·b/2 apart, groups them
  in blocks of b and rotates each block by R (not Rᵀ); the stages are applied in order.
- GLoRA: ΔW = (W · a1 · a2 + b1 · b2) · alpha / r with a1 (d_in × r), a2 (r × d_in), b1 (d_out × r),
  b2 (r × d_in[·kh·kw]) (b's product may go through a CP core `bm`); r = a2's rows, alpha 0 = r.
  LyCORIS before 2.0 named the factors the other way round (its a1, a2, b1, b2 are r × d_in, d_in × r,
  r × d_in, d_out × r: today's a2, a1, b2, b1, so ΔW = W · a2 · a1 + b2 · b1 there); such files are
  read under today's names (`glora_current_names`).
- norm: ΔW = `w_norm`, Δbias = `b_norm`, for LayerNorm/GroupNorm weights (a full diff of 1-D weights).

For OFT and BOFT ΔW = OFT(W) − W, and weight m gives W + m · ΔW, as for every other type (ComfyUI's
and A1111's rule; for OFT it is also LyCORIS' and kohya's own, which move R towards I).
"""

from __future__ import annotations

import torch

from ..errors import ModelError
from .scratch import Scratch, work_tensor

KINDS = ("OFT", "BOFT", "GLoRA", "norm")
# The parts each type needs (one of each tuple).
NEEDS = {"OFT": [("oft_blocks", "oft_diag")], "BOFT": [("oft_blocks",)],
         "GLoRA": [("a1.weight",), ("a2.weight",), ("b1.weight",), ("b2.weight",)], "norm": [("w_norm",)]}


def blocks_problem(parts: dict) -> str | None:
    """'<part> holds ...' when a module's OFT blocks are not n × b × b or m × n × b × b."""
    for part in ("oft_blocks", "oft_diag"):
        blocks = parts.get(part)
        if blocks is not None and (blocks.ndim not in (3, 4) or blocks.shape[-1] != blocks.shape[-2]):
            return f"{part} holds {tuple(blocks.shape)} OFT blocks; OFT stores n × b × b, BOFT m × n × b × b"
    return None


# A pre-2.0 GLoRA module's parts under today's names: the two layouts differ only in the names.
_GLORA_BEFORE_2 = {"a1.weight": "a2.weight", "a2.weight": "a1.weight", "b1.weight": "b2.weight",
                   "b2.weight": "b1.weight"}


def glora_layouts(parts: dict) -> set[str]:
    """The GLoRA layouts whose shapes `parts` fit: "2.0+" and/or "pre-2.0" (only 1×1 kernels, no CP
    core). A module on a square layer fits both, read with r and d_in swapped."""
    a1, a2, b1, b2 = (tuple(parts[f"{n}.weight"].shape) for n in ("a1", "a2", "b1", "b2"))
    if min(map(len, (a1, a2, b1, b2))) < 2 or a1[:2] != a2[1::-1] or any(d != 1 for s in (a1, a2, b1) for d in s[2:]):
        return set()
    fits = set()
    if b1[1] == a1[1] and b2[:2] == a2[:2]:  # a1 d_in×r, a2 r×d_in, b1 d_out×r, b2 r×d_in
        fits.add("2.0+")
    if b1[:2] == a1[:2] and b2[1] == a1[0] and "bm.weight" not in parts and all(d == 1 for d in b2[2:]):
        fits.add("pre-2.0")  # a1 r×d_in, a2 d_in×r, b1 r×d_in, b2 d_out×r
    return fits


def glora_current_names(path, modules: list) -> None:
    """Rename the parts of a file's pre-2.0 GLoRA `modules` (LycorisModules) to today's names, in place.
    A file is written by one LyCORIS version, so modules whose shapes fit both layouts (square layers)
    follow those that fit one; when none does, the factors' smaller side is the rank (a guess that
    cannot go unnoticed: the other reading needs a layer of another width, which the shape check
    finds). A module whose rank equals its square layer's width cannot be told, and is refused."""
    fits = {m.name: glora_layouts(m.parts) for m in modules}
    sure = {layout for f in fits.values() if len(f) == 1 for layout in f}
    if len(sure) > 1:
        old = next(n for n, f in fits.items() if f == {"pre-2.0"})
        new = next(n for n, f in fits.items() if f == {"2.0+"})
        raise ModelError(f"{path}: its GLoRA modules mix LyCORIS' pre-2.0 layout ({old}: a1 r×d_in, a2 d_in×r) "
                         f"and the 2.0+ one ({new}: a1 d_in×r, a2 r×d_in); a file holds one, so it is damaged")
    for module in modules:
        layouts = fits[module.name]
        if len(layouts) == 2:
            x, y = module.parts["a1.weight"].shape[:2]
            if not sure and x == y:
                raise ModelError(f"{path}: {module.name} is a GLoRA module of rank {x} on a {x}×{x} layer, whose shapes "
                                 "fit both LyCORIS' GLoRA layouts (2.0+: ΔW = W·a1·a2 + b1·b2; pre-2.0: W·a2·a1 + "
                                 "b2·b1), and no other module tells which one the file uses")
            layouts = sure or {"pre-2.0" if x < y else "2.0+"}
        if layouts == {"pre-2.0"}:
            module.parts = {_GLORA_BEFORE_2.get(k, k): v for k, v in module.parts.items()}


def _skew(blocks: torch.Tensor, constraint: float, kohya: bool) -> torch.Tensor:
    """Q = B − Bᵀ over the last two axes, shrunk to the constraint's norm (see the module docstring)."""
    q = blocks - blocks.transpose(-1, -2)
    if kohya:  # sd-scripts shrinks always, with its own guard against a zero norm
        norm = q.norm()
        return q * ((torch.clamp(norm, max=constraint) + 1e-8) / (norm + 1e-8))
    if constraint > 0:
        norm = q.norm() + 1e-8
        if norm > constraint:
            return q * (constraint / norm)
    return q


def cayley(blocks: torch.Tensor, constraint: float = 0.0, kohya: bool = False) -> torch.Tensor:
    """R = (I + Q)(I − Q)⁻¹ for every b × b block of `blocks` (any leading axes)."""
    q = _skew(blocks, constraint, kohya)
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    return torch.linalg.solve((eye - q).transpose(-1, -2), (eye + q).transpose(-1, -2)).transpose(-1, -2)


def oft_weight(weight: torch.Tensor, rotations: torch.Tensor, scratch: Scratch | None = None) -> torch.Tensor:
    """W with row block k replaced by R_kᵀ · W_k (rotations: n × b × b, n·b = d_out), in `scratch`'s
    buffer "a" when given."""
    n, b, _ = rotations.shape
    rows = weight.reshape(n, b, -1)
    out = work_tensor(scratch, "a", rows.shape, rows.dtype, rows.device)
    return torch.matmul(rotations.transpose(1, 2), rows, out=out).reshape(weight.shape)


def boft_weight(weight: torch.Tensor, rotations: torch.Tensor, scratch: Scratch | None = None) -> torch.Tensor:
    """W through the butterfly stages (rotations: m × n × b × b, n·b = d_out), in `scratch`'s buffer
    "a" or "b" when given (the stages take turns in them)."""
    stages, n, b, _ = rotations.shape
    rows = weight.reshape(weight.shape[0], -1)
    shape, rest = rows.shape, rows.shape[1]

    def buffer(slot):
        return work_tensor(scratch, slot, shape, rows.dtype, rows.device)

    # stage i: rows (c, g, j) -> (c, j, g), so rows 2^i·b/2 apart become neighbours in blocks of b;
    # undoing one stage's order and taking the next one's is a single gather
    back = None
    for i in range(stages):
        stride = 2 ** i * (b // 2)
        order = torch.arange(shape[0], device=rows.device).reshape(-1, 2, stride).transpose(1, 2).flatten()
        gathered = torch.index_select(rows, 0, order if back is None else back[order], out=buffer("b"))
        rows = torch.matmul(rotations[i], gathered.reshape(n, b, rest), out=buffer("a").reshape(n, b, rest))
        rows = rows.reshape(shape)
        back = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    return torch.index_select(rows, 0, back, out=buffer("b")).reshape(weight.shape)


def glora_delta(weight: torch.Tensor, parts: dict, dtype: torch.dtype, scale: float,
                scratch: Scratch | None = None) -> torch.Tensor:
    """(W · a1 · a2 + b1 · b2) · scale in W's shape, in `scratch`'s buffer "a" when given."""
    def g(part):
        return parts[part].to(weight.device, dtype)

    a1, a2 = g("a1.weight").flatten(1), g("a2.weight").flatten(1)
    b1, b2 = g("b1.weight").flatten(1), g("b2.weight")
    out_dim, in_dim = weight.shape[:2]
    taps = weight[0, 0].numel()  # 1 for a linear layer
    if "bm.weight" in parts:
        product = torch.einsum("ijhw,pi,jq->pqhw", g("bm.weight"), b1, b2.flatten(1)).reshape(out_dim, in_dim * taps)
        product = work_tensor(scratch, "a", product.shape, dtype, weight.device).copy_(product)
    else:
        product = torch.matmul(b1, b2.flatten(1), out=work_tensor(scratch, "a", (out_dim, in_dim * taps), dtype,
                                                                    weight.device))
    # W · a1 · a2 mixes the input channels within each kernel tap. W·a1 is small (d_out × r × taps);
    # its product with a2 is one matrix product with the taps as rows, added back tap by tap
    w_a1 = torch.matmul(a1.T, weight.to(dtype).reshape(out_dim, in_dim, taps))
    through_a = torch.matmul(w_a1.transpose(1, 2).reshape(out_dim * taps, -1), a2,
                             out=work_tensor(scratch, "b", (out_dim * taps, in_dim), dtype, weight.device))
    product = product.view(out_dim, in_dim, taps).add_(through_a.view(out_dim, taps, in_dim).transpose(1, 2))
    return product.mul_(scale).reshape(weight.shape)


def ortho_delta(module, weight: torch.Tensor, dtype: torch.dtype, scratch: Scratch | None = None) -> torch.Tensor:
    """ΔW at weight 1 of an OFT/BOFT/GLoRA/norm `module` (a LycorisModule) for the layer `weight`: a
    tensor of its own, or (OFT, BOFT, GLoRA) one of `scratch`'s buffers, overwritten by the next module."""
    problem = shape_problem(module, tuple(weight.shape))
    if problem:
        raise ModelError(f"{module.name} ({module.kind}) {problem}; it was made for another model")
    p = module.parts
    if module.kind == "norm":
        return p["w_norm"].to(weight.device, dtype).reshape(weight.shape).clone()
    if module.kind == "GLoRA":
        return glora_delta(weight, p, dtype, module.scale, scratch)
    w = weight.to(dtype)
    if "oft_diag" in p:  # LyCORIS' first OFT stored the rotations themselves
        merged = oft_weight(w, p["oft_diag"].to(weight.device, dtype), scratch)
    else:
        constraint = (module.alpha or 0.0) * weight.shape[0]
        rotations = cayley(p["oft_blocks"].to(weight.device, dtype), constraint, module.name.startswith("oft_unet_"))
        merged = (oft_weight if module.kind == "OFT" else boft_weight)(w, rotations, scratch)
    if "rescale" in p:
        merged.mul_(p["rescale"].to(weight.device, dtype).reshape(-1, *[1] * (w.ndim - 1)))
    return merged.sub_(w)


def out_features(module) -> int:
    """d_out as the parts tell it."""
    p = module.parts
    if module.kind == "norm":
        return p["w_norm"].numel()
    if module.kind == "GLoRA":
        return p["b1.weight"].shape[0]
    blocks = p["oft_diag"] if "oft_diag" in p else p["oft_blocks"]
    return blocks.shape[-3] * blocks.shape[-1]


def shape_problem(module, shape: tuple[int, ...]) -> str | None:
    """Why `module` cannot change a layer weight of `shape` (None when it fits); reads shapes only."""
    p = module.parts
    if module.kind == "norm":
        if len(shape) != 1 or p["w_norm"].numel() != shape[0] or ("b_norm" in p and p["b_norm"].numel() != shape[0]):
            return f"changes {p['w_norm'].numel()} norm weights but the layer's weight is {shape}"
        return None
    if len(shape) < 2:
        return f"changes a linear or conv weight but the layer's weight is {shape}"
    out_dim, in_dim = shape[:2]
    if module.kind == "GLoRA":
        a1, a2, b1, b2 = (tuple(p[f"{n}.weight"].shape) for n in ("a1", "a2", "b1", "b2"))
        r = a2[0]
        taps = 1 if len(shape) == 2 else shape[2] * shape[3]
        b2_in = b2[1] if "bm.weight" in p else int(torch.Size(b2[1:]).numel())
        want_b2 = in_dim if "bm.weight" in p else in_dim * taps
        if a1[:2] != (in_dim, r) or a2[1] != in_dim or b1[0] != out_dim or b1[1] != b2[0] or b2_in != want_b2:
            return (f"has a1 {a1}, a2 {a2}, b1 {b1}, b2 {b2}, which do not make a change of the layer's {shape} "
                    "weight (LyCORIS 2+ GLoRA: a1 d_in×r, a2 r×d_in, b1 d_out×r, b2 r×d_in)")
        return None
    if out_features(module) != out_dim:
        return f"rotates {out_features(module)} output rows but the layer's weight is {shape}"
    blocks = p["oft_diag"] if "oft_diag" in p else p["oft_blocks"]
    if module.kind == "BOFT":
        stages, n, b = blocks.shape[:3]
        if b % 2 or n & (n - 1) or 2 ** (stages - 1) * b > n * b:
            return f"has butterfly blocks {tuple(blocks.shape)} that no BOFT of {out_dim} rows has"
    if "rescale" in p and p["rescale"].numel() != out_dim:
        return f"has {p['rescale'].numel()} rescale values for {out_dim} output rows"
    return None
