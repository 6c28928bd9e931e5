"""LyCORIS adapter files (kohya key layout: `lora_unet_...`, `lora_te_...`, `lora_te1_/lora_te2_`,
kohya's OFT `oft_unet_...`, or LyCORIS' own `lycoris_<module path>`) read as one weight change ΔW per
layer, with the same shape as the layer's weight:

- LoRA / LoCon: ΔW = (alpha / r) · up @ down; with a CP core `lora_mid` (r × r × kh × kw) the up and
  down 1×1 factors wrap the core: ΔW[o, i, h, w] = Σ up[o, a] · mid[a, b, h, w] · down[b, i].
- LoHa: ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b) · alpha / r, r = rank of w1_b; with CP cores
  `hada_t1`/`hada_t2` each factor is rebuilt as above (w*_a, w*_b are then r × d_out, r × d_in).
- LoKr: ΔW = kron(w1, w2), each factor whole (`lokr_w1`) or a low-rank pair (`lokr_w1_a @ lokr_w1_b`;
  w2 may have a CP core `lokr_t2`). alpha / r applies only when a factor is low-rank (r = the rank
  of w2's pair, else w1's); with two whole factors the scale is 1.
- full: ΔW = `diff`, and the bias changes by `diff_b`.
- (IA)^3: a per-channel gain g (`weight`, on the input axis when `on_input` is 1, else the output
  axis): ΔW = W ⊙ g, so W' = W ⊙ (1 + m·g) at weight m. The bias is not scaled.
- OFT, BOFT, GLoRA and norm-layer diffs, built from the base weight: see `lycoris_ortho.py`.
- DoRA (`dora_scale` beside LoRA, LoHa, LoKr or full): W_d = dora_scale · (W + ΔW) / ‖W + ΔW‖, the
  norm per output row or per input column (whichever axis `dora_scale` lies on); at weight m,
  W' = W + m · (W_d − W), so weight 0 is the base and weight 1 the file's own weight.

A file is read as LyCORIS when a key names a part that a plain LoRA/DoRA file never has, or when a
LoRA file's `dora_scale` lies on the input axis (which peft cannot hold); every other LoRA file
keeps the LoRA reader (`adapter.py`), bit for bit.
"""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

import torch

from ..errors import ModelError, first_line
from . import lycoris_ortho as ortho
from .files import load_adapter
from .lycoris_names import (_PREFIX_NAMES, _READS, LYCORIS_PREFIX, PARTS, PREFIXES, SHARED, UNSUPPORTED,
                            component_of, component_prefix, is_lycoris, module_path, needs_lycoris_reader)
from .scratch import Scratch, work_tensor


def _tucker(core: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A CP-decomposed conv weight: core (r1 × r2 × kh × kw) with a (r1 × d_out), b (r2 × d_in)."""
    return torch.einsum("ijhw,ip,jq->pqhw", core, a, b)


@dataclass
class LycorisModule:
    """One layer's parts as the file stores them (cast to the working dtype when ΔW is built)."""

    name: str  # the kohya name, e.g. lora_unet_down_blocks_0_attentions_0_proj_in
    kind: str  # "LoRA", "LoHa", "LoKr", "full", "IA3", "OFT", "BOFT", "GLoRA", "norm"
    parts: dict[str, torch.Tensor]
    alpha: float | None = None
    dora_scale: torch.Tensor | None = None

    def _get(self, part: str, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
        return self.parts[part].to(device, dtype)

    @property
    def rank(self) -> int | None:
        """The rank of the low-rank factors (None for full, (IA)^3, OFT, BOFT, norm and LoKr with two
        whole factors)."""
        p = self.parts
        if self.kind == "GLoRA":
            return p["a2.weight"].shape[0]
        if self.kind == "LoRA":
            return p["lora_down.weight"].shape[0]
        if self.kind == "LoHa":
            return p["hada_w1_b"].shape[0]
        if self.kind == "LoKr":
            if "lokr_w2_b" in p:
                return p["lokr_w2_b"].shape[0]
            return p["lokr_w1_b"].shape[0] if "lokr_w1_b" in p else None
        return None

    @property
    def scale(self) -> float:
        """alpha / rank where the type has one (a file without alpha: 1; GLoRA's alpha 0 too). OFT's
        and BOFT's alpha is a constraint, not a scale."""
        rank = self.rank
        if self.kind in ("full", "IA3") or rank is None or not self.alpha:
            return 1.0
        return self.alpha / rank

    @property
    def parameters(self) -> int:
        return sum(t.numel() for k, t in self.parts.items() if k != "on_input") + \
            (self.dora_scale.numel() if self.dora_scale is not None else 0)

    def out_features(self) -> int | None:
        """d_out as the file tells it ((IA)^3 on the input axis cannot tell)."""
        p = self.parts
        if self.kind in ortho.KINDS:
            return ortho.out_features(self)
        if self.kind == "LoRA":
            return p["lora_up.weight"].shape[0]
        if self.kind == "LoHa":
            a = p["hada_w1_a"]
            return a.shape[1] if "hada_t1" in p else a.shape[0]
        if self.kind == "LoKr":
            w1 = p["lokr_w1"].shape[0] if "lokr_w1" in p else p["lokr_w1_a"].shape[0]
            if "lokr_w2" in p:
                return w1 * p["lokr_w2"].shape[0]
            return w1 * (p["lokr_w2_a"].shape[1] if "lokr_t2" in p else p["lokr_w2_a"].shape[0])
        if self.kind == "full":
            return p["diff"].shape[0]
        return None if self.on_input else p["weight"].numel()

    @property
    def on_input(self) -> bool:
        return self.kind == "IA3" and bool(int(self.parts.get("on_input", torch.tensor(0)).item()))

    def _product(self, dtype: torch.dtype, device: torch.device | str = "cpu", scratch: Scratch | None = None,
                 ) -> torch.Tensor:
        """ΔW (without scale) as the factors give it: 2-D (d_out × d_in·kh·kw) or 4-D, a tensor of its
        own (never a part of the file), in `scratch`'s buffer "a" when given."""
        p = self.parts

        def g(part: str) -> torch.Tensor:
            return self._get(part, dtype, device)

        def matmul(a: torch.Tensor, b: torch.Tensor, slot: str = "a") -> torch.Tensor:
            return torch.matmul(a, b, out=work_tensor(scratch, slot, (a.shape[0], b.shape[-1]), dtype, device))

        if self.kind == "LoRA":
            up, down = g("lora_up.weight"), g("lora_down.weight")
            if "lora_mid.weight" in p:
                return _tucker(g("lora_mid.weight"), up.flatten(1).T, down.flatten(1))
            return matmul(up.flatten(1), down.flatten(1))
        if self.kind == "LoHa":
            if "hada_t1" in p:
                return (_tucker(g("hada_t1"), g("hada_w1_a"), g("hada_w1_b"))
                        * _tucker(g("hada_t2"), g("hada_w2_a"), g("hada_w2_b")))
            return matmul(g("hada_w1_a"), g("hada_w1_b")).mul_(matmul(g("hada_w2_a"), g("hada_w2_b"), "b"))
        if self.kind == "LoKr":
            w1 = g("lokr_w1") if "lokr_w1" in p else g("lokr_w1_a") @ g("lokr_w1_b")
            if "lokr_w2" in p:
                w2 = g("lokr_w2")
            elif "lokr_t2" in p:
                w2 = _tucker(g("lokr_t2"), g("lokr_w2_a"), g("lokr_w2_b"))
            else:
                w2 = g("lokr_w2_a") @ g("lokr_w2_b")
            if w2.ndim == 4:  # a conv's w2 carries the kernel; w1 scales whole kernels
                w1 = w1[:, :, None, None]
            if w1.ndim != w2.ndim:
                return torch.kron(w1.contiguous(), w2.contiguous())
            shape = tuple(i * j for i, j in zip(w1.shape, w2.shape))
            return torch.kron(w1.contiguous(), w2.contiguous(), out=work_tensor(scratch, "a", shape, dtype, device))
        diff = g("diff")
        return work_tensor(scratch, "a", diff.shape, dtype, device).copy_(diff)

    def delta(self, weight: torch.Tensor, dtype: torch.dtype = torch.float64, scratch: Scratch | None = None,
              ) -> torch.Tensor:
        """ΔW at weight 1 for a layer whose current weight is `weight`, in `dtype` and `weight`'s shape
        ((IA)^3 scales `weight` itself): a new tensor, or `scratch`'s buffer "a" (overwritten by the
        next module). A shape that does not fit is a one-line ModelError."""
        shape = tuple(weight.shape)
        if self.kind in ortho.KINDS:  # built from the weight itself: a new tensor
            return ortho.ortho_delta(self, weight, dtype, scratch)
        if self.kind == "IA3":
            gain = self._get("weight", dtype, weight.device).flatten()
            axis = 1 if self.on_input else 0
            if gain.numel() != shape[axis]:
                raise ModelError(f"{self.name}.weight has {gain.numel()} gains but the layer has {shape[axis]} "
                                 f"{'inputs' if axis else 'outputs'}; it was made for another model")
            view = [1] * len(shape)
            view[axis] = -1
            out = work_tensor(scratch, "a", shape, dtype, weight.device)
            return torch.mul(weight.to(dtype), gain.reshape(view), out=out)
        try:
            product = self._product(dtype, weight.device, scratch)
        except RuntimeError as exc:  # factors whose shapes do not multiply
            raise ModelError(f"{self.name} ({self.kind}): its factors do not fit together "
                             f"({first_line(exc)})") from None
        if product.numel() != weight.numel() or product.shape[0] != shape[0]:
            raise ModelError(f"{self.name} ({self.kind}) makes a {tuple(product.shape)} change but the layer's "
                             f"weight is {shape}; it was made for another model")
        # the product is this module's own tensor: scaled in place (×1 changes no bit, so it is skipped)
        return product.reshape(shape).mul_(self.scale) if self.scale != 1.0 else product.reshape(shape)

    @property
    def bias_part(self) -> str | None:
        """The part that changes the layer's bias (full: `diff_b`, norm: `b_norm`), if any."""
        return next((k for k in ("diff_b", "b_norm") if k in self.parts), None)

    def bias_delta(self, dtype: torch.dtype = torch.float64) -> torch.Tensor | None:
        part = self.bias_part
        return None if part is None else self.parts[part].to(dtype).flatten()  # moved by the caller

    def merged(self, weight: torch.Tensor, multiplier: float, dtype: torch.dtype = torch.float64,
               out: torch.Tensor | None = None, scratch: Scratch | None = None) -> torch.Tensor:
        """The layer weight with this module applied at `multiplier`, in `dtype`: in `out` when given
        (it may be `weight` itself), else a new tensor. With `scratch`, ΔW is built in its reused
        buffers; the numbers are the same to the bit either way."""
        base = weight.to(dtype)
        delta = self.delta(base, dtype, scratch)  # this module's own tensor: every step below is in place
        if out is None:
            out = delta if scratch is None else torch.empty_like(delta)
        if self.dora_scale is None:  # ×1 changes no bit: skipped, as for the scale
            return torch.add(delta.mul_(multiplier) if multiplier != 1.0 else delta, base, out=out)
        combined = torch.add(base, delta, out=delta)
        scale = self.dora_scale.to(weight.device, dtype)
        if scale.shape[0] == weight.shape[0] and scale.numel() == weight.shape[0]:
            norm = combined.reshape(combined.shape[0], -1).norm(dim=1)
            view = (-1,) + (1,) * (weight.ndim - 1)
        elif scale.numel() == weight.shape[1]:
            norm = combined.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)
            view = (1, -1) + (1,) * (weight.ndim - 2)
        else:
            raise ModelError(f"{self.name}.dora_scale has shape {tuple(scale.shape)}, which fits neither the "
                             f"outputs nor the inputs of the layer's {tuple(weight.shape)} weight")
        decomposed = combined.mul_(scale.reshape(view) / (norm.reshape(view) + torch.finfo(torch.float32).eps))
        return torch.add(base, decomposed.sub_(base).mul_(multiplier), out=out)


@dataclass
class LycorisAdapter:
    """{component: {module path: LycorisModule}} of one file, plus its metadata."""

    modules: dict[str, dict[str, LycorisModule]]
    base: str
    metadata: dict[str, str] = field(default_factory=dict)
    base_reason: str = ""

    def items(self) -> Iterator[tuple[str, str, LycorisModule]]:
        for component, modules in self.modules.items():
            for path, module in modules.items():
                yield component, path, module

    @property
    def kinds(self) -> dict[str, int]:
        return dict(sorted(collections.Counter(m.kind for _, _, m in self.items()).items()))

    @property
    def parameters(self) -> int:
        return sum(m.parameters for _, _, m in self.items())


def _split(key: str) -> tuple[str, str]:
    name, _, part = key.partition(".")
    return name, part


def _check_parts(path, name: str, kind: str, parts: Mapping[str, torch.Tensor]) -> None:
    """Every part a type needs is there (one line naming the file and module otherwise)."""
    need = {"LoRA": [("lora_down.weight",), ("lora_up.weight",)],
            "LoHa": [("hada_w1_a",), ("hada_w1_b",), ("hada_w2_a",), ("hada_w2_b",)],
            "LoKr": [("lokr_w1", "lokr_w1_a"), ("lokr_w2", "lokr_w2_a")],
            "full": [("diff",)], "IA3": [("weight",)], **ortho.NEEDS}[kind]
    pairs = {"lokr_w1_a": "lokr_w1_b", "lokr_w2_a": "lokr_w2_b"}
    for options in need:
        if not any(o in parts for o in options):
            raise ModelError(f"{path}: {name} is a {kind} module without {' or '.join(options)}; "
                             "the file is incomplete")
    for a, b in pairs.items():
        if (a in parts) != (b in parts):
            raise ModelError(f"{path}: {name} has {a if a in parts else b} without {b if a in parts else a}")
    if kind == "LoHa" and ("hada_t1" in parts) != ("hada_t2" in parts):
        raise ModelError(f"{path}: {name} has only one of hada_t1/hada_t2")
    problem = ortho.blocks_problem(parts)
    if problem:
        raise ModelError(f"{path}: {name}.{problem}")


def read_lycoris(path: str | os.PathLike, base: str | None = None, fallback: str | None = None,
                 header_only: bool = False) -> LycorisAdapter:
    """Read a kohya-layout LyCORIS file. Unknown or unsupported parts are a one-line ModelError
    naming the file and the key; `base` ('sd15'/'sdxl') skips detection, `fallback` is the base
    when the keys and metadata cannot tell; `header_only` reads shapes but no weights, for checks."""
    from .adapter import BASES, detect_base

    path = Path(path)
    tensors, metadata = load_adapter(path, header_only=header_only)
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, part = _split(key)
        prefix = component_prefix(name)
        if prefix is None or not part:
            raise ModelError(f"{path}: key {key!r} has no kohya or LyCORIS prefix ({_PREFIX_NAMES}); "
                             "only kohya-layout LyCORIS files are read")
        if part in UNSUPPORTED:
            raise ModelError(f"{path}: {key!r} is {UNSUPPORTED[part]}; this tool does not read it (it reads "
                             f"{_READS} modules)")
        if part not in PARTS and part not in SHARED:
            raise ModelError(f"{path}: {key!r} is no LoRA/LyCORIS part this tool knows (it reads {_READS} modules)")
        grouped.setdefault(name, {})[part] = tensor
    modules: dict[str, dict[str, LycorisModule]] = {}
    for name, parts in grouped.items():
        kinds = {PARTS[p] for p in parts if p in PARTS}
        if len(kinds) != 1:
            what = " and ".join(sorted(kinds)) if kinds else "only " + "/".join(sorted(parts))
            raise ModelError(f"{path}: module {name} has {what} parts; each module must be one type")
        kind = kinds.pop()
        if kind == "OFT" and "oft_blocks" in parts and parts["oft_blocks"].ndim == 4:
            kind = "BOFT"  # butterfly stages × blocks × b × b
        _check_parts(path, name, kind, parts)
        alpha = parts.pop("alpha", None)
        dora = parts.pop("dora_scale", None)
        if dora is not None and kind in ("IA3", *ortho.KINDS):
            raise ModelError(f"{path}: {name} has a dora_scale on an {kind} module, which LyCORIS never writes")
        prefix = component_prefix(name)
        component = component_of(name, prefix)
        module = LycorisModule(name, kind, parts, None if alpha is None else float(alpha), dora)
        layer = module_path(component, name[len(prefix) + 1:])
        if layer in modules.get(component, {}):
            raise ModelError(f"{path}: {name} and {modules[component][layer].name} name the same layer "
                             f"({component}.{layer}); keep one of them")
        modules.setdefault(component, {})[layer] = module
    if not modules:
        raise ModelError(f"{path}: the adapter holds no tensors")
    ortho.glora_current_names(path, [m for layers in modules.values() for m in layers.values() if m.kind == "GLoRA"])
    if base is None:
        paths = {c: set(m) for c, m in modules.items()}
        try:
            base, reason = detect_base(list(tensors), metadata, paths, {})
        except ModelError as exc:
            if fallback is None:
                raise ModelError(f"{path}: {exc}") from None
            base, reason = fallback, "the base it is loaded into"
    elif base not in BASES:
        raise ModelError(f"base {base!r} is not one of {', '.join(BASES)}")
    else:
        reason = "given"
    if base == "sdxl":
        clip = [m.name for m in modules.get("text_encoder", {}).values() if m.name.startswith(LYCORIS_PREFIX)]
        if clip:
            raise ModelError(f"{path}: {clip[0]} names a text-encoder layer under LyCORIS' own prefix, which cannot tell "
                             "SDXL's two text encoders apart; rename its keys to lora_te1_ (CLIP ViT-L) or lora_te2_ "
                             "(OpenCLIP ViT-bigG)")
    return LycorisAdapter(modules, base, dict(metadata), reason)


__all__ = ["PREFIXES", "LycorisAdapter", "LycorisModule", "component_prefix", "is_lycoris", "module_path",
           "needs_lycoris_reader", "read_lycoris"]
