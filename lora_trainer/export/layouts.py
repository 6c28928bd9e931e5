"""Key conversion between the adapter layouts of LORA_FORMATS.md: peft (what training holds),
kohya (`lora_unet_..._to_q.lora_down.weight` + 0-d `alpha`) and diffusers (`unet.<path>.lora_A.weight`).

Both file layouts store the same math, W' = W + m · (alpha / r) · up @ down, with
down = peft `lora_A` and up = peft `lora_B`; only the names and where alpha lives differ.
No key is ever dropped: anything that does not fit a layout is reported by name.

DoRA adds a magnitude m per output channel: peft `lora_magnitude_vector` ((d_out,), for a conv
(1, d_out, 1, 1)), the diffusers key `<component>.<path>.lora_magnitude_vector` in peft's shape, and
kohya/LyCORIS `<lora_name>.dora_scale` stored on the output axis as (d_out, 1) (conv: (d_out, 1, 1, 1)),
the shape LyCORIS writes with `wd_on_out` and ComfyUI tells from the input-axis (1, d_in) kind by its
first dimension.
"""

from __future__ import annotations

from typing import Iterable, Mapping, NoReturn

import torch

from ..errors import ModelError
from .sdxl_names import diffusers_from_ldm, ldm_from_diffusers

# kohya prefix -> diffusers component. SD1.x has one text encoder (`lora_te`); SDXL has two
# (`lora_te1` = CLIP ViT-L, `lora_te2` = OpenCLIP bigG).
KOHYA_COMPONENTS = {"lora_unet": "unet", "lora_te": "text_encoder", "lora_te1": "text_encoder",
                    "lora_te2": "text_encoder_2"}
KOHYA_PREFIXES = {
    "sd15": {"unet": "lora_unet", "text_encoder": "lora_te"},
    "sdxl": {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
}
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")

_PEFT_SUFFIXES = {".lora_A.weight": "down", ".lora_B.weight": "up", ".lora_magnitude_vector": "magnitude"}
_KOHYA_SUFFIXES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha",
                   ".dora_scale": "dora_scale"}

# kohya names replace every `.` by `_`, so reading one back means knowing which `_` were part of a
# module name. These are the underscore names of the SD UNets (diffusers and LDM spelling) and HF
# CLIP; every other `_` was a dot.
_UNDERSCORE_NAMES = {
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
    "proj_in", "proj_out", "conv_in", "conv_out", "conv_shortcut", "time_emb_proj", "time_embedding",
    "linear_1", "linear_2", "add_embedding", "input_blocks", "middle_block", "output_blocks",
    "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "final_layer_norm",
    "layer_norm1", "layer_norm2", "token_embedding", "position_embedding", "text_projection",
    # the LDM UNet's own names (SDXL files)
    "in_layers", "out_layers", "emb_layers", "skip_connection", "time_embed", "label_emb",
}
_PLAIN_NAMES = {
    "attentions", "resnets", "attn1", "attn2", "ff", "net", "proj", "norm", "norm1", "norm2", "norm3",
    "conv", "conv1", "conv2", "downsamplers", "upsamplers", "encoder", "layers", "mlp", "fc1", "fc2",
    "embeddings", "op", "out",
}
# Top-level children of HF CLIPTextModel's inner `text_model`. Recent transformers flattens
# CLIPTextModel (no `.text_model`), but kohya names and older diffusers files keep it, so files are
# always written with it; diffusers strips it again when its model lacks the attribute.
_CLIP_INNER = ("encoder.", "embeddings.", "final_layer_norm.")


# Key fragments of LyCORIS's other network types, named when such a file is refused.
_LYCORIS_MARKERS = {".hada_": "LoHa", ".lokr_": "LoKr", ".oft_": "OFT", ".a1.weight": "GLoRA", ".b1.weight": "GLoRA",
                    ".w_norm": "norm", ".b_norm": "norm"}


def _fail(what: str, keys: Iterable[str], hint: str = "") -> NoReturn:
    keys = sorted(keys)
    shown = ", ".join(keys[:5]) + (f" (and {len(keys) - 5} more)" if len(keys) > 5 else "")
    raise ModelError(f"{what}: {shown}{'; ' + hint if hint else ''}")


def canonical_path(component: str, path: str) -> str:
    """The module path as files spell it: text encoder paths always start with `text_model.`."""
    if component.startswith("text_encoder") and path.startswith(_CLIP_INNER):
        return "text_model." + path
    return path


def _pair_modules(state: Mapping[str, torch.Tensor], suffixes: Mapping[str, str], shown_as: str = "",
                  ) -> dict[str, dict]:
    """Group `<module><suffix>` keys into {module: {"down": t, "up": t[, "alpha": t, "magnitude" or
    "dora_scale": t]}}.
    `shown_as` is prepended to names in errors (the file's component prefix)."""
    modules: dict[str, dict] = {}
    unknown = []
    for key, tensor in state.items():
        for suffix, role in suffixes.items():
            if key.endswith(suffix) and len(key) > len(suffix):
                modules.setdefault(key[: -len(suffix)], {})[role] = tensor
                break
        else:
            unknown.append(shown_as + key)
    lycoris = sorted({kind for key in unknown for marker, kind in _LYCORIS_MARKERS.items() if marker in key})
    if lycoris:
        raise ModelError(f"a LyCORIS {'/'.join(lycoris)} adapter ({len(unknown)} keys such as {sorted(unknown)[0]}); "
                         "this command reads only LoRA and DoRA files (infer.py, `lora-trainer merge`, `inspect` "
                         "and `merge-loras` read LyCORIS files; `lora-trainer resize IN OUT --rank R` turns one whose "
                         "change does not depend on the base (LoHa, LoKr, full) into a plain LoRA)")
    if unknown:
        _fail("keys that are not LoRA down/up weights", unknown,
              "only LoRA and DoRA are supported (no LoRA biases or LoHa/LoKr factors)")
    half = [f"{shown_as}{m} (has only {'/'.join(sorted(parts))})" for m, parts in modules.items()
            if not ("down" in parts and "up" in parts)]
    if half:
        _fail("LoRA modules missing their down or up weight", half)
    return modules


# --- peft <-> kohya ------------------------------------------------------------------------------

def peft_to_kohya(state: Mapping[str, torch.Tensor], prefix: str, alpha: float | Mapping[str, float],
                  *, unet_blocks: str = "diffusers", layers_per_block: int = 2,
                  alpha_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """One component's peft state dict -> kohya tensors under `prefix` (`lora_unet`, `lora_te`, ...).

    `alpha` is one number for every module or {peft module path: alpha}. `unet_blocks="ldm"` writes
    SDXL UNet names (`input_blocks_4_1_...`). Alpha is stored as a 0-d `alpha_dtype` tensor.
    """
    prefix = prefix.rstrip("_")
    if prefix not in KOHYA_COMPONENTS:
        raise ValueError(f"unknown kohya prefix {prefix!r}; use one of {', '.join(KOHYA_COMPONENTS)}")
    if unet_blocks not in ("diffusers", "ldm"):
        raise ValueError(f"unet_blocks must be 'diffusers' or 'ldm', not {unet_blocks!r}")
    component = KOHYA_COMPONENTS[prefix]
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for module, parts in _pair_modules(state, _PEFT_SUFFIXES).items():
        if isinstance(alpha, Mapping):
            if module not in alpha:
                raise ModelError(f"no alpha given for LoRA module {module!r}")
            module_alpha = alpha[module]
        else:
            module_alpha = alpha
        name = kohya_name(prefix, component, module, unet_blocks, layers_per_block)
        if name in origin:  # e.g. `a_b.c` and `a.b_c` would both become `a_b_c`
            raise ModelError(f"modules {origin[name]!r} and {module!r} get the same kohya name {name!r}")
        origin[name] = module
        out[f"{name}.lora_down.weight"] = parts["down"]
        out[f"{name}.lora_up.weight"] = parts["up"]
        out[f"{name}.alpha"] = torch.tensor(float(module_alpha), dtype=alpha_dtype)
        if "magnitude" in parts:
            out[f"{name}.dora_scale"] = dora_scale_from_magnitude(parts["magnitude"], parts["up"].ndim)
    return out


def kohya_name(prefix: str, component: str, module: str, unet_blocks: str = "diffusers",
               layers_per_block: int = 2) -> str:
    """The kohya module name of the peft module path `module` of `component` under `prefix`
    (`lora_unet`, ...): `lora_unet_down_blocks_0_..._to_q`; SDXL UNet names in LDM blocks with
    `unet_blocks="ldm"`, text encoder names with `text_model_`."""
    path = canonical_path(component, module)
    if component == "unet" and unet_blocks == "ldm":
        path = ldm_from_diffusers(path, layers_per_block)
    return f"{prefix}_{path.replace('.', '_')}"


def dora_scale_from_magnitude(magnitude: torch.Tensor, ndim: int) -> torch.Tensor:
    """peft's magnitude ((d_out,), conv (1, d_out, 1, 1)) as kohya's output-axis `dora_scale`:
    (d_out, 1[, 1, 1])."""
    return magnitude.reshape(-1, *[1] * (ndim - 1))


def peft_magnitude(magnitude: torch.Tensor, ndim: int) -> torch.Tensor:
    """A (d_out,) magnitude in peft's shape for a layer whose up weight has `ndim` dimensions:
    (d_out,) for linear layers, (1, d_out, 1, 1) for convs (peft's conv DoRA norm is laid out so)."""
    return magnitude.reshape(-1) if ndim == 2 else magnitude.reshape(1, -1, *[1] * (ndim - 2))


def magnitude_from_dora_scale(scale: torch.Tensor, up: torch.Tensor, key: str) -> torch.Tensor:
    """kohya's `dora_scale` as peft's magnitude (see `peft_magnitude`); input-axis scales (1, d_in),
    which older LyCORIS wrote, normalise columns instead of rows and have no peft equivalent."""
    d_out = up.shape[0]
    if scale.shape[0] != d_out or scale.numel() != d_out:
        shape = f"({d_out}, 1)" if up.ndim == 2 else f"({d_out}, 1, 1, 1)"
        raise ModelError(f"{key!r} has shape {tuple(scale.shape)}: an input-axis DoRA scale (LyCORIS without "
                         f"wd_on_out), which peft/diffusers cannot represent; only {shape} scales are read here "
                         "(infer.py and `lora-trainer merge` merge such files into the base weights)")
    return peft_magnitude(scale, up.ndim)


def _path_from_kohya(name: str, key: str, checked_later: bool = False) -> str:
    """`down_blocks_0_attentions_0_proj_in` -> `down_blocks.0.attentions.0.proj_in`."""
    tokens, parts, i = name.split("_"), [], 0
    while i < len(tokens):
        for width in (3, 2, 1):
            word = "_".join(tokens[i : i + width])
            if width == 1 or word in _UNDERSCORE_NAMES:
                parts.append(word)
                i += width
                break
    strange = [p for p in parts if not (p.isdigit() or p in _UNDERSCORE_NAMES or p in _PLAIN_NAMES)]
    if strange and not checked_later:
        raise ModelError(f"cannot tell the module path of {key!r} (unknown part {strange[0]!r}); "
                         "pass module_names from the model to resolve it")
    return ".".join(parts)


def kohya_to_peft(tensors: Mapping[str, torch.Tensor],
                  module_names: Mapping[str, Iterable[str]] | None = None, *, layers_per_block: int = 2,
                  ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, dict[str, float]]]:
    """kohya tensors -> ({component: peft state dict}, {component: {module path: alpha}}).

    Module paths use the file spelling (text encoders with `text_model.`, UNet with diffusers block
    names even when the file has SDXL's LDM names). `module_names` ({component: the model's module
    paths}) resolves names exactly instead of by the built-in vocabulary. A module without an
    alpha tensor gets alpha = rank (scale 1), as every consumer assumes.
    """
    known = {comp: {canonical_path(comp, p) for p in paths} for comp, paths in (module_names or {}).items()}
    exact = {comp: {p.replace(".", "_"): p for p in paths} for comp, paths in known.items()}
    bad_prefix = [k for k in tensors if not k.startswith(tuple(p + "_" for p in KOHYA_COMPONENTS))]
    if bad_prefix:
        _fail("keys without a kohya prefix (lora_unet_, lora_te_, lora_te1_, lora_te2_)", bad_prefix)
    states: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, dict[str, float]] = {}
    for lora_name, parts in _pair_modules(tensors, _KOHYA_SUFFIXES).items():
        prefix = next(p for p in KOHYA_COMPONENTS if lora_name.startswith(p + "_"))
        component, name = KOHYA_COMPONENTS[prefix], lora_name[len(prefix) + 1 :]
        key = f"{lora_name}.lora_down.weight"
        path = exact.get(component, {}).get(name) or _path_from_kohya(name, key, component in known)
        if component == "unet":
            path = diffusers_from_ldm(path, layers_per_block)
        if component in known and path not in known[component]:
            raise ModelError(f"{key!r} names no module of the {component}")
        state = states.setdefault(component, {})
        if f"{path}.lora_A.weight" in state:
            raise ModelError(f"{key!r} names the same module as another key ({path})")
        state[f"{path}.lora_A.weight"] = parts["down"]
        state[f"{path}.lora_B.weight"] = parts["up"]
        if "dora_scale" in parts:
            state[f"{path}.lora_magnitude_vector"] = magnitude_from_dora_scale(
                parts["dora_scale"], parts["up"], f"{lora_name}.dora_scale")
        alpha = parts.get("alpha")
        alphas.setdefault(component, {})[path] = float(alpha if alpha is not None else parts["down"].shape[0])
    return states, alphas


# --- peft <-> diffusers --------------------------------------------------------------------------

def peft_to_diffusers(component_states: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """{component: peft state dict} -> one flat dict with `unet.` / `text_encoder.` key prefixes."""
    out: dict[str, torch.Tensor] = {}
    for component, state in component_states.items():
        if component not in COMPONENTS:
            raise ValueError(f"unknown component {component!r}; use one of {', '.join(COMPONENTS)}")
        for module, parts in _pair_modules(state, _PEFT_SUFFIXES).items():
            path = canonical_path(component, module)
            out[f"{component}.{path}.lora_A.weight"] = parts["down"]
            out[f"{component}.{path}.lora_B.weight"] = parts["up"]
            if "magnitude" in parts:
                out[f"{component}.{path}.lora_magnitude_vector"] = parts["magnitude"]
    return out


def diffusers_to_peft(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The inverse of `peft_to_diffusers`: {component: peft state dict}."""
    states: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in tensors.items():
        component, _, rest = key.partition(".")
        if component not in COMPONENTS or not rest:
            unknown.append(key)
            continue
        states.setdefault(component, {})[rest] = tensor
    if unknown:
        _fail("keys without a diffusers component prefix (unet., text_encoder., text_encoder_2.)", unknown)
    for component, state in states.items():
        _pair_modules(state, _PEFT_SUFFIXES, f"{component}.")  # validates every key and pairing
    return states


# The original (A1111/ComfyUI) checkpoint layout: the UNet, the VAE, SD 1.x's and SDXL's text encoders.
_CHECKPOINT_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.embedders.")


def detect_layout(tensors: Mapping[str, torch.Tensor]) -> str:
    """'kohya' or 'diffusers'; a mix, or keys of neither, is an error naming the odd keys."""
    kohya = [k for k in tensors if k.startswith(tuple(p + "_" for p in KOHYA_COMPONENTS))]
    diffusers = [k for k in tensors if k.startswith(tuple(c + "." for c in COMPONENTS))]
    if not tensors:
        raise ModelError("the adapter holds no tensors")
    if kohya and diffusers:
        _fail("the adapter mixes kohya and diffusers keys; diffusers keys", diffusers)
    known = kohya or diffusers
    if not known and any(k.startswith(_CHECKPOINT_PREFIXES) for k in tensors):
        raise ModelError("a whole Stable Diffusion checkpoint (its UNet, VAE and text encoder weights), not an "
                         "adapter; give it as the base model (--model / model.base), or make an adapter of it "
                         "with `lora-trainer extract`")
    if not known and embedding_keys(tensors):
        raise ModelError(f"a textual-inversion embedding ({', '.join(sorted(tensors))}), not an adapter; infer.py "
                         "takes it with --embedding FILE[:TOKEN] (A1111/ComfyUI: their embeddings folder), "
                         "`lora-trainer inspect` reads it")
    if len(known) != len(tensors):
        _fail("keys of neither the kohya nor the diffusers layout", set(tensors) - set(known))
    return "kohya" if kohya else "diffusers"


_ADAPTER_HINTS = ("lora", "alpha", "hada_", "lokr_", "oft_", "diff", "bundle_emb.")


def embedding_keys(keys: Iterable[str]) -> bool:
    """Whether a file's keys are a textual-inversion embedding's: SDXL's clip_l + clip_g, or one
    tensor (A1111's emb_params, a string_to_param key, diffusers' {token: vectors}) whose name is
    no adapter's and no model layer's (`conv_in.weight`)."""
    keys = list(keys)
    if set(keys) == {"clip_l", "clip_g"}:
        return True
    return len(keys) == 1 and not any(hint in keys[0] for hint in _ADAPTER_HINTS) and \
        not keys[0].endswith((".weight", ".bias"))
