"""Which keys and files are LyCORIS': the parts of each type (by the key suffix after
`<lora_name>.`), the name prefixes (kohya's, kohya OFT's `oft_unet_`, LyCORIS' own `lycoris_`) and the
component and module path a name adapts, and whether a file needs the LyCORIS reader (`lycoris.py`).
"""

from __future__ import annotations

import math
import os

from ..errors import ModelError
from .layouts import KOHYA_COMPONENTS, _path_from_kohya, canonical_path
from .sdxl_names import diffusers_from_ldm

# Parts of a module, by the key suffix after `<lora_name>.`, and the LyCORIS type they belong to.
PARTS = {
    "lora_down.weight": "LoRA", "lora_up.weight": "LoRA", "lora_mid.weight": "LoRA",
    "hada_w1_a": "LoHa", "hada_w1_b": "LoHa", "hada_w2_a": "LoHa", "hada_w2_b": "LoHa",
    "hada_t1": "LoHa", "hada_t2": "LoHa",
    "lokr_w1": "LoKr", "lokr_w1_a": "LoKr", "lokr_w1_b": "LoKr", "lokr_w2": "LoKr", "lokr_w2_a": "LoKr",
    "lokr_w2_b": "LoKr", "lokr_t2": "LoKr",
    "diff": "full", "diff_b": "full",
    "weight": "IA3", "on_input": "IA3",
    "oft_blocks": "OFT", "oft_diag": "OFT", "rescale": "OFT",  # BOFT: 4-D oft_blocks, told when grouped
    "a1.weight": "GLoRA", "a2.weight": "GLoRA", "b1.weight": "GLoRA", "b2.weight": "GLoRA", "bm.weight": "GLoRA",
    "w_norm": "norm", "b_norm": "norm",
}
SHARED = ("alpha", "dora_scale")
# Parts this tool does not read, and what they are, for the refusal. LyCORIS' LoKr has a CP core for
# w2 only (`lokr_t2`): it lists `lokr_t1` among its parts but neither creates nor uses one (4.1.3),
# so no file defines what such a core means.
UNSUPPORTED = {"lokr_t1": "a CP core for a LoKr's w1, which LyCORIS itself never writes (its LoKr has one for "
                          "w2 only, lokr_t2) and ignores when loading"}
_READS = "LoRA/LoCon, LoHa, LoKr, full, (IA)^3, OFT, BOFT, GLoRA and norm"
# A key with one of these parts makes a kohya-layout file a LyCORIS file.
_LYCORIS_ONLY = {p for p, kind in PARTS.items() if kind != "LoRA"} | {"lora_mid.weight"} | set(UNSUPPORTED)
# LyCORIS' own network wrapper (`create_lycoris`, used by SimpleTuner) names each layer of the model
# it wraps `lycoris_<module path, dots as underscores>`; for SD that model is the UNet, with diffusers
# module names, and ComfyUI reads the prefix as the UNet's. Such files are read here whatever their type.
# A wrapped CLIP text encoder gives `lycoris_text_model_...`, or, with transformers 5 (whose
# CLIPTextModel has no `text_model`), `lycoris_encoder_layers_...`, `lycoris_embeddings_...` and
# `lycoris_final_layer_norm`, names no SD UNet layer has: SD 1.x's one text encoder (SDXL's two
# cannot be told apart that way).
LYCORIS_PREFIX = "lycoris"
_LYCORIS_CLIP_HEADS = tuple(f"{LYCORIS_PREFIX}_{head}" for head in
                            ("text_model_", "encoder_layers_", "embeddings_", "final_layer_norm"))
# kohya's own OFT (`networks.oft`) names UNet layers `oft_unet_<kohya module name>`.
KOHYA_OFT_PREFIX = "oft_unet"
PREFIXES = {**KOHYA_COMPONENTS, LYCORIS_PREFIX: "unet", KOHYA_OFT_PREFIX: "unet"}
_PREFIX_NAMES = "lora_unet_, lora_te_, lora_te1_, lora_te2_, lycoris_, oft_unet_"


def component_prefix(name: str) -> str | None:
    """The prefix (`lora_unet`, `lora_te1`, `lycoris`, ...) a module name starts with, or None."""
    return next((p for p in PREFIXES if name.startswith(p + "_")), None)


def component_of(name: str, prefix: str) -> str:
    """The pipeline component a module name adapts."""
    if prefix == LYCORIS_PREFIX and name.startswith(_LYCORIS_CLIP_HEADS):
        return "text_encoder"
    return PREFIXES[prefix]


def is_lycoris(keys) -> bool:
    """Whether kohya-layout `keys` hold any LyCORIS-only part (LoHa, LoKr, full, (IA)^3, a CP core...),
    or use LyCORIS' own `lycoris_` prefix."""
    prefixes = tuple(p + "_" for p in KOHYA_COMPONENTS)
    return any(k.startswith((LYCORIS_PREFIX + "_", KOHYA_OFT_PREFIX + "_"))
               or (k.startswith(prefixes) and k.partition(".")[2] in _LYCORIS_ONLY) for k in keys)


def needs_lycoris_reader(path: str | os.PathLike) -> bool:
    """Whether the file at `path` is read here rather than as LoRA: LyCORIS-only parts, or a LoRA
    file whose `dora_scale` lies on the input axis (1, d_in), which peft cannot represent."""
    import safetensors

    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            if is_lycoris(keys):
                return True
            prefixes = tuple(p + "_" for p in KOHYA_COMPONENTS)
            for key in keys:
                if key.startswith(prefixes) and key.endswith(".dora_scale"):
                    shape = f.get_slice(key).get_shape()
                    if len(shape) >= 2 and shape[0] == 1 and math.prod(shape) > 1:
                        return True
    except Exception:  # unreadable: the LoRA reader says what is wrong with it
        return False
    return False


def module_path(component: str, kohya_name: str, layers_per_block: int = 2) -> str:
    """The diffusers module path of a kohya name (without its prefix) by the built-in vocabulary;
    the inference side resolves it against the real model instead."""
    path = _path_from_kohya(kohya_name, kohya_name, checked_later=True)
    if component == "unet":
        try:
            path = diffusers_from_ldm(path, layers_per_block)
        except ModelError:
            pass
    return canonical_path(component, path)  # CLIP paths with `text_model.`, however the file spells them
