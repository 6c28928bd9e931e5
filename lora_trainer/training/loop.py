"""The training recipe, top to bottom: data → base model + LoRA → accelerate loop → export → samples.

Runs unchanged on CPU, one GPU, or several under `accelerate launch`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..config import RunConfig, dump_config
from ..data import ImageCaptionDataset
from ..data.buckets import BucketBatchSampler, assign_buckets, describe_buckets
from ..data.prepare import prepare_examples
from ..errors import ConfigError
from ..fileio import write_text_atomic
from ..models.loading import NATIVE_RESOLUTION, load_base, resolve_variant, weight_dtype_for
from ..models.lora import inject_lora, trainable_parameters
from .caches import EmbeddingCache, LatentCache, module_fingerprint
from .conditioning import encode_prompts, unet_conditioning
from .loss import diffusion_loss, perturb, sample_noise, training_target
from .optimizers import build_optimizer, check_optimizer
from .outputs import export_adapter, save_samples
from .prior import class_examples, generate_class_images

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    output_dir: Path
    adapter_paths: list[Path]
    steps: int
    losses: list[float] = field(default_factory=list)
    trainable_parameters: int = 0
    unet: Any = None  # the trained modules, adapters in place (for notebooks and tests)
    text_encoder: Any = None
    text_encoder_2: Any = None  # SDXL


def _check_environment(cfg: RunConfig) -> None:
    """Settings this machine cannot honour fail here, before any data or model is read."""
    import importlib.util

    if cfg.train.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.mixed_precision: got 'fp16', which needs a GPU; on CPU use 'bf16' or 'no'")
    check_optimizer(cfg.train)
    for key, on, module, extra in (("log.tensorboard", cfg.log.tensorboard, "tensorboard", "tensorboard"),
                                   ("log.wandb", cfg.log.wandb, "wandb", "wandb")):
        if on and importlib.util.find_spec(module) is None:
            raise ConfigError(f"{key}: true needs the {module} package; pip install 'lora-trainer[{extra}]' "
                              f"or set {key}=false")


def _for_variant(cfg: RunConfig, variant: str) -> RunConfig:
    """The config with what depends on the base filled in: the variant, the native resolution."""
    res = cfg.data.resolution or NATIVE_RESOLUTION[variant]
    if variant == "sdxl" and res < 1024:
        log.info("SDXL trained at %d px (its native size is 1024): fine for tests and quick runs", res)
    return replace(cfg, model=replace(cfg.model, variant=variant), data=replace(cfg.data, resolution=res))


def _tracker_config(cfg: RunConfig) -> dict:
    """The config flattened to scalar values, as trackers' hyperparameter tables want."""
    flat = {}
    for section, values in cfg.to_dict().items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def _make_accelerator(cfg: RunConfig, out_dir: Path):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    trackers = [name for name, on in (("tensorboard", cfg.log.tensorboard), ("wandb", cfg.log.wandb)) if on]
    # Several processes without GPUs (torchrun or `accelerate launch --multi_gpu` on a CPU machine):
    # accelerate only picks its gloo CPU backend when told the run is on CPU.
    on_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    return Accelerator(
        cpu=on_cpu,
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.grad_accum,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=str(out_dir), logging_dir=str(out_dir / "logs")),
    )


def _release_accelerate_state() -> None:
    # accelerate keeps process-wide singletons; drop them so a later run in the same process
    # (tests, notebooks) can choose other settings.
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def train(cfg: RunConfig, show_progress: bool = True) -> TrainResult:
    """Train one adapter as `cfg` says and write it to `cfg.output.dir`."""
    _check_environment(cfg)
    # Captions missing ones (BLIP-2), checks and scans: bad data stops the run before any model loads.
    examples = prepare_examples(cfg, show_progress)
    if cfg.dreambooth.instance_prompt:
        for ex in examples:
            ex.caption = cfg.dreambooth.instance_prompt
    cfg = _for_variant(cfg, resolve_variant(cfg.model))  # reads model_index.json or a file header only
    out_dir = Path(cfg.output.dir)
    accelerator = _make_accelerator(cfg, out_dir)
    try:
        return _train(cfg, examples, out_dir, accelerator, show_progress)
    finally:
        accelerator.end_training()
        _release_accelerate_state()


def _add_adapters(cfg: RunConfig, base) -> tuple[list[torch.nn.Module], list[dict]]:
    """Inject LoRA into the UNet (and the text encoders); return the trained modules and their
    optimizer groups."""
    rank, alpha, t = cfg.lora.rank, cfg.lora_alpha, cfg.train
    inject_lora(base.unet, cfg.lora.unet_targets, rank, alpha, cfg.lora.dropout, "lora.unet_targets")
    modules = [base.unet]
    groups = [{"params": trainable_parameters(base.unet), "lr": t.lr}]
    if cfg.lora.train_text_encoder:
        te_lr = t.text_encoder_lr if t.text_encoder_lr is not None else t.lr
        for encoder in base.text_encoders:
            inject_lora(encoder, cfg.lora.text_encoder_targets, rank, alpha, cfg.lora.dropout,
                        "lora.text_encoder_targets")
            modules.append(encoder)
            groups.append({"params": trainable_parameters(encoder), "lr": te_lr})
    if t.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
        for encoder in modules[1:]:
            encoder.gradient_checkpointing_enable()
    return modules, groups


def _loader(cfg: RunConfig, dataset: ImageCaptionDataset, seed: int):
    """Shuffled batches; with buckets, each batch from one bucket (the last one may be short)."""
    t = cfg.train
    if dataset.sizes is not None:
        item_buckets = [dataset.sizes[i % len(dataset.examples)] for i in range(len(dataset))]
        return torch.utils.data.DataLoader(dataset, batch_sampler=BucketBatchSampler(item_buckets, t.batch_size, seed),
                                           num_workers=cfg.data.num_workers)
    return torch.utils.data.DataLoader(
        dataset, batch_size=t.batch_size, shuffle=True, num_workers=cfg.data.num_workers,
        generator=torch.Generator().manual_seed(seed), drop_last=len(dataset) >= t.batch_size,
    )


def _set_epoch(loader, epoch: int) -> None:
    """New shuffles and augmentations each epoch: accelerate's wrapper passes the epoch on to some
    of the dataset and samplers, not all, so every one that takes it is told."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    for obj in (loader, loader.dataset, batch_sampler, getattr(batch_sampler, "batch_sampler", None)):
        if hasattr(obj, "set_epoch"):
            obj.set_epoch(epoch)


def _cycle(loader):
    """Batches from `loader` forever, a new epoch each pass (the class images of DreamBooth)."""
    epoch = 0
    while True:
        _set_epoch(loader, epoch)
        yield from loader
        epoch += 1


def _dataset(cfg: RunConfig, examples, seed: int, instance: bool = True) -> ImageCaptionDataset:
    d = cfg.data
    sizes = None
    if d.buckets:
        sizes = assign_buckets([ex.path for ex in examples], d.resolution, d.bucket_step)
        log.info("aspect buckets (w x h: images): %s", describe_buckets(sizes))
    return ImageCaptionDataset(
        examples, d.resolution, center_crop=d.center_crop, random_flip=d.random_flip,
        caption_prefix=d.caption_prefix if instance else "", caption_dropout=d.caption_dropout if instance else 0.0,
        repeats=d.repeats if instance else 1, seed=seed, sizes=sizes,
        shuffle_tags=d.shuffle_tags and instance, keep_tokens=d.keep_tokens,
    )


def _embedding_cache_reason(cfg: RunConfig) -> str | None:
    """Why text embeddings cannot be cached (None when they can)."""
    if cfg.lora.train_text_encoder:
        return "the text encoder is being trained"
    if cfg.data.shuffle_tags:
        return "data.shuffle_tags changes the captions every epoch"
    return None


def _train(cfg, examples, out_dir, accelerator, show_progress) -> TrainResult:
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler

    started_at = time.time()
    t = cfg.train
    set_seed(t.seed)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out_dir / "config.yaml", dump_config(cfg))
    if cfg.log.tensorboard or cfg.log.wandb:
        accelerator.init_trackers(cfg.log.project, config=_tracker_config(cfg))

    # ---- model: frozen base in the compute dtype ----
    weight_dtype = weight_dtype_for(cfg.model, t.mixed_precision)
    base = load_base(cfg.model, weight_dtype)
    device = accelerator.device
    for module in (base.vae, base.unet, *base.text_encoders):
        module.to(device)

    # ---- DreamBooth class images, made by the base model before any adapter exists ----
    prior = cfg.prior_preservation
    if prior:
        if accelerator.is_main_process:
            generate_class_images(cfg, base, show_progress)
        accelerator.wait_for_everyone()
        set_seed(t.seed)  # generating or not, the adapters start from the same values

    # ---- LoRA adapters in fp32 ----
    trained, groups = _add_adapters(cfg, base)
    train_te = len(trained) > 1
    params = [p for g in groups for p in g["params"]]
    counted = sum(p.numel() for p in params)
    log.info("trainable LoRA parameters: %d (rank %d, alpha %g)", counted, cfg.lora.rank, cfg.lora_alpha)

    # ---- data ----
    dataset = _dataset(cfg, examples, t.seed)
    loader = _loader(cfg, dataset, t.seed)
    loaders = [loader]
    if prior:
        class_set = _dataset(cfg, class_examples(cfg), t.seed + 1, instance=False)
        loaders.append(_loader(cfg, class_set, t.seed + 1))

    # ---- optimizer and schedule ----
    optimizer = build_optimizer(t, groups)
    updates_per_epoch = math.ceil(len(loader) / accelerator.num_processes / t.grad_accum)
    max_steps = t.max_steps if t.max_steps is not None else t.epochs * updates_per_epoch
    # accelerate steps a prepared scheduler once per process per update; scale to match.
    lr_scheduler = get_scheduler(t.scheduler, optimizer, num_warmup_steps=t.warmup * accelerator.num_processes,
                                 num_training_steps=max_steps * accelerator.num_processes)
    prepared = accelerator.prepare(*trained, optimizer, lr_scheduler, *loaders)
    trained = list(prepared[:len(trained)])
    optimizer, lr_scheduler, loader = prepared[len(trained):len(trained) + 3]
    class_batches = _cycle(prepared[-1]) if prior else None
    unet = trained[0]
    text_encoders = trained[1:] if train_te else base.text_encoders

    # ---- caches of the frozen work ----
    cache_dir = None
    if t.cache_latents and t.cache_latents_to_disk:
        cache_dir = Path(t.cache_dir or Path(cfg.data.path) / ".cache" / "lora-trainer") / "latents"
    latent_cache = LatentCache(enabled=t.cache_latents, directory=cache_dir, device=device,
                               fingerprint=module_fingerprint(base.vae) if cache_dir else "")
    no_cache = _embedding_cache_reason(cfg)
    if no_cache:
        log.info("text embeddings are not cached: %s", no_cache)
    embedding_cache = EmbeddingCache(enabled=no_cache is None)
    scaling = base.vae.config.scaling_factor
    timesteps_total = base.noise_scheduler.config.num_train_timesteps

    def encode_images(pixels: torch.Tensor):
        with torch.no_grad():
            dist = base.vae.encode(pixels.to(device, base.vae.dtype)).latent_dist
        return dist.mean, dist.std

    def encode_text(captions: list[str]):
        with torch.set_grad_enabled(train_te):
            return encode_prompts(base, text_encoders, captions, device)

    def batch_loss(batch, paths, generator=None) -> torch.Tensor:
        """The diffusion loss of one batch; `generator` gives the batch its own random stream."""
        size = tuple(batch["pixel_values"].shape[-2:])
        keys = [(str(paths[int(i)]), size, bool(f), tuple(c.tolist()))
                for i, f, c in zip(batch["index"], batch["flipped"], batch["crop_top_left"])]
        mean, std = latent_cache.distributions(keys, batch["pixel_values"], encode_images)
        eps = torch.randn(std.shape, generator=generator, dtype=std.dtype, device=std.device)
        latents = ((mean + std * eps) * scaling).to(weight_dtype)
        noise = sample_noise(latents, t.noise_offset, generator)
        timesteps = torch.randint(0, timesteps_total, (latents.shape[0],), device=device, generator=generator)
        noisy = base.noise_scheduler.add_noise(latents, perturb(noise, t.input_perturbation, generator), timesteps)
        target = training_target(base.noise_scheduler, latents, noise, timesteps)
        embeddings = embedding_cache.embeddings(batch["caption"], encode_text)
        pred = unet(noisy, timesteps, **unet_conditioning(embeddings, batch, size, device)).sample
        return diffusion_loss(pred, target, base.noise_scheduler, timesteps, t.snr_gamma)

    instance_paths = [ex.path for ex in examples]
    class_paths = [ex.path for ex in class_set.examples] if prior else []
    prior_generator = torch.Generator(device=device).manual_seed(t.seed + 1) if prior else None

    # ---- the loop ----
    log_path = out_dir / "train_log.jsonl"
    losses: list[float] = []
    step, epoch = 0, 0
    bar = tqdm(total=max_steps, desc="training", disable=not (show_progress and accelerator.is_main_process))
    for module in trained:
        module.train()
    step_started = time.perf_counter()
    while step < max_steps:
        _set_epoch(loader, epoch)
        for batch in loader:
            with accelerator.accumulate(*trained):
                loss = batch_loss(batch, instance_paths)
                if prior:
                    instance_loss = loss
                    prior_loss = batch_loss(next(class_batches), class_paths, prior_generator)
                    loss = instance_loss + cfg.dreambooth.prior_loss_weight * prior_loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and t.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, t.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            step += 1
            loss_value = accelerator.gather(loss.detach()).mean().item()
            losses.append(loss_value)
            now = time.perf_counter()
            record = {"step": step, "loss": loss_value, "lr": lr_scheduler.get_last_lr()[0],
                      "step_time": now - step_started, "epoch": epoch}
            if prior:
                record["instance_loss"] = accelerator.gather(instance_loss.detach()).mean().item()
                record["prior_loss"] = accelerator.gather(prior_loss.detach()).mean().item()
            step_started = now
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{record['lr']:.2e}")
            if accelerator.is_main_process and step % t.log_every_n_steps == 0:
                with log_path.open("a", encoding="utf-8") as fh:
                    fh.write(json.dumps(record) + "\n")
                accelerator.log({k: v for k, v in record.items() if "loss" in k or k == "lr"}, step=step)
            if cfg.output.save_every_n_steps and step % cfg.output.save_every_n_steps == 0 and step < max_steps:
                _export(cfg, accelerator, base, trained, examples, step, max_steps, started_at,
                        suffix=f"-step{step:05d}")
            if cfg.sample.every_n_steps and step % cfg.sample.every_n_steps == 0 and step < max_steps:
                _samples(cfg, accelerator, base, unet, text_encoders, step)
            if step >= max_steps:
                break
        epoch += 1
    bar.close()
    log.info("latent cache: %d entries, %d hits, %d misses", len(latent_cache), latent_cache.hits, latent_cache.misses)
    if cache_dir is not None:
        log.info("latent disk cache %s: %d entries read from disk", cache_dir, latent_cache.disk_hits)

    accelerator.wait_for_everyone()
    paths = _export(cfg, accelerator, base, trained, examples, step, max_steps, started_at)
    if cfg.sample.prompts:
        _samples(cfg, accelerator, base, unet, text_encoders, step)
    unwrapped = [accelerator.unwrap_model(m) for m in (unet, *text_encoders)]
    return TrainResult(out_dir, paths, step, losses, counted, *unwrapped)


def _export(cfg, accelerator, base, trained, examples, step, max_steps, started_at, suffix=""):
    if not accelerator.is_main_process:
        return []
    unet, *encoders = [accelerator.unwrap_model(m) for m in trained]
    return export_adapter(
        cfg, unet, encoders[0] if encoders else None, examples, step, max_steps, started_at,
        prediction_type=base.prediction_type, suffix=suffix,
        text_encoder_2=encoders[1] if len(encoders) > 1 else None, variant=base.variant,
    )


def _samples(cfg, accelerator, base, unet, text_encoders, step):
    if not cfg.sample.prompts or not accelerator.is_main_process:
        return
    encoders = [accelerator.unwrap_model(m) for m in text_encoders]
    with accelerator.autocast():
        save_samples(cfg, base, accelerator.unwrap_model(unet), encoders[0], step,
                     encoders[1] if len(encoders) > 1 else None)
