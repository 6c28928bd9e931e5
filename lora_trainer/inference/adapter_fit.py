"""Why an adapter file does not load into a pipeline, in one line a user can act on.

diffusers' own failure messages ("Error(s) in loading state_dict", "keys have not been correctly
renamed") name neither the layer nor the cause. When a load fails, the file is read with our own
reader and held against the pipeline: an unreadable or non-LoRA file, an adapter for the other base
family, or a layer whose shape differs from the base's (an adapter trained on another model, such
as SD 2.x on an SD 1.5 base) is each named as such.
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


def why_not_loadable(path: Path, pipe) -> str | None:
    """The reason `path` cannot load into `pipe`, when one can be named; None when it looks right."""
    from ..export.adapter import read_adapter

    base = pipe_family(pipe)
    try:
        adapter = read_adapter(path, base=base)  # the file as such: readable, LoRA keys, shapes that multiply
    except ModelError as exc:
        text = str(exc).replace(f"adapter file {path} is ", "")
        return text[len(str(path)) + 2:] if text.startswith(f"{path}: ") else text
    except (OSError, ValueError, KeyError, RuntimeError):
        return None
    try:
        family = read_adapter(path).base  # detected from keys and metadata
    except ModelError:  # too few keys to tell: the layer check below still applies
        family = base
    if family != base:
        return (f"an {FAMILY_NAMES[family]} adapter does not fit an {FAMILY_NAMES[base]} base; "
                f"use an {FAMILY_NAMES[family]} --model")
    return shape_mismatch(adapter, pipe)
