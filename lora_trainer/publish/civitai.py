"""A CivitAI-ready zip: the kohya file in fp16, preview images with their generation data, and
the upload form's fields as JSON, so a user fills CivitAI's form by copying, not by guessing.
"""

from __future__ import annotations

import json
import shutil
import stat
import tempfile
import time
import zipfile
from pathlib import Path

import torch

from ..errors import PublishError
from ..fileio import atomic_path, unwritable_reason
from .adapters import write_kohya
from .card import BASE_NAMES
from .embeddings import embedding_sources, readme_lines
from .run import Run, WeightAdvice, dataset_size, ema_setting, prompt_guide, recommended_prompts, trained_steps, trigger_words

# CivitAI's "Base model" choices for our variants.
CIVITAI_BASE_MODELS = {"sd15": "SD 1.5", "sdxl": "SDXL 1.0"}


def default_description(run: Run) -> str:
    images = dataset_size(run)
    words = trigger_words(run)
    return (f"LoRA for {BASE_NAMES[run.variant]}"
            + (f", trained on {images} images" if images else "")
            + f" for {trained_steps(run)} steps at rank {run.cfg.lora.rank}."
            + (f" Trigger words: {', '.join(words)}." if words else " No trigger word: it acts on every prompt."))


def civitai_fields(run: Run, advice: WeightAdvice, model_file: str, images: list[str],
                   description: str | None = None) -> dict:
    """What CivitAI's upload form asks, under the names of its API (type, baseModel, trainedWords)."""
    prompts, negative = recommended_prompts(run)
    cfg = run.cfg
    return {
        "name": run.name,
        "type": "LORA",
        "baseModel": CIVITAI_BASE_MODELS[run.variant],
        "trainedWords": trigger_words(run),
        "description": description or default_description(run),
        "recommendedWeight": {"default": advice.default, "min": advice.low, "max": advice.high,
                              "source": advice.source},
        "recommendedPrompts": prompts,
        "negativePrompt": negative,
        "file": model_file,
        "images": images,
        "training": {"steps": trained_steps(run), "images": dataset_size(run), "resolution": cfg.data.resolution,
                     "rank": cfg.lora.rank, "alpha": cfg.lora_alpha, "learningRate": cfg.train.lr,
                     "optimizer": cfg.train.optimizer, "scheduler": cfg.train.scheduler,
                     **({"emaDecay": ema_setting(run)[0]} if ema_setting(run) else {}),
                     **({"convRank": cfg.lora.conv_rank, "convAlpha": cfg.conv_alpha} if cfg.lora.conv_rank else {})},
    }


def readme_text(fields: dict) -> str:
    w = fields["recommendedWeight"]
    stem = fields["file"].removesuffix(".safetensors")
    weight_note = {"sweep": "read from the run's weight sweep", "user": "chosen by the author",
                   "default": "a default range, not measured on this adapter"}[w["source"]]
    lines = [
        fields["name"], "=" * len(fields["name"]), "",
        fields["description"], "",
        f"Type: LoRA    Base model: {fields['baseModel']}",
        f"Trigger words: {', '.join(fields['trainedWords']) or '(none)'}",
        f"Recommended weight: {w['default']:g} (range {w['min']:g} - {w['max']:g}; {weight_note})",
        *([f"Weights: an EMA of the training (decay {fields['training']['emaDecay']:g}), not the last step's"]
          if "emaDecay" in fields["training"] else []), "",
        "Recommended prompts:", *[f"  {p}" for p in fields["recommendedPrompts"]],
        f"Negative prompt: {fields['negativePrompt'] or '(none)'}", "",
        "Files:",
        f"  {fields['file']}  the adapter (kohya layout, fp16)",
        "  images/          preview images; their generation settings are in each PNG's parameters text",
        "  civitai.json     the upload form's fields",
        "  prompts.json     trigger words, prompts and weights as data", "",
        "Upload to CivitAI: Create > Upload a model, type LoRA; copy name, base model, trigger words and",
        "description from civitai.json; add the .safetensors file; drop the images in (CivitAI reads",
        "their generation data).", "",
        f"Use: AUTOMATIC1111 / Forge: copy {fields['file']} to models/Lora and write <lora:{stem}:{w['default']:g}>",
        "in the prompt. ComfyUI: copy it to models/loras and add a Load LoRA node.",
    ]
    return "\n".join(lines) + "\n"


# Members are unpacked with these permissions (rw-r--r--) whatever the source files' modes: zipfile
# would store 0o600 for text members and copy the mode of each file it adds.
_MEMBER_ATTR = (stat.S_IFREG | 0o644) << 16


def _add_file(z: zipfile.ZipFile, source: Path, name: str, compress: int) -> None:
    info = zipfile.ZipInfo.from_file(source, name)
    info.external_attr, info.compress_type = _MEMBER_ATTR, compress
    with open(source, "rb") as src, z.open(info, "w") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


def _add_text(z: zipfile.ZipFile, name: str, text: str) -> None:
    info = zipfile.ZipInfo(name, date_time=time.localtime()[:6])
    info.external_attr, info.compress_type = _MEMBER_ATTR, zipfile.ZIP_DEFLATED
    z.writestr(info, text)


def build_civitai_package(run: Run, out_zip: str | Path, advice: WeightAdvice, description: str | None = None,
                          overwrite: bool = False) -> list[str]:
    """Write the zip atomically; return the names inside it."""
    out_zip = Path(out_zip)
    if out_zip.suffix.lower() != ".zip":
        raise PublishError(f"--civitai: got {str(out_zip)!r}; expected a path ending in .zip")
    if out_zip.exists() and not overwrite:
        raise PublishError(f"--civitai: {out_zip} exists; pass --overwrite to replace it")
    unwritable = unwritable_reason(out_zip.parent)
    if unwritable:
        raise PublishError(f"--civitai: {out_zip.parent} {unwritable}; give a zip path in a folder you can write to")
    model_file = f"{run.name}.safetensors"
    images = [f"images/{i:02d}.png" for i in range(len(run.samples))]
    if advice.grid is not None:
        images.append("images/sweep.png")
    fields = civitai_fields(run, advice, model_file, images, description)
    with tempfile.TemporaryDirectory() as tmp:
        adapter = write_kohya(run, Path(tmp) / model_file, dtype=torch.float16)  # what CivitAI users expect
        with atomic_path(out_zip) as tmp_zip, zipfile.ZipFile(tmp_zip, "w") as z:
            # safetensors and PNG do not compress; text does
            _add_file(z, adapter, model_file, zipfile.ZIP_STORED)
            sources = [s.path for s in run.samples] + ([advice.grid] if advice.grid is not None else [])
            for name, source in zip(images, sources):
                _add_file(z, source, name, zipfile.ZIP_STORED)
            _add_text(z, "civitai.json", json.dumps(fields, indent=2, ensure_ascii=False) + "\n")
            _add_text(z, "prompts.json", json.dumps(prompt_guide(run, advice), indent=2, ensure_ascii=False) + "\n")
            embeddings = embedding_sources(run, Path(tmp))
            for name, source in embeddings:
                _add_file(z, source, name, zipfile.ZIP_STORED)
            extra = "".join(f"{line}\n" for line in readme_lines([n for n, _ in embeddings]))
            _add_text(z, "README.txt", readme_text(fields) + extra)
            names = z.namelist()
    return names


__all__ = ["CIVITAI_BASE_MODELS", "build_civitai_package", "civitai_fields"]
