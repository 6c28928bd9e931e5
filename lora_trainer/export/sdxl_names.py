"""SDXL UNet module paths: diffusers names <-> the LDM (SGM) names kohya writes in SDXL files.

kohya trains SDXL on Stability's original UNet, whose modules are numbered blocks:
`input_blocks.N.K` (K=0 resnet, K=1 attention; a level's last slot holds the downsampler `.0.op`),
`middle_block.0/1/2` (resnet, attention, resnet), `output_blocks.N.K` (K=0 resnet, K=1 attention,
the level's last slot also holds the upsampler at `.2.conv`, or `.1.conv` in a level without
attention). Inside a resnet, `in_layers.2` = conv1, `out_layers.3` = conv2, `emb_layers.1` =
time_emb_proj, `skip_connection` = conv_shortcut. Attention blocks keep their inner names.
"""

from __future__ import annotations

import re

from ..errors import ModelError

_RESNET_LDM = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
               "conv_shortcut": "skip_connection"}
_RESNET_DIFFUSERS = {ldm: name for name, ldm in _RESNET_LDM.items()}
_TOP_LDM = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
            "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
            "add_embedding.linear_2": "label_emb.0.2"}
_TOP_DIFFUSERS = {ldm: name for name, ldm in _TOP_LDM.items()}
# SDXL's up levels 0 and 1 hold attention blocks, level 2 does not (and has no upsampler).
SDXL_UP_ATTENTION = (0, 1)


def _resnet_to_ldm(rest: str, path: str) -> str:
    if rest not in _RESNET_LDM:
        raise ModelError(f"UNet module {path!r} has no LDM name (resnet layers are conv1, conv2, "
                         "time_emb_proj, conv_shortcut)")
    return _RESNET_LDM[rest]


def ldm_from_diffusers(path: str, layers_per_block: int = 2, up_attention=SDXL_UP_ATTENTION) -> str:
    """`down_blocks.1.attentions.0.proj_in` -> `input_blocks.4.1.proj_in`, and so on."""
    per = layers_per_block + 1  # each LDM level also has a slot for its down/up-sampler
    if path in _TOP_LDM:
        return _TOP_LDM[path]
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", path):
        slot = per * int(m[1]) + int(m[3]) + 1
        if m[2] == "resnets":
            return f"input_blocks.{slot}.0.{_resnet_to_ldm(m[4], path)}"
        return f"input_blocks.{slot}.1.{m[4]}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", path):
        return f"input_blocks.{per * (int(m[1]) + 1)}.0.op"
    if m := re.fullmatch(r"mid_block\.resnets\.([01])\.(.+)", path):
        return f"middle_block.{2 * int(m[1])}.{_resnet_to_ldm(m[2], path)}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", path):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", path):
        slot = per * int(m[1]) + int(m[3])
        if m[2] == "resnets":
            return f"output_blocks.{slot}.0.{_resnet_to_ldm(m[4], path)}"
        return f"output_blocks.{slot}.1.{m[4]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", path):
        level = int(m[1])
        return f"output_blocks.{per * level + per - 1}.{2 if level in up_attention else 1}.conv"
    raise ModelError(f"UNet module {path!r} has no SDXL (LDM) name")


def diffusers_from_ldm(path: str, layers_per_block: int = 2) -> str:
    """The inverse of `ldm_from_diffusers`; paths already in diffusers spelling pass through."""
    per = layers_per_block + 1
    if path in _TOP_DIFFUSERS:
        return _TOP_DIFFUSERS[path]
    if m := re.fullmatch(r"input_blocks\.(\d+)\.0\.op", path):
        return f"down_blocks.{int(m[1]) // per - 1}.downsamplers.0.conv"
    if m := re.fullmatch(r"input_blocks\.(\d+)\.([01])\.(.+)", path):
        level, j = divmod(int(m[1]) - 1, per)
        if m[2] == "1":
            return f"down_blocks.{level}.attentions.{j}.{m[3]}"
        if m[3] in _RESNET_DIFFUSERS:
            return f"down_blocks.{level}.resnets.{j}.{_RESNET_DIFFUSERS[m[3]]}"
    if m := re.fullmatch(r"middle_block\.([02])\.(.+)", path):
        if m[2] in _RESNET_DIFFUSERS:
            return f"mid_block.resnets.{int(m[1]) // 2}.{_RESNET_DIFFUSERS[m[2]]}"
    if m := re.fullmatch(r"middle_block\.1\.(.+)", path):
        return f"mid_block.attentions.0.{m[1]}"
    if m := re.fullmatch(r"output_blocks\.(\d+)\.([12])\.conv", path):
        # Attention blocks have no child called `conv`: this is the level's upsampler.
        return f"up_blocks.{int(m[1]) // per}.upsamplers.0.conv"
    if m := re.fullmatch(r"output_blocks\.(\d+)\.([01])\.(.+)", path):
        level, j = divmod(int(m[1]), per)
        if m[2] == "1":
            return f"up_blocks.{level}.attentions.{j}.{m[3]}"
        if m[3] in _RESNET_DIFFUSERS:
            return f"up_blocks.{level}.resnets.{j}.{_RESNET_DIFFUSERS[m[3]]}"
    if path.startswith(("input_blocks.", "middle_block.", "output_blocks.", "out.", "time_embed.", "label_emb.")):
        raise ModelError(f"LDM UNet module {path!r} is not a layer this tool knows (attention blocks, "
                         "resnet in_layers.2/out_layers.3/emb_layers.1/skip_connection, samplers, "
                         "conv_in/out, time/label embeddings)")
    return path
