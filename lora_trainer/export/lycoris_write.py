"""Writing trained LoHa/LoKr adapters (peft's, `models/lycoris.py`) as LyCORIS writes them under
kohya (`--network_module lycoris.kohya`): kohya module names (`lora_unet_...`, `lora_te_...`,
`lora_te1_/lora_te2_` on SDXL) with the parts `hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b, alpha`
(LoHa) or `lokr_w1 | lokr_w1_a + lokr_w1_b, lokr_w2 | lokr_w2_a + lokr_w2_b, alpha` (LoKr).

The scale: both types apply alpha / r, in peft, LyCORIS and every reader of its files (ours, A1111,
ComfyUI), except a LoKr of two whole factors (no low-rank pair to have a rank), which LyCORIS trains
and applies at scale 1; so does our training (`models.lycoris.whole_factor_scale`, which gives such a
layer alpha = r, what LyCORIS writes for it). Each module is written with its trained layer's alpha.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import safetensors.torch
import torch

from ..errors import ModelError
from ..fileio import atomic_path
from .files import _cast
from .layouts import KOHYA_COMPONENTS, KOHYA_PREFIXES, kohya_name
from .metadata import check_metadata, with_hashes

# peft part name -> the LyCORIS type it belongs to (the parts a peft LoHa/LoKr on linear layers or
# convs without CP cores has)
TRAINED_PARTS = {
    "hada_w1_a": "LoHa", "hada_w1_b": "LoHa", "hada_w2_a": "LoHa", "hada_w2_b": "LoHa",
    "lokr_w1": "LoKr", "lokr_w1_a": "LoKr", "lokr_w1_b": "LoKr",
    "lokr_w2": "LoKr", "lokr_w2_a": "LoKr", "lokr_w2_b": "LoKr",
}


def _modules(state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{module path: {part: tensor}} of one component's peft state, every key a known part."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        module, _, part = key.rpartition(".")
        if part not in TRAINED_PARTS or not module:
            raise ModelError(f"{key!r} is no LoHa/LoKr part written here ({', '.join(TRAINED_PARTS)})")
        modules.setdefault(module, {})[part] = tensor
    return modules


def peft_to_lycoris(state: Mapping[str, torch.Tensor], prefix: str, alphas: Mapping[str, float], *,
                    unet_blocks: str = "diffusers", layers_per_block: int = 2) -> dict[str, torch.Tensor]:
    """One component's peft LoHa/LoKr state dict -> LyCORIS tensors under `prefix` (`lora_unet`,
    `lora_te`, ...), each module with its trained layer's alpha (`alphas`: {module path: alpha}) as a
    0-d float32 `alpha`."""
    prefix = prefix.rstrip("_")
    if prefix not in KOHYA_COMPONENTS:
        raise ValueError(f"unknown kohya prefix {prefix!r}; use one of {', '.join(KOHYA_COMPONENTS)}")
    component = KOHYA_COMPONENTS[prefix]
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for module, parts in _modules(state).items():
        name = kohya_name(prefix, component, module, unet_blocks, layers_per_block)
        if name in origin:
            raise ModelError(f"modules {origin[name]!r} and {module!r} get the same kohya name {name!r}")
        origin[name] = module
        kinds = {TRAINED_PARTS[p] for p in parts}
        if len(kinds) != 1:
            raise ModelError(f"{module} has both LoHa and LoKr parts ({', '.join(sorted(parts))})")
        if module not in alphas:
            raise ModelError(f"{module}: no alpha given for it")
        for part, tensor in sorted(parts.items()):
            out[f"{name}.{part}"] = tensor
        out[f"{name}.alpha"] = torch.tensor(float(alphas[module]), dtype=torch.float32)
    return out


def save_lycoris_adapter(path: str | os.PathLike, component_states: Mapping[str, Mapping[str, torch.Tensor]],
                         alphas: Mapping[str, Mapping[str, float]], metadata: Mapping[str, str],
                         dtype: torch.dtype | None, *, base: str = "sd15",
                         extra_tensors: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write `component_states` ({"unet": peft LoHa/LoKr state, "text_encoder": ...}) as a kohya-layout
    LyCORIS file at `path`, atomically: each module with its alpha (`alphas`: {component: {module
    path: alpha}}, `models.lycoris.lycoris_alphas`), tensors in `dtype` (alphas in float32),
    `metadata` with the `sshs_*` hashes added; `extra_tensors` (a trained embedding's `bundle_emb.*`)
    as they are."""
    if base not in KOHYA_PREFIXES:
        raise ValueError(f"base must be one of {', '.join(KOHYA_PREFIXES)}, not {base!r}")
    states = {name: state for name, state in component_states.items() if state}
    if not states or set(states) - set(KOHYA_PREFIXES[base]):
        raise ValueError(f"components must be some of {', '.join(KOHYA_PREFIXES[base])} for {base}, "
                         f"got {', '.join(component_states) or 'none'}")
    header = dict(metadata)
    check_metadata(header)
    tensors: dict[str, torch.Tensor] = {}
    for component, state in states.items():
        tensors.update(peft_to_lycoris(state, KOHYA_PREFIXES[base][component], alphas.get(component, {}),
                                       unet_blocks="ldm" if base == "sdxl" else "diffusers"))
    tensors = {**_cast(tensors, dtype), **(extra_tensors or {})}
    header = with_hashes(tensors, header)
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(tensors, str(tmp), metadata=header)
    return Path(path)
