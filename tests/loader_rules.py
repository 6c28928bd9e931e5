"""Our reading of how AUTOMATIC1111's and ComfyUI's LoRA loaders decide which model layer each tensor
of an adapter file patches, re-implemented here (neither program can be installed in the tests) so
our files can be held to it. Neither loader fails on a name it does not know: ComfyUI logs "lora key
not loaded" and goes on, A1111 drops the key silently. So a file "loads" there only if every key
resolves, which is what these rules let a test assert.

Each loader matches a file's module names against names it builds from the model it has loaded,
and both load the original (LDM/CompVis) single-file layout. The model-side names here come from
our own tiny checkpoints saved in that layout (`models.single_file.save_single_file`), the key names
A1111 and ComfyUI would read: `model.diffusion_model.*`, `cond_stage_model.transformer.*` (SD 1.x),
`conditioner.embedders.0.transformer.*` + `conditioner.embedders.1.model.*` (SDXL).

Read from (2026-11): ComfyUI `comfy/lora.py` (model_lora_keys_unet, model_lora_keys_clip,
load_lora), `comfy/utils.py` (unet_to_diffusers, clip_text_transformers_convert),
`comfy/weight_adapter/` (lora, loha, lokr, weight_decompose); A1111 `extensions-builtin/Lora/`
`networks.py` (convert_diffusers_name_to_compvis, assign_network_names_to_compvis_modules,
load_network, network_apply_weights), `network.py`, `network_lora.py`, `network_hada.py`,
`network_lokr.py`, and `modules/textual_inversion` (create_embedding_from_data).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import safetensors

Shape = tuple[int, ...]


@dataclass
class Resolution:
    """What one loader makes of a file: {file module name: the loader's layer name}, the type each
    module loaded as, the keys it leaves unread, and what does not fit (wrong shapes, missing parts)."""
    layers: dict[str, str] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)
    unread: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # loads, but not as the file means it (documented gaps)
    embeddings: dict[str, int] = field(default_factory=dict)  # bundled token -> vectors (A1111)


# ---- the model side: our tiny checkpoints in the original layout ----------------------------------

def save_checkpoint(model_dir: Path, path: Path) -> Path:
    """The tiny diffusers pipeline at `model_dir` as an original-layout single file at `path`."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from lora_trainer.models.single_file import save_single_file

    sdxl = (Path(model_dir) / "text_encoder_2").is_dir()
    pipe = (StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline).from_pretrained(model_dir)
    return save_single_file(pipe, path)


def sd15_with_two_resnets_per_level(model_dir: Path, out: Path, seed: int = 0) -> Path:
    """The tiny SD1.5 pipeline at `model_dir` with real SD1.5's two resnets per UNet level (the tiny
    one has one), which A1111's SD 1.x rule hard-codes. `seed` draws the UNet; a seed other than 0
    also moves every text encoder weight a little, so two such models differ in every layer."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config({**pipe.unet.config, "layers_per_block": 2})
    if seed:
        with torch.no_grad():
            for param in pipe.text_encoder.parameters():
                param.add_(0.01 * torch.randn_like(param))
    parts = {**pipe.components, "unet": unet}
    StableDiffusionPipeline(**parts, requires_safety_checker=False).save_pretrained(out, safe_serialization=True)
    return Path(out)


def checkpoint_shapes(path: Path) -> dict[str, Shape]:
    """{tensor key: shape} of a single-file checkpoint, read from its header."""
    with safetensors.safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def under(name: str) -> str:
    return name.replace(".", "_")


def groups(tensors: Mapping) -> dict[str, dict]:
    """{module name: {part: tensor}}: both loaders split a key at its first dot
    (`lora_unet_x.lora_down.weight` -> `lora_unet_x`, `lora_down.weight`)."""
    out: dict[str, dict] = {}
    for key, tensor in tensors.items():
        module, _, part = key.partition(".")
        out.setdefault(module, {})[part] = tensor
    return out


# ---- what a module's tensors must be to patch a weight of a given shape ---------------------------

_LORA, _LOHA = ("lora_up.weight", "lora_down.weight"), ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
_LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def _delta_shape(kind: str, p: Mapping) -> tuple[int, int] | str:
    """(rows, numel) of the ΔW a module's factors build, as both loaders build it (then reshaped to
    the weight's shape, which needs the same rows and element count), or why they cannot."""
    if kind == "lora":
        up, down = p["lora_up.weight"].shape, p["lora_down.weight"].shape
        if up[1] != down[0]:
            return f"lora_up {tuple(up)} and lora_down {tuple(down)} disagree on the rank"
        if len(up) == 4 and tuple(up[2:]) != (1, 1):
            return f"lora_up {tuple(up)} has a kernel (only lora_down carries one)"
        return up[0], up[0] * math.prod(down[1:])
    if kind == "loha":
        a1, b1, a2, b2 = (p[n].shape for n in _LOHA)
        if (a1, b1) != (a2, b2) or a1[1] != b1[0]:
            return f"LoHa factors {tuple(a1)}·{tuple(b1)} and {tuple(a2)}·{tuple(b2)} do not pair"
        return a1[0], a1[0] * math.prod(b1[1:])
    w1 = p["lokr_w1"].shape if "lokr_w1" in p else (p["lokr_w1_a"].shape[0], p["lokr_w1_b"].shape[1])
    if "lokr_w2" in p:
        w2 = tuple(p["lokr_w2"].shape)
    else:
        w2 = (p["lokr_w2_a"].shape[0], math.prod(p["lokr_w2_b"].shape[1:]))
    return w1[0] * w2[0], math.prod(w1) * math.prod(w2)


def _kind(parts: Mapping) -> str | None:
    if all(n in parts for n in _LORA):
        return "lora"
    if all(n in parts for n in _LOHA):
        return "loha"
    one = ("lokr_w1" in parts or {"lokr_w1_a", "lokr_w1_b"} <= set(parts))
    two = ("lokr_w2" in parts or {"lokr_w2_a", "lokr_w2_b"} <= set(parts))
    return "lokr" if one and two else None


def _read_parts(kind: str, parts: Mapping) -> set[str]:
    """The parts a loader reads for a module of `kind` (besides alpha and dora_scale)."""
    if kind == "lora":
        return set(_LORA) | ({"lora_mid.weight"} & set(parts))
    if kind == "loha":
        return set(_LOHA) | ({"hada_t1", "hada_t2"} & set(parts))
    return set(_LOKR) & set(parts)


def check_module(name: str, kind: str, parts: Mapping, weight: Shape) -> list[str]:
    """Problems of one resolved module against its layer's weight shape: ΔW must have the weight's
    rows and element count (conv 3x3 vs 1x1 kernels, linear vs 1x1-conv projections), and a DoRA
    scale one value per output row."""
    built = _delta_shape(kind, parts)
    if isinstance(built, str):
        return [f"{name}: {built}"]
    rows, numel = built
    problems = []
    if rows != weight[0] or numel != math.prod(weight):
        problems.append(f"{name}: its {kind} ΔW has {rows} rows and {numel} values, the layer's weight is {weight}")
    scale = parts.get("dora_scale")
    if scale is not None and (scale.shape[0] != weight[0] or math.prod(scale.shape) != weight[0]):
        problems.append(f"{name}: dora_scale {tuple(scale.shape)} is not one value per output row of {weight}")
    return problems


def resolve_parts(res: Resolution, module: str, layer: str, parts: Mapping, weight: Shape) -> None:
    """Record `module` as patching `layer` (weight shape `weight`): its type, the parts no type reads,
    and what does not fit."""
    kind = _kind(parts)
    if kind is None:
        res.problems.append(f"{module}: no adapter type takes its parts {sorted(parts)}")
        return
    res.layers[module], res.kinds[module] = layer, kind
    read = _read_parts(kind, parts) | {"alpha", "dora_scale"}
    res.unread += [f"{module}.{p}" for p in parts if p not in read]
    res.problems += check_module(module, kind, parts, weight)


def check_distinct(res: Resolution) -> None:
    """Two file modules on one layer would patch it twice (e.g. one name in each block spelling)."""
    seen: dict[str, str] = {}
    for module, layer in res.layers.items():
        if layer in seen:
            res.problems.append(f"{seen[layer]} and {module} both patch {layer}")
        seen[layer] = module
