"""Our reading of AUTOMATIC1111's LoRA key rule (see loader_rules.py): `load_network` splits each
key at its first dot, converts the module name (`convert_diffusers_name_to_compvis` and fallbacks)
and looks it up among the model's named modules; keys that match nothing are dropped silently."""

from __future__ import annotations

import math
import re
from typing import Mapping

from loader_rules import Resolution, Shape, check_distinct, groups, resolve_parts, under


def a1111_layers(ckpt: Mapping[str, Shape]) -> dict[str, Shape]:
    """{network layer name: weight shape}: A1111 names every module of `sd_model.model` (the UNet as
    `diffusion_model_...`) and of the text encoder it wraps (`transformer_...` on SD 1.x; on SDXL
    `0_transformer_...` and `1_model_...`, where each OpenCLIP attention is one MultiheadAttention
    `1_model_transformer_resblocks_N_attn` whose q/k/v weights are thirds of `in_proj_weight`)."""
    out: dict[str, Shape] = {}
    for key, shape in ckpt.items():
        head, _, leaf = key.rpartition(".")
        if leaf == "in_proj_weight":  # A1111 patches q, k and v as thirds of it
            out[under(head.removeprefix("conditioner.embedders."))] = (shape[0] // 3, shape[1])
            continue
        for prefix in ("model.", "cond_stage_model.", "conditioner.embedders."):  # not the VAE
            if leaf == "weight" and head.startswith(prefix):
                out[under(head.removeprefix(prefix))] = shape
    return out


_A1111_RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
                 "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}


def a1111_compvis_name(name: str) -> str:
    """convert_diffusers_name_to_compvis for SD 1.x/SDXL: kohya's diffusers-style names -> compvis
    names, by regular expressions that hard-code SD's two resnets per level (three LDM slots); any
    other name comes back as it is."""
    if m := re.match(r"lora_unet_conv_in(.*)", name):
        return f"diffusion_model_input_blocks_0_0{m[1]}"
    if m := re.match(r"lora_unet_conv_out(.*)", name):
        return f"diffusion_model_out_2{m[1]}"
    if m := re.match(r"lora_unet_time_embedding_linear_(\d+)(.*)", name):
        return f"diffusion_model_time_embed_{int(m[1]) * 2 - 2}{m[2]}"
    if m := re.match(r"lora_unet_(down_blocks|mid_block|up_blocks)_(?:(\d+)_)?(attentions|resnets)_(\d+)_(.+)", name):
        where, b, part, j = m[1], int(m[2] or 0), m[3], int(m[4])
        suffix = _A1111_RESNET.get(m[5], m[5]) if part == "resnets" else m[5]
        slot = 1 if part == "attentions" else 0
        if where == "down_blocks":
            return f"diffusion_model_input_blocks_{1 + b * 3 + j}_{slot}_{suffix}"
        if where == "mid_block":
            return f"diffusion_model_middle_block_{1 if part == 'attentions' else j * 2}_{suffix}"
        return f"diffusion_model_output_blocks_{b * 3 + j}_{slot}_{suffix}"
    if m := re.match(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", name):
        return f"diffusion_model_input_blocks_{3 + int(m[1]) * 3}_0_op"
    if m := re.match(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", name):
        return f"diffusion_model_output_blocks_{2 + int(m[1]) * 3}_{2 if int(m[1]) > 0 else 1}_conv"
    if m := re.match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", name):
        return f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"
    if m := re.match(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", name):
        rest = m[2].replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj").replace("self_attn", "attn")
        return f"1_model_transformer_resblocks_{m[1]}_{rest}"
    return name


def _a1111_layer(module: str, layers: Mapping[str, Shape]) -> str | None:
    """The layer name A1111 files `module`'s tensors under, or None (dropped): the converted name, an
    OpenCLIP q/k/v (`..._attn_q_proj`, applied to the attention that owns it), then names that are
    compvis already (`lora_unet_` -> `diffusion_model_`, `lora_te1_text_model` -> `0_transformer_...`)."""
    name = a1111_compvis_name(module)
    if name in layers:
        return name
    if m := re.match(r"(.*)_([qkv]_proj)$", name):
        if m[1] in layers:
            return name
    if "lora_unet" in module:
        name = module.replace("lora_unet", "diffusion_model")
    elif "lora_te1_text_model" in module:
        name = module.replace("lora_te1_text_model", "0_transformer_text_model")
        if name not in layers:
            name = module.replace("lora_te1_text_model", "transformer_text_model")
    return name if name in layers else None


def a1111(tensors: Mapping, ckpt: Mapping[str, Shape]) -> Resolution:
    """A1111's Lora extension (`load_network`, then `network_apply_weights`) on a file's tensors over
    the model of checkpoint `ckpt`; bundled embeddings (`bundle_emb.TOKEN.*`) as it registers them."""
    layers = a1111_layers(ckpt)
    res = Resolution()
    bundles: dict[str, dict] = {}
    by_module = groups(tensors)
    for module, parts in by_module.items():
        if module == "bundle_emb":
            for part, tensor in parts.items():
                token, _, vec = part.partition(".")
                bundles.setdefault(token, {})[vec.split(".")[0]] = tensor
            continue
        name = _a1111_layer(module, layers)
        if name is None:
            res.unread += [f"{module}.{p}" for p in parts]
            continue
        attention = re.match(r"(.*)_([qkv]_proj)$", name)
        weight = layers[attention[1]] if name not in layers and attention else layers[name]
        resolve_parts(res, module, name, parts, weight)
    _check_openclip_attention(res, layers)
    check_distinct(res)
    for token, parts in bundles.items():
        _check_bundle(res, token, parts, ckpt)
    for module in res.kinds:
        scale = by_module[module].get("dora_scale")
        if scale is not None and math.prod(scale.shape) == scale.shape[0]:
            res.notes.append(f"{module}: output-axis dora_scale; A1111 normalises per input column")
    return res


def _check_openclip_attention(res: Resolution, layers: Mapping[str, Shape]) -> None:
    """A1111 patches an OpenCLIP MultiheadAttention only when the file has all of its q, k, v and
    out_proj modules; with any missing it applies none of them, silently."""
    groups: dict[str, set[str]] = {}
    for module, name in res.layers.items():
        if m := re.fullmatch(r"(1_model_transformer_resblocks_\d+_attn)_(q_proj|k_proj|v_proj|out_proj)", name):
            groups.setdefault(m[1], set()).add(m[2])
    for attention, have in groups.items():
        if have != {"q_proj", "k_proj", "v_proj", "out_proj"}:
            res.problems.append(f"{attention}: A1111 applies q/k/v/out_proj together; the file has only {sorted(have)}")


def _check_bundle(res: Resolution, token: str, parts: Mapping, ckpt: Mapping[str, Shape]) -> None:
    """create_embedding_from_data, then the database's width check (SD 1.x: the CLIP width; SDXL:
    clip_l + clip_g widths, the concatenated conditioning)."""
    te = ckpt.get("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight")
    if te is not None:
        vectors = parts.get("string_to_param", parts.get("emb_params"))
        if vectors is None or len(parts) != 1 or vectors.shape[-1] != te[1]:
            res.problems.append(f"bundle_emb.{token}: {sorted(parts)} is not one (N, {te[1]}) tensor")
            return
        res.embeddings[token] = vectors.shape[0]
        return
    widths = (ckpt["conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"][1],
              ckpt["conditioner.embedders.1.model.token_embedding.weight"][1])
    l, g = parts.get("clip_l"), parts.get("clip_g")
    if l is None or g is None or (l.shape[-1], g.shape[-1]) != widths or l.shape[0] != g.shape[0]:
        res.problems.append(f"bundle_emb.{token}: needs clip_l (N, {widths[0]}) and clip_g (N, {widths[1]})")
        return
    res.embeddings[token] = g.shape[0]
