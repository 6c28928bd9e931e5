"""kohya's caption and bucket options (from the arguments, or a dataset TOML subset layered over
them) as data.* keys: caption files and their extension, prefix and suffix, tag shuffling and
dropout (keep_tokens and its separator, dropout every n epochs), weighted captions, loss masks
(alpha channel or mask images), augmentation, and aspect buckets with their limits."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..config import normalize_caption_extension
from .options import IMAGE_SUFFIXES, KOHYA_DEFAULTS, set_key

if TYPE_CHECKING:
    from .mapping import Args

KOHYA_CAPTION_EXTENSION = ".caption"  # what kohya reads when --caption_extension is not given
KOHYA_BUCKET_STEP = 64  # kohya's --bucket_reso_steps default


def data_options(src: "Args", cfg: dict, notes: list[str]) -> None:
    """Caption, augmentation and bucket options (from the arguments or a dataset TOML subset)."""
    if src.bool("shuffle_caption"):
        set_key(cfg, "data.shuffle_tags", True)
    if src.has("keep_tokens"):
        set_key(cfg, "data.keep_tokens", src.int("keep_tokens"))
    if src.has("caption_dropout_rate"):
        set_key(cfg, "data.caption_dropout", src.float("caption_dropout_rate"))
    if src.int("caption_dropout_every_n_epochs"):  # 0 is off in both
        set_key(cfg, "data.caption_dropout_every_n_epochs", src.int("caption_dropout_every_n_epochs"))
    if src.has("keep_tokens_separator"):
        set_key(cfg, "data.keep_tokens_separator", src.str("keep_tokens_separator"))
    if src.float("caption_tag_dropout_rate"):  # 0 is off in both
        set_key(cfg, "data.caption_tag_dropout", src.float("caption_tag_dropout_rate"))
    if src.bool("flip_aug"):
        set_key(cfg, "data.random_flip", True)
    if src.bool("random_crop"):
        set_key(cfg, "data.center_crop", False)
    # kohya joins the prefix and the suffix to the caption with a space; ours are taken literally.
    templates = cfg.get("embedding", {}).get("templates")
    for key in [k for k in ("caption_prefix", "caption_suffix") if templates and src.has(k)]:
        notes.append(f"{src.name(key)} {src.str(key)}: left out, as kohya's TI templates replace it with the caption "
                     f"(embedding.templates {templates} refuses data.{key})")
        src.values.pop(key)
    if src.has("caption_prefix"):
        prefix = src.str("caption_prefix")
        set_key(cfg, "data.caption_prefix", prefix if prefix[-1:].isspace() else prefix + " ")
    if src.has("caption_suffix"):
        suffix = src.str("caption_suffix")
        set_key(cfg, "data.caption_suffix", suffix if suffix[:1].isspace() else " " + suffix)
    if src.bool("weighted_captions"):
        set_key(cfg, "data.weighted_captions", True)
    mask_options(src, cfg, notes)
    bucket_options(src, cfg, notes)


def mask_options(src: "Args", cfg: dict, notes: list[str]) -> None:
    """kohya's loss masks: --masked_loss with a conditioning_data_dir (an argument, or a subset option)
    as data.mask_dir, which kohya reads over the alpha channel when both are given; else --alpha_mask
    (an argument or a subset option; --masked_loss with it adds nothing) as data.alpha_mask."""
    masked, alpha = src.bool("masked_loss"), src.bool("alpha_mask")
    folder = src.str("conditioning_data_dir")
    if masked and folder:
        set_key(cfg, "data.mask_dir", folder)
        if alpha:
            notes.append(f"{src.name('alpha_mask')}: with --masked_loss kohya weights the loss by the mask images in "
                         f"{src.name('conditioning_data_dir')} (data.mask_dir), not by the alpha channel; left out")
        return
    if alpha:
        set_key(cfg, "data.alpha_mask", True)
    if folder:
        notes.append(f"{src.name('conditioning_data_dir')} {folder}: kohya reads the mask images only with "
                     "--masked_loss, which is off; left out (data.mask_dir would read them)")
    elif masked and not alpha:
        notes.append(f"{src.name('masked_loss')}: no conditioning_data_dir (mask images) and no --alpha_mask, so "
                     "there is no mask to read; left out (set data.mask_dir to a folder of mask images)")


def subset_mask_dir(subsets: list[tuple[dict, "Args"]], cfg: dict, notes: list[str]) -> None:
    """data.mask_dir for several training subsets, each with its own conditioning_data_dir: their
    common parent when each folder is named as its subset's image folder (the run looks for a mask
    under the image's folder name first), else the first subset's, with a note."""
    dirs = [(Path(str(subset["image_dir"])), layer.str("conditioning_data_dir")) for subset, layer in subsets]
    if "mask_dir" not in cfg.get("data", {}) or len({d for _, d in dirs}) == 1:
        return
    parents = {Path(d).parent for _, d in dirs if d}
    if all(d and Path(d).name == image.name for image, d in dirs) and len(parents) == 1:
        set_key(cfg, "data.mask_dir", str(parents.pop()))
        return
    notes.append(f"dataset config conditioning_data_dir: the subsets keep their masks in {len({d for _, d in dirs})} "
                 f"folders; data.mask_dir is one folder ({cfg['data']['mask_dir']}), where a mask is looked for under "
                 "its image's folder name, then at the top: gather the masks as <mask_dir>/<image folder>/<name>")


def bucket_options(src: "Args", cfg: dict, notes: list[str]) -> None:
    """--enable_bucket and its step, side limits and no-upscale rule. With buckets on, kohya's
    default limits (256 and 1024) are kept; limits that are not multiples of the step are moved to
    one as kohya moves them (the minimum down, the maximum up)."""
    limits = {"min_bucket_reso": "data.min_bucket_side", "max_bucket_reso": "data.max_bucket_side"}
    if src.has("bucket_reso_steps"):
        set_key(cfg, "data.bucket_step", src.int("bucket_reso_steps"))
    if not src.bool("enable_bucket"):
        unused = [f"{src.name(key)} {src.int(key)}" for key in limits
                  if src.has(key) and src.int(key) != KOHYA_DEFAULTS[key]]
        unused += [src.name("bucket_no_upscale")] if src.bool("bucket_no_upscale") else []
        if unused:
            notes.append(f"{', '.join(unused)}: kohya uses them only with --enable_bucket, which is off; left out")
        return
    set_key(cfg, "data.buckets", True)
    step = src.int("bucket_reso_steps", KOHYA_BUCKET_STEP)
    resolution = cfg.get("data", {}).get("resolution")
    side = max(step, resolution // step * step) if resolution else None  # the square bucket's side
    for key, ours in limits.items():
        value = src.int(key, KOHYA_DEFAULTS[key])
        if not src.has(key) and side is not None and (value > side if key == "min_bucket_reso" else value < side):
            continue  # kohya's default does not fit this resolution (a small test run): no limit that way
        moved = max(step, value - value % step) if key == "min_bucket_reso" else -(-value // step) * step
        if moved != value:
            notes.append(f"{src.name(key)} {value}: not a multiple of the bucket step {step}; {ours} is {moved}, "
                         "as kohya adjusts it")
        set_key(cfg, ours, moved)
    if src.bool("bucket_no_upscale"):
        set_key(cfg, "data.bucket_no_upscale", True)


def caption_extension_option(src: "Args", folders: list[Path], cfg: dict, notes: list[str]) -> None:
    """data.caption_extension from --caption_extension (or kohya's old spelling --caption_extention,
    which wins as in kohya). Without either, kohya reads `.caption` files: so does the config when
    the dataset `folders` hold any; else .txt stays, with a note."""
    given = {key: src.str(key) for key in ("caption_extention", "caption_extension")}
    key, ext = next(((k, v) for k, v in given.items() if v), (None, None))
    if key is not None:
        set_key(cfg, "data.caption_extension", normalize_caption_extension(ext, src.name(key)))
        return
    if any(captioned_images(folder, KOHYA_CAPTION_EXTENSION) for folder in folders):
        set_key(cfg, "data.caption_extension", KOHYA_CAPTION_EXTENSION)
        return
    if cfg.get("dreambooth", {}).get("instance_prompt") or cfg.get("embedding", {}).get("templates"):
        return  # an instance prompt or TI templates caption every image: none are read
    shown = ", ".join(str(f) for f in folders)
    found = "none were found in" if any(f.is_dir() for f in folders) else "the folders are not here to look in:"
    notes.append(f"--caption_extension not given: kohya's default would have read .caption files, and {found} "
                 f"{shown}; captions are read from .txt files (set data.caption_extension for another extension)")


def kohya_caption_extension(values: dict) -> str:
    """The caption extension kohya reads for these arguments (".caption" when none is given)."""
    value = str(values.get("caption_extention") or values.get("caption_extension") or KOHYA_CAPTION_EXTENSION).strip()
    return value if value.startswith(".") else "." + value


def captioned_images(folder: Path, ext: str) -> int:
    """How many images under `folder` have a `<stem><ext>` caption file beside them (0 when the
    folder is not here)."""
    if not folder.is_dir():
        return 0
    return sum(1 for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
               and p.with_name(p.stem + ext).is_file())
