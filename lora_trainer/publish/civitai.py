"""A CivitAI-ready zip: the kohya file in fp16 (for a run that trained an embedding alone, the
embedding, as a Textual Inversion), preview images with their generation data, and the upload
form's fields as JSON, so a user fills CivitAI's form by copying, not by guessing.
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

from ..config import trained_sides
from ..errors import PublishError
from ..fileio import atomic_path, unwritable_reason
from .adapters import write_kohya
from .card import BASE_NAMES
from .embeddings import embedding_sources, publish_embedding, readme_lines
from ..models.lycoris import type_name
from .guidance import WeightAdvice, prompt_guide, recommended_prompts, trigger_words
from .run import Run, dataset_size, ema_setting, embedding_vectors, trained_steps

# CivitAI's model type by adapter (its API names; the upload form calls LoCon "LyCORIS") and the
# form's label for each
CIVITAI_TYPES = {"LoRA": "LORA", "LoHa": "LoCon", "LoKr": "LoCon"}
CIVITAI_TYPE_LABELS = {"LORA": "LoRA", "LoCon": "LyCORIS"}

# CivitAI's "Base model" choices for our variants.
CIVITAI_BASE_MODELS = {"sd15": "SD 1.5", "sdxl": "SDXL 1.0"}


def default_description(run: Run) -> str:
    images = dataset_size(run)
    words = trigger_words(run)
    return (f"{type_name(run.cfg.lora.type)} for {BASE_NAMES[run.variant]}"
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
        "type": CIVITAI_TYPES[type_name(run.cfg.lora.type)],
        "baseModel": CIVITAI_BASE_MODELS[run.variant],
        "trainedWords": trigger_words(run),
        "description": description or default_description(run),
        "recommendedWeight": {"default": advice.default, "min": advice.low, "max": advice.high,
                              "source": advice.source},
        "recommendedPrompts": prompts,
        "negativePrompt": negative,
        "file": model_file,
        "images": images,
        "training": {"steps": trained_steps(run), "images": dataset_size(run),
                     "resolution": max(trained_sides(cfg.data)),
                     "rank": cfg.lora.rank, "alpha": cfg.lora_alpha, "learningRate": cfg.train.lr,
                     "optimizer": cfg.train.optimizer, "scheduler": cfg.train.scheduler,
                     **({"emaDecay": ema_setting(run)[0]} if ema_setting(run) else {}),
                     **({"convRank": cfg.lora.conv_rank, "convAlpha": cfg.conv_alpha} if cfg.lora.conv_rank else {})},
    }


def embedding_fields(run: Run, model_file: str, images: list[str], description: str | None = None) -> dict:
    """civitai_fields for an embedding alone: CivitAI's type TextualInversion, no weight."""
    prompts, negative = recommended_prompts(run)
    cfg, images_count, vectors = run.cfg, dataset_size(run), embedding_vectors(run)
    return {
        "name": run.name,
        "type": "TextualInversion",
        "baseModel": CIVITAI_BASE_MODELS[run.variant],
        "trainedWords": trigger_words(run),
        "description": description or (
            f"Textual-inversion embedding for {BASE_NAMES[run.variant]}: the word {run.token} stands for {vectors} "
            f"learned vector{'s' if vectors != 1 else ''}" + (f", trained on {images_count} images" if images_count else "")
            + f" for {trained_steps(run)} steps. Write {run.token} in the prompt."),
        "recommendedPrompts": prompts,
        "negativePrompt": negative,
        "file": model_file,
        "images": images,
        "training": {"steps": trained_steps(run), "images": images_count,
                     "resolution": max(trained_sides(cfg.data)),
                     "vectors": vectors, "initWords": cfg.embedding.init_words,
                     "learningRate": cfg.embedding.lr if cfg.embedding.lr is not None else cfg.train.lr,
                     "optimizer": cfg.train.optimizer, "scheduler": cfg.train.scheduler},
    }


def embedding_readme_text(fields: dict, vae: str | None = None) -> str:
    """README.txt of an embedding alone's zip; `vae`: the model.vae the run trained and drew its samples with."""
    token = fields["trainedWords"][0]
    lines = [
        fields["name"], "=" * len(fields["name"]), "",
        fields["description"], "",
        f"Type: Textual Inversion (embedding)    Base model: {fields['baseModel']}",
        f"Trigger word: {token}  (no weight: prompt emphasis such as ({token}:1.2) makes it stronger)",
        *([f"VAE: {vae}, not the base's: the previews were drawn with it; use it for images like them"]
          if vae else []), "",
        "Recommended prompts:", *[f"  {p}" for p in fields["recommendedPrompts"]],
        f"Negative prompt: {fields['negativePrompt'] or '(none)'}", "",
        "Files:",
        f"  {fields['file']}  the embedding (AUTOMATIC1111's layout, fp16)",
        "  images/          preview images; their generation settings are in each PNG's parameters text",
        "  civitai.json     the upload form's fields",
        "  prompts.json     trigger word and prompts as data", "",
        "Upload to CivitAI: Create > Upload a model, type Textual Inversion; copy name, base model, trigger",
        "word and description from civitai.json; add the .safetensors file; drop the images in (CivitAI",
        "reads their generation data).", "",
        f"Use: keep the file name {fields['file']} (the prompt word is the file's name).",
        f"AUTOMATIC1111 / Forge: copy it to the embeddings folder and write {token} in the prompt.",
        f"ComfyUI: copy it to models/embeddings and write embedding:{token} in the prompt.",
        f"diffusers: pipe.load_textual_inversion(\"{fields['file']}\", token=\"{token}\")"
        + (" (SDXL: its clip_l and clip_g, one per text encoder)" if fields["baseModel"].startswith("SDXL") else ""),
    ]
    return "\n".join(lines) + "\n"


def readme_text(fields: dict, vae: str | None = None) -> str:
    """README.txt of a LoRA's zip; `vae`: the model.vae the run trained and drew its samples with."""
    w = fields["recommendedWeight"]
    stem = fields["file"].removesuffix(".safetensors")
    weight_note = {"sweep": "read from the run's weight sweep", "user": "chosen by the author",
                   "default": "a default range, not measured on this adapter"}[w["source"]]
    lines = [
        fields["name"], "=" * len(fields["name"]), "",
        fields["description"], "",
        f"Type: {CIVITAI_TYPE_LABELS[fields['type']]}    Base model: {fields['baseModel']}",
        f"Trigger words: {', '.join(fields['trainedWords']) or '(none)'}",
        f"Recommended weight: {w['default']:g} (range {w['min']:g} - {w['max']:g}; {weight_note})",
        *([f"Weights: an EMA of the training (decay {fields['training']['emaDecay']:g}), not the last step's"]
          if "emaDecay" in fields["training"] else []),
        *([f"VAE: {vae}, not the base's: the previews were drawn with it; use it for images like them"]
          if vae else []), "",
        "Recommended prompts:", *[f"  {p}" for p in fields["recommendedPrompts"]],
        f"Negative prompt: {fields['negativePrompt'] or '(none)'}", "",
        "Files:",
        f"  {fields['file']}  the adapter (kohya layout, fp16)",
        "  images/          preview images; their generation settings are in each PNG's parameters text",
        "  civitai.json     the upload form's fields",
        "  prompts.json     trigger words, prompts and weights as data", "",
        f"Upload to CivitAI: Create > Upload a model, type {CIVITAI_TYPE_LABELS[fields['type']]}; copy name, base model, "
        "trigger words and",
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
    # an embedding alone: its own file, named by its token (A1111 takes the prompt word from the name)
    model_file = run.adapter.name if run.embedding_only else f"{run.name}.safetensors"
    images = [f"images/{i:02d}.png" for i in range(len(run.samples))]
    if advice is not None and advice.grid is not None:
        images.append("images/sweep.png")
    fields = (embedding_fields(run, model_file, images, description) if run.embedding_only
              else civitai_fields(run, advice, model_file, images, description))
    with tempfile.TemporaryDirectory() as tmp:
        # fp16: what CivitAI users expect
        adapter = (publish_embedding(run, Path(tmp) / model_file, dtype=torch.float16) if run.embedding_only
                   else write_kohya(run, Path(tmp) / model_file, dtype=torch.float16))
        with atomic_path(out_zip) as tmp_zip, zipfile.ZipFile(tmp_zip, "w") as z:
            # safetensors and PNG do not compress; text does
            _add_file(z, adapter, model_file, zipfile.ZIP_STORED)
            grid = advice.grid if advice is not None else None
            sources = [s.path for s in run.samples] + ([grid] if grid is not None else [])
            for name, source in zip(images, sources):
                _add_file(z, source, name, zipfile.ZIP_STORED)
            _add_text(z, "civitai.json", json.dumps(fields, indent=2, ensure_ascii=False) + "\n")
            _add_text(z, "prompts.json", json.dumps(prompt_guide(run, advice), indent=2, ensure_ascii=False) + "\n")
            if run.embedding_only:
                _add_text(z, "README.txt", embedding_readme_text(fields, run.vae))
            else:
                embeddings = embedding_sources(run, Path(tmp))
                for name, source in embeddings:
                    _add_file(z, source, name, zipfile.ZIP_STORED)
                extra = "".join(f"{line}\n" for line in readme_lines([n for n, _ in embeddings]))
                _add_text(z, "README.txt", readme_text(fields, run.vae) + extra)
            names = z.namelist()
    return names


__all__ = ["CIVITAI_BASE_MODELS", "build_civitai_package", "civitai_fields", "embedding_fields"]
