"""Writing and reading adapter `.safetensors` files in the kohya or diffusers layout.

Writes go through `atomic_path`, so a crash mid-write never leaves a half file under the real name.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
from pathlib import Path
from typing import Mapping

import safetensors
import safetensors.torch
import torch

from ..errors import DAMAGED, ModelError
from ..fileio import atomic_path
from .bundle import PREFIX as BUNDLE_PREFIX
from .layouts import COMPONENTS, KOHYA_PREFIXES, peft_to_diffusers, peft_to_kohya
from .metadata import check_metadata, kohya_metadata, with_hashes

# diffusers' `LORA_ADAPTER_METADATA_KEY`: a JSON object of each component's peft LoraConfig with
# keys prefixed by the component (`unet.r`, `unet.lora_alpha`, `text_encoder.target_modules`...).
LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"

# How LyCORIS records DoRA in kohya metadata (`--network_args dora_wd=True wd_on_out=True`): the
# magnitudes are on the output axis, the peft/diffusers convention (see layouts.py).
DORA_NETWORK_ARGS = {"dora_wd": "True", "wd_on_out": "True"}

Alpha = float | Mapping[str, float | Mapping[str, float]]


def adapter_states(unet, text_encoder=None, text_encoder_2=None, adapter_name: str = "default",
                   ) -> dict[str, dict[str, torch.Tensor]]:
    """{component: peft state dict} of the adapters injected with `add_adapter`, on the CPU."""
    from peft.utils import get_peft_model_state_dict

    models = {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    return {
        name: {k: v.detach().cpu() for k, v in get_peft_model_state_dict(
            model, adapter_name=adapter_name, save_embedding_layers=False).items()}
        for name, model in models.items()
        if model is not None
    }


def adapter_configs(unet, text_encoder=None, text_encoder_2=None, adapter_name: str = "default",
                    ) -> dict[str, dict]:
    """{component: LoraConfig as a dict} of injected adapters, for `save_adapter(adapter_configs=...)`."""
    models = {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    return {name: model.peft_config[adapter_name].to_dict() for name, model in models.items() if model is not None}


def _component_alpha(alpha: Alpha, component: str) -> float | Mapping[str, float]:
    """`alpha` is one number, {component: number}, or {component: {module: number}}."""
    return alpha[component] if isinstance(alpha, Mapping) else alpha


def _headline_alpha(alpha: Alpha) -> float:
    """The alpha to show as `ss_network_alpha`: the most common one when they differ."""
    values: list[float] = []
    for value in alpha.values() if isinstance(alpha, Mapping) else [alpha]:
        values.extend(value.values() if isinstance(value, Mapping) else [value])
    return collections.Counter(float(v) for v in values).most_common(1)[0][0]


def _pattern(module: str) -> str:
    # peft matches patterns as `(.*\.)?PATTERN$`; without `text_model.` the pattern matches both
    # flattened (transformers >= 5) and nested CLIP text models.
    return re.escape(module.removeprefix("text_model."))


def lora_config_dict(state: Mapping[str, torch.Tensor], rank: int, alpha: float | Mapping[str, float]) -> dict:
    """A peft LoraConfig (as a dict) that rebuilds exactly the modules in `state`: the most common
    rank/alpha as `r`/`lora_alpha`, the rest as `rank_pattern`/`alpha_pattern`."""
    from peft import LoraConfig

    modules = sorted({key.rsplit(".lora_", 1)[0] for key in state})
    ranks = {m: state[f"{m}.lora_A.weight"].shape[0] for m in modules}
    alphas = dict(alpha) if isinstance(alpha, Mapping) else {m: float(alpha) for m in modules}
    lora_alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    config = LoraConfig(
        r=rank,
        lora_alpha=lora_alpha,
        # Whole module paths, not suffixes like `to_q`: an adapter on some of the layers a suffix
        # names (an extracted or merged file) must not make peft wrap the others too.
        target_modules=sorted({m.removeprefix("text_model.") for m in modules}),
        rank_pattern={_pattern(m): r for m, r in ranks.items() if r != rank},
        alpha_pattern={_pattern(m): a for m, a in alphas.items() if a != lora_alpha},
        use_dora=any(key.endswith(".lora_magnitude_vector") for key in state),
    )
    return config.to_dict()


def _adapter_metadata_json(configs: Mapping[str, dict]) -> str:
    """Flatten {component: config} the way diffusers' `_save_lora_weights` does, then dump it as
    diffusers' `write_lora_layers` does (sets as lists, indent=2, sorted keys)."""
    flat = {}
    for component, config in configs.items():
        for key, value in config.items():
            if isinstance(value, set):  # target_modules; sorted so the file is reproducible
                value = sorted(value)
            flat[f"{component}.{key}"] = value
    return json.dumps(flat, indent=2, sort_keys=True)


def _with_dora_args(header: dict[str, str]) -> dict[str, str]:
    """`ss_network_args` with LyCORIS's DoRA arguments added (beside LoCon's conv_dim/conv_alpha),
    unless the file already says how its DoRA scales lie."""
    try:
        args = json.loads(header.get("ss_network_args") or "{}")
    except ValueError:
        return header  # someone else's text: leave it as it is
    if not isinstance(args, dict) or "dora_wd" in args:
        return header
    return {**header, "ss_network_args": json.dumps({**args, **DORA_NETWORK_ARGS})}


def _cast(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    # Alphas keep their own dtype (float32): they are scalars and must stay exact. dtype None keeps
    # every tensor as it is (format conversion must not round anything).
    return {k: (v if k.endswith(".alpha") or dtype is None else v.to(dtype)).contiguous()
            for k, v in tensors.items()}


def save_adapter(
    path: str | os.PathLike,
    component_states: Mapping[str, Mapping[str, torch.Tensor]],
    rank: int,
    alpha: Alpha,
    layout: str = "kohya",
    metadata: Mapping[str, str] | None = None,
    dtype: torch.dtype | None = torch.float16,
    *,
    base: str = "sd15",
    adapter_configs: Mapping[str, dict] | None = None,
    extra_tensors: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write `component_states` ({"unet": peft state, "text_encoder": ...}) to `path` atomically.

    `alpha` is one number, or per component a number or {peft module path: alpha} (what
    `kohya_to_peft` returns). `base` ("sd15" or "sdxl") picks the kohya prefixes and, for SDXL,
    LDM block names. kohya files get `sshs_*` hashes and, if absent, the basic `ss_network_*` keys;
    diffusers files get each component's LoraConfig under `lora_adapter_metadata` (built from
    `rank`/`alpha` and the keys unless `adapter_configs` gives the real ones). `extra_tensors`: written
    as they are beside a kohya file's (a trained embedding's `bundle_emb.*` keys).
    """
    if layout not in ("kohya", "diffusers"):
        raise ValueError(f"layout must be 'kohya' or 'diffusers', not {layout!r}")
    if dtype not in (torch.float16, torch.bfloat16, torch.float32, None):
        raise ValueError(f"dtype must be float16, bfloat16, float32 or None (keep), not {dtype}")
    if base not in KOHYA_PREFIXES:
        raise ValueError(f"base must be one of {', '.join(KOHYA_PREFIXES)}, not {base!r}")
    states = {name: state for name, state in component_states.items() if state}
    extra = set(states) - set(KOHYA_PREFIXES[base])
    if extra or not states:
        raise ValueError(f"components must be some of {', '.join(KOHYA_PREFIXES[base])} for {base}, "
                         f"got {', '.join(component_states) or 'none'}")
    header = dict(metadata or {})
    check_metadata(header)

    if layout == "kohya":
        tensors: dict[str, torch.Tensor] = {}
        for component, state in states.items():
            tensors.update(peft_to_kohya(state, KOHYA_PREFIXES[base][component], _component_alpha(alpha, component),
                                         unet_blocks="ldm" if base == "sdxl" else "diffusers"))
        tensors = {**_cast(tensors, dtype), **(extra_tensors or {})}
        if "ss_network_dim" not in header:
            version = "sdxl_base_v1-0" if base == "sdxl" else "sd_v1"
            basics = kohya_metadata(rank=rank, alpha=_headline_alpha(alpha), base_model_version=version)
            header = {**{k: v for k, v in basics.items() if k.startswith("ss_")}, **header}
        if any(k.endswith(".dora_scale") for k in tensors):
            header = _with_dora_args(header)
        header = with_hashes(tensors, header)
    else:
        tensors = _cast(peft_to_diffusers(states), dtype)
        configs = dict(adapter_configs or {})
        for component, state in states.items():
            if component not in configs:
                configs[component] = lora_config_dict(state, rank, _component_alpha(alpha, component))
        header = {"format": "pt", **header, LORA_ADAPTER_METADATA_KEY: _adapter_metadata_json(configs)}

    with atomic_path(path) as tmp:
        safetensors.torch.save_file(tensors, str(tmp), metadata=header)
    return Path(path)


# torch.save / pickle files: loading one runs whatever code it carries.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


def adapter_path_problem(path: Path) -> str | None:
    """Why `path` cannot be read as an adapter file before opening it (a folder, missing, a pickle),
    as the end of a sentence that starts with the path; None when it can be tried."""
    if path.is_dir():
        files = sorted(p.name for p in path.glob("*.safetensors"))
        inside = f" (it holds {', '.join(files[:3])}{', ...' if len(files) > 3 else ''})" if files else ""
        return f"is a folder; give the adapter's .safetensors file{inside}"
    if not path.is_file():
        return "does not exist"
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return (f"is a pickle ({path.suffix}), which can run code when loaded and is not read here; save it as "
                ".safetensors first")
    return None


def _header_tensor(f, key: str) -> torch.Tensor:
    """A tensor as the header describes it: a 'meta' tensor of its shape and dtype, holding no data,
    except single values (alphas, flags), which are read."""
    part = f.get_slice(key)
    shape = part.get_shape()
    if math.prod(shape) <= 1 or part.get_dtype() not in _DTYPES:  # a dtype torch has no name for here: read it
        return f.get_tensor(key)
    return torch.empty(shape, dtype=_DTYPES[part.get_dtype()], device="meta")


# safetensors' dtype names (the header's) -> torch dtypes
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def load_adapter(path: str | os.PathLike, header_only: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of an adapter file; a missing or unreadable file is a one-line ModelError.
    `header_only` reads the keys, shapes and metadata but no weights (see `_header_tensor`): enough
    to check that a file fits a model before it is read for good. Bundled textual-inversion
    embeddings (`bundle_emb.*`) are no part of the adapter and are left out: every tool reads
    them with `bundle.read_bundle` and keeps or writes them itself."""
    path = Path(path)
    problem = adapter_path_problem(path)
    if problem is not None:
        raise ModelError(f"adapter file {path} {problem}")
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            read = (lambda key: _header_tensor(f, key)) if header_only else f.get_tensor
            tensors = {key: read(key) for key in f.keys() if not key.startswith(BUNDLE_PREFIX)}
    except Exception as e:  # safetensors raises several types (SafetensorError, OSError, ...)
        reason = " ".join(str(e).split()) or type(e).__name__
        raise ModelError(f"adapter file {path} is not a readable .safetensors file ({reason}); {DAMAGED}") from e
    return tensors, metadata


__all__ = ["COMPONENTS", "LORA_ADAPTER_METADATA_KEY", "adapter_configs", "adapter_states", "load_adapter",
           "lora_config_dict", "save_adapter"]
