"""An adapter file in memory, whatever its layout: per component and module path, the LoRA factors
down (A) and up (B) and alpha, with W' = W + (alpha / r) · up @ down. The file tools (convert,
inspect, resize, merge-loras, extract) read and write adapters through this module.

A DoRA module also holds its magnitude m (d_out,): W' = m · (W + ΔW) / ‖W + ΔW‖ (row norms). Tools
whose math is linear in ΔW (resize, merge-loras) refuse DoRA adapters instead of dropping m.

Module paths use the file spelling of `layouts.py`: diffusers UNet names (also for SDXL, whose
kohya files use LDM names) and text encoder paths starting with `text_model.`.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

import torch

from ..errors import ModelError
from ..fileio import unwritable_reason
from .files import LORA_ADAPTER_METADATA_KEY, load_adapter, save_adapter
from .layouts import (
    KOHYA_PREFIXES, canonical_path, detect_layout, diffusers_to_peft, kohya_to_peft, peft_magnitude,
)

BASES = tuple(KOHYA_PREFIXES)  # "sd15" (SD 1.x/2.x names), "sdxl"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# Metadata that describes one particular file's bytes or layout; never carried into another file.
_FILE_KEYS = ("sshs_model_hash", "sshs_legacy_hash", LORA_ADAPTER_METADATA_KEY, "format")


@dataclass
class LoraModule:
    """One adapted layer: down (r × d_in, or r × d_in × kh × kw for a conv), up (d_out × r [× 1 × 1])."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    magnitude: torch.Tensor | None = None  # DoRA's per-output-channel magnitude (d_out,), else None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def is_conv(self) -> bool:
        return self.down.ndim == 4

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the layer weight the adapter changes: (d_out, d_in) or (d_out, d_in, kh, kw)."""
        return (self.up.shape[0], *self.down.shape[1:])

    @property
    def parameters(self) -> int:
        return self.down.numel() + self.up.numel() + (self.magnitude.numel() if self.magnitude is not None else 0)

    def factors(self, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
        """(left, right) with ΔW = left @ right as a d_out × (d_in·kh·kw) matrix; the scale is in left."""
        left = self.up.reshape(self.up.shape[0], self.rank).to(dtype) * self.scale
        return left, self.down.reshape(self.rank, -1).to(dtype)

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """ΔW = (alpha / r) · up @ down, in the layer weight's shape."""
        left, right = self.factors(torch.float64)
        return (left @ right).reshape(self.weight_shape).to(dtype)


def module_from_product(left: torch.Tensor, right: torch.Tensor, weight_shape: tuple[int, ...],
                        alpha: float) -> LoraModule:
    """The module whose ΔW is left @ right (d_out × r, r × d_in·kh·kw), stored with the given alpha.

    The factors absorb 1 / (alpha / r), half on each side, so that files can share one alpha (diffusers
    0.42 misreads per-module alphas of kohya SD files) while both factors keep similar magnitudes
    (fp16 files round both alike)."""
    rank = left.shape[1]
    gain = math.sqrt(rank / alpha)
    up, down = (left * gain).float(), (right * gain).float()
    if len(weight_shape) == 4:
        up, down = up.reshape(weight_shape[0], rank, 1, 1), down.reshape(rank, *weight_shape[1:])
    return LoraModule(down.contiguous(), up.contiguous(), float(alpha))


@dataclass
class Adapter:
    """{component: {module path: LoraModule}} for one base family, plus the file's metadata."""

    modules: dict[str, dict[str, LoraModule]]
    base: str
    metadata: dict[str, str] = field(default_factory=dict)
    layout: str = "kohya"  # the layout it was read from
    base_reason: str = "given"  # why `base` was chosen, for `inspect`

    def items(self) -> Iterator[tuple[str, str, LoraModule]]:
        for component, modules in self.modules.items():
            for path, module in modules.items():
                yield component, path, module

    def common_rank(self) -> int:
        return collections.Counter(m.rank for _, _, m in self.items()).most_common(1)[0][0]

    def common_alpha(self) -> float:
        return collections.Counter(m.alpha for _, _, m in self.items()).most_common(1)[0][0]

    @property
    def parameters(self) -> int:
        return sum(m.parameters for _, _, m in self.items())

    def peft_states(self, fold_alpha: bool = False) -> dict[str, dict[str, torch.Tensor]]:
        """{component: peft state dict} (`lora_A`/`lora_B` weights, DoRA magnitudes). `fold_alpha`
        multiplies up by alpha / r, for consumers of a bare state dict, which carries no alpha; the
        folded up is float32, so a half-precision file is not rounded a second time."""
        def up(m: LoraModule) -> torch.Tensor:
            return (m.up.double() * m.scale).float() if fold_alpha else m.up

        def magnitude(m: LoraModule) -> torch.Tensor | None:
            return None if m.magnitude is None else peft_magnitude(m.magnitude, m.up.ndim)

        return {c: {k: v for p, m in mods.items()
                    for k, v in ((f"{p}.lora_A.weight", m.down), (f"{p}.lora_B.weight", up(m)),
                                 (f"{p}.lora_magnitude_vector", magnitude(m))) if v is not None}
                for c, mods in self.modules.items() if mods}

    @property
    def is_dora(self) -> bool:
        return any(m.magnitude is not None for _, _, m in self.items())

    def refuse_dora(self, what: str, name: str) -> None:
        """The one-line refusal of tools whose math holds only for plain LoRA."""
        if self.is_dora:
            raise ModelError(f"DoRA adapters cannot be {what} linearly: {name} has DoRA magnitudes "
                             "(dora_scale / lora_magnitude_vector) that depend on the base weights")


# --- base family -------------------------------------------------------------------------------

def _base_from_structure(paths: Mapping[str, set[str]], shapes: Mapping[str, int]) -> tuple[str, str] | None:
    """SD1.x and SDXL UNets differ where attention blocks sit and how deep they are."""
    unet = paths.get("unet", set())
    if any(re.match(r"(up_blocks\.0\.attentions|.*transformer_blocks\.[1-9])", p) for p in unet):
        return "sdxl", "UNet layout (attention in up_blocks.0 or stacked transformer blocks)"
    if any(re.match(r"(down_blocks\.0\.attentions|down_blocks\.3\.|up_blocks\.3\.)", p) for p in unet):
        return "sd15", "UNet layout (attention in down_blocks.0 or a fourth block level)"
    for path, d_in in shapes.items():
        if path.endswith(("attn2.to_k", "attn2.to_v")):
            if d_in == 2048:
                return "sdxl", "cross-attention width 2048"
            if d_in in (768, 1024):
                return "sd15", f"cross-attention width {d_in}"
    return None


def detect_base(keys: list[str], metadata: Mapping[str, str], paths: Mapping[str, set[str]],
                shapes: Mapping[str, int]) -> tuple[str, str]:
    """('sd15' | 'sdxl', why) from the key names, then the metadata, then the UNet's structure."""
    if any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for k in keys) or "text_encoder_2" in paths:
        return "sdxl", "two text encoders"
    if any(k.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_"))
           for k in keys):
        return "sdxl", "LDM (SGM) UNet block names"
    version, arch = metadata.get("ss_base_model_version", ""), metadata.get("modelspec.architecture", "")
    if version.startswith("sdxl") or arch.startswith("stable-diffusion-xl"):
        return "sdxl", "metadata"
    if version.startswith(("sd_v1", "sd_v2")) or arch.startswith(("stable-diffusion-v1", "stable-diffusion-v2")):
        return "sd15", "metadata"
    if any(k.startswith("lora_te_") for k in keys):
        return "sd15", "one text encoder (lora_te_)"
    found = _base_from_structure(paths, shapes)
    if found:
        return found
    if not paths.get("unet"):
        return "sd15", "text encoder only, one encoder"
    raise ModelError("cannot tell whether the adapter is for SD 1.x or SDXL from its keys or metadata; "
                     "pass --variant sd15 or --variant sdxl")


# --- reading -------------------------------------------------------------------------------------

def _match_pattern(patterns: Mapping[str, float], path: str) -> float | None:
    """peft's rank/alpha_pattern lookup: the first pattern matching the end of the module path."""
    for candidate in (path, path.removeprefix("text_model.")):
        for pattern, value in patterns.items():
            if re.match(rf"(.*\.)?({pattern})$", candidate):
                return value
    return None


def _diffusers_alphas(metadata: Mapping[str, str], states: Mapping[str, Mapping[str, torch.Tensor]],
                      alpha_keys: Mapping[str, float], name: str) -> dict[str, dict[str, float]]:
    """Alphas of a diffusers-layout file: `<component>.<module>.alpha` tensors, else each
    component's peft LoraConfig under `lora_adapter_metadata`, else alpha = rank (scale 1)."""
    config: dict = {}
    if LORA_ADAPTER_METADATA_KEY in metadata:
        try:
            config = json.loads(metadata[LORA_ADAPTER_METADATA_KEY])
        except ValueError:
            raise ModelError(f"{name}: metadata {LORA_ADAPTER_METADATA_KEY!r} is not valid JSON") from None
    alphas: dict[str, dict[str, float]] = {}
    for component, state in states.items():
        get = lambda key, default=None: config.get(f"{component}.{key}", default)  # noqa: E731
        for key in state:
            if not key.endswith(".lora_A.weight"):
                continue
            path, rank = key[: -len(".lora_A.weight")], state[key].shape[0]
            alpha = alpha_keys.get(f"{component}.{path}")
            if alpha is None and get("lora_alpha") is not None:
                alpha = _match_pattern(get("alpha_pattern") or {}, path)
                alpha = float(get("lora_alpha") if alpha is None else alpha)
                if get("use_rslora"):  # peft scales by alpha / sqrt(r); store the equivalent alpha / r
                    alpha *= math.sqrt(rank)
            alphas.setdefault(component, {})[path] = float(rank if alpha is None else alpha)
    return alphas


def read_adapter(path: str | os.PathLike, base: str | None = None, fallback: str | None = None,
                 header_only: bool = False) -> Adapter:
    """Read a kohya or diffusers adapter file. `base` ('sd15'/'sdxl') skips detection; `fallback` is
    the base when the keys, metadata and shapes cannot tell. `header_only` reads no weights: the
    modules' tensors are shape-only 'meta' tensors (see `load_adapter`), for checks."""
    tensors, metadata = load_adapter(path, header_only=header_only)
    try:
        layout = detect_layout(tensors)
    except ModelError as exc:
        raise ModelError(f"{path}: {exc}") from None
    if layout == "kohya":
        states, alphas = kohya_to_peft(tensors)
    else:
        alpha_keys = {k[: -len(".alpha")]: float(v) for k, v in tensors.items() if k.endswith(".alpha")}
        states = diffusers_to_peft({k: v for k, v in tensors.items() if not k.endswith(".alpha")})
        stray = [f"{k}.alpha" for k in alpha_keys
                 if f"{k.partition('.')[2]}.lora_A.weight" not in states.get(k.partition(".")[0], {})]
        if stray:
            raise ModelError(f"{path}: alpha keys without a LoRA module: {', '.join(sorted(stray)[:5])}")
        alphas = _diffusers_alphas(metadata, states, alpha_keys, str(path))
        # Files written with flattened CLIP paths (no `text_model.`) are read in the usual spelling.
        states = {c: {canonical_path(c, k): v for k, v in s.items()} for c, s in states.items()}
        alphas = {c: {canonical_path(c, p): a for p, a in a_.items()} for c, a_ in alphas.items()}
    modules = {
        component: {key[: -len(".lora_A.weight")]: LoraModule(
            state[key], state[key.replace("lora_A", "lora_B")], alphas[component][key[: -len(".lora_A.weight")]],
            state.get(key.replace(".lora_A.weight", ".lora_magnitude_vector")))
            for key in sorted(state) if key.endswith(".lora_A.weight")}
        for component, state in states.items()
    }
    for component, mods in modules.items():
        for name, module in mods.items():
            if module.up.shape[1] != module.rank or module.up.ndim != module.down.ndim:
                raise ModelError(f"{path}: {component}.{name} has down {tuple(module.down.shape)} and up "
                                 f"{tuple(module.up.shape)}, which do not multiply")
            if module.magnitude is not None:
                # peft's shape: (d_out,) for a linear layer, (1, d_out, 1, 1) for a conv
                d_out = module.up.shape[0]
                want = (d_out,) if module.up.ndim == 2 else (1, d_out, 1, 1)
                if tuple(module.magnitude.shape) not in (want, (d_out,)):
                    raise ModelError(f"{path}: {component}.{name} has a DoRA magnitude of shape "
                                     f"{tuple(module.magnitude.shape)}; its up weight needs {want}")
                module.magnitude = module.magnitude.reshape(-1)
    if base is not None:
        if base not in BASES:
            raise ModelError(f"base {base!r} is not one of {', '.join(BASES)}")
        reason = "given"
    else:
        paths = {c: set(m) for c, m in modules.items()}
        shapes = {p: m.down.shape[1] for mods in modules.values() for p, m in mods.items()}
        try:
            base, reason = detect_base(list(tensors), metadata, paths, shapes)
        except ModelError as exc:
            if fallback is None:
                raise ModelError(f"{path}: {exc}") from None
            base, reason = fallback, "the base it is loaded into"
    return Adapter(modules, base, dict(metadata), layout, reason)


def read_adapter_for(path: str | os.PathLike, variant: str | None = None) -> Adapter:
    """read_adapter for the commands' `--variant`, which is for files whose base cannot be told:
    a variant that contradicts what the file's keys, metadata or shapes say is refused, since the
    modules would be written under the other family's names (a file no base can load)."""
    adapter = read_adapter(path, base=variant)
    if variant is not None:
        try:
            found = read_adapter(path)
        except ModelError:  # the base cannot be told: what --variant is for
            return adapter
        if found.base != variant:
            raise ModelError(f"--variant {variant}: {path} is an {found.base} adapter (told by: {found.base_reason}); "
                             "leave out --variant, which is for files whose base cannot be told")
    return adapter


# --- writing -------------------------------------------------------------------------------------

def carried_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """The metadata worth keeping in a derived file: everything but hashes and layout-specific keys."""
    return {k: v for k, v in metadata.items() if k not in _FILE_KEYS}


def check_output(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """`path` as a place for a new adapter file, or a one-line ModelError; the commands call it before
    minutes of SVDs, write_adapter again before writing."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ModelError(f"{path}: adapter files end in .safetensors (what A1111, ComfyUI and diffusers look for); "
                         "give the output that name")
    if path.is_dir():
        raise ModelError(f"{path} is a folder; give the adapter's file name, e.g. {path / 'adapter.safetensors'}")
    if path.exists() and not overwrite:
        raise ModelError(f"{path} already exists; choose another name or pass --overwrite to replace it")
    unwritable = unwritable_reason(path.parent)
    if unwritable:
        raise ModelError(f"{path.parent} {unwritable}; write {path.name} to a folder you can write to")
    return path


def write_adapter(path: str | os.PathLike, adapter: Adapter, layout: str = "kohya",
                  dtype: torch.dtype | None = torch.float16, metadata: Mapping[str, str] | None = None,
                  overwrite: bool = False) -> Path:
    """Write `adapter` atomically in `layout`; `metadata` (default: the adapter's, minus hashes and
    layout keys) goes in the header. dtype None keeps each tensor's dtype. An existing file is
    replaced only with `overwrite`."""
    path = check_output(path, overwrite)
    if layout not in ("kohya", "diffusers"):
        raise ModelError(f"layout {layout!r} is not kohya or diffusers")
    extra = set(adapter.modules) - set(KOHYA_PREFIXES[adapter.base])
    if extra:
        raise ModelError(f"an {adapter.base} adapter cannot hold {', '.join(sorted(extra))}; is the base right?")
    if not any(adapter.modules.values()):
        raise ModelError(f"{path}: the adapter has no modules to write")
    states = adapter.peft_states()
    alphas = {c: {p: m.alpha for p, m in mods.items()} for c, mods in adapter.modules.items() if mods}
    header = carried_metadata(adapter.metadata if metadata is None else metadata)
    return save_adapter(path, states, adapter.common_rank(), alphas, layout=layout, metadata=header,
                        dtype=dtype, base=adapter.base)
