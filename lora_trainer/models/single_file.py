"""Single-file checkpoints in the original Stable Diffusion layout (what CivitAI and A1111 use):
`model.diffusion_model.*` (LDM UNet), `first_stage_model.*` (VAE), `cond_stage_model.transformer.*`
(SD1.x CLIP) or `conditioner.embedders.{0,1}.*` (SDXL's CLIP ViT-L and OpenCLIP bigG).

One table of names per component maps diffusers keys to original keys; saving walks it forwards,
loading backwards, into components built from configs (shipped in `configs/`, or `model.config_dir`)
and loaded strictly, so a checkpoint that does not fit fails by name instead of loading half.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping

import safetensors
import safetensors.torch
import torch

from ..errors import DAMAGED, ModelError, first_line
from ..fileio import atomic_path

log = logging.getLogger(__name__)

CONFIGS = Path(__file__).parent / "configs"
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = {"sd15": "cond_stage_model.transformer.", "sdxl": "conditioner.embedders.0.transformer."}
OPENCLIP_PREFIX = "conditioner.embedders.1.model."
_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
           ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
_VAE_ATTN = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]
_OPENCLIP = [("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"),
             ("self_attn.out_proj", "attn.out_proj")]


# ---- name tables: diffusers key -> original key ---------------------------------------------------

def _rename(rest: str, pairs) -> str:
    head, _, leaf = rest.rpartition(".")  # `weight` / `bias` stay as they are
    for new, old in pairs:
        if head == new or head.startswith(new + "."):
            return old + head[len(new):] + "." + leaf
    return rest


def unet_names(unet) -> dict[str, str]:
    """The LDM name of every UNet tensor. LDM numbers the UNet's layers flatly: input block 0 is
    conv_in, then each down block contributes layers_per_block layers (resnet `.0`, attention `.1`)
    plus its downsampler; output blocks have one more layer each, the upsampler after the attention."""
    lpb = unet.config.layers_per_block
    up_has_attention = {int(k.split(".")[1]) for k in unet.state_dict() if k.startswith("up_blocks.") and ".attentions." in k}
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
    names = {}
    for key in unet.state_dict():
        head, _, leaf = key.rpartition(".")
        if head in fixed:
            names[key] = f"{fixed[head]}.{leaf}"
            continue
        m = re.match(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)", key)
        if m:
            kind, b, part, j, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
            if kind == "down_blocks":
                layer = 1 + b * (lpb + 1) + (lpb if part == "downsamplers" else j)
                where = f"input_blocks.{layer}"
            else:
                layer = b * (lpb + 1) + (lpb if part == "upsamplers" else j)
                where = f"output_blocks.{layer}"
            if part == "resnets":
                names[key] = f"{where}.0.{_rename(rest, _RESNET)}"
            elif part == "attentions":
                names[key] = f"{where}.1.{rest}"
            elif part == "downsamplers":
                names[key] = f"{where}.0.op.{rest.removeprefix('conv.')}"
            else:
                names[key] = f"{where}.{2 if b in up_has_attention else 1}.{rest}"
            continue
        m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
        if m:
            index = {"resnets": 2 * int(m[2]), "attentions": 1}[m[1]]
            rest = _rename(m[3], _RESNET) if m[1] == "resnets" else m[3]
            names[key] = f"middle_block.{index}.{rest}"
            continue
        raise ModelError(f"UNet tensor {key!r} has no place in the original SD layout")
    return {k: UNET_PREFIX + v for k, v in names.items()}


def vae_names(vae) -> dict[str, str]:
    """The original name of every VAE tensor; decoder up blocks are numbered in reverse there."""
    n_up = len(vae.config.up_block_types)
    names = {}
    for key in vae.state_dict():
        side, _, rest = key.partition(".")
        if side not in ("encoder", "decoder"):
            names[key] = key  # quant_conv, post_quant_conv
            continue
        if rest.startswith("conv_norm_out."):
            rest = "norm_out." + rest.split(".", 1)[1]
        elif m := re.match(r"(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)", rest):
            b = int(m[2]) if m[1] == "down" else n_up - 1 - int(m[2])
            if m[3] == "resnets":
                rest = f"{m[1]}.{b}.block.{m[4]}.{m[5].replace('conv_shortcut', 'nin_shortcut')}"
            else:
                rest = f"{m[1]}.{b}.{'downsample' if m[1] == 'down' else 'upsample'}.{m[5]}"
        elif m := re.match(r"mid_block\.resnets\.(\d+)\.(.+)", rest):
            rest = f"mid.block_{int(m[1]) + 1}.{m[2].replace('conv_shortcut', 'nin_shortcut')}"
        elif m := re.match(r"mid_block\.attentions\.0\.(.+)", rest):
            rest = "mid.attn_1." + _rename(m[1], _VAE_ATTN)
        names[key] = f"{side}.{rest}"
    return {k: VAE_PREFIX + v for k, v in names.items()}


def _clip_key(key: str) -> str:
    # transformers >= 5 flattens CLIPTextModel (no `text_model.`); original files always have it.
    return key if key.startswith(("text_model.", "text_projection")) else "text_model." + key


# ---- diffusers -> original ---------------------------------------------------------------------

def _openclip_state(encoder) -> dict[str, torch.Tensor]:
    """SDXL's second encoder in OpenCLIP names: q/k/v fused into `in_proj_*`, projection transposed."""
    state = {_clip_key(k): v for k, v in encoder.state_dict().items()}
    out = {"token_embedding.weight": state.pop("text_model.embeddings.token_embedding.weight"),
           "positional_embedding": state.pop("text_model.embeddings.position_embedding.weight"),
           "text_projection": state.pop("text_projection.weight").T.contiguous()}
    for leaf in ("weight", "bias"):
        out[f"ln_final.{leaf}"] = state.pop(f"text_model.final_layer_norm.{leaf}")
    layers = sorted({int(k.split(".")[3]) for k in state if k.startswith("text_model.encoder.layers.")})
    for n in layers:
        src, dst = f"text_model.encoder.layers.{n}.", f"transformer.resblocks.{n}."
        for leaf in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{leaf}"] = torch.cat([state.pop(f"{src}self_attn.{p}_proj.{leaf}") for p in "qkv"])
        for key in [k for k in state if k.startswith(src)]:
            out[dst + _rename(key[len(src):], _OPENCLIP)] = state.pop(key)
    state.pop("text_model.embeddings.position_ids", None)
    if state:
        raise ModelError(f"text_encoder_2 tensors with no OpenCLIP name: {sorted(state)[:3]}")
    return {OPENCLIP_PREFIX + k: v for k, v in out.items()}


def original_vae_state_dict(vae) -> dict[str, torch.Tensor]:
    """The VAE's tensors under their original names (`first_stage_model.*`), as a checkpoint holds them."""
    own = vae.state_dict()
    state = {}
    for key, name in vae_names(vae).items():
        tensor = own[key]
        if ".mid.attn_1." in name and tensor.ndim == 2:  # the original VAE attention uses 1×1 convolutions
            tensor = tensor[:, :, None, None]
        state[name] = tensor
    return state


def original_state_dict(components: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """UNet, VAE and text encoder(s) of a pipeline as one original-layout state dict."""
    variant = "sdxl" if components.get("text_encoder_2") is not None else "sd15"
    unet, te = components["unet"], components["text_encoder"]
    unet_state = unet.state_dict()
    state = {name: unet_state[key] for key, name in unet_names(unet).items()}
    state.update(original_vae_state_dict(components["vae"]))
    state.update({CLIP_PREFIX[variant] + _clip_key(k): v for k, v in te.state_dict().items()
                  if not k.endswith("position_ids")})
    if variant == "sdxl":
        state.update(_openclip_state(components["text_encoder_2"]))
    return {k: v.detach().contiguous() for k, v in state.items()}


def save_single_file(pipe_or_components, path: str | os.PathLike, dtype: torch.dtype | None = None,
                     metadata: Mapping[str, str] | None = None) -> Path:
    """Write a pipeline (or its `components` dict) as one original-layout `.safetensors` file,
    atomically; `dtype` casts floating tensors (fp16 halves the file)."""
    components = getattr(pipe_or_components, "components", pipe_or_components)
    state = original_state_dict(components)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(state, str(tmp), metadata=dict(metadata or {"format": "pt"}))
    return Path(path)


# ---- original -> diffusers ---------------------------------------------------------------------

def detect_single_file_variant(path: str | os.PathLike) -> str:
    """'sdxl' when the file has SDXL's second (OpenCLIP) text encoder, 'sd15' when it has the SD1.x
    CLIP; anything else (SD2, SD3, Flux, a LoRA) is a one-line ModelError."""
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
    except Exception as exc:
        raise ModelError(f"model.base: {path} is not a readable .safetensors file ({first_line(exc)}); {DAMAGED}") from None
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        raise ModelError(f"model.base: {path} has no {UNET_PREFIX}* tensors; it is not a Stable Diffusion "
                         "checkpoint in the original layout (is it a LoRA?)")
    if any(k.startswith(OPENCLIP_PREFIX) for k in keys):
        return "sdxl"
    if any(k.startswith(CLIP_PREFIX["sd15"]) for k in keys):
        return "sd15"
    raise ModelError(f"model.base: {path} is neither SD1.x (cond_stage_model.transformer.*) nor SDXL "
                     "(conditioner.embedders.*); SD2 and other families are not supported")


def _openclip_names(encoder) -> dict[str, str]:
    """diffusers key -> OpenCLIP key for the tensors that are not fused (all but q/k/v)."""
    names = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
             "text_model.embeddings.position_embedding.weight": "positional_embedding",
             "text_model.final_layer_norm.weight": "ln_final.weight",
             "text_model.final_layer_norm.bias": "ln_final.bias"}
    for key in map(_clip_key, encoder.state_dict()):
        if m := re.match(r"text_model\.encoder\.layers\.(\d+)\.(.+)", key):
            if not re.match(r"self_attn\.[qkv]_proj\.", m[2]):
                names[key] = f"transformer.resblocks.{m[1]}.{_rename(m[2], _OPENCLIP)}"
    return {k: OPENCLIP_PREFIX + v for k, v in names.items()}


def _take(state: Mapping[str, torch.Tensor], names: Mapping[str, str], model, what: str) -> dict:
    """{diffusers key: tensor} for `model` from the original-layout `state`, shaped as the model's
    own tensors (the VAE's 1×1 attention convolutions become linear weights)."""
    own = model.state_dict()
    missing = [orig for orig in names.values() if orig not in state]
    if missing:
        raise ModelError(f"model.base: the checkpoint lacks {len(missing)} {what} tensors, e.g. {missing[0]}; "
                         "does model.config_dir describe this checkpoint?")
    out = {}
    for key, orig in names.items():
        tensor = state[orig]
        if tensor.shape != own[key].shape:
            if tensor.numel() != own[key].numel():
                raise ModelError(f"model.base: {orig} has shape {tuple(tensor.shape)}, the {what} config expects "
                                 f"{tuple(own[key].shape)}; set model.config_dir to this model's diffusers configs")
            tensor = tensor.reshape(own[key].shape)
        out[key] = tensor
    return out


def _strip_text_model(model, state: dict) -> dict:
    own = model.state_dict()
    return {k if k in own else k.removeprefix("text_model."): v for k, v in state.items()}


def _load_into(model, state: dict, dtype: torch.dtype):
    # Cast before loading: with assign=True the module takes the tensors (and dtype) as they are.
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    result = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing:
        raise ModelError(f"model.base: no tensor for {missing[0]} (and {len(missing) - 1} more) in the checkpoint")
    return model


def _tokenizer(folder: Path, **overrides):
    """The folder's tokenizer, else the CLIP BPE tokenizer shipped in configs/clip-tokenizer (the
    vocabulary of OpenAI's CLIP, which SD1.x and both SDXL encoders use)."""
    from transformers import CLIPTokenizer

    if folder.is_dir() and any(folder.iterdir()):
        return CLIPTokenizer.from_pretrained(folder, **overrides)
    return CLIPTokenizer.from_pretrained(CONFIGS / "clip-tokenizer", **overrides)


def load_single_file(path: str | os.PathLike, variant: str, dtype: torch.dtype,
                     config_dir: str | None = None) -> tuple[dict, dict]:
    """({component name: module or tokenizer}, scheduler config) from an original-layout file.

    Components are built from the diffusers configs in `config_dir` (a diffusers folder of the same
    architecture: its weights are not read) or the shipped SD1.5/SDXL configs, without weights,
    then filled from the file."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(config_dir) if config_dir else CONFIGS / variant
    if not (folder / "unet" / "config.json").is_file():
        raise ModelError(f"model.config_dir: {folder} has no unet/config.json; point it at a diffusers pipeline folder")
    if (variant == "sdxl") != (folder / "text_encoder_2" / "config.json").is_file():  # the other family's configs
        has = "SDXL" if variant == "sd15" else "SD 1.x"
        raise ModelError(f"model.config_dir: {folder} describes an {has} pipeline but {path} is an "
                         f"{'SDXL' if variant == 'sdxl' else 'SD 1.x'} checkpoint; give a folder of its own family")
    state = safetensors.torch.load_file(str(path))
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
        te = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
        te2 = (CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2"))
               if variant == "sdxl" else None)
    parts = {
        "unet": _load_into(unet, _take(state, unet_names(unet), unet, "UNet"), dtype),
        "vae": _load_into(vae, _take(state, vae_names(vae), vae, "VAE"), dtype),
        "tokenizer": _tokenizer(folder / "tokenizer"),
    }
    te_names = {k: CLIP_PREFIX[variant] + _clip_key(k) for k in te.state_dict() if not k.endswith("position_ids")}
    parts["text_encoder"] = _load_into(te, _strip_text_model(te, _take(state, te_names, te, "text encoder")), dtype)
    if te2 is not None:
        te2_state = _take(state, _openclip_names(te2), te2, "text encoder 2")
        hidden = te2.config.hidden_size
        for n in range(te2.config.num_hidden_layers):
            for leaf in ("weight", "bias"):
                fused = state[f"{OPENCLIP_PREFIX}transformer.resblocks.{n}.attn.in_proj_{leaf}"]
                for i, p in enumerate("qkv"):
                    te2_state[f"text_model.encoder.layers.{n}.self_attn.{p}_proj.{leaf}"] = fused[i * hidden:(i + 1) * hidden]
        te2_state["text_projection.weight"] = state[OPENCLIP_PREFIX + "text_projection"].T.contiguous()
        parts["text_encoder_2"] = _load_into(te2, _strip_text_model(te2, te2_state), dtype)
        parts["tokenizer_2"] = _tokenizer(folder / "tokenizer_2", pad_token="!")  # OpenCLIP pads with "!"
    scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    return parts, scheduler_config
