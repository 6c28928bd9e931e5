"""Our reading of ComfyUI's LoRA key rule (see loader_rules.py): `model_lora_keys_unet` and
`model_lora_keys_clip` map kohya module names to the weights of the loaded model, `load_lora` reads
each mapped module's parts and logs every other key as "lora key not loaded"."""

from __future__ import annotations

import re
from typing import Mapping

from loader_rules import Resolution, Shape, check_distinct, groups, resolve_parts, under


# comfy/lora.py LORA_CLIP_MAP: the only text encoder layers kohya names map to (32 layers at most)
COMFY_CLIP_LINEARS = ("mlp.fc1", "mlp.fc2", "self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj",
                      "self_attn.out_proj")
# comfy/utils.py unet_to_diffusers' tables, at module level: diffusers name -> LDM name
_COMFY_RESNET = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
                 "conv_shortcut": "skip_connection", "norm1": "in_layers.0", "norm2": "out_layers.0"}
_COMFY_ATTENTION = ("proj_in", "proj_out", "norm")
_COMFY_TRANSFORMER = ("norm1", "norm2", "norm3", "ff.net.0.proj", "ff.net.2",
                      *(f"attn{i}.{p}" for i in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")))
_COMFY_BASIC = {"class_embedding.linear_1": "label_emb.0.0", "class_embedding.linear_2": "label_emb.0.2",
                "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
                "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
                "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2"}
# OpenCLIP -> HF CLIP names, as ComfyUI converts SDXL's second encoder on load
_RESBLOCK, _CLIP_G = r"conditioner\.embedders\.1\.model\.transformer\.resblocks\.(\d+)\.", "clip_g.transformer.text_model.encoder.layers."
_OPENCLIP_HF = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
                "attn.out_proj": "self_attn.out_proj"}


def comfy_layers(ckpt: Mapping[str, Shape]) -> dict[str, Shape]:
    """The weights ComfyUI's models hold, by its names: `diffusion_model.*` (the UNet as in the file),
    `clip_l.transformer.*` (SD 1.x's CLIP, SDXL's first encoder) and `clip_g.transformer.text_model.*`
    (SDXL's OpenCLIP, renamed to HF CLIP with q/k/v cut out of `in_proj`)."""
    out: dict[str, Shape] = {}
    for key, shape in ckpt.items():
        if key.startswith("model.diffusion_model."):
            out[key.removeprefix("model.")] = shape
        elif key.startswith(("cond_stage_model.transformer.", "conditioner.embedders.0.transformer.")):
            out["clip_l.transformer." + key.split(".transformer.", 1)[1]] = shape
        elif m := re.fullmatch(_RESBLOCK + r"(.+)\.(weight|bias)", key):
            out[f"{_CLIP_G}{m[1]}.{_OPENCLIP_HF.get(m[2], m[2])}.{m[3]}"] = shape
        elif m := re.fullmatch(_RESBLOCK + r"attn\.in_proj_weight", key):
            for p in "qkv":
                out[f"{_CLIP_G}{m[1]}.self_attn.{p}_proj.weight"] = (shape[0] // 3, shape[1])
    return out


def _slots(keys, blocks: str) -> dict[int, set[str]]:
    """{slot N: its children's names} of `input_blocks`/`output_blocks` (`.0`, `.1`, `.0.op`, `.2.conv`)."""
    slots: dict[int, set[str]] = {}
    for key in keys:
        if m := re.match(rf"diffusion_model\.{blocks}\.(\d+)\.(\d+)\.(\w+)", key):
            slots.setdefault(int(m[1]), set()).add(f"{m[2]}.{m[3]}")
    return slots


def _depth(keys, prefix: str) -> int:
    return len({m[1] for k in keys if (m := re.match(re.escape(prefix) + r"transformer_blocks\.(\d+)\.", k))})


def comfy_diffusers_names(layers: Mapping[str, Shape]) -> dict[str, str]:
    """{diffusers module path: LDM module path} as ComfyUI's unet_to_diffusers builds it, from the
    UNet's structure (levels, resnets per level, transformer depth per block: what ComfyUI's model
    detection reads off the checkpoint), not from any name table of ours."""
    keys = [k for k in layers if k.startswith("diffusion_model.")]
    names = dict(_COMFY_BASIC)
    inputs = _slots(keys, "input_blocks")
    per_level = [0]  # resnets in each down level
    for n in sorted(inputs)[1:]:  # slot 0 is conv_in
        level, j = len(per_level) - 1, per_level[-1]
        if "0.op" in inputs[n]:
            names[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{n}.0.op"
            per_level.append(0)
            continue
        names.update({f"down_blocks.{level}.resnets.{j}.{d}": f"input_blocks.{n}.0.{o}" for d, o in _COMFY_RESNET.items()})
        depth = _depth(keys, f"diffusion_model.input_blocks.{n}.1.")
        if depth:
            names.update(_attention(f"down_blocks.{level}.attentions.{j}", f"input_blocks.{n}.1", depth))
        per_level[-1] += 1
    n = 0
    for up, count in enumerate(reversed(per_level)):
        for j in range(count + 1):  # an up level has one resnet more than its down level
            names.update({f"up_blocks.{up}.resnets.{j}.{d}": f"output_blocks.{n}.0.{o}" for d, o in _COMFY_RESNET.items()})
            depth = _depth(keys, f"diffusion_model.output_blocks.{n}.1.")
            if depth:
                names.update(_attention(f"up_blocks.{up}.attentions.{j}", f"output_blocks.{n}.1", depth))
            if j == count:
                names[f"up_blocks.{up}.upsamplers.0.conv"] = f"output_blocks.{n}.{2 if depth else 1}.conv"
            n += 1
    names.update(_attention("mid_block.attentions.0", "middle_block.1", _depth(keys, "diffusion_model.middle_block.1.")))
    for i, slot in enumerate((0, 2)):
        names.update({f"mid_block.resnets.{i}.{d}": f"middle_block.{slot}.{o}" for d, o in _COMFY_RESNET.items()})
    return names


def _attention(diffusers: str, ldm: str, depth: int) -> dict[str, str]:
    names = {f"{diffusers}.{p}": f"{ldm}.{p}" for p in _COMFY_ATTENTION}
    for t in range(depth):
        names.update({f"{diffusers}.transformer_blocks.{t}.{p}": f"{ldm}.transformer_blocks.{t}.{p}"
                      for p in _COMFY_TRANSFORMER})
    return names


def comfy_key_map(layers: Mapping[str, Shape]) -> dict[str, str]:
    """{kohya module name: ComfyUI weight key}: `lora_unet_` + each UNet weight's LDM name, and + its
    diffusers name; `lora_te_`/`lora_te1_` + CLIP-L's and `lora_te2_` + bigG's six encoder linears."""
    key_map = {}
    for key in layers:
        if key.startswith("diffusion_model.") and key.endswith(".weight"):
            key_map["lora_unet_" + under(key[len("diffusion_model."):-len(".weight")])] = key
    for diffusers, ldm in comfy_diffusers_names(layers).items():
        key_map["lora_unet_" + under(diffusers)] = f"diffusion_model.{ldm}.weight"
    has_l = any(k.startswith("clip_l.") for k in layers)
    for b in range(32):
        for c in COMFY_CLIP_LINEARS:
            suffix = f"text_model_encoder_layers_{b}_{under(c)}"
            if (k := f"clip_l.transformer.text_model.encoder.layers.{b}.{c}.weight") in layers:
                key_map[f"lora_te_{suffix}"] = key_map[f"lora_te1_{suffix}"] = k
            if (k := f"clip_g.transformer.text_model.encoder.layers.{b}.{c}.weight") in layers and has_l:
                key_map[f"lora_te2_{suffix}"] = k
    return key_map


def comfyui(tensors: Mapping, ckpt: Mapping[str, Shape]) -> Resolution:
    """ComfyUI's LoraLoader on `tensors` (a file's {key: tensor}) over the model of checkpoint `ckpt`."""
    layers = comfy_layers(ckpt)
    key_map = comfy_key_map(layers)
    res = Resolution()
    for module, parts in groups(tensors).items():
        target = key_map.get(module)
        if target is None or target not in layers:  # "lora key not loaded" (or a patch for no weight)
            res.unread += [f"{module}.{p}" for p in parts]
            continue
        resolve_parts(res, module, target, parts, layers[target])
    check_distinct(res)
    return res
