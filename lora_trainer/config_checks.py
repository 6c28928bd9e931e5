"""Value checks of a run config: each problem becomes one line naming its key, collected by
`config_from_dict` so a config with several mistakes reports them all at once."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from .config_data_checks import (  # noqa: F401 (re-exported)
    bucket_limit_errors, caption_warnings, check_caption_config, normalize_caption_extension, resolution_errors,
    treatment_errors,
)
from .config_subsets import check_subsets, image_folders, inside
from .models.blocks import block_config_errors

if TYPE_CHECKING:
    from .config import OutputConfig, RunConfig, TrainConfig

MAX_TIMESTEPS = 1000  # the num_train_timesteps of SD1.x and SDXL schedules


def check_run(cfg: RunConfig, errors: list[str]) -> None:
    """Append one line per out-of-range or inconsistent value of `cfg` to `errors`."""
    def need(ok: bool, key: str, value: Any, allowed: str) -> None:
        if not ok:
            errors.append(f"{key}: got {value!r}; expected {allowed}")

    need(bool(cfg.model.base), "model.base", cfg.model.base, "a hub id, a diffusers folder or a .safetensors file")
    need(1 <= cfg.model.clip_skip <= 12, "model.clip_skip", cfg.model.clip_skip,
         "an integer from 1 (the model's default) to 12; 2 for anime SD1.5 bases")
    need(bool(cfg.data.path) or bool(cfg.data.subsets), "data.path", cfg.data.path,
         "a folder of images with captions (or data.subsets, a list of them)")
    bad_resolution = resolution_errors(cfg.data.resolution)
    errors += bad_resolution
    r = None if bad_resolution else cfg.data.resolution
    step = cfg.data.bucket_step
    need(step >= 8 and step % 8 == 0, "data.bucket_step", step, "a positive multiple of 8 (64 for real models)")
    if step >= 8 and step % 8 == 0:
        errors += bucket_limit_errors(cfg.data, r)
    if not cfg.data.buckets:
        for key, value in (("min_bucket_side", cfg.data.min_bucket_side), ("max_bucket_side", cfg.data.max_bucket_side),
                           ("bucket_no_upscale", cfg.data.bucket_no_upscale or None)):
            if value is not None:
                errors.append(f"data.{key}: got {value!r} with data.buckets false, which does not read it; "
                              f"set data.buckets=true or leave data.{key} {'false' if key == 'bucket_no_upscale' else 'null'}")
    errors += treatment_errors(cfg.data)
    check_subsets(cfg, errors)
    if cfg.data.mask_dir is not None and (cfg.data.alpha_mask or not cfg.data.mask_dir.strip()):
        errors.append(f"data.mask_dir: got {cfg.data.mask_dir!r}" + (
            " with data.alpha_mask true; the loss mask comes from one of them: set only one" if cfg.data.alpha_mask
            else "; expected a folder of mask images named like the training images, or null"))
    # The scan reads every image under data.path (each subset's), so images there would train as the run's.
    for key, folder, what in (("data.mask_dir", cfg.data.mask_dir if not cfg.data.alpha_mask else None, "the masks"),
                              ("output.dir", cfg.output.dir, "the run's samples and loss curve"),
                              ("dreambooth.class_data", cfg.dreambooth.class_data if cfg.prior_preservation else None,
                               "the class images")):
        for images_key, images in image_folders(cfg.data) if folder and folder.strip() else ():
            if inside(folder, images):
                errors.append(f"{key}: got {folder!r}, inside {images_key} {images!r}, so {what} would train "
                              f"as images; use a folder outside {images_key}")
    need(cfg.data.caption_dropout_every_n_epochs >= 0, "data.caption_dropout_every_n_epochs",
         cfg.data.caption_dropout_every_n_epochs, "an integer >= 0 (0: off; 2: every second epoch trains uncaptioned)")
    need(cfg.data.num_workers >= 0, "data.num_workers", cfg.data.num_workers, "an integer >= 0")
    check_caption_config(cfg.data.caption, errors)
    _check_validation(cfg, errors)
    trigger = cfg.data.caption_prefix.strip().rstrip(",").strip()
    if cfg.data.caption.method != "none" and trigger and trigger in cfg.data.caption.prefix:
        errors.append(f"data.caption.prefix: got {cfg.data.caption.prefix!r}, which repeats data.caption_prefix "
                      f"{cfg.data.caption_prefix!r} (added to every caption at training time); set only one of them")
    ending = cfg.data.caption_suffix.strip().lstrip(",").strip()
    if cfg.data.caption.method != "none" and ending and ending in cfg.data.caption.suffix:
        errors.append(f"data.caption.suffix: got {cfg.data.caption.suffix!r}, which repeats data.caption_suffix "
                      f"{cfg.data.caption_suffix!r} (added to every caption at training time); set only one of them")
    need(cfg.lora.rank >= 1, "lora.rank", cfg.lora.rank, "an integer >= 1 (typically 4 to 128)")
    need(cfg.lora.alpha is None or cfg.lora.alpha > 0, "lora.alpha", cfg.lora.alpha, "a number > 0 or null (= rank)")
    for key in ("dropout", "neuron_dropout", "rank_dropout", "module_dropout"):
        need(0.0 <= getattr(cfg.lora, key) < 1.0, f"lora.{key}", getattr(cfg.lora, key), "a number in [0, 1) (0: off)")
    need(bool(cfg.lora.unet_targets), "lora.unet_targets", cfg.lora.unet_targets, "a non-empty list of module names")
    need(cfg.lora.conv_rank >= 0, "lora.conv_rank", cfg.lora.conv_rank, "an integer >= 0 (0: no LoCon; typically 4 to 32)")
    need(cfg.lora.conv_alpha is None or cfg.lora.conv_alpha > 0, "lora.conv_alpha", cfg.lora.conv_alpha,
         "a number > 0 or null (= conv_rank)")
    if cfg.lora.conv_alpha is not None and cfg.lora.conv_rank == 0:
        errors.append(f"lora.conv_alpha: got {cfg.lora.conv_alpha!r} with lora.conv_rank 0; set lora.conv_rank "
                      "(e.g. 8) to adapt the 3x3 convs, or leave conv_alpha null")
    _check_train_unet(cfg, errors)
    _check_adapter_type(cfg, errors)
    variant = cfg.model.variant if cfg.model.variant != "auto" else None  # else checked once the base is read
    errors += block_config_errors(cfg.lora, variant)
    t = cfg.train
    need(t.max_steps is None or t.max_steps >= 1, "train.max_steps", t.max_steps, "an integer >= 1 or null")
    need(t.epochs is None or t.epochs >= 1, "train.epochs", t.epochs, "an integer >= 1 or null")
    if t.max_steps is None and t.epochs is None:
        errors.append("train.max_steps: neither train.max_steps nor train.epochs is set; set one of them")
    need(t.batch_size >= 1, "train.batch_size", t.batch_size, "an integer >= 1")
    need(t.grad_accum >= 1, "train.grad_accum", t.grad_accum, "an integer >= 1")
    need(t.lr > 0, "train.lr", t.lr, "a number > 0 (e.g. 1e-4)")
    need(t.text_encoder_lr is None or t.text_encoder_lr >= 0, "train.text_encoder_lr", t.text_encoder_lr, "a number >= 0")
    need(t.warmup >= 0, "train.warmup", t.warmup, "an integer >= 0")
    _check_schedule(t, errors)
    need(t.max_grad_norm >= 0, "train.max_grad_norm", t.max_grad_norm, "a number >= 0 (0 disables clipping)")
    need(t.noise_offset >= 0, "train.noise_offset", t.noise_offset, "a number >= 0 (e.g. 0.05)")
    need(t.snr_gamma is None or t.snr_gamma > 0, "train.snr_gamma", t.snr_gamma, "a number > 0 (e.g. 5.0) or null")
    need(t.input_perturbation >= 0, "train.input_perturbation", t.input_perturbation, "a number >= 0 (e.g. 0.1)")
    _check_loss(t, errors)
    _check_cache_and_optimizer(t, errors)
    need(t.log_every_n_steps >= 1, "train.log_every_n_steps", t.log_every_n_steps, "an integer >= 1")
    need(cfg.output.save_every_n_epochs >= 0, "output.save_every_n_epochs", cfg.output.save_every_n_epochs,
         "an integer >= 0 (0: off)")
    need(cfg.output.save_last_n_epochs >= 0, "output.save_last_n_epochs", cfg.output.save_last_n_epochs,
         "an integer >= 0 (0 keeps all)")
    if cfg.output.save_last_n_epochs and not cfg.output.save_every_n_epochs:
        errors.append(f"output.save_last_n_epochs: got {cfg.output.save_last_n_epochs!r} with "
                      "output.save_every_n_epochs 0, so there are no epoch files to keep; "
                      "set output.save_every_n_epochs (e.g. 1) or leave it 0")
    _check_loraplus_and_norms(t, errors)
    need(cfg.output.keep_checkpoints >= 0, "output.keep_checkpoints", cfg.output.keep_checkpoints,
         "an integer >= 0 (0 keeps all)")
    need(t.resume is None or bool(t.resume.strip()), "train.resume", t.resume,
         "'latest', the path of a checkpoint folder, or null")
    need(cfg.output.save_every_n_steps >= 0, "output.save_every_n_steps", cfg.output.save_every_n_steps, "an integer >= 0")
    _check_step_adapters(cfg.output, errors)
    name = cfg.output.name
    need(bool(name) and "/" not in name and "\\" not in name, "output.name", name, "a file name without slashes")
    db = cfg.dreambooth
    need(db.num_class_images >= 0, "dreambooth.num_class_images", db.num_class_images, "an integer >= 0")
    need(db.prior_loss_weight >= 0, "dreambooth.prior_loss_weight", db.prior_loss_weight, "a number >= 0 (1.0 usual)")
    need(db.class_batch_size >= 1, "dreambooth.class_batch_size", db.class_batch_size, "an integer >= 1")
    need(db.class_steps >= 1, "dreambooth.class_steps", db.class_steps, "an integer >= 1")
    if db.num_class_images:  # prior preservation is on: it needs both the folder and the prompt
        need(bool(db.class_data), "dreambooth.class_data", db.class_data, "a folder for the class images")
        need(bool(db.class_prompt), "dreambooth.class_prompt", db.class_prompt, 'the class, e.g. "a photo of a dog"')
    elif db.class_prompt or db.class_data:
        errors.append("dreambooth.num_class_images: got 0 with class_prompt/class_data set; "
                      "expected the number of class images for prior preservation (e.g. 200)")
    elif db.prior_loss_weight >= 0 and db.class_batch_size >= 1 and db.class_steps >= 1:
        for key in ("prior_loss_weight", "class_batch_size", "class_steps"):
            if _unread(db, key):
                errors.append(f"dreambooth.{key}: got {getattr(db, key)!r} with dreambooth.num_class_images 0 "
                              "(no prior preservation); set num_class_images, class_prompt and class_data, or "
                              f"leave it at {_default(db, key)!r}")


def config_warnings(cfg: RunConfig) -> list[str]:
    """One line per option set that this run does not read but that may be meant for later (a config
    kept as a template, or filled in by from-kohya): the run goes on, the log says so."""
    lines = caption_warnings(cfg.data.caption)
    if not cfg.sample.prompts:
        for key in ("every_n_steps", "every_n_epochs", "at_start", "scheduler"):
            value = getattr(cfg.sample, key)
            if value:
                lines.append(f"sample.{key}: got {value!r} with no sample.prompts, so no samples are drawn; "
                             "set sample.prompts to see them")
    ratio = cfg.train.loraplus_text_encoder_lr_ratio
    if ratio is not None and not cfg.lora.train_text_encoder:
        lines.append(f"train.loraplus_text_encoder_lr_ratio: got {ratio!r} with lora.train_text_encoder false, so "
                     "no text-encoder adapter uses it; set lora.train_text_encoder=true for that")
    return lines


def _check_step_adapters(o: OutputConfig, errors: list[str]) -> None:
    if o.save_step_adapters and not o.save_every_n_steps:
        errors.append("output.save_step_adapters: got True with output.save_every_n_steps 0, so no step is saved; "
                      "set output.save_every_n_steps (e.g. 100) or leave it false")
    if o.save_last_n_step_adapters < 0:
        errors.append(f"output.save_last_n_step_adapters: got {o.save_last_n_step_adapters!r}; "
                      "expected an integer >= 0 (0 keeps all)")
    elif o.save_last_n_step_adapters and not o.save_step_adapters:
        errors.append(f"output.save_last_n_step_adapters: got {o.save_last_n_step_adapters!r} with "
                      "output.save_step_adapters false, so there are no step files to keep; "
                      "set output.save_step_adapters=true or leave it 0")


def _check_schedule(t: TrainConfig, errors: list[str]) -> None:
    """The schedule options: in range, and set only with the schedule that reads them."""
    if t.warmup > 0 and t.scheduler == "constant":  # diffusers' constant schedule has no warmup (kohya refuses it)
        errors.append(f"train.warmup: got {t.warmup!r} with train.scheduler 'constant', which has no warmup; "
                      "set train.scheduler=constant_with_warmup or leave train.warmup at 0")
    for key, value, default, allowed, scheduler in (
            ("scheduler_cycles", t.scheduler_cycles, 1, "an integer >= 1", "cosine_with_restarts"),
            ("scheduler_power", t.scheduler_power, 1.0, "a number > 0 (1: linear)", "polynomial"),
            ("min_lr_ratio", t.min_lr_ratio, 0.0, "a number in [0, 1) (e.g. 0.1; 0: off)", "cosine")):
        ok = {"scheduler_cycles": value >= 1, "scheduler_power": value > 0, "min_lr_ratio": 0 <= value < 1}[key]
        if not ok:
            errors.append(f"train.{key}: got {value!r}; expected {allowed}")
        elif value != default and t.scheduler != scheduler:
            errors.append(f"train.{key}: got {value!r} with train.scheduler {t.scheduler!r}, which does not read it; "
                          f"set train.scheduler={scheduler} or leave train.{key} at {default!r}")


def _check_cache_and_optimizer(t: TrainConfig, errors: list[str]) -> None:
    """Cache and optimizer options that only some settings read."""
    if t.cache_latents_to_disk and not t.cache_latents:
        errors.append("train.cache_latents_to_disk: got True with train.cache_latents false, so nothing is cached; "
                      "set train.cache_latents=true or leave cache_latents_to_disk false")
    elif t.cache_dir and not t.cache_latents_to_disk:
        errors.append(f"train.cache_dir: got {t.cache_dir!r} with train.cache_latents_to_disk false, so nothing is "
                      "written there; set train.cache_latents_to_disk=true or leave cache_dir null")
    # Adafactor takes neither betas nor eps; Lion (both packages) takes betas but no eps
    unread = {"adafactor": ("adam_beta1", "adam_beta2", "adam_epsilon"), "lion": ("adam_epsilon",),
              "lion8bit": ("adam_epsilon",)}.get(t.optimizer, ())
    for key in unread:
        if _unread(t, key):
            errors.append(f"train.{key}: got {getattr(t, key)!r} with train.optimizer {t.optimizer!r}, which does not "
                          f"read it; leave train.{key} at {_default(t, key)!r}")


def _check_loraplus_and_norms(t: TrainConfig, errors: list[str]) -> None:
    ratios = {key: getattr(t, key) for key in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio",
                                                "loraplus_text_encoder_lr_ratio")}
    for key, value in ratios.items():
        if value is not None and not value > 0:
            errors.append(f"train.{key}: got {value!r}; expected a number > 0 (16 in the LoRA+ paper) or null (off)")
    if t.optimizer == "prodigy" and any(v is not None for v in ratios.values()):
        key = next(k for k, v in ratios.items() if v is not None)
        errors.append(f"train.{key}: Prodigy estimates one step size for every parameter group, so it cannot train "
                      "B at a higher rate than A; leave LoRA+ off with prodigy, or use adamw, adamw8bit, adafactor or lion")
    if t.scale_weight_norms is not None and not t.scale_weight_norms > 0:
        errors.append(f"train.scale_weight_norms: got {t.scale_weight_norms!r}; expected a number > 0 "
                      "(1.0 is kohya's suggested start) or null (off)")
    if t.ema_decay is not None and not 0 <= t.ema_decay < 1:
        errors.append(f"train.ema_decay: got {t.ema_decay!r}; expected a number in [0, 1) (0.99 for a few hundred "
                      "steps, 0.999 for a few thousand) or null (off)")
    elif t.ema_decay is None:
        for key in ("ema_warmup", "ema_device"):
            if _unread(t, key):
                errors.append(f"train.{key}: got {getattr(t, key)!r} with train.ema_decay null (no EMA), which "
                              f"does not read it; set train.ema_decay (e.g. 0.999) or leave train.{key} at "
                              f"{_default(t, key)!r}")


def _check_validation(cfg: RunConfig, errors: list[str]) -> None:
    d, t = cfg.data, cfg.train
    if not 0.0 <= d.validation_split < 1.0:
        errors.append(f"data.validation_split: got {d.validation_split!r}; expected a fraction in [0, 1) "
                      "(e.g. 0.1 holds out one image in ten; 0: off)")
    if d.validation_path and d.validation_split > 0:
        errors.append(f"data.validation_path: got {d.validation_path!r} with data.validation_split "
                      f"{d.validation_split!r}; set only one of them")
    elif d.validation_path:
        for key, folder in image_folders(d):
            if inside(d.validation_path, folder) or inside(folder, d.validation_path):
                errors.append(f"data.validation_path: got {d.validation_path!r}, which overlaps {key} {folder!r}, "
                              f"so held-out images would be trained on; use a folder outside {key}")
    validating = d.validation_split > 0 or bool(d.validation_path)
    every = t.validate_every_n_steps
    if every is not None and every < 0:
        errors.append(f"train.validate_every_n_steps: got {every!r}; expected an integer >= 0 "
                      "(0: at step 0 and the end only) or null (about 10 times a run)")
    elif every is not None and not validating:
        errors.append(f"train.validate_every_n_steps: got {every!r} with no held-out images; "
                      "set data.validation_split (e.g. 0.1) or data.validation_path, or leave it null")
    if t.validation_timesteps < 1:
        errors.append(f"train.validation_timesteps: got {t.validation_timesteps!r}; expected an integer >= 1 (e.g. 8)")
    elif not validating:
        for section, key in ((d, "validation_seed"), (t, "validation_timesteps")):
            if _unread(section, key):
                name = f"{'data' if section is d else 'train'}.{key}"
                errors.append(f"{name}: got {getattr(section, key)!r} with no held-out images; set "
                              f"data.validation_split (e.g. 0.1) or data.validation_path, or leave it at "
                              f"{_default(section, key)!r}")


def _check_loss(t: TrainConfig, errors: list[str]) -> None:
    def need(ok: bool, key: str, allowed: str) -> None:
        if not ok:
            errors.append(f"train.{key}: got {getattr(t, key)!r}; expected {allowed}")

    need(t.huber_c > 0, "huber_c", "a number > 0 (kohya's default 0.1)")
    need(t.huber_scale > 0, "huber_scale", "a number > 0 (1.0: off)")
    need(t.min_timestep >= 0, "min_timestep", "an integer >= 0")
    high = t.max_timestep if t.max_timestep is not None else MAX_TIMESTEPS
    need(1 <= high <= MAX_TIMESTEPS, "max_timestep",
         f"an integer in [1, {MAX_TIMESTEPS}] or null (the scheduler's num_train_timesteps)")
    if 0 <= t.min_timestep and 1 <= high <= MAX_TIMESTEPS and not t.min_timestep < high:
        errors.append(f"train.min_timestep: got {t.min_timestep!r}; expected less than train.max_timestep "
                      f"({high}): timesteps are drawn from [min_timestep, max_timestep)")
    need(t.multires_noise_iterations >= 0, "multires_noise_iterations", "an integer >= 0 (0: off; 6-10 usual)")
    need(0 <= t.multires_noise_discount <= 1, "multires_noise_discount", "a number in [0, 1] (0.3 usual)")
    for key, value, base in (("noise_offset_random_strength", t.noise_offset_random_strength, "noise_offset"),
                             ("adaptive_noise_scale", t.adaptive_noise_scale, "noise_offset"),
                             ("input_perturbation_random_strength", t.input_perturbation_random_strength,
                              "input_perturbation")):
        if value not in (None, False) and not getattr(t, base) > 0:
            errors.append(f"train.{key}: got {value!r} with train.{base} {getattr(t, base)!r}, which it "
                          f"{'scales' if key.endswith('strength') else 'adds to'}; set train.{base} (e.g. 0.1) "
                          f"or leave train.{key} {'false' if key.endswith('strength') else 'null'}")
    if t.adaptive_noise_scale is not None and t.adaptive_noise_scale == 0:  # (0.0 == False: the loop skips it)
        errors.append("train.adaptive_noise_scale: got 0.0, which adds nothing to the noise offset; set a scale "
                      "(e.g. 0.05, or negative) or leave it null")
    need(t.v_pred_like_loss is None or t.v_pred_like_loss > 0, "v_pred_like_loss",
         "a number > 0 (e.g. 0.1) or null (off)")
    if t.v_pred_like_loss is not None and t.scale_v_pred_loss_like_noise_pred:
        errors.append(f"train.v_pred_like_loss: got {t.v_pred_like_loss!r} with "
                      "train.scale_v_pred_loss_like_noise_pred true; the first is for epsilon bases, the second "
                      "for v-prediction bases: set only one")
    if t.loss_type in ("l2", "l1"):  # the huber threshold shapes only the huber and smooth_l1 losses
        for key in ("huber_c", "huber_schedule", "huber_scale"):
            if t.huber_c > 0 and t.huber_scale > 0 and _unread(t, key):
                errors.append(f"train.{key}: got {getattr(t, key)!r} with train.loss_type {t.loss_type!r}, which does "
                              f"not read it; set train.loss_type=huber (or smooth_l1) or leave train.{key} at "
                              f"{_default(t, key)!r}")
    if t.multires_noise_iterations == 0 and 0 <= t.multires_noise_discount <= 1 and \
            _unread(t, "multires_noise_discount"):
        errors.append(f"train.multires_noise_discount: got {t.multires_noise_discount!r} with "
                      "train.multires_noise_iterations 0 (no multi-resolution noise); set train.multires_noise_iterations "
                      f"(6-10 usual) or leave the discount at {_default(t, 'multires_noise_discount')!r}")


def _default(section: Any, key: str) -> Any:
    """The declared default of `section`'s field `key` (config.py, which imports this module)."""
    field = next(f for f in dataclasses.fields(section) if f.name == key)
    return field.default_factory() if field.default is dataclasses.MISSING else field.default


def _unread(section: Any, key: str) -> bool:
    """Whether `key` differs from its default: a value the user set (a value equal to the default
    changes nothing, and every resolved config.yaml holds all of them)."""
    return getattr(section, key) != _default(section, key)


# What a LoHa/LoKr run (lora.type) does not do yet, by key: (the key's section, its field).
_NOT_WITH_LYCORIS = (
    ("lora", "use_dora"), ("lora", "dropout"), ("lora", "neuron_dropout"), ("lora", "rank_dropout"),
    ("lora", "module_dropout"), ("lora", "block_lr_zero_threshold"),
    ("lora", "block_ranks"), ("lora", "block_alphas"), ("lora", "conv_block_ranks"), ("lora", "conv_block_alphas"),
    ("train", "loraplus_lr_ratio"), ("train", "loraplus_unet_lr_ratio"), ("train", "loraplus_text_encoder_lr_ratio"),
    ("train", "scale_weight_norms"),
)


def _check_adapter_type(cfg: RunConfig, errors: list[str]) -> None:
    """lora.type loha/lokr: only the kohya layout (diffusers cannot load LyCORIS types), and none of
    the options that shape or train LoRA's B·A factors (DoRA, the dropouts, LoCon, blocks,
    LoRA+, max-norm); lora.lokr_factor only with lokr."""
    lora = cfg.lora
    factor = lora.lokr_factor
    if factor != -1 and factor < 1:
        errors.append(f"lora.lokr_factor: got {factor!r}; expected -1 (each dimension split near its square root) "
                      "or an integer >= 1 (e.g. 8)")
    elif factor != -1 and lora.type != "lokr":
        errors.append(f"lora.lokr_factor: got {factor!r} with lora.type {lora.type!r}, which does not read it; "
                      "set lora.type=lokr or leave lora.lokr_factor at -1")
    if lora.type == "lora":
        return
    if cfg.output.format != "kohya":
        errors.append(f"output.format: got {cfg.output.format!r} with lora.type {lora.type!r}; diffusers cannot "
                      "load LoHa/LoKr adapters, so they are written in the kohya layout only: set output.format=kohya")
    weights = lora.block_lr_weights
    found = [(f"lora.block_lr_weights.{side}", getattr(weights, side)) for side in ("down", "mid", "up")]
    sections = {"lora": lora, "train": cfg.train}
    found += [(f"{section}.{key}", getattr(sections[section], key)) for section, key in _NOT_WITH_LYCORIS]
    for key, value in found:
        if value not in (None, False, 0, 0.0):
            errors.append(f"{key}: got {value!r} with lora.type {lora.type!r}, which does not support it yet; "
                          f"leave it unset, or set lora.type=lora")


# lora.* keys that shape the UNet's adapter, meaningless when lora.train_unet is false
_UNET_ONLY_KEYS = ("conv_rank", "conv_alpha", "block_lr_zero_threshold", "block_ranks", "block_alphas",
                   "conv_block_ranks", "conv_block_alphas")


def _check_train_unet(cfg: RunConfig, errors: list[str]) -> None:
    """Text-encoder-only training (lora.train_unet false) needs the text encoder trained (or, with no
    LoRA at all, an embedding: textual inversion), and refuses the options that only shape the UNet's
    adapter."""
    lora = cfg.lora
    if lora.train_unet:
        return
    if not lora.train_text_encoder and cfg.embedding.token is None:
        errors.append("lora.train_unet: got False with lora.train_text_encoder false, so nothing would train; "
                      "set lora.train_text_encoder=true (text-encoder-only training), lora.train_unet=true, or "
                      "embedding.token (an embedding alone: textual inversion)")
        return
    weights = lora.block_lr_weights
    found = [(f"lora.block_lr_weights.{side}", getattr(weights, side)) for side in ("down", "mid", "up")]
    found += [(f"lora.{key}", getattr(lora, key)) for key in _UNET_ONLY_KEYS]
    found.append(("train.loraplus_unet_lr_ratio", cfg.train.loraplus_unet_lr_ratio))
    for key, value in found:
        if value not in (None, 0, 0.0):
            errors.append(f"{key}: got {value!r} with lora.train_unet false; it shapes the UNet's adapter, which a "
                          f"text-encoder-only run does not have: leave it unset or set lora.train_unet=true")
