"""Small LyCORIS files for the tiny pipelines, written with the key names LyCORIS writes, and each
module's ΔW computed here by hand (loops over kernel taps and Kronecker blocks), independently of
the reader under test."""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch

from lora_trainer.export.layouts import KOHYA_PREFIXES, canonical_path
from lora_trainer.export.sdxl_names import ldm_from_diffusers


def kohya_name(variant: str, component: str, path: str) -> str:
    spelled = canonical_path(component, path)
    if component == "unet" and variant == "sdxl":
        spelled = ldm_from_diffusers(spelled)
    return f"{KOHYA_PREFIXES[variant][component]}_{spelled.replace('.', '_')}"


def get_layer(pipe, component: str, path: str) -> torch.nn.Module:
    """The layer at `path`; CLIP models with a `text_model` (SDXL's second encoder) nest it there."""
    model = getattr(pipe, component)
    try:
        return model.get_submodule(path)
    except AttributeError:
        return model.get_submodule(f"text_model.{path}")


def _cp_by_hand(core, a, b):
    """core (r1, r2, kh, kw), a (r1, out), b (r2, in) -> (out, in, kh, kw), one kernel tap at a time."""
    kh, kw = core.shape[2:]
    out = torch.zeros(a.shape[1], b.shape[1], kh, kw, dtype=torch.float64)
    for h in range(kh):
        for w in range(kw):
            out[:, :, h, w] = a.T @ core[:, :, h, w] @ b
    return out


def _kron_by_hand(w1, w2):
    """The Kronecker product built block by block: block (i, j) is w1[i, j] · w2."""
    rows, cols = w2.shape[0], w2.shape[1]
    out = torch.zeros(w1.shape[0] * rows, w1.shape[1] * cols, *w2.shape[2:], dtype=torch.float64)
    for i in range(w1.shape[0]):
        for j in range(w1.shape[1]):
            out[i * rows:(i + 1) * rows, j * cols:(j + 1) * cols] = w1[i, j] * w2
    return out


def _rand(g, *shape, std=0.2):
    """float64 values that float32 holds exactly, so the file (float32) and the reference agree."""
    return (torch.randn(*shape, generator=g) * std).double()


def module_tensors(kind: str, weight: torch.Tensor, g, rank: int = 4, alpha: float = 2.0):
    """({part: tensor}, ΔW at weight 1, bias change or None) for one layer of `weight`'s shape."""
    shape = tuple(weight.shape)
    out_dim, in_dim = shape[:2]
    k = shape[2:]
    flat_in = in_dim * (k[0] * k[1] if k else 1)
    scale = alpha / rank
    a = torch.tensor(alpha)
    if kind == "loha":
        t = {"hada_w1_a": _rand(g, out_dim, rank), "hada_w1_b": _rand(g, rank, flat_in),
             "hada_w2_a": _rand(g, out_dim, rank), "hada_w2_b": _rand(g, rank, flat_in), "alpha": a}
        delta = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * scale
        return t, delta.reshape(shape), None
    if kind == "loha_cp":  # a conv with CP cores
        t = {"hada_t1": _rand(g, rank, rank, *k), "hada_w1_a": _rand(g, rank, out_dim), "hada_w1_b": _rand(g, rank, in_dim),
             "hada_t2": _rand(g, rank, rank, *k), "hada_w2_a": _rand(g, rank, out_dim), "hada_w2_b": _rand(g, rank, in_dim),
             "alpha": a}
        delta = (_cp_by_hand(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"])
                 * _cp_by_hand(t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"]) * scale)
        return t, delta, None
    if kind == "loha_dora":  # input-axis dora_scale, as LyCORIS writes it for LoHa/LoKr
        t, delta, _ = module_tensors("loha", weight, g, rank, alpha)
        t["dora_scale"] = (weight.double().transpose(0, 1).reshape(in_dim, -1).norm(dim=1)
                           * (1 + _rand(g, in_dim))).reshape(1, in_dim, *[1] * len(k)).float().double()
        return t, delta, None
    if kind == "lora_dora":  # a plain LoRA module with an input-axis dora_scale (older LyCORIS LoCon)
        t, delta, _ = module_tensors("lora", weight, g, rank, alpha)
        t["dora_scale"] = (weight.double().transpose(0, 1).reshape(in_dim, -1).norm(dim=1)
                           * (1 + _rand(g, in_dim))).reshape(1, in_dim, *[1] * len(k)).float().double()
        return t, delta, None
    if kind in ("lokr", "lokr_full", "lokr_cp"):
        a1, c1 = 2, 2  # w1 is (2, 2): out = 2·b, in = 2·d
        b_out, d_in = out_dim // a1, in_dim // c1
        if kind == "lokr_cp":  # low-rank w1, CP-decomposed conv w2
            t = {"lokr_w1_a": _rand(g, a1, 1), "lokr_w1_b": _rand(g, 1, c1), "lokr_t2": _rand(g, rank, rank, *k),
                 "lokr_w2_a": _rand(g, rank, b_out), "lokr_w2_b": _rand(g, rank, d_in), "alpha": a}
            w1 = t["lokr_w1_a"] @ t["lokr_w1_b"]
            w2 = _cp_by_hand(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
            return t, _kron_by_hand(w1, w2) * scale, None
        t = {"lokr_w1": _rand(g, a1, c1), "alpha": a}
        if kind == "lokr_full":  # both factors whole: scale 1 whatever alpha says
            t["lokr_w2"] = _rand(g, b_out, d_in, *k)
            return t, _kron_by_hand(t["lokr_w1"], t["lokr_w2"]), None
        t["lokr_w2_a"], t["lokr_w2_b"] = _rand(g, b_out, rank), _rand(g, rank, d_in * (k[0] * k[1] if k else 1))
        w2 = (t["lokr_w2_a"] @ t["lokr_w2_b"]).reshape(b_out, d_in, *k)
        return t, _kron_by_hand(t["lokr_w1"], w2) * scale, None
    if kind == "full_nobias":
        t = {"diff": _rand(g, *shape, std=0.02)}
        return t, t["diff"], None
    if kind == "full":
        t = {"diff": _rand(g, *shape, std=0.02), "diff_b": _rand(g, out_dim, std=0.02)}
        return t, t["diff"], t["diff_b"]
    if kind == "ia3":
        t = {"weight": _rand(g, out_dim), "on_input": torch.tensor(0)}
        return t, weight.double() * t["weight"].reshape(-1, *[1] * (len(shape) - 1)), None
    if kind == "locon_cp":
        t = {"lora_down.weight": _rand(g, rank, in_dim, 1, 1), "lora_mid.weight": _rand(g, rank, rank, *k),
             "lora_up.weight": _rand(g, out_dim, rank, 1, 1), "alpha": a}
        delta = _cp_by_hand(t["lora_mid.weight"], t["lora_up.weight"].flatten(1).T, t["lora_down.weight"].flatten(1))
        return t, delta * scale, None
    if kind == "lora":
        t = {"lora_down.weight": _rand(g, rank, in_dim, *k), "lora_up.weight": _rand(g, out_dim, rank, *[1] * len(k)),
             "alpha": a}
        return t, (t["lora_up.weight"].flatten(1) @ t["lora_down.weight"].flatten(1)).reshape(shape) * scale, None
    raise ValueError(kind)


def dora_merged(weight, delta, dora_scale, m):
    """W + m·(W_d − W), W_d = dora_scale · (W + ΔW) / ‖W + ΔW‖ per input column."""
    w = weight.double()
    combined = w + delta
    norm = combined.transpose(0, 1).reshape(combined.shape[1], -1).norm(dim=1)
    view = (1, -1) + (1,) * (w.ndim - 2)
    decomposed = combined * dora_scale.double().reshape(view) / (norm.reshape(view) + torch.finfo(torch.float32).eps)
    return w + m * (decomposed - w)


def write_lycoris(pipe, variant: str, out: Path, layers, seed: int = 0, extra: dict | None = None):
    """Write a LyCORIS file adapting `layers` [(component, module path, kind)] of `pipe`; returns
    {(component, path): (ΔW, bias change, dora_scale)} as computed by hand (float64)."""
    g = torch.Generator().manual_seed(seed)
    tensors, reference = {}, {}
    for component, path, kind in layers:
        layer = get_layer(pipe, component, path)
        parts, delta, bias = module_tensors(kind, layer.weight.detach(), g)
        name = kohya_name(variant, component, path)
        for part, tensor in parts.items():
            tensors[f"{name}.{part}"] = tensor.float() if tensor.is_floating_point() else tensor
        reference[(component, path)] = (delta, bias, parts.get("dora_scale"))
    tensors.update(extra or {})
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(out),
                                metadata={"ss_network_module": "lycoris.kohya"})
    return reference


@torch.no_grad()
def merge_by_hand(pipe, reference, m: float) -> None:
    """Put W + m·ΔW (DoRA: W + m·(W_d − W)) and b + m·Δb into `pipe`, from the hand-computed reference."""
    for (component, path), (delta, bias, dora_scale) in reference.items():
        layer = get_layer(pipe, component, path)
        layer = getattr(layer, "base_layer", layer)
        if dora_scale is None:
            new = layer.weight.double() + m * delta
        else:
            new = dora_merged(layer.weight, delta, dora_scale, m)
        layer.weight.copy_(new.to(layer.weight.dtype))
        if bias is not None:
            layer.bias.copy_((layer.bias.double() + m * bias).to(layer.bias.dtype))
