"""The run's adapter in both layouts, with metadata fit to publish.

A run may hold the kohya layout, the diffusers layout or both; a published repo carries both, so
the missing one is converted with lora_trainer.export (same tensors, same alphas).
"""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path

import safetensors.torch
import torch

from ..export.bundle import add_to_file, bundle_tensors
from ..export.files import LORA_ADAPTER_METADATA_KEY, load_adapter, save_adapter
from ..export.layouts import diffusers_to_peft, kohya_to_peft
from ..export.metadata import with_hashes
from ..fileio import atomic_path
from .run import Run, is_local

# Keys that belong to one layout only: hashes describe kohya bytes; diffusers' own keys describe peft.
_KOHYA_ONLY = ("sshs_model_hash", "sshs_legacy_hash")
_DIFFUSERS_ONLY = ("format", LORA_ADAPTER_METADATA_KEY)


def public_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """`metadata` without local paths: kohya keeps only the file name of a local base
    (`ss_sd_model_name`), so a published file does not reveal the trainer's folders."""
    out = dict(metadata)
    name = out.get("ss_sd_model_name")
    if name and is_local(name):
        out["ss_sd_model_name"] = Path(name.replace("\\", "/")).name
    return out


def _tensor_dtype(tensors: dict[str, torch.Tensor]) -> torch.dtype:
    return next(t.dtype for k, t in tensors.items() if not k.endswith(".alpha"))


def _headline_rank(states: dict[str, dict[str, torch.Tensor]]) -> int:
    ranks = [t.shape[0] for state in states.values() for k, t in state.items() if k.endswith("lora_A.weight")]
    return collections.Counter(ranks).most_common(1)[0][0]


def _diffusers_alphas(states: dict[str, dict[str, torch.Tensor]], metadata: dict[str, str]) -> dict:
    """{component: {module: alpha}} from diffusers' stored LoraConfigs (lora_alpha, alpha_pattern);
    a file without them means alpha = rank, as diffusers assumes."""
    try:
        configs = json.loads(metadata.get(LORA_ADAPTER_METADATA_KEY) or "{}")
    except ValueError:
        configs = {}
    alphas: dict[str, dict[str, float]] = {}
    for component, state in states.items():
        default = configs.get(f"{component}.lora_alpha")
        patterns = configs.get(f"{component}.alpha_pattern") or {}
        for key, tensor in state.items():
            if not key.endswith(".lora_A.weight"):
                continue
            module = key[: -len(".lora_A.weight")]
            alpha = float(default) if default is not None else float(tensor.shape[0])
            for pattern, value in patterns.items():  # peft matches `(.*\.)?PATTERN$`
                if re.fullmatch(rf"(.*\.)?(?:{pattern})", module):
                    alpha = float(value)
            alphas.setdefault(component, {})[module] = alpha
    return alphas


def write_kohya(run: Run, path: Path, dtype: torch.dtype | None = None) -> Path:
    """The kohya layout (what A1111, ComfyUI, Forge and CivitAI read) at `path`, in `dtype`
    (None: as trained). Alphas stay float32 scalars; the sshs_* hashes are recomputed. Bundled
    embeddings are kept, in their own precision (they are few and A1111 reads any)."""
    metadata = {k: v for k, v in public_metadata(run.metadata).items() if k not in _DIFFUSERS_ONLY}
    if run.layout == "kohya":
        dtype = dtype or _tensor_dtype(run.tensors)
        tensors = {k: (t if k.endswith(".alpha") else t.to(dtype)).contiguous() for k, t in run.tensors.items()}
        tensors.update(bundle_tensors(run.bundle))
        metadata = with_hashes(tensors, metadata)
        with atomic_path(path) as tmp:
            safetensors.torch.save_file(tensors, str(tmp), metadata=metadata)
        return path
    states = diffusers_to_peft(run.tensors)
    save_adapter(path, states, _headline_rank(states), _diffusers_alphas(states, run.metadata),
                 layout="kohya", metadata=metadata, dtype=dtype or _tensor_dtype(run.tensors), base=run.variant)
    return add_to_file(path, run.bundle) if run.bundle else path


def write_diffusers(run: Run, path: Path) -> Path:
    """The diffusers layout (what `pipe.load_lora_weights` reads without conversion) at `path`."""
    if run.layout == "diffusers" or run.diffusers_file is not None:
        tensors, metadata = (run.tensors, run.metadata) if run.layout == "diffusers" else load_adapter(run.diffusers_file)
        metadata = {k: v for k, v in public_metadata(metadata).items() if k not in _KOHYA_ONLY}
        with atomic_path(path) as tmp:
            safetensors.torch.save_file(tensors, str(tmp), metadata=metadata)
        return path
    # SDXL kohya files use LDM block names; layers_per_block=2 is every real SDXL UNet.
    states, alphas = kohya_to_peft(run.tensors, layers_per_block=2)
    metadata = {k: v for k, v in public_metadata(run.metadata).items() if k not in _KOHYA_ONLY}
    return save_adapter(path, states, _headline_rank(states), alphas, layout="diffusers", metadata=metadata,
                        dtype=_tensor_dtype(run.tensors), base=run.variant)
