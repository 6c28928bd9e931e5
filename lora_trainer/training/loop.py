"""The training recipe, top to bottom: data → base model + LoRA → accelerate loop → export → samples.

Runs unchanged on CPU, one GPU, or several under `accelerate launch`; saves checkpoints it can
resume from bit for bit, and stops cleanly on a non-finite loss or Ctrl-C.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..config import RunConfig, describe_sides, dump_config, main_side
from ..data.holdout import split_examples
from ..data.prepare import prepare_examples
from ..errors import ConfigError
from ..fileio import write_text_atomic
from ..models.blocks import block_config_errors, fit_lr_weight_counts
from ..models.loading import NATIVE_RESOLUTION, load_base, resolve_variant, weight_dtype_for
from ..models.dropout import DropoutKeys
from .adapters import add_adapters
from .embedding_init import initial_vectors
from .init_adapter import load_initial_adapter, read_initial_adapter
from .caches import run_caches
from .checkpoints import (TrainerState, check_checkpoint_settings, checkpoints_dir, find_checkpoint, latest_checkpoint,
                          load_checkpoint, register_adapter_only_hooks, save_checkpoint)
from .components import TrainResult, draw_samples, draw_sweep, export_trained  # noqa: F401 (TrainResult re-exported)
from .conditioning import check_clip_skip, encode_prompts, unet_conditioning
from .draws import draw_step, extra_draw_options, item_seed
from .ema import start_ema, with_ema
from .epochs import EpochEnds, epoch_suffix
from .finished import FinishedRun, already_finished, message, run_files, write_finished
from .guards import (RunInterrupted, StopSignals, check_environment, check_finite, check_free_space, check_output_dir,
                     check_schedule_options, check_writable_folders, clear_previous_run, record_taken_back,
                     warn_resume_changes)
from .loaders import ClassBatches, epoch_batches, prepared_loaders
from .loraplus import loraplus_groups
from .loss import diffusion_loss, extra_weight_options, training_scheduler, training_target
from .masks import latent_mask, latent_scale
from .maxnorm import apply_max_norm
from .optimizers import build_optimizer
from .plots import plot_loss
from .schedules import build_scheduler
from .step_adapters import keep_step_adapters, step_suffix
from .prior import class_examples, generate_class_images
from .pivotal import COMPONENT, check_token_in_run, optimizer_group, start_words, trained_until, word_tables
from .tracking import (end_run, init_trackers, learning_rates, make_accelerator, release_accelerate_state, truncate_log,
                       write_record)
from .validation import Validation

log = logging.getLogger(__name__)


def _for_variant(cfg: RunConfig, variant: str) -> RunConfig:
    """The config with what depends on the base filled in: the variant, the native resolution, block
    lr-weight lists fitted to its block counts."""
    cfg = replace(cfg, lora=fit_lr_weight_counts(cfg.lora, variant))  # with a warning, as kohya fits them
    problems = block_config_errors(cfg.lora, variant)  # the block counts depend on the base
    if problems:
        raise ConfigError("\n".join(problems))
    res = cfg.data.resolution or NATIVE_RESOLUTION[variant]
    if variant == "sdxl" and main_side(res) < 1024:
        log.info("SDXL trained at %s px (its native size is 1024): fine for tests and quick runs", describe_sides(res))
    return replace(cfg, model=replace(cfg.model, variant=variant), data=replace(cfg.data, resolution=res))


def train(cfg: RunConfig, show_progress: bool = True,
          loss_hook: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> TrainResult:
    """Train one adapter as `cfg` says and write it to `cfg.output.dir`.

    `loss_hook(step, loss) -> loss` sees each micro-batch loss before the backward pass (tests
    inject a NaN or a Ctrl-C through it)."""
    check_environment(cfg)
    out_dir = Path(cfg.output.dir)
    # Before anything writes there (prepare_examples writes captions.jsonl there).
    check_output_dir(out_dir, cfg.output.overwrite, resuming=cfg.train.resume is not None, name=cfg.output.name)
    checkpoint = find_checkpoint(out_dir, cfg.train.resume) if cfg.train.resume else None
    done = already_finished(cfg, out_dir, checkpoint is not None) if cfg.train.resume == "latest" else None
    if done is not None:  # the same command run again: no model is loaded, nothing is written
        adapters = [out_dir / n for n in done.adapters]
        return TrainResult(out_dir, adapters, done.step, finished=message(out_dir, done, cfg))
    if checkpoint is not None:  # before config.yaml is replaced: a refused resume leaves the run as it was
        check_checkpoint_settings(checkpoint, cfg.train.optimizer, cfg.embedding.token)
    if cfg.train.resume == "latest" and checkpoint is None:
        log.info("train.resume=latest: no checkpoint in %s yet; starting from step 0", checkpoints_dir(out_dir))
    # The base is checked first (it reads model_index.json or a file header only), so a wrong
    # model.base stops the run before the data is scanned, and the scan knows the native size.
    cfg = _for_variant(cfg, resolve_variant(cfg.model))
    initial = (read_initial_adapter(cfg.lora.init_from, cfg.model.variant, cfg.lora.train_text_encoder, cfg.lora.rank,
                                    cfg.lora.use_dora, cfg.lora.conv_rank, cfg.lora.train_unet, cfg.lora.type,
                                    cfg.lora.lokr_factor)
               if cfg.lora.init_from else None)
    start_vectors = initial_vectors(cfg, cfg.model.variant)  # embedding.init_from, or lora.init_from's bundle
    check_writable_folders(cfg)  # made here if missing: not before a bad model.base, after it the data is read
    with record_taken_back(out_dir):  # caption, check, scan: bad data stops the run before any model loads
        examples = prepare_examples(cfg, show_progress)
        if cfg.dreambooth.instance_prompt:
            examples = [replace(ex, caption=cfg.dreambooth.instance_prompt) for ex in examples]
        examples, held_out = split_examples(cfg, examples)  # held-out images are never trained on
        check_token_in_run(cfg, examples)  # embedding.token: a trigger word no caption names would never train
    accelerator = make_accelerator(cfg, out_dir)
    try:
        with StopSignals() as stop:
            return _train(cfg, examples, held_out, out_dir, accelerator, show_progress, checkpoint, loss_hook,
                          initial, start_vectors, stop)
    finally:
        end_run(accelerator)  # not accelerator.end_training(): see end_run
        release_accelerate_state()


def _train(cfg, examples, held_out, out_dir, accelerator, show_progress, checkpoint, loss_hook,
           initial, start_vectors, stop: StopSignals) -> TrainResult:
    from accelerate.utils import set_seed
    started_at = time.time()
    t = cfg.train
    set_seed(t.seed)
    log_path = out_dir / "train_log.jsonl"
    if accelerator.is_main_process:
        if checkpoint is None:
            clear_previous_run(out_dir, cfg.embedding.token, cfg.output.name)  # overwrite, or nothing to resume
        else:
            warn_resume_changes(out_dir / "config.yaml", cfg, checkpoint)  # read before it is replaced below
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out_dir / "config.yaml", dump_config(cfg))
    init_trackers(cfg, accelerator, out_dir)

    # ---- model: frozen base in the compute dtype ----
    weight_dtype = weight_dtype_for(cfg.model, t.mixed_precision)
    base = load_base(cfg.model, weight_dtype)
    check_schedule_options(t, base.noise_scheduler)  # the timestep range, the v-prediction options
    check_clip_skip(cfg.model.clip_skip, base.text_encoders)
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
    dropout_keys = DropoutKeys()
    trained, groups, group_names = add_adapters(cfg, base, dropout_keys)
    train_te = cfg.lora.train_text_encoder
    if initial is not None:  # a checkpoint, when resuming, replaces these values below
        load_initial_adapter(initial, trained.named, cfg.lora.init_from)

    # ---- data: the order is a function of (seed, epoch), whatever the processes ----
    class_set = class_examples(cfg) if prior else []
    loader, *class_loader = prepared_loaders(cfg, accelerator, examples, class_set)  # the class images' with prior

    # ---- optimizer and schedule (LoRA+: B in groups of its own, at lr × ratio; the embedding's own) ----
    groups, group_names = loraplus_groups(t, trained.modules, groups, group_names)
    words = start_words(cfg, base, start_vectors)  # embedding.token (pivotal tuning): vectors trained with it
    if words is not None:
        trained = trained.with_module(COMPONENT, words)
        groups, group_names = [*groups, optimizer_group(cfg, words)], [*group_names, COMPONENT]
    params = [p for g in groups for p in g["params"]]
    counted = sum(p.numel() for p in params)  # what checkpoints hold
    optimizer = build_optimizer(t, groups)
    updates_per_epoch = math.ceil(len(loader) / t.grad_accum)  # this process's share of the batches
    max_steps = t.max_steps if t.max_steps is not None else t.epochs * updates_per_epoch
    num_epochs = math.ceil(max_steps / updates_per_epoch)
    lr_scheduler = build_scheduler(t, optimizer, max_steps, accelerator.num_processes)
    # Only trained modules are prepared: DDP refuses a module with nothing to train (a frozen UNet).
    count = len(trained.modules)
    prepared = accelerator.prepare(*trained.modules, optimizer, lr_scheduler)
    trained = trained.replace(list(prepared[:count]))
    optimizer, lr_scheduler = prepared[count:]
    unet, text_encoders = trained.unet(base), trained.text_encoders(base)
    # a frozen UNet is not prepared, so mixed precision's autocast is put around its call here
    unet_autocast = accelerator.autocast if not cfg.lora.train_unet else contextlib.nullcontext

    # ---- resume: adapter, optimizer, scheduler, RNG states, data position ----
    register_adapter_only_hooks(accelerator)
    state = TrainerState(0, 0, 0)
    if checkpoint is not None:
        state = load_checkpoint(accelerator, checkpoint, t.optimizer, cfg.embedding.token)
        log.info("resumed from %s (step %d, epoch %d)", checkpoint, state.step, state.epoch)
        if accelerator.is_main_process:
            truncate_log(log_path, state.step)
    class_batches = ClassBatches(class_loader[0], state.class_epoch, state.class_batches) if prior else None
    # train.ema_decay: the files, samples and validation use the EMA, swapped in for each of them
    ema = start_ema(t, trained.unwrapped(accelerator), device, checkpoint, max_steps)
    exported, samples, sweep = (with_ema(ema, f) for f in (export_trained, draw_samples, draw_sweep))

    # ---- caches of the frozen work ----
    latent_cache, embedding_cache = run_caches(cfg, base.vae, device)
    scaling = base.vae.config.scaling_factor
    timesteps_total = base.noise_scheduler.config.num_train_timesteps
    noise_scheduler = training_scheduler(base.noise_scheduler, t.zero_terminal_snr)  # samples keep the base's
    loss_options = dict(loss_type=t.loss_type, huber_c=t.huber_c, huber_schedule=t.huber_schedule,
                        huber_scale=t.huber_scale, debiased=t.debiased_estimation)
    draw_extras = extra_draw_options(t)  # kohya's extra options, only those set: off, the calls are as they were
    loss_options.update(extra_weight_options(t))

    def encode_images(pixels: torch.Tensor):
        with torch.no_grad():
            dist = base.vae.encode(pixels.to(device, base.vae.dtype)).latent_dist
        return dist.mean, dist.std

    words_until = trained_until(cfg, max_steps) if words is not None else 0

    def encode_text(captions: list[str]):
        tables, live = None, False
        if words is not None:  # the vectors in the graph while they train (not in validation, not after)
            live = torch.is_grad_enabled() and step < words_until
            module = trained.named[COMPONENT]
            tables = word_tables(base, words.token, module() if live else words.fixed())
        with torch.set_grad_enabled((train_te or live) and torch.is_grad_enabled()):  # validation runs without
            return encode_prompts(base, text_encoders, captions, device, cfg.model.clip_skip,
                                  cfg.model.max_token_length, cfg.data.weighted_captions, tables)

    def batch_loss(batch, paths, epoch: int, stream: str, seed: int = t.seed,
                   timesteps: torch.Tensor | None = None) -> torch.Tensor:
        """The diffusion loss of one batch; its random draws come from (seed, epoch, item, stream).
        Validation fixes the `timesteps`, and its latents are cached under keys of their own."""
        size = tuple(batch["pixel_values"].shape[-2:])
        tag = () if timesteps is None else (stream,)
        alpha = batch.get("alpha_mask")  # data.alpha_mask: the loss mask, cached with the latents
        tag += () if alpha is None else ("alpha_mask",)  # entries with a mask never meet entries without
        if alpha is None:
            alpha = batch.get("loss_mask")  # data.mask_dir: keyed by the mask file's content below
        alpha = latent_mask(alpha, latent_scale(base.vae)).to(device) if alpha is not None else None
        mask_ids = [(f"mask:{m}",) for m in batch["mask_id"]] if "mask_id" in batch else [()] * len(batch["index"])
        keys = [(str(paths[int(i)]), size, bool(f), tuple(c.tolist()), *tag, *m)
                for i, f, c, m in zip(batch["index"], batch["flipped"], batch["crop_top_left"], mask_ids)]
        mean, std, *mask = latent_cache.distributions(keys, batch["pixel_values"], encode_images, alpha)
        d = draw_step(tuple(mean.shape), [int(i) for i in batch["item"]], seed, epoch, stream, t.noise_offset,
                      t.input_perturbation, t.max_timestep or timesteps_total, std.dtype, weight_dtype, device,
                      min_timestep=t.min_timestep, multires_iterations=t.multires_noise_iterations,
                      multires_discount=t.multires_noise_discount, **draw_extras,
                      **({"latent_parts": (mean, std, scaling)} if "adaptive_noise_scale" in draw_extras else {}))
        timesteps = d.timesteps if timesteps is None else timesteps
        latents = ((mean + std * d.eps) * scaling).to(weight_dtype)
        noisy = noise_scheduler.add_noise(latents, d.model_noise, timesteps)
        target = training_target(noise_scheduler, latents, d.noise, timesteps)
        with dropout_keys.batch([item_seed(t.seed, epoch, int(i), f"{stream}:dropout") for i in batch["item"]]):
            embeddings = embedding_cache.embeddings(batch["caption"], encode_text)
            with unet_autocast():
                pred = unet(noisy, timesteps, **unet_conditioning(embeddings, batch, size, device)).sample
        masked = {"mask": mask[0]} if mask else {}  # off: the call is exactly what it was
        return diffusion_loss(pred, target, noise_scheduler, timesteps, t.snr_gamma, **loss_options, **masked)

    instance_paths, class_paths = [ex.path for ex in examples], [ex.path for ex in class_set]
    # adapter + two Adam moments + the exported copy (+ the EMA), in fp32
    checkpoint_bytes = counted * 4 * (4 + (ema is not None))

    def save(state: TrainerState) -> Path:
        state = replace(state, optimizer=t.optimizer, embedding_token=cfg.embedding.token or "")
        check_free_space(out_dir, checkpoint_bytes, f"the checkpoint of step {state.step}")
        suffix = step_suffix(state.step)  # the kept copy has the same name

        def export(folder: Path) -> list[Path]:  # main process, before the checkpoint is published
            paths = exported(cfg, accelerator, base, trained, examples, state.step, max_steps, started_at,
                             suffix=suffix, folder=folder, epoch=state.epoch + 1, num_epochs=num_epochs)
            if ema is not None:
                ema.save(folder)
            if cfg.output.save_step_adapters and saves_due(state.step):  # not a Ctrl-C checkpoint between them
                keep_step_adapters(paths, suffix, out_dir, cfg.output, state.step, cfg.embedding.token, folder)
            return paths

        return save_checkpoint(accelerator, out_dir, state, cfg.output.keep_checkpoints, export)

    def saves_due(at: int) -> bool:
        every = cfg.output.save_every_n_steps
        return bool(every) and at % every == 0 and at < max_steps

    epoch_ends = EpochEnds.for_run(
        cfg, out_dir, max_steps, accelerator.is_main_process, counted * 4,
        export=lambda n, at: exported(cfg, accelerator, base, trained, examples, at, max_steps, started_at,
                                      suffix=epoch_suffix(n), epoch=n, num_epochs=num_epochs),
        sample=lambda n, at: samples(cfg, accelerator, base, trained, at, f"epoch_{n:06d}"))

    validation = Validation(cfg, held_out, timesteps_total, max_steps, batch_loss, trained.modules, accelerator,
                            ema.applied if ema is not None else contextlib.nullcontext)
    if held_out and accelerator.is_main_process:
        log.info("%s", validation.describe())

    # ---- the loop ----
    losses: list[float] = []
    step, epoch, skip = state.step, state.epoch, state.batches_in_epoch
    if skip >= len(loader):  # saved at the end of an epoch
        epoch_ends.catch_up(epoch + 1, step)
        epoch, skip = epoch + 1, 0
    done = state  # the position after the last completed step: what a checkpoint stores
    last_good = checkpoint or latest_checkpoint(out_dir)
    bar = tqdm(total=max_steps, initial=step, desc="training",
               disable=not (show_progress and accelerator.is_main_process))
    for module in trained.modules:
        module.train()
    if accelerator.num_processes > 1:
        stop.defer()  # a SIGTERM stops all processes at one batch: see StopSignals
    try:
        if step == 0 and validation.due(0):  # before any update: the point the curve is read against
            write_record(accelerator, log_path, {"step": 0, "epoch": 0, "val_loss": validation.loss(0)})
        if step == 0 and cfg.sample.at_start:  # the base (or lora.init_from): what the later samples are read against
            samples(cfg, accelerator, base, trained, 0)
        step_started = time.perf_counter()  # the first step's time leaves these out
        while step < max_steps:
            seen = skip
            for batch in epoch_batches(loader, epoch, skip):
                stop.check()  # a Ctrl-C that Python dropped in a finalizer during the last step
                seen += 1
                with accelerator.accumulate(*trained.modules):
                    loss = batch_loss(batch, instance_paths, epoch, "instance")
                    if prior:
                        instance_loss = loss
                        prior_loss = batch_loss(next(class_batches), class_paths, class_batches.epoch, "class")
                        loss = instance_loss + cfg.dreambooth.prior_loss_weight * prior_loss
                    if loss_hook is not None:
                        loss = loss_hook(step + 1, loss)
                    # Every process sees every process's loss, so all stop together, before any update
                    # (and at a SIGTERM to any of them: see StopSignals.gather_losses)
                    gathered = stop.gather_losses(accelerator, loss)
                    if not torch.isfinite(gathered).all():
                        check_finite(float(gathered[~torch.isfinite(gathered)][0]), step + 1, last_good)
                    accelerator.backward(loss)
                    grad_norm, norms = None, None
                    if accelerator.sync_gradients:
                        # inf clips nothing but still measures the norm for the log
                        grad_norm = accelerator.clip_grad_norm_(params, t.max_grad_norm or float("inf"))
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    if t.scale_weight_norms and accelerator.sync_gradients:  # the same on every process
                        norms = apply_max_norm(list(trained.unwrapped(accelerator).values()), t.scale_weight_norms)
                    if ema is not None and accelerator.sync_gradients:  # once per update, after max-norm
                        ema.update()
                if not accelerator.sync_gradients:
                    continue
                step += 1
                done = TrainerState(step, epoch, seen, *((class_batches.epoch, class_batches.consumed)
                                                         if prior else (0, 0)))
                loss_value = gathered.mean().item()
                losses.append(loss_value)
                now = time.perf_counter()
                record = {"step": step, "epoch": epoch, "loss": loss_value, "lr": lr_scheduler.get_last_lr()[0],
                          **learning_rates(lr_scheduler, group_names), "grad_norm": float(grad_norm),
                          "step_time": now - step_started, **(norms.record() if norms else {})}
                if prior:
                    record["instance_loss"] = accelerator.gather(instance_loss.detach()).mean().item()
                    record["prior_loss"] = accelerator.gather(prior_loss.detach()).mean().item()
                if validation.due(step):
                    try:
                        record["val_loss"] = validation.loss(step)
                    except KeyboardInterrupt:  # the step itself is done: its line is kept, without val_loss
                        write_record(accelerator, log_path, record)
                        raise
                    now = time.perf_counter()  # the next step's time leaves the validation out
                step_started = now
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{record['lr']:.2e}", **validation.postfix())
                if step % t.log_every_n_steps == 0 or "val_loss" in record:
                    write_record(accelerator, log_path, record)
                if seen == len(loader):  # the epoch's last update; its files come before this step's checkpoint
                    epoch_ends(epoch + 1, step)
                if saves_due(step):
                    last_good = save(done)
                if cfg.sample.every_n_steps and step % cfg.sample.every_n_steps == 0 and step < max_steps:
                    samples(cfg, accelerator, base, trained, step)
                if step >= max_steps:
                    break
            else:
                epoch, skip = epoch + 1, 0
    except KeyboardInterrupt:
        saved = None
        if done.step > 0:
            saved = last_good if last_good is not None and last_good.name == f"step-{done.step:06d}" else save(done)
        raise RunInterrupted(done.step, saved) from None
    finally:
        bar.close()
    latent_cache.log_summary()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        check_free_space(out_dir, counted * 4, "the adapter")
    paths = exported(cfg, accelerator, base, trained, examples, step, max_steps, started_at,
                     epoch=num_epochs, num_epochs=num_epochs)
    if cfg.sample.prompts:
        samples(cfg, accelerator, base, trained, step)
        if cfg.sample.grid_weights:
            sweep(cfg, accelerator, base, trained)
    if accelerator.is_main_process:
        plot_loss(log_path, out_dir / "loss.png")
        write_finished(out_dir, FinishedRun(step, num_epochs, updates_per_epoch, run_files(paths, words)))
    unwrapped = [accelerator.unwrap_model(m) for m in (unet, *text_encoders)]
    return TrainResult(out_dir, paths, step, losses, counted, *unwrapped, resumed_from=checkpoint,
                       val_losses=validation.losses, ema=ema.named() if ema is not None else None,
                       embedding={k: v.cpu().clone() for k, v in words.fixed().items()} if words is not None else None)
