"""Generation parameters in a PNG's `parameters` text chunk, in the AUTOMATIC1111 format that
A1111, CivitAI and most image browsers read back."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .fileio import atomic_path

HASH_LISTS = ("Lora hashes", "TI hashes")  # settings written already quoted
LORA_TAG = re.compile(r"\s*<lora:([^:>]+):([-+]?[\d.]+)(?::lbw=([^:>]+))?>")


@dataclass
class GenerationInfo:
    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    sampler: str = "DPM++ 2M"
    cfg_scale: float = 7.5
    seed: int = 0
    width: int = 512
    height: int = 512
    model_name: str | None = None
    model_hash: str | None = None  # first 10 hex of the SHA-256 of the model file, as A1111 shows
    vae_name: str | None = None  # a separate VAE's file name (none: the model's own VAE)
    vae_hash: str | None = None  # first 10 hex of the SHA-256 of the VAE file
    # (name, weight, short hash or None) for each adapter
    adapters: list[tuple[str, float, str | None]] = field(default_factory=list)
    # {adapter name: its per-block weights as given after lbw= (a preset or numbers)}, for those with them
    block_weights: dict[str, str] = field(default_factory=dict)
    denoising_strength: float | None = None  # img2img / inpainting
    clip_skip: int = 1  # A1111 numbering: 1 = last layer (written only when > 1, as A1111 does)
    # (name, short hash or None) for each textual-inversion embedding the prompts use
    embeddings: list[tuple[str, str | None]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def _quote(value: str) -> str:
    # A1111 quotes values that hold its own separators.
    return f'"{value}"' if ("," in value or ":" in value or '"' in value) else value


def a1111_parameters(info: GenerationInfo) -> str:
    """The three-part text: prompt, 'Negative prompt: ...', then 'Key: value, ...' settings.

    Adapters are listed in the prompt as `<lora:name:weight>` (how A1111 users write them, and how
    CivitAI finds the resources used; `<lora:name:weight:lbw=SPEC>` with block weights, as the LoRA
    Block Weight extension reads them) and by hash under 'Lora hashes'; embeddings the prompts use
    under 'TI hashes' (their names are in the prompts already)."""
    prompt = info.prompt
    lbw = {name: f":lbw={spec}" for name, spec in info.block_weights.items()}
    tags = " ".join(f"<lora:{name}:{weight:g}{lbw.get(name, '')}>" for name, weight, _ in info.adapters)
    if tags:
        prompt = f"{prompt} {tags}" if prompt else tags
    lines = [prompt]
    if info.negative_prompt:
        lines.append(f"Negative prompt: {info.negative_prompt}")
    settings: dict[str, Any] = {
        "Steps": info.steps,
        "Sampler": info.sampler,
        "CFG scale": f"{info.cfg_scale:g}",
        "Seed": info.seed,
        "Size": f"{info.width}x{info.height}",
    }
    if info.model_hash:
        settings["Model hash"] = info.model_hash
    if info.model_name:
        settings["Model"] = info.model_name
    if info.vae_hash:
        settings["VAE hash"] = info.vae_hash
    if info.vae_name:
        settings["VAE"] = info.vae_name
    if info.denoising_strength is not None:
        settings["Denoising strength"] = f"{info.denoising_strength:g}"
    if info.clip_skip > 1:
        settings["Clip skip"] = info.clip_skip
    hashes = [f"{name}: {h}" for name, _, h in info.adapters if h]
    if hashes:
        settings["Lora hashes"] = f'"{", ".join(hashes)}"'
    # A1111 drops ':' and ',' from a name here: they would split the list
    ti = [f"{re.sub('[:,]', '', name)}: {h}" for name, h in info.embeddings if h]
    if ti:
        settings["TI hashes"] = f'"{", ".join(ti)}"'
    settings.update(info.extra)
    lines.append(", ".join(f"{k}: {v if k in HASH_LISTS else _quote(str(v))}" for k, v in settings.items()))
    return "\n".join(lines)


def _split_settings(line: str) -> dict[str, str]:
    """'Key: value, Key: "quoted, value", ...' → {key: value}."""
    out = {}
    for m in re.finditer(r'\s*([^:,]+):\s*("(?:\\.|[^"\\])*"|[^,]*)\s*(?:,|$)', line):
        value = m.group(2).strip()
        out[m.group(1).strip()] = value[1:-1] if value.startswith('"') and value.endswith('"') else value
    return out


def _hash_list(text: str) -> dict[str, str]:
    """'name: hash, name: hash' → {name: hash}."""
    return dict(part.split(": ", 1) for part in text.split(", ") if ": " in part)


def parse_a1111_parameters(text: str) -> GenerationInfo:
    """Read a `parameters` text (ours or A1111's) back into a GenerationInfo; unknown settings go to
    `extra`, `<lora:name:weight>` tags in the prompt become `adapters` (hashes from 'Lora hashes'),
    their `:lbw=SPEC` parts `block_weights`."""
    lines = text.strip().split("\n")
    # An empty prompt leaves the settings line alone (the text starts with the newline after it).
    is_settings = "Steps:" in lines[-1] and (len(lines) > 1 or bool(re.match(r"Steps: \d+(,|$)", lines[-1])))
    settings = _split_settings(lines[-1]) if is_settings else {}
    body = lines[:-1] if settings else lines
    prompt_lines, negative_lines, in_negative = [], [], False
    for line in body:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative_lines if in_negative else prompt_lines).append(line)
    prompt = "\n".join(prompt_lines)
    hashes = _hash_list(settings.pop("Lora hashes", ""))
    embeddings = list(_hash_list(settings.pop("TI hashes", "")).items())
    tags = LORA_TAG.findall(prompt)
    adapters = [(name, float(weight), hashes.get(name)) for name, weight, _ in tags]
    prompt = LORA_TAG.sub("", prompt).strip()
    width, _, height = settings.pop("Size", "512x512").partition("x")
    info = GenerationInfo(
        prompt=prompt, negative_prompt="\n".join(negative_lines), steps=int(settings.pop("Steps", 20)),
        sampler=settings.pop("Sampler", ""), cfg_scale=float(settings.pop("CFG scale", 7.0)),
        seed=int(settings.pop("Seed", 0)), width=int(width), height=int(height),
        model_name=settings.pop("Model", None), model_hash=settings.pop("Model hash", None), adapters=adapters,
        vae_name=settings.pop("VAE", None), vae_hash=settings.pop("VAE hash", None),
        block_weights={name: lbw for name, _, lbw in tags if lbw},
        embeddings=embeddings,
    )
    if "Denoising strength" in settings:
        info.denoising_strength = float(settings.pop("Denoising strength"))
    info.clip_skip = int(settings.pop("Clip skip", 1))
    info.extra = settings
    return info


def save_png(image, path: str | Path, info: GenerationInfo | None = None) -> Path:
    """Write `image` as PNG atomically, with the `parameters` chunk when `info` is given."""
    from PIL.PngImagePlugin import PngInfo

    meta = None
    if info is not None:
        meta = PngInfo()
        meta.add_text("parameters", a1111_parameters(info))
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=meta)
    return path
