"""DreamBooth prior preservation: class images ("a photo of a dog") generated once with the base
model, then trained on beside the instance images so the adapter learns the subject without
forgetting the class. The class loss is added as `prior_loss_weight · loss(class batch)`."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import RunConfig, main_side
from ..data import Example, is_image_file
from ..data.images import is_unread_image_file, unread_formats_message
from ..errors import DataError
from ..models.vae import png_vae_fields

log = logging.getLogger(__name__)


def existing_class_images(folder: Path) -> list[Path]:
    """Images already in the class folder (user-supplied or generated before), sorted by name."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p) and not p.name.startswith("."))


def _free_names(folder: Path, count: int) -> list[Path]:
    names, k = [], 0
    while len(names) < count:
        path = folder / f"class-{k:05d}.png"
        if not path.exists():
            names.append(path)
        k += 1
    return names


def generate_class_images(cfg: RunConfig, base, show_progress: bool = True) -> list[Path]:
    """Fill `dreambooth.class_data` up to `num_class_images` with images of `class_prompt`.

    Must run before the adapters are injected: the class images show what the base model makes.
    Images already there are kept, so an interrupted run resumes where it stopped; each image is
    written (atomically) as soon as its batch is done, with a fixed seed per file name number.
    """
    from ..pnginfo import GenerationInfo, save_png
    from .conditioning import pipeline_prompt_embeds
    from .outputs import sampling_pipeline

    db, size = cfg.dreambooth, main_side(cfg.data.resolution)  # several sides: the largest
    folder = Path(db.class_data)
    unread = sorted(p.name for p in folder.iterdir() if p.is_file() and is_unread_image_file(p)) \
        if folder.is_dir() else []
    if unread:  # else class images the user put there would be generated over in silence
        log.warning("%s: %s: %s", folder, unread_formats_message(unread), ", ".join(unread[:10]))
    missing = db.num_class_images - len(existing_class_images(folder))
    if missing <= 0:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    targets = _free_names(folder, missing)
    log.info("generating %d class images of %r into %s", missing, db.class_prompt, folder)
    pipe = sampling_pipeline(base)
    pipe.set_progress_bar_config(disable=True)
    seed0, s = cfg.train.seed, cfg.sample
    written = []
    bar = tqdm(total=missing, desc="class images", disable=not show_progress)
    for start in range(0, missing, db.class_batch_size):
        batch = targets[start:start + db.class_batch_size]
        seeds = [seed0 + int(p.stem.split("-")[1]) for p in batch]
        generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]
        # The class prompt read as training reads captions (clip skip, long text): the class images
        # show what the base makes of the caption the class loss trains on.
        prompts = pipeline_prompt_embeds(base, pipe, [db.class_prompt] * len(batch), s.negative_prompt,
                                         cfg.model.clip_skip, cfg.model.max_token_length, cfg.data.weighted_captions)
        with torch.no_grad():
            images = pipe(**prompts, num_inference_steps=db.class_steps, guidance_scale=s.guidance_scale,
                          height=size, width=size, generator=generators).images
        for path, image, seed in zip(batch, images, seeds):
            info = GenerationInfo(prompt=db.class_prompt, negative_prompt=s.negative_prompt, steps=db.class_steps,
                                  cfg_scale=s.guidance_scale, seed=seed, width=image.width, height=image.height,
                                  clip_skip=cfg.model.clip_skip, model_name=Path(cfg.model.base).name,
                                  **png_vae_fields(cfg.model.vae))
            written.append(save_png(image, path, info))
        bar.update(len(batch))
    bar.close()
    return written


def class_examples(cfg: RunConfig) -> list[Example]:
    """The first `num_class_images` class images, each captioned with `class_prompt`."""
    db = cfg.dreambooth
    paths = existing_class_images(Path(db.class_data))[: db.num_class_images]
    if len(paths) < db.num_class_images:
        raise DataError(f"dreambooth.class_data: {db.class_data} holds {len(paths)} images, "
                        f"{db.num_class_images} expected; check that the folder is writable")
    return [Example(p, db.class_prompt) for p in paths]
