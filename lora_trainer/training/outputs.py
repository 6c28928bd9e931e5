"""What a run leaves for the user: the adapter file(s) with their metadata, and sample images."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import torch

from ..config import RunConfig, main_side, resolution_sides, resolve_subsets
from ..data import tag_frequency, training_caption
from ..data.templates import describe_templates
from ..data.buckets import bucket_side_range
from ..data.folders import describe_folders, describe_groups, group_keys, parse_folder_name
from ..export.files import adapter_states, save_adapter
from ..export.lycoris_write import save_lycoris_adapter
from ..export.metadata import kohya_metadata
from ..models.blocks import blocks_in_use, format_values
from ..models.lora import layer_alphas
from ..models.lycoris import lycoris_alphas
from ..models.vae import png_vae_fields, vae_file_hashes, vae_name
from ..sample_prompts import parse_sample_prompt
from .conditioning import pipeline_prompt_embeds
from .pivotal import bundle_tensors, save_embedding

log = logging.getLogger(__name__)

SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _final_captions(cfg: RunConfig, examples) -> list:
    """The captions as trained on (with the trigger prefix and the suffix of each image's subset),
    for the tag counts users see."""
    subs = resolve_subsets(cfg.data)
    return [replace(ex, caption=training_caption(ex.caption, subs[ex.subset].caption_prefix,
                                                 subs[ex.subset].caption_suffix, subs[ex.subset].keep_tokens_separator))
            for ex in examples]


def dataset_folders(cfg: RunConfig, examples) -> tuple[list[dict], list[str]]:
    """(rows of ss_dataset_dirs: folder, img_count, n_repeats; each example's folder key): per
    <N>_<name> folder and the images in none, under each data.subsets folder's name with subsets."""
    subs = resolve_subsets(cfg.data)
    keys = group_keys(examples, [s.path for s in subs])
    if not cfg.data.subsets:
        return describe_folders(examples, cfg.data.path, cfg.data.repeats), keys
    return describe_groups(examples, keys, [s.repeats for s in subs]), keys


BASE_MODEL_VERSIONS = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}


# lora.<key> -> kohya's network argument, for the per-block lists
BLOCK_NETWORK_ARGS = {"block_ranks": "block_dims", "block_alphas": "block_alphas",
                      "conv_block_ranks": "conv_block_dims", "conv_block_alphas": "conv_block_alphas"}


def folder_triggers(examples) -> list[str]:
    """The names of kohya `<N>_<name>` folders whose images trained on that name as their caption
    (kohya's class tokens, e.g. "sks dog"): the words that switch such an adapter on."""
    names = set()
    for ex in examples:
        parsed = parse_folder_name(Path(ex.folder).name) if ex.folder else None
        if parsed and parsed[1] and ex.caption.strip() == parsed[1].strip():
            names.add(parsed[1].strip())
    return sorted(names)


def _network_args(cfg: RunConfig) -> dict[str, str]:
    """What kohya records in `ss_network_args`: LyCORIS' `algo` (and LoKr's `factor`) for lora.type
    loha/lokr, LoCon's `conv_dim`/`conv_alpha`, the LoRA+ ratios, rank and module dropout and the block
    arguments set, each as the string kohya's command line takes ("1,0.5,0", "cosine+0.5")."""
    t, lora = cfg.train, cfg.lora
    args = {"algo": lora.type} if lora.type != "lora" else {}
    if lora.type == "lokr" and lora.lokr_factor != -1:
        args["factor"] = str(lora.lokr_factor)
    if lora.conv_rank:
        args.update({"conv_dim": str(lora.conv_rank), "conv_alpha": f"{cfg.conv_alpha:g}"})
    keys = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")
    args.update({key: f"{getattr(t, key):g}" for key in keys if getattr(t, key) is not None})
    args.update({key: f"{getattr(lora, key):g}" for key in ("rank_dropout", "module_dropout") if getattr(lora, key)})
    for side in ("down", "mid", "up"):
        value = getattr(lora.block_lr_weights, side)
        if value is not None:
            args[f"{side}_lr_weight"] = format_values(value)
    if lora.block_lr_zero_threshold:
        args["block_lr_zero_threshold"] = f"{lora.block_lr_zero_threshold:g}"
    for key, kohya in BLOCK_NETWORK_ARGS.items():
        if getattr(lora, key) is not None:
            args[kohya] = format_values(getattr(lora, key))
    return args


def _vae_metadata(source: str | None) -> dict:
    """kohya's VAE keys for model.vae: its name, and a file's hashes."""
    if not source:
        return {}
    hashes = vae_file_hashes(source) or {}
    return {"vae_name": vae_name(source), "vae_hash": hashes.get("legacy"), "new_vae_hash": hashes.get("sha256")}


def _metadata(cfg: RunConfig, examples, step: int, max_steps: int, started_at: float,
              prediction_type: str, variant: str, epoch: int | None = None,
              num_epochs: int | None = None) -> dict[str, str]:
    from .optimizers import OPTIMIZER_NAMES
    from .schedules import scheduler_name

    t = cfg.train
    db = cfg.dreambooth
    # As kohya writes them: one entry per folder (each <N>_<name> folder, the other images under the
    # dataset folder's name), n_repeats per epoch, and the image count as the sum of img_count × n_repeats.
    folders, keys = dataset_folders(cfg, examples)
    by_folder: dict[str, list] = {row["folder"]: [] for row in folders}
    for ex, key in zip(_final_captions(cfg, examples), keys):
        by_folder[key].append(ex)
    tags = {folder: tag_frequency(group) for folder, group in by_folder.items()}
    d = cfg.data
    ranges = [bucket_side_range(side, d.bucket_step, d.min_bucket_side, d.max_bucket_side)
              for side in resolution_sides(d.resolution)] if d.buckets else []
    sides = (min(r[0] for r in ranges), max(r[1] for r in ranges)) if ranges else None  # over all training sides
    metadata = kohya_metadata(
        rank=cfg.lora.rank,
        alpha=cfg.lora_alpha,
        base_model_version=BASE_MODEL_VERSIONS[variant],
        # kohya records a local base by its name only: the path is the user's own business
        base_model_name=Path(cfg.model.base).name if Path(cfg.model.base).exists() else cfg.model.base,
        **_vae_metadata(cfg.model.vae),
        resolution=main_side(cfg.data.resolution),  # kohya's one size: with several sides, the largest
        num_train_images=_items_per_epoch(cfg, examples, folders),
        num_reg_images=db.num_class_images,
        prior_loss_weight=db.prior_loss_weight if db.num_class_images else None,
        enable_bucket=cfg.data.buckets,
        epoch=epoch,
        num_epochs=num_epochs,
        min_bucket_reso=sides[0] if sides else None,  # kohya writes the bucket options only with buckets
        max_bucket_reso=sides[1] if sides else None,
        bucket_no_upscale=d.bucket_no_upscale if sides else None,
        caption_tag_dropout_rate=d.caption_tag_dropout,
        caption_dropout_every_n_epochs=d.caption_dropout_every_n_epochs or None,  # written only when on
        weighted_captions=d.weighted_captions,
        alpha_mask=any(s.alpha_mask for s in resolve_subsets(d)),  # any subset's
        # alpha or mask images: kohya's --masked_loss
        masked_loss=any(s.alpha_mask for s in resolve_subsets(d)) or d.mask_dir is not None,
        steps=step,
        max_train_steps=max_steps,
        learning_rate=t.lr,
        unet_lr=t.lr if cfg.lora.train_unet else None,
        text_encoder_lr=(t.text_encoder_lr if t.text_encoder_lr is not None else t.lr) if cfg.lora.train_text_encoder else None,
        lr_scheduler=scheduler_name(t),  # cosine with train.min_lr_ratio is kohya's cosine_with_min_lr
        optimizer=OPTIMIZER_NAMES[t.optimizer],
        mixed_precision=t.mixed_precision,
        seed=t.seed,
        # the text reading the adapter learned with; A1111/CivitAI show ss_clip_skip to users
        clip_skip=cfg.model.clip_skip,
        max_token_length=cfg.model.max_token_length,
        noise_offset=t.noise_offset,
        min_snr_gamma=t.snr_gamma,
        **_loss_metadata(t),
        scale_weight_norms=t.scale_weight_norms,
        loraplus_lr_ratio=t.loraplus_lr_ratio,
        loraplus_unet_lr_ratio=t.loraplus_unet_lr_ratio,
        loraplus_text_encoder_lr_ratio=t.loraplus_text_encoder_lr_ratio,
        ema_decay=t.ema_decay,  # the tensors are the EMA of the trained weights
        ema_warmup=t.ema_warmup if t.ema_decay is not None else None,
        # LyCORIS types train through kohya's `--network_module lycoris.kohya --network_args algo=...`
        network_module="lycoris.kohya" if cfg.lora.type != "lora" else "networks.lora",
        network_args=_network_args(cfg) or None,  # kohya's --network_args: LoCon, LoRA+, dropouts, blocks
        network_dropout=cfg.lora.neuron_dropout or None,  # kohya's --network_dropout; written only when on
        # which models the file adapts, under kohya's argument names
        network_train_unet_only=not cfg.lora.train_text_encoder,
        network_train_text_encoder_only=not cfg.lora.train_unet,
        cache_latents=t.cache_latents,
        training_started_at=started_at,
        training_finished_at=time.time(),
        output_name=cfg.output.name,
        tag_frequency=tags,
        dataset_dirs={row["folder"]: {"n_repeats": row["n_repeats"], "img_count": row["img_count"]} for row in folders},
        trigger_phrase=cfg.dreambooth.instance_prompt
        or ", ".join(dict.fromkeys(p for s in resolve_subsets(d) if (p := s.caption_prefix.strip().rstrip(","))))
        or (cfg.embedding.token if cfg.embedding.templates is not None else None)
        or ", ".join(folder_triggers(examples)) or None,
        prediction_type="v" if prediction_type == "v_prediction" else "epsilon",
        title=cfg.output.name,
    )
    # The images trained on templates, not on the captions ss_tag_frequency counts (kohya records none)
    templates = describe_templates(cfg.embedding.templates)
    if templates:
        metadata["ss_caption_templates"] = templates
    return metadata


def _items_per_epoch(cfg: RunConfig, examples, folders: list[dict]) -> int:
    """kohya's ss_num_train_images: images × repeats per epoch, × their sides when data.resolution (or a
    subset's) lists several (kohya counts a folder listed in two [[datasets]] of other sizes twice)."""
    subs = resolve_subsets(cfg.data)
    sides = [len(resolution_sides(s.resolution)) or 1 for s in subs]
    if max(sides) == 1:
        return sum(row["img_count"] * row["n_repeats"] for row in folders)
    return sum(ex.repeats * subs[ex.subset].repeats * sides[ex.subset] for ex in examples)


def _loss_metadata(t) -> dict:
    """The loss and noise options for kohya_metadata, as kohya records them: the loss type, huber
    settings and random-strength switches always; multi-resolution noise, the adaptive noise scale,
    the v-prediction options and the timestep range only when in use."""
    multires = t.multires_noise_iterations > 0
    narrowed = t.min_timestep > 0 or t.max_timestep is not None
    return dict(ip_noise_gamma=t.input_perturbation, loss_type=t.loss_type, huber_schedule=t.huber_schedule,
                huber_c=t.huber_c, huber_scale=t.huber_scale, debiased_estimation=t.debiased_estimation,
                zero_terminal_snr=t.zero_terminal_snr, noise_offset_random_strength=t.noise_offset_random_strength,
                ip_noise_gamma_random_strength=t.input_perturbation_random_strength,
                adaptive_noise_scale=t.adaptive_noise_scale, v_pred_like_loss=t.v_pred_like_loss,
                scale_v_pred_loss_like_noise_pred=t.scale_v_pred_loss_like_noise_pred or None,
                multires_noise_iterations=t.multires_noise_iterations if multires else None,
                multires_noise_discount=t.multires_noise_discount if multires else None,
                min_timestep=t.min_timestep if narrowed else None, max_timestep=t.max_timestep if narrowed else None)


def export_adapter(cfg: RunConfig, unet, text_encoder, examples, step: int, max_steps: int,
                   started_at: float, prediction_type: str = "epsilon", suffix: str = "",
                   text_encoder_2=None, variant: str = "sd15", folder: Path | None = None,
                   epoch: int | None = None, num_epochs: int | None = None, words=None) -> list[Path]:
    """Write the adapter as `cfg.output.format` says; return the written paths.

    kohya (default): DIR/<name>.safetensors. diffusers: the same name in the diffusers layout.
    both: kohya at DIR/<name>.safetensors and diffusers at DIR/<name>.diffusers.safetensors.
    `folder` replaces DIR (a checkpoint's folder) and `suffix` goes after the name ("-step00000100",
    "-000002" for an epoch). `epoch` (counted from 1) and `num_epochs` go to ss_epoch/ss_num_epochs.
    `words` (embedding.token's trained vectors): also DIR/embeddings/<token><suffix>.safetensors, and
    in the kohya file with embedding.bundle; not among the returned paths.
    """
    out_dir = Path(folder) if folder is not None else Path(cfg.output.dir)
    states = adapter_states(unet, text_encoder, text_encoder_2)
    metadata = _metadata(cfg, examples, step, max_steps, started_at, prediction_type, variant, epoch, num_epochs)
    dtype = SAVE_DTYPES[cfg.output.dtype]
    alpha = cfg.lora_alpha
    if cfg.lora.conv_rank or blocks_in_use(cfg.lora):  # 3x3 convs or blocks with their own alpha: per module
        alpha = {name: cfg.lora_alpha for name in states}
        alpha["unet"] = layer_alphas(unet)
    fmt = cfg.output.format
    layouts = {"kohya": ["kohya"], "diffusers": ["diffusers"], "both": ["kohya", "diffusers"]}[fmt]
    if not states:  # no LoRA (an embedding alone: textual inversion): the embedding file only
        layouts = []
    bundle = {}
    if words is not None:
        save_embedding(out_dir, words.token, words.fixed(), dtype, suffix, _embedding_metadata(metadata, words))
        bundle = bundle_tensors(words.token, words.fixed(), dtype) if cfg.embedding.bundle else {}
    paths = []
    for layout in layouts:
        tail = ".diffusers" if (fmt == "both" and layout == "diffusers") else ""
        path = out_dir / f"{cfg.output.name}{suffix}{tail}.safetensors"
        if cfg.lora.type != "lora":  # LoHa/LoKr: the kohya layout only (config checks)
            modules = {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
            alphas = {name: lycoris_alphas(modules[name]) for name in states}
            save_lycoris_adapter(path, states, alphas, metadata, dtype, base=variant, extra_tensors=bundle)
        else:
            save_adapter(path, states, cfg.lora.rank, alpha, layout=layout, metadata=metadata, dtype=dtype,
                         base=variant, extra_tensors=bundle if layout == "kohya" else None)
        log.info("saved %s adapter: %s", layout, path)
        paths.append(path)
    return paths


def _embedding_metadata(metadata: dict[str, str], words) -> dict[str, str]:
    """The standalone embedding's header: what it is and what trained it (a few of the adapter's keys)."""
    keep = ("ss_base_model_version", "ss_sd_model_name", "ss_steps", "ss_epoch", "ss_output_name",
            "ss_training_started_at", "ss_training_finished_at", "ss_clip_skip", "ss_caption_templates")
    return {"format": "pt", "token": words.token, "vectors": str(next(iter(words.vectors.values())).shape[0]),
            **{k: metadata[k] for k in keep if k in metadata}}


def sampling_pipeline(base, unet=None, text_encoder=None, text_encoder_2=None, sampler: str | None = None):
    """A txt2img pipeline over the in-memory (adapted, or the base's own) modules: no copy, no reload.
    Its scheduler is a new one on the base's config (the training schedule is never stepped): infer.py's
    `sampler` (sample.scheduler), or DPM++ 2M when None."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    from ..inference.schedulers import make_scheduler

    unet = unet if unet is not None else base.unet
    text_encoder = text_encoder if text_encoder is not None else base.text_encoder
    config = base.noise_scheduler.config
    scheduler = make_scheduler(sampler, config) if sampler else DPMSolverMultistepScheduler.from_config(config)
    if base.variant == "sdxl":
        return StableDiffusionXLPipeline(
            vae=base.vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2 or base.text_encoder_2,
            tokenizer=base.tokenizer, tokenizer_2=base.tokenizer_2, unet=unet, scheduler=scheduler,
        )
    return StableDiffusionPipeline(
        vae=base.vae, text_encoder=text_encoder, tokenizer=base.tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _render(cfg: RunConfig, base, pipe, text: str, seed: int, weight: float = 1.0, own_size: bool = True,
            words=None):
    """One sample image and its A1111 parameters, its prompt read as training reads captions.
    `text` may carry kohya-style options (--n, --w, --h, --d, --l, --s; see sample_prompts.py)
    over the `sample.*` defaults; `own_size=False` keeps the training resolution (grids need
    equal cells). `words`: the run's trained embedding (word tables), read where the prompt names it."""
    from ..pnginfo import GenerationInfo

    s, m, p = cfg.sample, cfg.model, parse_sample_prompt(text)
    negative = s.negative_prompt if p.negative is None else p.negative
    seed = seed if p.seed is None else p.seed
    steps = p.steps or s.steps
    guidance = s.guidance_scale if p.guidance is None else p.guidance
    width = (p.width if own_size else None) or main_side(cfg.data.resolution)
    height = (p.height if own_size else None) or main_side(cfg.data.resolution)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    prompts = pipeline_prompt_embeds(base, pipe, [p.prompt], negative, m.clip_skip, m.max_token_length,
                                     cfg.data.weighted_captions, words)
    with torch.no_grad():
        image = pipe(**prompts, num_inference_steps=steps, guidance_scale=guidance,
                     height=height, width=width, generator=generator).images[0]
    info = GenerationInfo(prompt=p.prompt, negative_prompt=negative, steps=steps, sampler=s.sampler_name,
                          cfg_scale=guidance, seed=seed, width=image.width, height=image.height,
                          clip_skip=m.clip_skip, model_name=Path(m.base).name, **png_vae_fields(m.vae),
                          adapters=[(cfg.output.name, weight, None)])
    return image, info


def save_samples(cfg: RunConfig, base, unet, text_encoder, step: int, text_encoder_2=None,
                 folder_name: str | None = None, words=None) -> list:
    """Render `sample.prompts` with fixed seeds into DIR/samples/step_XXXXX/ (or DIR/samples/
    `folder_name`/: epoch_XXXXXX for epoch samples); return the images."""
    from ..pnginfo import save_png

    pipe = sampling_pipeline(base, unet, text_encoder, text_encoder_2, cfg.sample.scheduler)
    pipe.set_progress_bar_config(disable=True)
    was_training = unet.training
    unet.eval()
    folder = Path(cfg.output.dir) / "samples" / (folder_name or f"step_{step:05d}")
    images = []
    for i, prompt in enumerate(cfg.sample.prompts):
        image, info = _render(cfg, base, pipe, prompt, cfg.sample.seed + i, words=words)
        save_png(image, folder / f"{i:02d}.png", info)
        images.append(image)
    if was_training:
        unet.train()
    return images


def _lora_layers(modules):
    """The adapted layers (LoRA, or LoHa/LoKr: peft scales each type's ΔW by its `scaling`)."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lycoris_utils import LycorisLayer

    return [m for module in modules if module is not None for m in module.modules()
            if isinstance(m, (LoraLayer, LycorisLayer))]


def save_sweep(cfg: RunConfig, base, unet, text_encoder, text_encoder_2=None, words=None) -> Path:
    """samples/sweep.png: sample.prompts (rows) × sample.grid_weights (columns), same seed along a
    row, drawn with the in-memory adapter scaled by each weight (peft's `scaling` multiplied, then
    restored), with the `Sweep: "<name>: 0,0.5,1"` parameter that inference sweeps also write."""
    from ..imagegrid import labelled_grid
    from ..pnginfo import save_png

    s, name = cfg.sample, cfg.output.name
    layers = _lora_layers([unet, text_encoder, text_encoder_2])
    saved = [dict(layer.scaling) for layer in layers]
    pipe = sampling_pipeline(base, unet, text_encoder, text_encoder_2, cfg.sample.scheduler)
    pipe.set_progress_bar_config(disable=True)
    was_training = unet.training
    unet.eval()
    rows, first = [], None
    try:
        for i, prompt in enumerate(s.prompts):
            row = []
            for weight in s.grid_weights:
                for layer, scaling in zip(layers, saved):
                    layer.scaling.update({k: v * weight for k, v in scaling.items()})
                image, info = _render(cfg, base, pipe, prompt, s.seed + i, weight, own_size=False, words=words)
                row.append(image)
                first = first or info
            rows.append(row)
    finally:
        for layer, scaling in zip(layers, saved):
            layer.scaling.update(scaling)
        if was_training:
            unet.train()
    grid = labelled_grid(rows, [parse_sample_prompt(p).prompt for p in s.prompts],
                         [f"{name}: {w:g}" for w in s.grid_weights])
    first.extra["Sweep"] = f"{name}: {','.join(f'{w:g}' for w in s.grid_weights)}"
    return save_png(grid.image, Path(cfg.output.dir) / "samples" / "sweep.png", first)
