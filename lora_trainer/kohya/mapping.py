"""kohya-ss sd-scripts arguments (train_network.py, sdxl_train_network.py, the textual-inversion
scripts through embedding_options.py, dataset TOML) mapped to lora-trainer config keys. Every
argument is either mapped, or named in a note saying why not; arguments that are off or empty
(false, "", []) mean nothing and are passed over."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Optional

from ..config import ModelConfig
from ..errors import ConfigError
from .block_args import block_args
from .data_options import caption_extension_option, data_options
from .embedding_options import TI_SCRIPTS, embedding_options, is_textual_inversion
from .loss_options import loss_options
from .lycoris_args import lycoris_args, lycoris_type
from .optimizer_options import optimizer_options, scheduler_options
from .output_options import output_options, sample_options
from .options import (
    KOHYA_DEFAULTS, LORAPLUS_ARGS, NETWORK_ARG_NOTES, dataset_config_data, drop_unet_options, images_in,
    no_half_vae_note, note_for, parse_network_args, parse_number, reg_folder, resolution_side, set_conv_rank, set_key,
)

# kohya's networks.lora adapts every Linear and 1x1 Conv2d of the UNet's transformer blocks
# (proj_in/proj_out are 1x1 convs on SD1.x, linears on SDXL) and the text encoders' attention and
# MLP; with `conv_dim` also the ResNet blocks and samplers (lora.conv_rank adds those).
KOHYA_UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"]
KOHYA_TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
KOHYA_DEFAULT_LR = 2e-6  # kohya's --learning_rate default
SECTIONS = ("model", "data", "dreambooth", "lora", "embedding", "train", "sample", "output", "log")  # RunConfig's order
PRECISIONS = {"no": "no", "fp16": "fp16", "bf16": "bf16"}


class Args:
    """kohya arguments with typed getters; remembers what was read, so the rest become notes."""

    def __init__(self, values: dict[str, Any], where: str = "--"):
        self.values = {k: v for k, v in values.items() if not k.startswith("_")}
        self.where = where  # how a key is shown: "--network_dim", or "subset 1 num_repeats"
        self.used: set[str] = set()

    def has(self, key: str) -> bool:
        value = self.values.get(key)
        return not (value is None or value is False or value == "" or value == [])

    def get(self, key: str, default: Any = None) -> Any:
        self.used.add(key)
        return self.values[key] if self.has(key) else default

    def name(self, key: str) -> str:
        return f"{self.where}{key}"

    def int(self, key: str, default: Optional[int] = None) -> Optional[int]:
        value = self.get(key)
        if value is None:
            return default
        try:
            number = float(value)
            if number.is_integer() and not isinstance(value, bool):
                return int(number)
        except (TypeError, ValueError):
            pass
        raise ConfigError(f"{self.name(key)}: {value!r} is not an integer")

    def float(self, key: str, default: Optional[float] = None) -> Optional[float]:
        value = self.get(key)
        if value is None:
            return default
        try:
            if not isinstance(value, bool):
                return float(value)
        except (TypeError, ValueError):
            pass
        raise ConfigError(f"{self.name(key)}: {value!r} is not a number")

    def bool(self, key: str) -> bool:
        value = self.get(key)
        if isinstance(value, str):
            if value.lower() not in ("true", "1", "yes", "false", "0", "no"):
                raise ConfigError(f"{self.name(key)}: {value!r} is not true or false")
            return value.lower() in ("true", "1", "yes")
        return bool(value)

    def str(self, key: str, default: Optional[str] = None) -> Optional[str]:
        value = self.get(key)
        if isinstance(value, list):
            raise ConfigError(f"{self.name(key)}: takes one value, got {' '.join(map(str, value))!r}")
        return default if value is None else str(value)

    def leftovers(self) -> list[str]:
        return [k for k in self.values if k not in self.used and self.has(k)]


def config_from_kohya(args: dict[str, Any], dataset: Optional[dict[str, Any]] = None,
                      base_dir: Path = Path(".")) -> tuple[dict[str, Any], list[str]]:
    """Our config (nested dict, as YAML would hold it) and the notes, from kohya's arguments and
    optional dataset TOML. Relative files the arguments name (sample prompts) are looked up from
    the current folder, then from `base_dir` (where the kohya file was)."""
    a, cfg, notes = Args(args), {}, []
    for key, value in a.values.items():
        if any(re.search(r"\$\{?\w+|%\w+%", str(v)) for v in (value if isinstance(value, list) else [value])):
            notes.append(f"--{key} {value}: a shell variable is not expanded here; put in its value")
    _model(a, args.get("_script"), args.get("_launcher", ""), cfg, notes)
    if is_textual_inversion(a, args.get("_script")):
        embedding_options(a, cfg, notes, KOHYA_DEFAULT_LR)  # no LoRA: the network arguments are noted
    else:
        _network(a, cfg, notes)
    _schedule(a, cfg, notes)
    optimizer_options(a, cfg, notes)
    if dataset is not None:
        dataset_config_data(a, dataset, cfg, notes)
    else:
        _data_dirs(a, cfg, notes)
    sample_options(a, cfg, notes, base_dir)
    output_options(a, cfg, notes)
    for key in a.leftovers():
        if KOHYA_DEFAULTS.get(key, object()) == a.values[key]:  # kohya's own default changes nothing
            continue
        notes.append(note_for(a.name(key), key, a.values[key]))
    return {section: cfg[section] for section in SECTIONS if section in cfg}, notes


def _model(a: Args, script: Optional[str], launcher: str, cfg: dict, notes: list[str]) -> None:
    """The base, its variant (from the script's name) and text-encoder reading; refuses scripts
    that are not LoRA or textual-inversion training."""
    if script and script not in ("train_network.py", "sdxl_train_network.py", *TI_SCRIPTS):
        raise ConfigError(f"{script}: not a LoRA training script (nor textual inversion); from-kohya reads "
                          "train_network.py and train_textual_inversion.py setups and their sdxl_ versions (full "
                          "fine-tuning and DreamBooth checkpoints are not LoRA)")
    if "--" in launcher and not re.search(r"\b(accelerate\s+launch|torchrun)\b", launcher):
        notes.append(f"launcher `{launcher}`: its options are not part of the config; start train.py the same way")
    base = a.str("pretrained_model_name_or_path")
    if not base:
        raise ConfigError("--pretrained_model_name_or_path: missing; it names the base model (kohya needs it too)")
    set_key(cfg, "model.base", base)
    if (script or "").startswith("sdxl_") or a.bool("sdxl"):
        set_key(cfg, "model.variant", "sdxl")
    elif a.bool("v2"):
        notes.append("--v2: SD2.x is untested here; a diffusers-folder SD2 base loads with model.variant auto "
                     "(one text encoder, like SD1.x), a single-file SD2 checkpoint is refused")
    elif script in ("train_network.py", TI_SCRIPTS[0]):
        set_key(cfg, "model.variant", "sd15")
    if a.bool("v_parameterization"):
        notes.append("--v_parameterization: the prediction type is read from the base's scheduler config "
                     "(a diffusers folder of a v-prediction model trains as one); a single file takes that of "
                     "model.config_dir, else epsilon")
    if a.has("vae"):
        set_key(cfg, "model.vae", a.str("vae"))
    if a.has("no_half_vae") and a.bool("no_half_vae"):  # which way the VAE goes depends on it and the base
        notes.append(no_half_vae_note(a.str("vae"), cfg["model"].get("variant")))
    model_keys = {f.name for f in dataclasses.fields(ModelConfig)}
    if cfg["model"].get("variant") == "sdxl" and a.has("clip_skip") and a.int("clip_skip") != KOHYA_DEFAULTS["clip_skip"]:
        notes.append(f"--clip_skip {a.get('clip_skip')}: kohya's SDXL training ignores it; left out "
                     "(model.clip_skip would read an earlier layer on SDXL)")
        a.values.pop("clip_skip")
    for key in ("clip_skip", "max_token_length"):
        if a.has(key):
            if key in model_keys:
                set_key(cfg, f"model.{key}", a.int(key))
            elif a.int(key) != KOHYA_DEFAULTS[key]:
                notes.append(f"--{key} {a.get(key)}: model.{key} is not in this version's config; left out")


def _network(a: Args, cfg: dict, notes: list[str]) -> None:
    module = a.str("network_module", "networks.lora")
    if module not in ("networks.lora", "lycoris.kohya"):
        raise ConfigError(f"--network_module {module}: not supported; lora-trainer trains kohya's networks.lora "
                          "and LyCORIS' lycoris.kohya (algo=lora, locon, loha, lokr): DyLoRA, OFT and LoRA-FA are not")
    network_args = dict(parse_network_args(a.get("network_args", [])))
    if module == "lycoris.kohya":
        lycoris_type(network_args)  # an algorithm not trained here fails first
    if not a.has("network_dim"):
        notes.append("--network_dim not given: kohya's default 4 is used")
    set_key(cfg, "lora.rank", a.int("network_dim", 4))
    if not a.has("network_alpha"):
        notes.append("--network_alpha not given: kohya's default 1 is kept (scale 1/rank); ours would be alpha = rank")
    alpha = a.float("network_alpha", 1.0)
    set_key(cfg, "lora.alpha", alpha if alpha else float(cfg["lora"]["rank"]))  # kohya: alpha 0 means alpha = dim
    if a.float("network_dropout") and module == "lycoris.kohya":
        notes.append(f"--network_dropout {a.get('network_dropout')}: lycoris.kohya does not read it (its dropouts "
                     "are --network_args dropout/rank_dropout/module_dropout); left out")
    elif a.float("network_dropout"):  # kohya's dropout of the down projection's output, not of the input
        set_key(cfg, "lora.neuron_dropout", a.float("network_dropout"))
    set_key(cfg, "lora.unet_targets", list(KOHYA_UNET_TARGETS))
    set_key(cfg, "lora.text_encoder_targets", list(KOHYA_TEXT_ENCODER_TARGETS))
    if a.has("network_weights"):
        set_key(cfg, "lora.init_from", a.str("network_weights"))
        if a.bool("dim_from_weights"):
            notes.append("--dim_from_weights: set lora.rank to the file's rank (`lora-trainer inspect FILE` shows it)")
    te_lrs = _text_encoder_lrs(a)
    unet_only = a.bool("network_train_unet_only") or te_lrs[:1] == [0.0]
    if te_lrs[:1] == [0.0] and not a.bool("network_train_unet_only"):
        notes.append("--text_encoder_lr 0: the text encoder is not trained (older kohya versions trained it at "
                     "learning_rate: set lora.train_text_encoder=true and train.text_encoder_lr for that)")
    te_only = a.bool("network_train_text_encoder_only")
    if te_only and unet_only:
        raise ConfigError("--network_train_text_encoder_only: with " + (
            "--network_train_unet_only" if a.bool("network_train_unet_only") else "--text_encoder_lr 0")
            + " nothing would train (kohya trains nothing either); keep one of them")
    set_key(cfg, "lora.train_text_encoder", not unet_only)
    if te_only:
        set_key(cfg, "lora.train_unet", False)
    if module == "lycoris.kohya":
        lycoris_args(network_args, alpha, cfg, notes)
    else:
        _locon(network_args, cfg, notes)
        block_args(network_args, cfg, notes)
    for key, value in network_args.items():
        if key == "loraplus_text_encoder_lr_ratio" and unet_only:
            notes.append(f"--network_args {key}={value}: the text encoder is not trained; left out")
        elif key in LORAPLUS_ARGS:  # LoRA+: B at lr × ratio, the same three names here
            set_key(cfg, f"train.{key}", parse_number(value, f"--network_args {key}"))
        elif key in ("rank_dropout", "module_dropout"):  # kohya's per-layer dropouts, the same names here
            set_key(cfg, f"lora.{key}", parse_number(value, f"--network_args {key}"))
        else:
            notes.append(note_for(f"--network_args {key}={value}", key, True, NETWORK_ARG_NOTES))
    if te_only:
        drop_unet_options(cfg, notes)


def _locon(network_args: dict[str, str], cfg: dict, notes: list[str]) -> None:
    """kohya's `--network_args conv_dim=R conv_alpha=A` (LoCon) as lora.conv_rank / lora.conv_alpha;
    the pair is taken out of `network_args`."""
    dim, alpha = network_args.pop("conv_dim", None), network_args.pop("conv_alpha", None)
    if dim is None:
        if alpha is not None:
            notes.append(f"--network_args conv_alpha={alpha}: without conv_dim kohya adapts no 3x3 convs; left out")
        return
    rank = set_conv_rank(dim, "kohya", cfg, notes)
    if not rank:
        return
    if alpha is None:
        notes.append("--network_args conv_alpha not given: kohya's default 1 is kept (scale 1/conv_dim); "
                     "ours would be conv_alpha = conv_rank")
    value = parse_number(alpha, "--network_args conv_alpha") if alpha is not None else 1.0
    set_key(cfg, "lora.conv_alpha", value if value else float(rank))  # as network_alpha: 0 means = dim


def _schedule(a: Args, cfg: dict, notes: list[str]) -> None:
    lr, unet_lr, te_lrs = a.float("learning_rate"), a.float("unet_lr"), _text_encoder_lrs(a)
    base_lr = lr if lr is not None else KOHYA_DEFAULT_LR  # what kohya falls back to for either model
    if lr is None and unet_lr is None:
        usual = "an embedding alone usually trains at 5e-3" if "embedding" in cfg else "LoRA usually trains at 1e-4"
        notes.append(f"--learning_rate not given: kohya's default {KOHYA_DEFAULT_LR} is used ({usual})")
    set_key(cfg, "train.lr", unet_lr if unet_lr is not None else base_lr)
    if len(set(te_lrs)) > 1:
        notes.append(f"--text_encoder_lr {' '.join(map(str, te_lrs))}: one rate holds for both text encoders here, "
                     "the first")
    te_lr = te_lrs[0] if te_lrs else base_lr
    if cfg["lora"]["train_text_encoder"] and te_lr != cfg["train"]["lr"]:
        set_key(cfg, "train.text_encoder_lr", te_lr)
        if lr is None and not te_lrs:
            notes.append(f"--learning_rate not given: the text encoder trains at kohya's default {KOHYA_DEFAULT_LR}, "
                         "as in kohya (set train.text_encoder_lr)")
    epochs = a.int("max_train_epochs") or None  # 0 means unset (kohya_ss GUI files write it)
    steps = a.int("max_train_steps") or None
    if epochs is not None:
        set_key(cfg, "train.epochs", epochs)
        if steps is not None:
            notes.append(f"--max_train_steps {steps}: --max_train_epochs {epochs} wins, as in kohya")
    else:
        if steps is None:
            notes.append("--max_train_steps not given: kohya's default 1600 is used")
        set_key(cfg, "train.max_steps", steps or 1600)
    warmup = a.get("lr_warmup_steps")
    if warmup is not None:
        ratio = a.float("lr_warmup_steps")
        if 0 < ratio < 1:  # kohya reads a fraction as a share of the training steps
            if epochs is None:
                set_key(cfg, "train.warmup", int(ratio * (steps or 1600)))
            else:
                notes.append(f"--lr_warmup_steps {ratio}: a share of the steps, which are counted in epochs "
                             "here; set train.warmup to a number of steps")
        else:
            set_key(cfg, "train.warmup", a.int("lr_warmup_steps"))
    scheduler_options(a, cfg, notes)
    for kohya, ours, kind in (("train_batch_size", "train.batch_size", "int"),
                              ("gradient_accumulation_steps", "train.grad_accum", "int"),
                              ("seed", "train.seed", "int"), ("max_grad_norm", "train.max_grad_norm", "float"),
                              ("noise_offset", "train.noise_offset", "float"),
                              ("ip_noise_gamma", "train.input_perturbation", "float"),
                              ("max_data_loader_n_workers", "data.num_workers", "int")):
        if a.has(kohya):
            set_key(cfg, ours, a.int(kohya) if kind == "int" else a.float(kohya))
    if a.float("min_snr_gamma"):  # 0 is off in kohya, null here
        set_key(cfg, "train.snr_gamma", a.float("min_snr_gamma"))
    loss_options(a, cfg, notes)
    kind = cfg.get("lora", {}).get("type", "lora")
    if a.float("scale_weight_norms") and kind != "lora":
        notes.append(f"--scale_weight_norms {a.get('scale_weight_norms')}: max-norm is not supported with lora.type "
                     f"{kind} yet; left out")
    elif a.float("scale_weight_norms"):  # 0 is off in kohya, null here
        set_key(cfg, "train.scale_weight_norms", a.float("scale_weight_norms"))
    if a.float("validation_split"):  # held-out images for a validation loss; 0 is off in both
        set_key(cfg, "data.validation_split", a.float("validation_split"))
        if a.int("validate_every_n_steps"):
            set_key(cfg, "train.validate_every_n_steps", a.int("validate_every_n_steps"))
        if a.has("validation_seed"):
            set_key(cfg, "data.validation_seed", a.int("validation_seed"))
    precision = a.str("mixed_precision")
    if precision is not None:
        if precision not in PRECISIONS:
            raise ConfigError(f"--mixed_precision: {precision!r}; expected no, fp16 or bf16")
        set_key(cfg, "train.mixed_precision", precision)
    for kohya, ours in (("gradient_checkpointing", "train.gradient_checkpointing"),
                        ("cache_latents", "train.cache_latents"),
                        ("cache_latents_to_disk", "train.cache_latents_to_disk")):
        if a.bool(kohya):
            set_key(cfg, ours, True)
    if cfg["train"].get("cache_latents_to_disk"):
        set_key(cfg, "train.cache_latents", True)


def _text_encoder_lrs(a: Args) -> list[float]:
    """--text_encoder_lr as a list: newer kohya takes one rate per SDXL text encoder."""
    value = a.get("text_encoder_lr")
    values = value if isinstance(value, list) else [] if value is None else [value]
    return [parse_number(str(v), "--text_encoder_lr") for v in values]


def _data_dirs(a: Args, cfg: dict, notes: list[str]) -> None:
    """Data from --train_data_dir / --reg_data_dir (no dataset TOML): folders of <N>_<name> folders,
    which our loader reads the way kohya does."""
    folder = a.str("train_data_dir")
    if not folder:
        raise ConfigError("--train_data_dir: missing (and no --dataset_config); it names the image folders")
    set_key(cfg, "data.path", folder)
    if a.has("in_json"):
        notes.append(f"--in_json {a.get('in_json')}: kohya's fine-tuning metadata is not read; give each image a "
                     "caption file or a metadata.jsonl (file_name, text)")
    loose = images_in(Path(folder))
    if loose:
        notes.append(f"--train_data_dir: {len(loose)} image(s) directly in {folder} are trained here once per epoch; "
                     "kohya reads only its <N>_<name> subfolders (move them into one, or out)")
    if a.has("reg_data_dir"):
        reg_folder(a.str("reg_data_dir"), None, a.float("prior_loss_weight"), cfg, notes, "--reg_data_dir")
    if a.has("resolution"):
        set_key(cfg, "data.resolution", resolution_side(a.get("resolution"), "--resolution", notes))
    data_options(a, cfg, notes)
    caption_extension_option(a, [Path(folder)], cfg, notes)
