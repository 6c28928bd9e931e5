"""The training recipe, top to bottom: data → base model + LoRA → accelerate loop → export → samples.

Runs unchanged on CPU, one GPU, or several under `accelerate launch`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..config import RunConfig, dump_config
from ..data import ImageCaptionDataset
from ..data.prepare import prepare_examples
from ..errors import ConfigError
from ..fileio import write_text_atomic
from ..models.loading import load_base, weight_dtype_for
from ..models.lora import expected_lora_parameters, inject_lora, trainable_parameters
from .caches import EmbeddingCache, LatentCache
from .loss import diffusion_loss, sample_noise, training_target
from .outputs import export_adapter, save_samples

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


def _check_environment(cfg: RunConfig) -> None:
    """Settings this machine cannot honour fail here, before any data or model is read."""
    import importlib.util

    if cfg.train.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.mixed_precision: got 'fp16', which needs a GPU; on CPU use 'bf16' or 'no'")
    for key, on, module, extra in (("log.tensorboard", cfg.log.tensorboard, "tensorboard", "tensorboard"),
                                   ("log.wandb", cfg.log.wandb, "wandb", "wandb")):
        if on and importlib.util.find_spec(module) is None:
            raise ConfigError(f"{key}: true needs the {module} package; pip install 'lora-trainer[{extra}]' "
                              f"or set {key}=false")


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
    out_dir = Path(cfg.output.dir)
    accelerator = _make_accelerator(cfg, out_dir)
    try:
        return _train(cfg, examples, out_dir, accelerator, show_progress)
    finally:
        accelerator.end_training()
        _release_accelerate_state()


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

    # ---- model: frozen base in the compute dtype, LoRA adapters in fp32 ----
    weight_dtype = weight_dtype_for(cfg.model, t.mixed_precision)
    base = load_base(cfg.model, weight_dtype)
    device = accelerator.device
    base.vae.to(device)
    base.text_encoder.to(device)
    base.unet.to(device)
    rank, alpha = cfg.lora.rank, cfg.lora_alpha
    inject_lora(base.unet, cfg.lora.unet_targets, rank, alpha, cfg.lora.dropout, "lora.unet_targets")
    n_params = expected_lora_parameters(base.unet, rank)
    train_te = cfg.lora.train_text_encoder
    if train_te:
        inject_lora(base.text_encoder, cfg.lora.text_encoder_targets, rank, alpha, cfg.lora.dropout,
                    "lora.text_encoder_targets")
        n_params += expected_lora_parameters(base.text_encoder, rank)
    if t.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
        if train_te:
            base.text_encoder.gradient_checkpointing_enable()
    unet_params = trainable_parameters(base.unet)
    te_params = trainable_parameters(base.text_encoder) if train_te else []
    counted = sum(p.numel() for p in unet_params + te_params)
    log.info("trainable LoRA parameters: %d (rank %d, alpha %g)", counted, rank, alpha)

    # ---- data ----
    dataset = ImageCaptionDataset(
        examples, cfg.data.resolution, center_crop=cfg.data.center_crop, random_flip=cfg.data.random_flip,
        caption_prefix=cfg.data.caption_prefix, caption_dropout=cfg.data.caption_dropout,
        repeats=cfg.data.repeats, seed=t.seed,
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=t.batch_size, shuffle=True, num_workers=cfg.data.num_workers,
        generator=torch.Generator().manual_seed(t.seed), drop_last=len(dataset) >= t.batch_size,
    )

    # ---- optimizer and schedule ----
    groups = [{"params": unet_params, "lr": t.lr}]
    if te_params:
        groups.append({"params": te_params, "lr": t.text_encoder_lr if t.text_encoder_lr is not None else t.lr})
    optimizer = torch.optim.AdamW(groups, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.weight_decay,
                                  eps=t.adam_epsilon)
    updates_per_epoch = math.ceil(len(loader) / accelerator.num_processes / t.grad_accum)
    max_steps = t.max_steps if t.max_steps is not None else t.epochs * updates_per_epoch
    # accelerate steps a prepared scheduler once per process per update; scale to match.
    lr_scheduler = get_scheduler(t.scheduler, optimizer, num_warmup_steps=t.warmup * accelerator.num_processes,
                                 num_training_steps=max_steps * accelerator.num_processes)
    if train_te:
        unet, text_encoder, optimizer, loader, lr_scheduler = accelerator.prepare(
            base.unet, base.text_encoder, optimizer, loader, lr_scheduler)
    else:
        unet, optimizer, loader, lr_scheduler = accelerator.prepare(base.unet, optimizer, loader, lr_scheduler)
        text_encoder = base.text_encoder

    # ---- caches of the frozen work ----
    latent_cache = LatentCache(enabled=t.cache_latents)
    # Text embeddings are a pure function of the caption only while the text encoder is frozen.
    embedding_cache = EmbeddingCache(enabled=not train_te)
    scaling = base.vae.config.scaling_factor

    def encode_images(pixels: torch.Tensor):
        with torch.no_grad():
            dist = base.vae.encode(pixels.to(device, weight_dtype)).latent_dist
        return dist.mean, dist.std

    def encode_text(captions: list[str]) -> torch.Tensor:
        tok = base.tokenizer(captions, padding="max_length", max_length=base.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        with torch.set_grad_enabled(train_te):
            return text_encoder(tok.input_ids.to(device))[0]

    # ---- the loop ----
    log_path = out_dir / "train_log.jsonl"
    losses: list[float] = []
    step, epoch = 0, 0
    bar = tqdm(total=max_steps, desc="training", disable=not (show_progress and accelerator.is_main_process))
    unet.train()
    if train_te:
        text_encoder.train()
    step_started = time.perf_counter()
    while step < max_steps:
        dataset.set_epoch(epoch)
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        for batch in loader:
            with accelerator.accumulate(unet):
                keys = [(int(i), bool(f), tuple(c.tolist()))
                        for i, f, c in zip(batch["index"], batch["flipped"], batch["crop_top_left"])]
                mean, std = latent_cache.distributions(keys, batch["pixel_values"], encode_images)
                latents = (mean + std * torch.randn_like(std)) * scaling
                noise = sample_noise(latents, t.noise_offset)
                timesteps = torch.randint(0, base.noise_scheduler.config.num_train_timesteps,
                                          (latents.shape[0],), device=device)
                noisy = base.noise_scheduler.add_noise(latents, noise, timesteps)
                target = training_target(base.noise_scheduler, latents, noise, timesteps)
                hidden = embedding_cache.embeddings(batch["caption"], encode_text)
                pred = unet(noisy, timesteps, hidden).sample
                loss = diffusion_loss(pred, target, base.noise_scheduler, timesteps, t.snr_gamma)
                accelerator.backward(loss)
                if accelerator.sync_gradients and t.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(unet_params + te_params, t.max_grad_norm)
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
            step_started = now
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{record['lr']:.2e}")
            if accelerator.is_main_process and step % t.log_every_n_steps == 0:
                with log_path.open("a", encoding="utf-8") as fh:
                    fh.write(json.dumps(record) + "\n")
                accelerator.log({"loss": loss_value, "lr": record["lr"]}, step=step)
            if cfg.output.save_every_n_steps and step % cfg.output.save_every_n_steps == 0 and step < max_steps:
                _export(cfg, accelerator, base, unet, text_encoder if train_te else None, examples, step,
                        max_steps, started_at, suffix=f"-step{step:05d}")
            if cfg.sample.every_n_steps and step % cfg.sample.every_n_steps == 0 and step < max_steps:
                _samples(cfg, accelerator, base, unet, text_encoder, step)
            if step >= max_steps:
                break
        epoch += 1
    bar.close()
    log.info("latent cache: %d entries, %d hits, %d misses", len(latent_cache), latent_cache.hits, latent_cache.misses)

    accelerator.wait_for_everyone()
    paths = _export(cfg, accelerator, base, unet, text_encoder if train_te else None, examples, step, max_steps,
                    started_at)
    if cfg.sample.prompts:
        _samples(cfg, accelerator, base, unet, text_encoder, step)
    return TrainResult(out_dir, paths, step, losses, counted, accelerator.unwrap_model(unet),
                       accelerator.unwrap_model(text_encoder))


def _export(cfg, accelerator, base, unet, text_encoder, examples, step, max_steps, started_at, suffix=""):
    if not accelerator.is_main_process:
        return []
    return export_adapter(
        cfg, accelerator.unwrap_model(unet),
        accelerator.unwrap_model(text_encoder) if text_encoder is not None else None,
        examples, step, max_steps, started_at, prediction_type=base.prediction_type, suffix=suffix,
    )


def _samples(cfg, accelerator, base, unet, text_encoder, step):
    if not cfg.sample.prompts or not accelerator.is_main_process:
        return
    with accelerator.autocast():
        save_samples(cfg, base, accelerator.unwrap_model(unet), accelerator.unwrap_model(text_encoder), step)
