"""Extract a LoRA from two checkpoints of one architecture: for each adaptable layer,
ΔW = W_tuned − W_base and its best rank-r approximation by SVD (Eckart–Young), so that
base + extracted LoRA ≈ tuned. Reads diffusers pipeline folders tensor by tensor (safetensors,
single or sharded), so only two layer weights are in memory at a time.

Layers taken, as kohya's LoRA/LoCon networks: in the UNet every linear and conv of the attention
blocks, resnets and down/up-samplers (3×3 convs at `conv_rank`, 0 to skip resnets and samplers);
in the text encoders the attention projections and MLP linears.
"""

from __future__ import annotations

import collections
import json
import re
from contextlib import ExitStack
from pathlib import Path
from typing import Callable

import safetensors
import torch

from ..errors import DAMAGED, ModelError, first_line
from ..processes import check_device
from .adapter import Adapter, LoraModule, module_from_product
from .layouts import COMPONENTS, canonical_path
from .lowrank import FitReport, fit, svd_of_matrix, truncated_factors
from .metadata import kohya_metadata

_STEMS = {"unet": "diffusion_pytorch_model", "text_encoder": "model", "text_encoder_2": "model"}
_TEXT_LAYER = re.compile(r"layers\.\d+\.(self_attn\.[qkv]_proj|self_attn\.out_proj|mlp\.fc[12])$")
_VERSIONS = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}


def _weight_files(folder: Path, component: str) -> list[Path] | None:
    """The component's .safetensors file(s), or None when the folder has no such component."""
    sub = folder / component
    if not sub.is_dir():
        return None
    stem = _STEMS[component]
    for name in (f"{stem}.safetensors", f"{stem}.fp16.safetensors"):
        if (sub / name).is_file():
            return [sub / name]
    for name in (f"{stem}.safetensors.index.json", f"{stem}.fp16.safetensors.index.json"):
        if (sub / name).is_file():
            try:
                shards = sorted(set(json.loads((sub / name).read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError) as exc:
                raise ModelError(f"{sub / name}: cannot read the shard index ({exc})") from None
            return [sub / shard for shard in shards]
    raise ModelError(f"{sub}: no {stem}.safetensors; extract reads safetensors weights (re-save the model with "
                     "save_pretrained(..., safe_serialization=True))")


class _Tensors:
    """Lazy name -> tensor access over one component's safetensors files."""

    def __init__(self, files: list[Path], stack: ExitStack):
        self.where = {}
        for path in files:
            try:
                handle = stack.enter_context(safetensors.safe_open(str(path), framework="pt", device="cpu"))
            except Exception as exc:  # safetensors raises several error types
                raise ModelError(f"{path}: not a readable .safetensors file ({first_line(exc)}); {DAMAGED}") from None
            self.where.update({key: handle for key in handle.keys()})

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.where[key].get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        return self.where[key].get_tensor(key)


def _is_target(component: str, path: str, shape: tuple[int, ...], conv_rank: int) -> bool:
    if len(shape) not in (2, 4):
        return False
    if component != "unet":
        return bool(_TEXT_LAYER.search(path)) and len(shape) == 2
    if ".attentions." in path:
        return True
    return conv_rank > 0 and any(f".{block}." in path for block in ("resnets", "downsamplers", "upsamplers"))


def _family(folder: Path) -> str:
    return "sdxl" if (folder / "text_encoder_2").is_dir() else "sd15"


def extract_adapter(base: str | Path, tuned: str | Path, rank: int, *, conv_rank: int | None = None,
                    min_diff: float = 0.0, device: str = "cpu",
                    progress: Callable[[str], None] | None = None) -> tuple[Adapter, FitReport, list[str]]:
    """(adapter, fit report, skipped layers) approximating `tuned` − `base` at `rank`.

    Layers whose largest |ΔW| is at most `min_diff` are skipped (an untouched text encoder gives
    none). `conv_rank` (default `rank`) is the rank of 3×3 convs; 0 leaves resnets and samplers
    out. `device` runs the SVDs (`cuda` is much faster on full-size models).
    """
    base, tuned = Path(base), Path(tuned)
    conv_rank = rank if conv_rank is None else conv_rank
    if rank < 1 or conv_rank < 0:
        raise ModelError(f"--rank {rank} must be >= 1 and --conv-rank {conv_rank} >= 0")
    check_device(device)
    for folder in (base, tuned):
        if not folder.is_dir():
            raise ModelError(f"{folder} is not a folder; extract takes two diffusers pipeline folders")
    if _family(base) != _family(tuned):
        raise ModelError(f"{base} is {_family(base)} but {tuned} is {_family(tuned)}; both must share one architecture")

    report, skipped = FitReport(), []
    products: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]] = {}
    with ExitStack() as stack:
        for component in COMPONENTS:
            files = _weight_files(base, component), _weight_files(tuned, component)
            if files == (None, None):
                continue
            if None in files:
                raise ModelError(f"{component} is in only one of {base} and {tuned}")
            b, t = (_Tensors(f, stack) for f in files)
            missing = sorted(set(b.where) ^ set(t.where))
            if missing:
                raise ModelError(f"{component} weights differ between the folders (e.g. {', '.join(missing[:3])}); "
                                 "both must share one architecture")
            for key in sorted(b.where):
                if not key.endswith(".weight"):
                    continue
                path = canonical_path(component, key[: -len(".weight")])
                shape = b.shape(key)
                if not _is_target(component, path, shape, conv_rank):
                    continue
                if t.shape(key) != shape:
                    raise ModelError(f"{component}.{key} is {shape} in {base} but {t.shape(key)} in {tuned}")
                delta = t.get(key).to(device, torch.float32) - b.get(key).to(device, torch.float32)
                if float(delta.abs().max()) <= min_diff:
                    skipped.append(f"{component}.{path}")
                    continue
                if progress:
                    progress(f"{component}.{path}")
                u, s, vh = svd_of_matrix(delta)
                is_3x3 = len(shape) == 4 and shape[2:] != (1, 1)
                keep = min(conv_rank if is_3x3 else rank, len(s))
                report.modules.append(fit(component, path, s.double().cpu(), len(s), keep))
                left, right = truncated_factors(u, s, vh, keep)
                products[(component, path)] = (left.double().cpu(), right.double().cpu(), shape)
    if not products:
        raise ModelError(f"{tuned} and {base} do not differ in any adaptable layer (min diff {min_diff})")

    ranks = collections.Counter(left.shape[1] for left, _, _ in products.values())
    alpha = float(ranks.most_common(1)[0][0])  # scale 1 at the common rank, as kohya's extract
    modules: dict[str, dict[str, LoraModule]] = {}
    for (component, path), (left, right, shape) in products.items():
        modules.setdefault(component, {})[path] = module_from_product(left, right, shape, alpha)
    family = _family(base)
    metadata = kohya_metadata(
        rank=int(alpha), alpha=alpha, base_model_version=_VERSIONS[family], base_model_name=base.name,
        training_comment=f"extracted from {tuned.name} minus {base.name} at rank {rank} (conv {conv_rank}); "
                         f"retained Frobenius norm {100 * report.retained:.2f}%")
    if len(ranks) > 1:
        metadata["ss_network_dim"] = "Dynamic"
    return Adapter(modules, family, metadata, "kohya", "folder layout"), report, skipped
