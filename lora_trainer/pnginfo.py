"""Generation parameters in a PNG's `parameters` text chunk, in the AUTOMATIC1111 format that
A1111, CivitAI and most image browsers read back."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .fileio import atomic_path


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
    # (name, weight, short hash or None) for each adapter
    adapters: list[tuple[str, float, str | None]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def _quote(value: str) -> str:
    # A1111 quotes values that hold its own separators.
    return f'"{value}"' if ("," in value or ":" in value or '"' in value) else value


def a1111_parameters(info: GenerationInfo) -> str:
    """The three-part text: prompt, 'Negative prompt: ...', then 'Key: value, ...' settings.

    Adapters are listed in the prompt as `<lora:name:weight>` (how A1111 users write them, and how
    CivitAI finds the resources used) and by hash under 'Lora hashes'."""
    prompt = info.prompt
    tags = " ".join(f"<lora:{name}:{weight:g}>" for name, weight, _ in info.adapters)
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
    hashes = [f"{name}: {h}" for name, _, h in info.adapters if h]
    if hashes:
        settings["Lora hashes"] = f'"{", ".join(hashes)}"'
    settings.update(info.extra)
    lines.append(", ".join(f"{k}: {v if k == 'Lora hashes' else _quote(str(v))}" for k, v in settings.items()))
    return "\n".join(lines)


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
