"""The HuggingFace model card: YAML front matter the Hub indexes, then the page users read.

The front matter is built as data and dumped with yaml.safe_dump, so it always parses; the widget
entries point at sample images copied into the repo folder.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field

import yaml

from ..config import describe_sides, trained_sides
from .embeddings import card_section
from ..models.lycoris import type_name
from .guidance import WeightAdvice, recommended_prompts, trigger_words
from .run import Run, dataset_size, ema_setting, final_loss, top_tags, trained_steps

BASE_NAMES = {"sd15": "Stable Diffusion 1.5", "sdxl": "Stable Diffusion XL 1.0"}
PIPELINES = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}


@dataclass
class CardFiles:
    """Paths inside the repo folder that the card links to."""

    images: list[str]  # one per run sample, same order
    kohya: str | None = None  # None for an embedding alone, which has no LoRA file
    diffusers: str | None = None
    sweep: str | None = None
    loss: str | None = None  # the run's loss curve
    embeddings: list[str] = field(default_factory=list)  # embeddings/<TOKEN>.safetensors


def front_matter(run: Run, base_model: str, license: str, files: CardFiles) -> dict:
    # the Hub lists textual-inversion repos under `textual_inversion`; `template:sd-lora` is the LoRA card template
    tags = (["textual_inversion", "text-to-image", "stable-diffusion", "diffusers", "lora-trainer"] if run.embedding_only
            else ["lora", "text-to-image", "stable-diffusion", "diffusers", "template:sd-lora", "lora-trainer"])
    lycoris = not run.embedding_only and type_name(run.cfg.lora.type) != "LoRA"
    if lycoris:  # diffusers reads no LoHa/LoKr: no diffusers library or tag, whose Hub snippet would fail
        tags = ["lora", "lycoris", *tags[1:]]
        tags.remove("diffusers")
    if run.variant == "sdxl":
        tags += ["sdxl", "stable-diffusion-xl"]
    data: dict = {"base_model": base_model, "license": license, **({} if lycoris else {"library_name": "diffusers"}),
                  "pipeline_tag": "text-to-image", "tags": tags}
    words = trigger_words(run)
    if words:
        # the Hub shows `instance_prompt` as the adapter's trigger words
        data["instance_prompt"] = ", ".join(words)
    widget = []
    for sample, image in zip(run.samples, files.images):
        entry: dict = {"text": sample.prompt}
        if sample.negative_prompt:
            entry["parameters"] = {"negative_prompt": sample.negative_prompt}
        entry["output"] = {"url": image}
        widget.append(entry)
    if widget:
        data["widget"] = widget
    return data


def _code(text: str) -> str:
    return f"`{text}`" if "`" not in text else f"``{text}``"


def _weight_section(advice: WeightAdvice, files: CardFiles) -> list[str]:
    span = f"**{advice.low:g} – {advice.high:g}**, start at **{advice.default:g}**"
    if advice.source == "sweep":
        lines = [f"Recommended weight: {span}: the range of the weight sweep below (fixed seeds, weight 0 "
                 "is the base model). Lower weights keep more of the base model; higher ones follow the "
                 "training images more closely and may over-fit."]
    elif advice.source == "user":
        lines = [f"Recommended weight: {span} (chosen by the author)."]
    else:
        lines = [f"Recommended weight: {span}. This is a **default range, not measured on this adapter**: "
                 "render a few fixed-seed images across weights 0 – 1.2 and pick what looks best."]
    if files.sweep:
        lines += ["", f"![weight sweep]({files.sweep})"]
    return lines


def _usage(run: Run, base_model: str, repo_id: str, files: CardFiles, advice: WeightAdvice,
           prompt: str, negative: str) -> list[str]:
    pipeline = PIPELINES[run.variant]
    adapter_name = re.sub(r"\W", "_", run.name)  # peft adapter names cannot hold dots
    a1111_tag = f"<lora:{files.kohya.removesuffix('.safetensors')}:{advice.default:g}>"
    neg = f", negative_prompt={negative!r}" if negative else ""
    if files.diffusers is None:  # LoHa/LoKr
        command = (f"lora-trainer infer --model {base_model} --lora {files.kohya}:{advice.default:g} "
                   f"--prompt {shlex.quote(prompt)}" + (f" --negative-prompt {shlex.quote(negative)}" if negative else ""))
        diffusers = [
            f"diffusers' `load_lora_weights` does not read {type_name(run.cfg.lora.type)} files. lora-trainer "
            "generates with them on a diffusers pipeline:", "",
            "```bash", command, "```",
        ]
    else:
        diffusers = [
            "```python", "import torch", f"from diffusers import {pipeline}", "",
            f'pipe = {pipeline}.from_pretrained("{base_model}", torch_dtype=torch.float16).to("cuda")',
            f'pipe.load_lora_weights("{repo_id}", weight_name="{files.diffusers}", adapter_name="{adapter_name}")',
            f'pipe.set_adapters(["{adapter_name}"], adapter_weights=[{advice.default:g}])',
            f"image = pipe({prompt!r}{neg}, num_inference_steps=30).images[0]",
            'image.save("out.png")', "```",
        ]
    return [
        "## Use it with diffusers", "", *diffusers, "",
        "## Use it in ComfyUI, AUTOMATIC1111 or Forge", "",
        f"Download {_code(files.kohya)} (kohya layout, which these tools and CivitAI read).", "",
        f"- **ComfyUI**: put it in `ComfyUI/models/loras/`, add a *Load LoRA* node after the checkpoint "
        f"loader and set `strength_model` and `strength_clip` to {advice.default:g}.",
        f"- **AUTOMATIC1111 / Forge**: put it in `models/Lora/` and add "
        f"{_code(a1111_tag)} to the prompt.",
    ]


def _adapted_modules(cfg) -> str:
    """The card's "adapted modules" row: the UNet's targets and/or the text encoder's."""
    parts = []
    if cfg.lora.train_unet:
        parts.append("UNet " + ", ".join(cfg.lora.unet_targets)
                     + (", ResNet blocks and samplers (LoCon)" if cfg.lora.conv_rank else ""))
    if cfg.lora.train_text_encoder:
        parts.append("text encoder " + ", ".join(cfg.lora.text_encoder_targets)
                     + ("" if cfg.lora.train_unet else " (text encoder only; the UNet is the base's)"))
    return "; ".join(parts)


def _training_details(run: Run, base_model: str, files: CardFiles) -> list[str]:
    cfg, t = run.cfg, run.cfg.train
    images = dataset_size(run)
    loss = final_loss(run)
    # With kohya's <N>_<name> folders the repeats differ per folder: quote the epoch's length instead.
    per_epoch = run.metadata.get("ss_num_train_images", "")
    repeats = (f" × {cfg.data.repeats} repeats" if cfg.data.repeats > 1 else "")
    if per_epoch.isdigit() and images is not None and int(per_epoch) != images * cfg.data.repeats:
        repeats = f" ({per_epoch} per epoch with folder repeats)"
    rows = [
        ("base model", base_model),
        ("training images", f"{images}{repeats}" if images is not None else "not recorded"),
        ("resolution", f"{describe_sides(trained_sides(cfg.data))} px"),
        ("steps", trained_steps(run)),
        ("batch size × gradient accumulation", f"{t.batch_size} × {t.grad_accum}"),
        (f"{type_name(run.cfg.lora.type)} rank / alpha", f"{cfg.lora.rank} / {cfg.lora_alpha:g}"),
        ("adapted modules", _adapted_modules(cfg)),
        ("learning rate", f"{t.lr:g} ({t.scheduler}, {t.warmup} warmup steps)" if cfg.lora.train_unet
         else f"{t.scheduler}, {t.warmup} warmup steps"),
        ("optimizer", t.optimizer),
        ("mixed precision", t.mixed_precision),
        ("seed", t.seed),
    ]
    if cfg.lora.conv_rank:
        rows.insert(6, ("LoCon 3x3 conv rank / alpha", f"{cfg.lora.conv_rank} / {cfg.conv_alpha:g}"))
    if cfg.lora.train_text_encoder:
        rows.insert(8 + bool(cfg.lora.conv_rank), ("text encoder learning rate", f"{t.text_encoder_lr if t.text_encoder_lr is not None else t.lr:g}"))
    if run.vae:  # model.vae: the samples show it, not the base's VAE
        rows.insert(1, ("VAE", f"`{run.vae}`, not the base's: it encoded the training images "
                        "and drew the sample images; generate with it for images like them"))
    ema = ema_setting(run)
    if ema is not None:
        # the files are not the last step's weights: a user comparing with another trainer must know
        rows.append(("EMA of the weights", f"decay {ema[0]:g}{' with warm-up' if ema[1] else ''}: the files hold the "
                     "averaged adapter, not the last step's"))
    if loss is not None:
        rows.append(("final loss (mean of last 10 steps)", f"{loss:.4f}"))
    lines = ["## Training details", "", "| setting | value |", "| --- | --- |"]
    lines += [f"| {k} | {str(v).replace('|', '/')} |" for k, v in rows]
    # tags seen once are whole unique captions, not what the adapter learned
    tags = [(tag, n) for tag, n in top_tags(run) if n > 1]
    if tags:
        lines += ["", "Most frequent caption tags: " + ", ".join(f"{_code(tag)} ({n})" for tag, n in tags) + "."]
    if files.loss:
        lines += ["", f"![training loss]({files.loss})"]
    lines += ["", "Trained with lora-trainer; the full run config is in `config.yaml`."]
    return lines


def _limitations(run: Run, advice: WeightAdvice) -> list[str]:
    images = dataset_size(run)
    lines = ["## Limitations", ""]
    if images is not None:
        lines.append(f"- Learned from {images} image{'s' if images != 1 else ''}: it knows what they show and "
                     "little else; prompts far from the training captions fall back to the base model.")
    lines += [
        f"- Above weight {advice.high:g} the adapter tends to over-fit (repeated compositions, burnt colours).",
        f"- It inherits the biases, limits and licence terms of {BASE_NAMES[run.variant]}.",
        "- The sample images were made with the settings in their PNG metadata; other samplers and "
        "step counts give other results.",
    ]
    return lines


def model_card(run: Run, repo_id: str, base_model: str, license: str, files: CardFiles,
               advice: WeightAdvice, description: str | None = None) -> str:
    """README.md for the Hub repo."""
    meta = yaml.safe_dump(front_matter(run, base_model, license, files), sort_keys=False, allow_unicode=True)
    prompts, negative = recommended_prompts(run)
    words = trigger_words(run)
    about = description or (f"A {type_name(run.cfg.lora.type)} adapter for {BASE_NAMES[run.variant]} (`{base_model}`)"
                            + (f", trained on {dataset_size(run)} images" if dataset_size(run) else "")
                            + (f"; it is switched on by {', '.join(_code(w) for w in words)}." if words else "."))
    lines = ["---", meta.rstrip(), "---", "", f"# {run.name}", "", about, ""]
    if files.images:
        lines += ["<Gallery />", ""]
    lines += ["## Trigger words", ""]
    lines += ([f"Put {', '.join(_code(w) for w in words)} in the prompt to switch the adapter on.", ""]
              if words else ["This adapter was trained without a trigger word; it acts on every prompt.", ""])
    lines += ["## Recommended prompts", "", "These are the prompts the sample images were made with:", "", "```text"]
    lines += prompts + ["```", ""]
    lines += ([f"Negative prompt: {_code(negative)}", ""] if negative else
              ["No negative prompt was used for the samples; add your usual one if you like.", ""])
    lines += ["## Weight", ""] + _weight_section(advice, files) + [""]
    lines += ["## Files", "", "| file | what |", "| --- | --- |",
              f"| {_code(files.kohya)} | kohya layout: AUTOMATIC1111, ComfyUI, Forge, InvokeAI, CivitAI |",
              *([f"| {_code(files.diffusers)} | diffusers layout: `pipe.load_lora_weights` |"] if files.diffusers else []),
              "| `prompts.json` | trigger words, recommended prompts, negative prompt and weights as data |",
              "| `config.yaml` | the training run's config |"]
    if files.images:
        lines.append("| `images/` | sample images; generation settings are in each PNG's `parameters` text |")
    lines += [f"| {_code(name)} | textual-inversion embedding (its token is a trigger word) |"
              for name in files.embeddings]
    lines.append("")
    lines += card_section(run, repo_id, files.embeddings)
    lines += _usage(run, base_model, repo_id, files, advice, prompts[0], negative) + [""]
    lines += _training_details(run, base_model, files) + [""]
    lines += _limitations(run, advice)
    return "\n".join(lines) + "\n"
