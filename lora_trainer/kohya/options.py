"""Data-side pieces of the kohya import: the dataset TOML's subsets, regularisation (class) images,
sample prompt files, and the note for each argument we cannot honour (caption and bucket options
are in data_options.py)."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from ..errors import ConfigError
from ..sample_prompts import parse_sample_prompt

if TYPE_CHECKING:
    from .mapping import Args

# The suffixes lora_trainer.data.images.IMAGE_EXTENSIONS reads (not imported: that package pulls in torch).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# kohya's folder name `<N>_<name>`, as lora_trainer.data.folders parses it.
_REPEAT_NAME = re.compile(r"([0-9]+)_(.*)", re.DOTALL)
_PROMPT_FLAG = re.compile(r"(?:^|\s)--([A-Za-z]+)(?=\s|$)")
_OUR_PROMPT_FLAGS = {"n", "w", "h", "d", "l", "s"}
# Keys of a dataset TOML subset/dataset that the import reads itself (not through data_options).
STRUCTURAL = {"image_dir", "num_repeats", "class_tokens", "is_reg", "subsets"}
SUBSET_OPTIONS = ("shuffle_caption", "keep_tokens", "caption_dropout_rate", "caption_tag_dropout_rate", "flip_aug",
                  "random_crop", "caption_extension", "caption_prefix", "caption_suffix", "enable_bucket",
                  "bucket_reso_steps", "min_bucket_reso", "max_bucket_reso", "bucket_no_upscale", "resolution",
                  "batch_size", "alpha_mask", "masked_loss", "keep_tokens_separator",
                  "caption_dropout_every_n_epochs")

_LEFT_OUT = "not supported; left out"
_ATTENTION = "attention runs through torch's scaled_dot_product_attention here; nothing to set"
_CHECKPOINTS = "output.keep_checkpoints keeps the newest N checkpoints (default 3)"
_SCHEDULER_OPTION = ("not supported (the schedule options here are train.scheduler_cycles, train.scheduler_power "
                     "and train.min_lr_ratio); left out")
NOTES = {
    "xformers": _ATTENTION, "sdpa": _ATTENTION, "mem_eff_attn": _ATTENTION,
    "lowram": "memory placement is automatic here", "highvram": "memory placement is automatic here",
    "persistent_data_loader_workers": "no equivalent; left out",
    # as models.loading decides: by the VAE's config, not by a flag
    "no_half_vae": ("no flag here: under fp16 an SDXL VAE whose config says fp16 overflows (force_upcast: the "
                    "base's, and a model.vae file, read with the base's config) stays fp32; one whose config says it "
                    "does not (the fp16-fix VAE as a folder or hub id) runs in fp16, as SD1.x VAEs do"),
    "cache_text_encoder_outputs": "frozen text embeddings are cached automatically while the text encoders are not trained",
    "cache_text_encoder_outputs_to_disk": "text embeddings are cached in memory only",
    "vae_batch_size": "latents are encoded as batches come; left out",
    "full_fp16": "adapters always train in fp32; train.mixed_precision sets the compute precision",
    "full_bf16": "adapters always train in fp32; train.mixed_precision sets the compute precision",
    "fp8_base": "fp8 bases are not supported; the frozen base is held in the compute precision",
    "training_comment": "metadata text is not copied; `lora-trainer publish` writes the model card",
    "no_metadata": "the adapter always carries its ss_* metadata",
    "huggingface_repo_id": "upload after training with `lora-trainer publish RUN_DIR --hub REPO`",
    "base_weights": "merging LoRAs into the base is done beforehand here: `lora-trainer merge`, then use the result as model.base",
    "lr_scheduler_timescale": _SCHEDULER_OPTION, "lr_scheduler_args": _SCHEDULER_OPTION, "lr_scheduler_type": _SCHEDULER_OPTION, "lr_decay_steps": _SCHEDULER_OPTION,
    "save_n_epoch_ratio": "the epochs are counted from the steps here: set output.save_every_n_epochs",
    "save_last_n_epochs_state": _CHECKPOINTS,
    "save_last_n_steps_state": _CHECKPOINTS,
    "save_state": "every checkpoint here holds the full training state (with output.save_every_n_steps); "
                  "epoch files (output.save_every_n_epochs) are adapters only",
    "save_state_on_train_end": "every checkpoint here holds the full training state (with output.save_every_n_steps)",
    "wandb_run_name": "the run name is output.name", "log_prefix": _LEFT_OUT, "log_tracker_config": _LEFT_OUT,
    "ddp_timeout": "DDP settings come from accelerate; left out",
    "ddp_gradient_as_bucket_view": "DDP settings come from accelerate; left out",
    "ddp_static_graph": "DDP settings come from accelerate; left out",
    "caption_separator": "captions are split into tags at commas; left out",
    "color_aug": _LEFT_OUT, "face_crop_aug_range": _LEFT_OUT,
    "secondary_separator": _LEFT_OUT,
    "enable_wildcard": _LEFT_OUT, "token_warmup_min": _LEFT_OUT, "token_warmup_step": _LEFT_OUT,
    "torch_compile": _LEFT_OUT, "dynamo_backend": _LEFT_OUT,
    "tokenizer_cache_dir": "tokenizers come with the base model",
    "prior_loss_weight": "there are no regularisation images, so there is no prior loss; left out", "dataset_repeats": "use data.repeats",
}
# Values equal to kohya's defaults change nothing when left out (kohya_ss GUI files write many of them).
KOHYA_DEFAULTS = {"lr_scheduler_num_cycles": 1, "lr_scheduler_power": 1, "lr_scheduler_min_lr_ratio": 0,
                  "clip_skip": 1, "max_token_length": 75, "caption_separator": ",", "min_bucket_reso": 256,
                  "max_bucket_reso": 1024, "vae_batch_size": 1, "save_model_as": "safetensors",
                  "caption_extension": ".caption", "log_prefix": "",
                  "persistent_data_loader_workers": False}
NETWORK_ARG_NOTES = {
    "dropout": "kohya's networks.lora does not read it (its down-output dropout is --network_dropout, "
               "lora.neuron_dropout here); left out",
}
# LoRA+ network arguments, mapped to train.<same name>.
LORAPLUS_ARGS = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")
# lora.* keys that only shape the UNet's adapter (left out of a text-encoder-only run)
UNET_ONLY_LORA_KEYS = ("conv_rank", "conv_alpha", "block_lr_weights", "block_lr_zero_threshold", "block_ranks",
                       "block_alphas", "conv_block_ranks", "conv_block_alphas")


def parse_number(text: str, where: str) -> float:
    """A kohya argument's value as a number, or a one-line ConfigError naming `where`."""
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{where}: {text!r} is not a number") from None


def set_conv_rank(dim: str, who: str, cfg: dict, notes: list[str]) -> int:
    """`--network_args conv_dim=R` (LoCon's 3x3 convs) as lora.conv_rank; R <= 0 adapts none, noted
    with what `who` (kohya, LyCORIS) still adds. Returns the rank set (0: none)."""
    rank = parse_number(dim, "--network_args conv_dim")
    if not rank.is_integer():
        raise ConfigError(f"--network_args conv_dim={dim}: not an integer")
    if rank <= 0:
        notes.append(f"--network_args conv_dim={dim}: no 3x3 convs are adapted ({who} still adds the ResNet blocks' "
                     "time_emb_proj and conv_shortcut; add them to lora.unet_targets for that)")
        return 0
    set_key(cfg, "lora.conv_rank", int(rank))
    return int(rank)


def drop_unet_options(cfg: dict, notes: list[str]) -> None:
    """With --network_train_text_encoder_only kohya builds no UNet adapter, so the options that shape
    one do nothing there; here they are refused, so they are left out with a note."""
    dropped = [(section, key) for section, keys in (("lora", UNET_ONLY_LORA_KEYS),
                                                    ("train", ("loraplus_unet_lr_ratio",)))
               for key in keys if key in cfg.get(section, {})]
    for section, key in dropped:
        del cfg[section][key]
    if dropped:
        notes.append("--network_train_text_encoder_only: the UNet gets no adapter, so "
                     + ", ".join(f"{s}.{k}" for s, k in dropped) + " (UNet options) are left out")


def set_key(cfg: dict, dotted: str, value: Any) -> None:
    """cfg["train"]["lr"] = value for "train.lr"."""
    *sections, key = dotted.split(".")
    node = cfg
    for section in sections:
        node = node.setdefault(section, {})
    node[key] = value


def note_for(shown: str, key: str, value: Any, reasons: dict[str, str] = NOTES) -> str:
    """One note line for an argument that is not carried over: its name, value and why."""
    if key == "wandb_api_key":  # a secret: never repeated
        return f"{shown}: not copied into the config; set WANDB_API_KEY in the environment"
    reason = reasons.get(key)
    if reason is None and key.startswith(("metadata_", "huggingface_")):
        reason = NOTES["training_comment" if key.startswith("metadata_") else "huggingface_repo_id"]
    if value is not True:
        shown += " " + (" ".join(map(str, value)) if isinstance(value, list) else str(value))
    return f"{shown}: {reason or 'not known to the importer; left out (check whether your run needs it)'}"


def no_half_vae_note(vae: Optional[str], variant: Optional[str]) -> str:
    """The note for --no_half_vae: the general rule, or with --vae, which way that VAE goes. A folder's
    config.json (or vae/config.json) is read here; a hub id's is not (offline), so both ways are told."""
    shown = "--no_half_vae"
    if variant == "sd15":
        return f"{shown}: no flag here; an SD1.x VAE runs in the compute precision (train.mixed_precision)"
    if not vae:
        return f"{shown}: {NOTES['no_half_vae']}"
    path = Path(vae).expanduser()
    if path.is_file() or path.suffix.lower() == ".safetensors":
        how = "a file, read with the base's VAE config (force_upcast): on SDXL it stays fp32 under fp16"
    else:
        upcast = _force_upcast(path)
        if upcast is None:
            how = ("read with its own config: one that says fp16 overflows (force_upcast) stays fp32 under fp16; "
                   "one that says it does not (the fp16-fix VAE) runs in fp16")
        elif upcast:
            how = "a folder whose config says fp16 overflows (force_upcast): it stays fp32 under fp16"
        else:
            how = ("a folder whose config says fp16 does not overflow it (force_upcast false, as the fp16-fix "
                   "VAE's): it runs in fp16 under fp16, not fp32 as --no_half_vae asked")
    return f"{shown}: no flag here; --vae {vae} is {how}"


def _force_upcast(folder: Path) -> Optional[bool]:
    """force_upcast of a local diffusers VAE folder (or a model folder's vae/); None when not readable here."""
    import json

    for config in (folder / "config.json", folder / "vae" / "config.json"):
        try:
            return bool(json.loads(config.read_text(encoding="utf-8")).get("force_upcast", True))
        except (OSError, ValueError, AttributeError):
            continue
    return None


def parse_network_args(values: Any) -> list[tuple[str, str]]:
    """["conv_dim=4", "conv_alpha=1"] (or one string of them) as [(key, value)]."""
    items = values.split() if isinstance(values, str) else list(values or [])
    pairs = []
    for item in items:
        key, eq, value = str(item).partition("=")
        pairs.append((key.strip(), value.strip() if eq else "true"))
    return pairs


def images_in(folder: Path) -> list[Path]:
    """The image files directly inside `folder` (none when it does not exist here)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not p.name.startswith("."))


def resolution_side(value: Any, where: str, notes: list[str]) -> int:
    """kohya's "512" or "768,512" (width,height) as our square side, noting what changes."""
    parts = value if isinstance(value, list) else re.split(r"[,x ]+", str(value).strip("()[] "))
    try:
        sides = [int(p) for p in parts if str(p).strip()]
    except ValueError:
        raise ConfigError(f"{where}: {value!r} is not a resolution; expected e.g. 512 or 768,512") from None
    if len(sides) not in (1, 2) or min(sides) < 8:
        raise ConfigError(f"{where}: {value!r} is not a resolution; expected e.g. 512 or 768,512")
    if len(sides) == 1 or sides[0] == sides[1]:
        return -(-sides[0] // 8) * 8
    side = max(64, round(math.sqrt(sides[0] * sides[1]) / 64) * 64)
    notes.append(f"{where} {sides[0]},{sides[1]}: we train squares of one side (or buckets of about side² pixels "
                 f"with data.buckets), so data.resolution is {side}, the same pixel count; the "
                 f"{sides[0]}x{sides[1]} shape is dropped")
    return side


def reg_folder(folder: str, class_tokens: Optional[str], weight: Optional[float], cfg: dict, notes: list[str],
               where: str) -> None:
    """Regularisation images as DreamBooth class images: one folder, its prompt, and its image count
    (our num_class_images; kohya's images are made beforehand, so none is generated when it matches)."""
    path = Path(folder)
    if not path.is_dir():
        notes.append(f"{where} {folder}: not found here, so prior preservation is left off; once the images are "
                     "there set dreambooth.class_data (the folder of images), dreambooth.class_prompt and "
                     "dreambooth.num_class_images (their count)")
        return
    if where == "--reg_data_dir":  # kohya reads the <N>_<class> folders inside it
        found = []
        for sub in sorted(p for p in path.iterdir() if p.is_dir()):
            match = _REPEAT_NAME.fullmatch(sub.name)
            if match and int(match.group(1)) > 0 and images_in(sub):
                found.append((sub, match.group(2).strip()))
    else:
        found = [(path, "")] if images_in(path) else []
    if not found:
        notes.append(f"{where} {folder}: no images found, so prior preservation is left off")
        return
    found.sort(key=lambda item: -len(images_in(item[0])))
    chosen, name = found[0]
    for other, _ in found[1:]:
        notes.append(f"{where}: {other} left out; dreambooth.class_data is one folder ({chosen} has the most images)")
    prompt = class_tokens or name
    if not prompt:
        notes.append(f"{where} {chosen}: no class tokens to caption the class images, so prior preservation is left "
                     "off; set dreambooth.class_data, class_prompt and num_class_images yourself")
        return
    count = len(images_in(chosen))
    set_key(cfg, "dreambooth.class_data", str(chosen))
    set_key(cfg, "dreambooth.class_prompt", prompt)
    set_key(cfg, "dreambooth.num_class_images", count)
    if weight is not None:
        set_key(cfg, "dreambooth.prior_loss_weight", weight)
    notes.append(f"{where}: the {count} images in {chosen} are the class images, all captioned {prompt!r}; each "
                 "step trains a class batch beside the instance batch (kohya's reg repeats do not apply)")


def read_sample_prompts(path: Path, notes: list[str]) -> list[str]:
    """The prompts of a kohya .txt prompt file, one a line; options we do not read are dropped."""
    if path.suffix.lower() in (".toml", ".json"):
        notes.append(f"--sample_prompts {path}: only .txt prompt files (one prompt a line) are read; "
                     "copy its prompts into sample.prompts")
        return []
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = _PROMPT_FLAG.split(line)
        dropped = sorted({f"--{flag}" for flag in parts[1::2] if flag not in _OUR_PROMPT_FLAGS})
        if dropped:
            line = parts[0].strip() + "".join(f" --{flag} {value.strip()}" for flag, value in
                                              zip(parts[1::2], parts[2::2]) if flag in _OUR_PROMPT_FLAGS)
            notes.append(f"--sample_prompts line {number}: {', '.join(dropped)} left out (we read --n --w --h --d --l --s)")
        try:
            parse_sample_prompt(line)
        except ValueError as exc:
            notes.append(f"--sample_prompts line {number}: {exc}; prompt left out")
            continue
        prompts.append(line.strip())
    return prompts


def dataset_config_data(a: "Args", dataset: dict, cfg: dict, notes: list[str]) -> None:
    """The data from kohya's dataset TOML: data.path for one training subset, data.subsets for
    several (the first one's options as data.*, each subset's own caption, tag and flip options
    in its entry), the reg subset as class images."""
    from .data_options import caption_extension_option, data_options, kohya_caption_extension, subset_mask_dir
    from .mapping import Args
    from .subsets import CARRIED, subsets_data

    general = dataset.get("general") or {}
    datasets = [d for d in dataset["datasets"] if isinstance(d, dict)]
    for key in ("train_data_dir", "reg_data_dir", "in_json"):
        if a.has(key):
            notes.append(f"--{key} {a.get(key)}: ignored, as kohya ignores it when a dataset config is given")
    if len(datasets) > 1:
        notes.append(f"dataset config: {len(datasets)} [[datasets]] are merged into one: every subset is used, "
                     "with the options (batch size, buckets) of the first; each keeps its resolution")
    subsets = [(s, d) for d in datasets for s in d.get("subsets") or [] if isinstance(s, dict)]
    for index, (subset, _) in enumerate(subsets, 1):
        if not subset.get("image_dir"):
            raise ConfigError(f"dataset config: subset {index} has no image_dir (kohya's fine-tuning subsets with "
                              "metadata_file are not read); give each subset an image_dir")
    train = [(s, d) for s, d in subsets if not s.get("is_reg")]
    if not train:
        raise ConfigError("dataset config: no training subset (every [[datasets.subsets]] is is_reg, or none is given)")
    layers, seen, mask_dirs = [], {}, []
    for index, (subset, ds) in enumerate(train, 1):
        layer = Args({**a.values, **general, **{k: v for k, v in ds.items() if k != "subsets"}, **subset},
                     where=f"dataset config (subset {subset['image_dir']}) ")
        layers.append(layer)
        if index == 1:
            # The resolution first: the bucket options read it (kohya's default limits vs a small side).
            if layer.has("resolution"):
                set_key(cfg, "data.resolution", resolution_side(layer.get("resolution"), layer.name("resolution"), notes))
            data_options(layer, cfg, notes)
            caption_extension_option(layer, [Path(str(s["image_dir"])) for s, _ in train], cfg, notes)
            if layer.has("batch_size"):
                set_key(cfg, "train.batch_size", layer.int("batch_size"))
            seen = {k: layer.values.get(k) for k in SUBSET_OPTIONS}
            seen["caption_extension"] = kohya_caption_extension(layer.values)  # unset means kohya's .caption
        else:  # the options data.subsets carries become its entries (kohya/subsets.py); the rest are one for all
            layer.used.update(SUBSET_OPTIONS)
            layer.get("conditioning_data_dir")  # a folder per subset: subset_mask_dir below
            for key in (k for k in SUBSET_OPTIONS if k not in CARRIED and k not in ("caption_extension", "resolution")):
                value = layer.values.get(key)
                if value != seen[key]:
                    notes.append(f"{layer.name(key)}: {_shown(value)} differs from the first "
                                 f"subset's {_shown(seen[key])}; one value holds for all images here, the first's")
        mask_dirs.append((subset, layer))
        a.used.update(layer.used)
    subset_mask_dir(mask_dirs, cfg, notes)
    if len(train) == 1:
        _train_folders([s for s, _ in train], cfg, notes)
    else:
        subsets_data(list(zip([s for s, _ in train], layers)), cfg, notes)
    reg = [s for s, _ in subsets if s.get("is_reg")]
    for extra in reg[1:]:
        notes.append(f"dataset config: reg subset {extra['image_dir']} left out; dreambooth.class_data is one folder")
    if reg:
        reg_folder(str(reg[0]["image_dir"]), reg[0].get("class_tokens"), a.float("prior_loss_weight"), cfg, notes,
                   f"dataset config (reg subset {reg[0]['image_dir']})")
        folders = [cfg["data"]["path"]] if "path" in cfg["data"] else [s["path"] for s in cfg["data"]["subsets"]]
        if any(inside(Path(reg[0]["image_dir"]), Path(folder)) for folder in folders):
            where = "data.path" if "path" in cfg["data"] else "a training subset's folder"
            notes.append(f"dataset config: reg subset {reg[0]['image_dir']} lies under {where}, so its images "
                         "also train as instance images; move it out")
    used = set().union(*(layer.used for layer in layers)) | STRUCTURAL | {"metadata_file"}
    tables = [("[general]", general)] + [("[[datasets]]", d) for d in datasets] + [
        (f"subset {s['image_dir']}", s) for s, _ in subsets]
    for where, table in tables:
        for key, value in table.items():
            if key not in used and value not in (None, False, "", []):
                notes.append(note_for(f"dataset config {where} {key}", key, value))


def _train_folders(subsets: list[dict], cfg: dict, notes: list[str]) -> None:
    """data.path for the one training subset: its folder, num_repeats as data.repeats and class_tokens
    (the caption of its images without one) as data.default_caption. A dataset TOML's folder names
    mean nothing to kohya, and the folder given as data.path is not read as an `<N>_<name>` folder
    here either."""
    from .subsets import subset_repeats

    subset = subsets[0]
    set_key(cfg, "data.path", str(subset["image_dir"]))
    if subset_repeats(subset) != 1:
        set_key(cfg, "data.repeats", subset_repeats(subset))
    if subset.get("class_tokens"):
        set_key(cfg, "data.default_caption", str(subset["class_tokens"]))


def _shown(value: Any) -> str:
    return "unset" if value is None else repr(value)


def inside(path: Path, root: Path) -> bool:
    """`path` is `root` or lies below it (links resolved)."""
    try:
        path.resolve().relative_to(root.resolve())
    except ValueError:
        return False
    return True
