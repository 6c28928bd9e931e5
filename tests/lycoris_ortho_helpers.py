"""OFT, BOFT, GLoRA and norm-layer modules for the tiny pipelines, with the parts LyCORIS (and kohya's
`networks.oft`) write, and each module's ΔW computed here from the published formulas: whole d × d
rotation matrices (block-diagonal, butterfly permutations built row by row), an explicit inverse,
GLoRA one kernel tap at a time — independently of the reader under test, in float64."""

from __future__ import annotations

import torch


def _rand(g, *shape, std=0.2):
    """float64 values that float32 holds exactly, so the file (float32) and the reference agree."""
    return (torch.randn(*shape, generator=g) * std).float().double()


def cayley_by_hand(raw: torch.Tensor, constraint: float = 0.0, kohya: bool = False) -> torch.Tensor:
    """R = (I + Q)(I − Q)⁻¹ per block, Q = raw − rawᵀ shrunk to norm `constraint` (LyCORIS: when
    longer, 0 = never; kohya: always to min(norm, constraint))."""
    q = raw - raw.transpose(-1, -2)
    norm = q.norm().item()
    if kohya:
        q = q * (min(norm, constraint) / norm)
    elif constraint > 0 and norm > constraint:
        q = q * (constraint / norm)
    eye = torch.eye(raw.shape[-1], dtype=torch.float64)
    return (eye + q) @ torch.linalg.inv(eye - q)


def _butterfly_permutation(d: int, stride: int) -> torch.Tensor:
    """P with (P·W) row `new` = W row `old`: rows `stride` apart become neighbours."""
    p = torch.zeros(d, d, dtype=torch.float64)
    for new in range(d):
        c, rest = divmod(new, 2 * stride)
        j, g = divmod(rest, 2)
        p[new, c * 2 * stride + g * stride + j] = 1
    return p


def oft_parts(kind: str, weight: torch.Tensor, g, blocks: int = 4, constraint: float = 0.0):
    """({part: tensor}, ΔW at weight 1, bias change or None) for one layer of `weight`'s shape.
    Kinds: oft, oft_rescaled, oft_diag (R stored), kohya_oft, boft, boft_rescaled, glora, glora_cp, norm."""
    w = weight.double()
    shape = tuple(w.shape)
    if kind == "norm":
        t = {"w_norm": _rand(g, shape[0]), "b_norm": _rand(g, shape[0])}
        return t, t["w_norm"], t["b_norm"]
    out_dim, in_dim = shape[:2]
    flat = w.reshape(out_dim, -1)
    if kind.startswith("glora"):
        r = 4
        t = {"a1.weight": _rand(g, in_dim, r), "a2.weight": _rand(g, r, in_dim), "b1.weight": _rand(g, out_dim, r),
             "alpha": torch.tensor(2.0)}
        through_a = torch.zeros(shape, dtype=torch.float64)
        taps = [()] if len(shape) == 2 else [(h, v) for h in range(shape[2]) for v in range(shape[3])]
        for tap in taps:  # W · a1 · a2 mixes input channels within each kernel tap
            index = (slice(None), slice(None), *tap)
            through_a[index] = w[index] @ t["a1.weight"] @ t["a2.weight"]
        if kind == "glora_cp":  # b through a CP core: b1 · bm[:, :, tap] · b2 per tap
            t["b2.weight"], t["bm.weight"] = _rand(g, r, in_dim, 1, 1), _rand(g, r, r, *shape[2:])
            b_part = torch.zeros(shape, dtype=torch.float64)
            for h, v in taps:
                b_part[:, :, h, v] = t["b1.weight"] @ t["bm.weight"][:, :, h, v] @ t["b2.weight"].flatten(1)
        else:
            t["b2.weight"] = _rand(g, r, in_dim, *shape[2:])
            b_part = (t["b1.weight"] @ t["b2.weight"].flatten(1)).reshape(shape)
        if len(shape) == 4:  # LyCORIS stores a conv's 1×1 factors as conv weights
            t["a1.weight"], t["a2.weight"], t["b1.weight"] = (t[k][:, :, None, None] for k in ("a1.weight", "a2.weight", "b1.weight"))
        return t, (through_a + b_part) * (2.0 / r), None
    if kind.startswith("boft"):
        b = 2 * blocks if kind == "boft" else blocks
        n = out_dim // b
        stages = n.bit_length()  # LyCORIS' most stages: 1 + log2(n)
        raw = _rand(g, stages, n, b, b, std=0.1)
        t = {"oft_blocks": raw, "alpha": torch.tensor(constraint)}
        rotations = cayley_by_hand(raw, constraint * out_dim)  # the constraint holds for all stages together
        merged = flat
        for i in range(stages):
            rotation = torch.block_diag(*rotations[i])
            p = _butterfly_permutation(out_dim, 2 ** i * (b // 2))
            merged = p.T @ rotation @ p @ merged
    else:
        n = blocks
        b = out_dim // n
        if kind == "oft_diag":  # orthogonal blocks stored as they are
            rotations = torch.linalg.qr(torch.randn(n, b, b, generator=g, dtype=torch.float64))[0].float().double()
            t = {"oft_diag": rotations}
        else:
            raw = _rand(g, n, b, b, std=0.1)
            t = {"oft_blocks": raw, "alpha": torch.tensor(constraint)}
            rotations = cayley_by_hand(raw, constraint * out_dim, kohya=kind == "kohya_oft")
        merged = torch.block_diag(*rotations).T @ flat
    if kind.endswith("rescaled"):
        t["rescale"] = (1 + _rand(g, out_dim, *[1] * (len(shape) - 1), std=0.1)).float().double()
        merged = merged * t["rescale"].reshape(-1, 1)
    return t, (merged - flat).reshape(shape), None


def write_ortho(pipe, variant: str, out, layers, seed: int = 0, kohya_oft: bool = False) -> dict:
    """Write a file adapting `layers` [(component, module path, kind)] of `pipe` (kohya_oft: kohya's
    `networks.oft` layout, `oft_unet_` names); returns {(component, path): (ΔW, bias change, None)}.
    Rescaled and kohya OFT/BOFT get an alpha (constraint) small enough to shrink Q."""
    import safetensors.torch
    from lycoris_helpers import get_layer, kohya_name

    g = torch.Generator().manual_seed(seed)
    tensors, reference = {}, {}
    for component, path, kind in layers:
        constraint = 2e-3 if kind.endswith("rescaled") or kind == "kohya_oft" else 0.0
        constraint = torch.tensor(constraint, dtype=torch.float32).item()  # as the file holds it
        parts, delta, bias = oft_parts(kind, get_layer(pipe, component, path).weight.detach(), g, constraint=constraint)
        name = kohya_name(variant, component, path)
        if kohya_oft:
            name = name.replace("lora_unet_", "oft_unet_", 1)
        tensors.update({f"{name}.{part}": t.float().contiguous() for part, t in parts.items()})
        reference[(component, path)] = (delta, bias, None)
    module = "networks.oft" if kohya_oft else "lycoris.kohya"
    safetensors.torch.save_file(tensors, str(out), metadata={"ss_network_module": module})
    return reference
