"""Why an adapter file does not load into a pipeline, in one line a user can act on.

diffusers' own failure messages ("Error(s) in loading state_dict", "keys have not been correctly
renamed") name neither the layer nor the cause. When a load fails, the file is read with our own
reader and held against the pipeline: an unreadable or non-LoRA file, an adapter for the other base
family, or a layer whose shape differs from the base's (an adapter trained on another model, such
as SD 2.x on an SD 1.5 base) is each named as such. `infer --compare` asks the same before it
draws anything, so that no file fails after the columns before it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ModelError

FAMILY_NAMES = {"sd15": "SD 1.x", "sdxl": "SDXL"}


def pipe_family(pipe) -> str:
    return "sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd15"


def _layer_weight_shape(layer: torch.nn.Module) -> tuple[int, ...] | None:
    """The (d_out, d_in[, kh, kw]) of the frozen layer, looking through a peft wrapper if loaded."""
    base = getattr(layer, "base_layer", layer)
    weight = getattr(base, "weight", None)
    return tuple(weight.shape) if isinstance(weight, torch.Tensor) else None


def _submodule(model: torch.nn.Module, path: str) -> torch.nn.Module | None:
    """The layer at `path`; files spell CLIP paths with `text_model.`, which newer transformers drop."""
    candidates = [path, path[len("text_model."):]] if path.startswith("text_model.") else [path]
    for candidate in candidates:
        try:
            return model.get_submodule(candidate)
        except AttributeError:
            continue
    return None


def shape_mismatch(adapter, pipe) -> str | None:
    """The first module of `adapter` that the pipeline lacks, or whose layer has another shape."""
    for component, modules in adapter.modules.items():
        model = getattr(pipe, component, None)
        if not isinstance(model, torch.nn.Module):
            if modules:
                return f"it adapts {component}, which this base does not have"
            continue
        for path, module in modules.items():
            layer = _submodule(model, path)
            if layer is None:
                return f"its layer {component}.{path} is not in this base; it was trained for another model"
            shape = _layer_weight_shape(layer)
            # A 1x1 conv and a linear layer of the same sizes take the same adapter (SD 1.x proj_in/out).
            if shape is not None and shape[:2] != module.weight_shape[:2]:
                return (f"its layer {component}.{path} is {module.weight_shape[1]}->{module.weight_shape[0]} but this "
                        f"base's is {shape[1]}->{shape[0]}; it was trained for another model (e.g. SD 2.x)")
    return None


def _reason(exc: ModelError, path: Path) -> str:
    """A reader's error without the file's name in front (the caller names the file)."""
    text = str(exc).replace(f"adapter file {path} is ", "")
    return text[len(str(path)) + 2:] if text.startswith(f"{path}: ") else text


def why_not_loadable(path: Path, pipe, unreadable_is_a_reason: bool = True) -> str | None:
    """The reason `path` cannot load into `pipe`, when one can be named; None when it looks right.

    Only the file's header is read (keys, shapes, metadata; no weights), so checking a file before
    loading it does not read it twice. A LyCORIS file is held against the layers it will be merged
    into; a LoRA file against the base family and the shapes of its layers. A LoRA file our reader
    cannot read is a reason when `unreadable_is_a_reason`; else (a check before loading) it is left
    to diffusers' loader, which may still know it. A LyCORIS file is only ever read by us, so its
    reader's errors always stand."""
    from ..export.adapter import read_adapter
    from ..export.lycoris import needs_lycoris_reader, read_lycoris
    from .lycoris import WeightPatches

    base = pipe_family(pipe)
    lycoris = needs_lycoris_reader(path)
    if lycoris:
        try:
            adapter = read_lycoris(path, fallback=base, header_only=True)
            if adapter.base == base:
                WeightPatches(pipe).resolve(adapter, str(path))  # matches every module to a layer, changes nothing
        except ModelError as exc:
            return _reason(exc, path)
    else:
        try:
            # keys, metadata and shapes tell the family; when too few keys do, the layers are checked
            adapter = read_adapter(path, fallback=base, header_only=True)
        except ModelError as exc:
            return _reason(exc, path) if unreadable_is_a_reason else None
        except (OSError, ValueError, KeyError, RuntimeError):
            return None
    if adapter.base != base:
        return (f"an {FAMILY_NAMES[adapter.base]} adapter does not fit an {FAMILY_NAMES[base]} base; "
                f"use an {FAMILY_NAMES[adapter.base]} --model or leave the file out")
    return None if lycoris else shape_mismatch(adapter, pipe)
