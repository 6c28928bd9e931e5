"""The model card of a run that trained an embedding alone (textual inversion): the same front
matter and prompts as a LoRA's card, but the file is one word's vectors, used by writing the word;
there is no LoRA weight, no LoRA file and no LoRA usage.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from ..config import describe_sides, trained_sides
from .card import BASE_NAMES, PIPELINES, CardFiles, _code, front_matter
from .embeddings import diffusers_lines
from .guidance import recommended_prompts
from .run import Run, dataset_size, embedding_vectors, final_loss, trained_steps

# What each base's embedding file holds, in A1111's layout.
PARTS = {"sd15": "`emb_params`", "sdxl": "`clip_l` and `clip_g`, one per text encoder"}


def _init_source(run: Run) -> str:
    e = run.cfg.embedding
    if e.init_from:
        return f"continued from {_code(Path(e.init_from).name)}"
    return f"the words {_code(e.init_words)}" if e.init_words else "the token's own words, as the base reads them"


def _training_details(run: Run, base_model: str, files: CardFiles) -> list[str]:
    cfg, t = run.cfg, run.cfg.train
    images, loss, vectors = dataset_size(run), final_loss(run), embedding_vectors(run)
    lr = cfg.embedding.lr if cfg.embedding.lr is not None else t.lr
    rows = [
        ("base model", base_model),
        ("training images", (f"{images}" + (f" × {cfg.data.repeats} repeats" if cfg.data.repeats > 1 else ""))
         if images is not None else "not recorded"),
        ("resolution", f"{describe_sides(trained_sides(cfg.data))} px"),
        ("steps", trained_steps(run)),
        ("batch size × gradient accumulation", f"{t.batch_size} × {t.grad_accum}"),
        ("trained", f"the embedding {_code(run.token)} only ({vectors} vector{'s' if vectors != 1 else ''}); "
                    "the UNet and text encoders are the base's"),
        ("vectors started from", _init_source(run)),
        ("learning rate", f"{lr:g} ({t.scheduler}, {t.warmup} warmup steps)"),
        ("optimizer", t.optimizer),
        ("mixed precision", t.mixed_precision),
        ("seed", t.seed),
    ]
    if run.vae:  # model.vae: the samples show it, not the base's VAE
        rows.insert(1, ("VAE", f"{_code(run.vae)}, not the base's: it encoded the training images "
                        "and drew the sample images; generate with it for images like them"))
    if loss is not None:
        rows.append(("final loss (mean of last 10 steps)", f"{loss:.4f}"))
    lines = ["## Training details", "", "| setting | value |", "| --- | --- |"]
    lines += [f"| {k} | {str(v).replace('|', '/')} |" for k, v in rows]
    if files.loss:
        lines += ["", f"![training loss]({files.loss})"]
    return lines + ["", "Trained with lora-trainer (textual inversion); the full run config is in `config.yaml`."]


def _usage(run: Run, base_model: str, repo_id: str, file: str, prompt: str, negative: str) -> list[str]:
    pipeline, token = PIPELINES[run.variant], run.token
    neg = f", negative_prompt={negative!r}" if negative else ""
    load = [ln for ln in diffusers_lines(run, repo_id, file, token) if ln]
    imports = [ln for ln in load if ln.startswith(("from ", "import "))]  # with the others, at the top
    return [
        "## Use it with diffusers", "",
        "```python", "import torch", f"from diffusers import {pipeline}", *imports, "",
        f'pipe = {pipeline}.from_pretrained("{base_model}", torch_dtype=torch.float16).to("cuda")',
        *[ln for ln in load if ln not in imports],
        f"image = pipe({prompt!r}{neg}, num_inference_steps=30).images[0]",
        'image.save("out.png")', "```", "",
        "## Use it in AUTOMATIC1111, Forge or ComfyUI", "",
        f"Download {_code(file)} and keep its name: these tools take the prompt word from the file name.", "",
        f"- **AUTOMATIC1111 / Forge**: put it in the `embeddings` folder and write {_code(token)} in the prompt.",
        f"- **ComfyUI**: put it in `ComfyUI/models/embeddings/` and write {_code('embedding:' + token)} in the prompt.",
    ]


def _limitations(run: Run) -> list[str]:
    images = dataset_size(run)
    lines = ["## Limitations", ""]
    if images is not None:
        lines.append(f"- Learned from {images} image{'s' if images != 1 else ''}: prompts far from the training "
                     "captions use the word less faithfully.")
    lines += [
        "- An embedding only changes what one word means to the text encoder: it cannot teach the base model "
        "to draw what it cannot draw already.",
        f"- It fits {BASE_NAMES[run.variant]} and models fine-tuned from it; other bases read its vectors as noise.",
        f"- It inherits the biases, limits and licence terms of {BASE_NAMES[run.variant]}.",
        "- The sample images were made with the settings in their PNG metadata; other samplers and "
        "step counts give other results.",
    ]
    return lines


def model_card(run: Run, repo_id: str, base_model: str, license: str, files: CardFiles,
               description: str | None = None) -> str:
    """README.md for the Hub repo of an embedding alone; `files.embeddings[0]` is its file."""
    meta = yaml.safe_dump(front_matter(run, base_model, license, files), sort_keys=False, allow_unicode=True)
    prompts, negative = recommended_prompts(run)
    token, file, vectors = run.token, files.embeddings[0], embedding_vectors(run)
    images = dataset_size(run)
    about = description or (f"A textual-inversion embedding for {BASE_NAMES[run.variant]} (`{base_model}`)"
                            + (f", trained on {images} images" if images else "")
                            + f": the word {_code(token)} stands for {vectors} learned vector{'s' if vectors != 1 else ''}.")
    lines = ["---", meta.rstrip(), "---", "", f"# {run.name}", "", about, ""]
    if files.images:
        lines += ["<Gallery />", ""]
    lines += ["## Trigger word", "",
              f"Write {_code(token)} in the prompt: the embedding gives that word its learned meaning, and the base "
              "model is otherwise unchanged. There is no weight to set; prompt emphasis such as "
              f"{_code(f'({token}:1.2)')} makes it stronger or weaker in AUTOMATIC1111, Forge and ComfyUI.", ""]
    lines += ["## Recommended prompts", "", "These are the prompts the sample images were made with:", "", "```text"]
    lines += prompts + ["```", ""]
    lines += ([f"Negative prompt: {_code(negative)}", ""] if negative else
              ["No negative prompt was used for the samples; add your usual one if you like.", ""])
    lines += ["## Files", "", "| file | what |", "| --- | --- |",
              f"| {_code(file)} | the embedding ({PARTS[run.variant]}, AUTOMATIC1111's layout): AUTOMATIC1111, "
              "Forge, ComfyUI, InvokeAI, CivitAI, diffusers' `load_textual_inversion` |",
              "| `prompts.json` | trigger word, recommended prompts and negative prompt as data |",
              "| `config.yaml` | the training run's config |"]
    if files.images:
        lines.append("| `images/` | sample images; generation settings are in each PNG's `parameters` text |")
    lines.append("")
    lines += _usage(run, base_model, repo_id, file, prompts[0], negative) + [""]
    lines += _training_details(run, base_model, files) + [""]
    lines += _limitations(run)
    return "\n".join(lines) + "\n"
