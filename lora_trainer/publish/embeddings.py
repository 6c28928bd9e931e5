"""Textual-inversion embeddings of a pivotal-tuning run, as published: the run's
`embeddings/<TOKEN>.safetensors` files and those bundled in its adapter file, their tokens (trigger
words), the files that go into the Hub repo and the CivitAI zip, and how to use them. Also the
file of a run that trained an embedding alone, as it is published.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ..fileio import atomic_path
from .adapters import public_metadata
from ..models.lycoris import type_name
from .run import Run

FOLDER = "embeddings"


def embedding_sources(run: Run, scratch: Path) -> list[tuple[str, Path]]:
    """(name inside the repo or zip, file to copy) of every embedding: the run's own files, and a
    standalone file written into `scratch` for each bundled one without a file (the diffusers layout
    cannot carry bundled embeddings, so diffusers users need the file)."""
    from ..export.bundle import write_embedding_files

    have = {p.stem.lower() for p in run.embedding_files}
    missing = {t: parts for t, parts in run.bundle.items() if t.lower() not in have}
    written = write_embedding_files(missing, scratch) if missing else []
    return [(f"{FOLDER}/{p.name}", p) for p in sorted([*run.embedding_files, *written], key=lambda p: p.name)]


def card_section(run: Run, repo_id: str, names: list[str]) -> list[str]:
    """The model card's section on the embeddings (empty without any)."""
    if not names:
        return []
    tokens = [Path(n).stem for n in names]
    first, file = tokens[0], names[0]
    kind = type_name(run.cfg.lora.type)
    lines = ["## Embeddings (pivotal tuning)", "",
             f"The trigger word{'s' if len(tokens) > 1 else ''} {', '.join(f'`{t}`' for t in tokens)} "
             f"{'are' if len(tokens) > 1 else 'is a'} textual-inversion embedding{'s' if len(tokens) > 1 else ''} "
             f"trained with the {kind}: write the token in the prompt and use the embedding file with the adapter.", ""]
    if run.bundle and kind != "LoRA":  # LoHa/LoKr: the kohya file alone, which `lora-trainer infer` reads whole
        lines += ["The kohya-layout file carries them inside (AUTOMATIC1111 and Forge use them from it, whatever the "
                  f"{kind}'s weight, and so does the `lora-trainer infer` command below); ComfyUI ignores such "
                  "bundled embeddings and diffusers has no reader for this file: use the files in `embeddings/` "
                  "there.", ""]
    elif run.bundle:
        lines += ["The kohya-layout file carries them inside (AUTOMATIC1111 and Forge use them from it, whatever the "
                  "LoRA's weight); ComfyUI ignores such bundled embeddings and diffusers' `load_lora_weights` refuses "
                  "them, so the diffusers-layout file has none: use the files in `embeddings/` there.", ""]
    lines += [f"- AUTOMATIC1111 / Forge / ComfyUI: copy `{FOLDER}/<TOKEN>.safetensors` to the `embeddings` folder "
              f"(ComfyUI: write `embedding:{first}` in the prompt).", "- diffusers:", "", "```python"]
    return lines + diffusers_lines(run, repo_id, file, first) + ["```", ""]


def diffusers_lines(run: Run, repo_id: str, file: str, token: str) -> list[str]:
    """The Python lines that load the embedding `file` of the repo into `pipe` as `token`. An SDXL
    file holds two parts that diffusers loads one text encoder at a time."""
    if run.variant != "sdxl":
        return [f'pipe.load_textual_inversion("{repo_id}", weight_name="{file}", token="{token}")']
    return ["from huggingface_hub import hf_hub_download",
            "from safetensors.torch import load_file", "",
            f'state = load_file(hf_hub_download("{repo_id}", "{file}"))',
            f'pipe.load_textual_inversion(state["clip_l"], token="{token}", text_encoder=pipe.text_encoder, '
            "tokenizer=pipe.tokenizer)",
            f'pipe.load_textual_inversion(state["clip_g"], token="{token}", text_encoder=pipe.text_encoder_2, '
            "tokenizer=pipe.tokenizer_2)"]


def publish_embedding(run: Run, path: Path, dtype: torch.dtype | None = None) -> Path:
    """The embedding of a run that trained one alone, at `path`: its bytes as trained when they are
    already in `dtype` (None: as trained) and name no local folder, else rewritten in `dtype` with
    public metadata. Atomic."""
    metadata = public_metadata(run.metadata)
    convert = dtype is not None and any(t.dtype != dtype for t in run.tensors.values())
    with atomic_path(path) as tmp:
        if convert or metadata != run.metadata:
            import safetensors.torch

            tensors = {k: (t.to(dtype) if dtype else t).contiguous() for k, t in run.tensors.items()}
            safetensors.torch.save_file(tensors, str(tmp), metadata=metadata)
        else:
            shutil.copyfile(run.adapter, tmp)
    return path


def readme_lines(names: list[str]) -> list[str]:
    """README.txt lines of the CivitAI zip on its embedding files."""
    if not names:
        return []
    return ["", "Embeddings (pivotal tuning): " + ", ".join(names),
            "  Their tokens are trigger words. AUTOMATIC1111 / Forge / ComfyUI: copy them to the embeddings folder;",
            "  diffusers: pipe.load_textual_inversion(file, token=TOKEN) (SDXL: clip_l and clip_g, one per encoder).",
            "  Upload each on CivitAI as a Textual Inversion beside the LoRA."]
