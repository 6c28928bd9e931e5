"""The run config: one typed object built from YAML plus `key=value` overrides, validated once.

Every field is declared here with its default and a comment; validation reports every bad key or
value (name, value, what is allowed) before anything heavy happens.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from .config_checks import (  # noqa: F401 (re-exported)
    MAX_TIMESTEPS, bucket_limit_errors, check_caption_config, check_run, config_warnings, normalize_caption_extension,
)
from .config_data import (  # noqa: F401 (re-exported)
    DEFAULT_CAPTION_MODELS, CaptionConfig, DataConfig, caption_model, describe_sides, main_side, resolution_sides,
)
from .config_embedding import EmbeddingConfig, check_embedding
from .config_parse import UniqueKeyLoader, build_dataclass, merge_dicts, parse_overrides  # noqa: F401 (re-exported)
from .config_sample import SampleConfig, check_sample  # noqa: F401 (re-exported)
from .config_subsets import (  # noqa: F401 (re-exported)
    SubsetConfig, dataset_root, normalize_subset_extensions, resolve_subsets, subset_label, trained_sides,
)
from .errors import ConfigError

log = logging.getLogger(__name__)

_DOTTED_KEY = re.compile(r"\b(?:model|data|dreambooth|lora|embedding|train|sample|output|log)(?:\.[a-z_0-9]+)+")

DEFAULT_UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
DEFAULT_TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@dataclass
class ModelConfig:
    base: str = ""  # hub id, diffusers folder, or single-file .safetensors checkpoint
    variant: Literal["auto", "sd15", "sdxl"] = "auto"  # auto: detected from the model
    revision: Optional[str] = None  # hub revision (branch, tag or commit)
    # dtype of the frozen weights; auto follows train.mixed_precision (fp32 when "no")
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    # single-file bases only: a diffusers folder whose configs (and tokenizers) describe the
    # checkpoint; None uses the SD1.5/SDXL configs shipped in lora_trainer/models/configs/
    config_dir: Optional[str] = None
    # A VAE to use instead of the base's own (kohya's --vae), for the latents trained on and the
    # sample and class images drawn: a diffusers VAE folder, a diffusers model folder (its vae/), a
    # hub id of either, or a .safetensors VAE in the original layout (A1111's models/VAE files, e.g.
    # vae-ft-mse-840000-ema-pruned.safetensors; read with the base's VAE config). It must fit the
    # base (latent channels, scaling); written to the adapter's metadata (ss_vae_name, ss_vae_hash)
    vae: Optional[str] = None
    # How the text encoder(s) read captions, samples and class prompts (kohya's --clip_skip and
    # --max_token_length); written to the adapter's metadata (ss_clip_skip, ss_max_token_length).
    # clip_skip, A1111 numbering: 1 = the model's own layer; 2 = the penultimate layer through the
    # final LayerNorm on SD1.x (what anime bases are trained and used with); SDXL, whose default
    # is already the penultimate layer, reads clip_skip - 1 layers further back.
    clip_skip: int = 1
    # Caption tokens read: 75 is CLIP's window; 150/225 split longer captions into 2/3 windows of
    # 75 as A1111 does (breaking after a comma near a window's end), each [BOS] 75 [EOS], their
    # hidden states concatenated; every caption gets all the windows (short ones padded with empty
    # windows). Captions are literal text: `(word:1.2)` and BREAK are not weight syntax here.
    max_token_length: Literal[75, 150, 225] = 75


@dataclass
class DreamboothConfig:
    instance_prompt: Optional[str] = None  # when set, every instance image uses this caption
    # prior preservation: images of the class ("a photo of a dog") keep the model's idea of it
    class_prompt: Optional[str] = None  # caption of the class images, and the prompt that generates them
    class_data: Optional[str] = None  # folder of class images; missing ones are generated into it
    num_class_images: int = 0  # how many class images to train with (generated up to this count)
    prior_loss_weight: float = 1.0  # loss = instance loss + weight · class loss
    class_batch_size: int = 4  # images generated per pipeline call
    class_steps: int = 30  # sampling steps per generated class image


@dataclass
class BlockLrWeights:
    """kohya's block-wise learning rates (--network_args down_lr_weight / mid_lr_weight / up_lr_weight):
    the UNet adapter's lr × the weight of each module's block. down and up: a list (12 values on SD1.x,
    input blocks shallow -> deep, output blocks deep -> shallow; 9 on SDXL), "1,1,0.5,...", or a preset
    sine, cosine, linear, reverse_linear, zeros with an optional +offset ("cosine+0.5"); mid: a list
    (1 value on SD1.x, 3 on SDXL) or one number. null: 1 for those blocks. Text encoders are unaffected.
    A list of another count is fitted as kohya fits it (cut, or filled with 1.0), with a warning."""

    down: Optional[Union[list[float], str]] = None
    mid: Optional[Union[list[float], str]] = None
    up: Optional[Union[list[float], str]] = None


@dataclass
class LoraConfig:
    # The adapter type (README: LoHa and LoKr): lora (B·A); or LyCORIS' loha (Hadamard product of two
    # low-rank pairs, (w1_a·w1_b) ⊙ (w2_a·w2_b)) or lokr (Kronecker product kron(w1, w2), w2 low-rank
    # when rank is small against its size), both at rank/alpha on the same target layers, written as
    # kohya's `--network_module lycoris.kohya --network_args algo=...` files (kohya layout only)
    type: Literal["lora", "loha", "lokr"] = "lora"
    # lokr only (LyCORIS' `factor`): w1's side (each dimension d is split as f × d/f); -1: near √d
    lokr_factor: int = -1
    rank: int = 4  # r: the inner dimension of B·A
    alpha: Optional[float] = None  # scale is alpha / rank; None means alpha = rank (scale 1)
    dropout: float = 0.0  # peft's lora_dropout: each element of the adapter's input x is dropped
    # kohya's dropouts (sd-scripts networks/lora.py; README: LoRA dropout), training only, masks per sample:
    # neuron_dropout (kohya's --network_dropout): each element of the down projection's output A·x, the
    # rest ×1/(1-p); rank_dropout: whole rank channels of A·x for a sample, the scale ×1/(1-p);
    # module_dropout: a sample skips a layer's adapter (the layer gives W·x). 0: off
    neuron_dropout: float = 0.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    unet_targets: list[str] = field(default_factory=lambda: list(DEFAULT_UNET_TARGETS))
    text_encoder_targets: list[str] = field(default_factory=lambda: list(DEFAULT_TEXT_ENCODER_TARGETS))
    train_text_encoder: bool = False
    # false (with train_text_encoder true): text-encoder-only training (kohya's --network_train_text_encoder_only);
    # the UNet stays frozen without an adapter, the loss flows through it, the file holds lora_te* keys only
    train_unet: bool = True
    init_from: Optional[str] = None  # start from this adapter file (kohya or diffusers layout; same rank)
    # DoRA (weight-decomposed LoRA): also learn a magnitude per output channel,
    # W' = m · (W + s·B·A) / ‖W + s·B·A‖ (row norms); files gain `dora_scale` / `lora_magnitude_vector`
    use_dora: bool = False
    # LoCon (kohya's --network_args conv_dim=R conv_alpha=A): > 0 also adapts the UNet's ResNet
    # blocks and down/up-samplers as kohya does: their 3x3 convs (resnet conv1/conv2, sampler conv) at
    # this rank, each resnet's time_emb_proj and 1x1 conv_shortcut at lora.rank; 0: off
    conv_rank: int = 0
    conv_alpha: Optional[float] = None  # scale of the 3x3 convs is conv_alpha / conv_rank; None: = conv_rank
    # Block-wise training (kohya's networks.lora block args; README: Block-wise learning rates and ranks).
    # A block whose lr weight is at most block_lr_zero_threshold is left out of the adapter (not
    # trained, not in the file), as kohya does
    block_lr_weights: BlockLrWeights = field(default_factory=BlockLrWeights)
    block_lr_zero_threshold: float = 0.0
    # Per-block rank and alpha (kohya's block_dims / block_alphas): 25 values on SD1.x (12 input, 1
    # middle, 12 output blocks), 23 on SDXL (embeddings, 9 input, 3 middle, 9 output, out); rank 0
    # leaves the block out. null: lora.rank / lora.alpha everywhere
    block_ranks: Optional[list[int]] = None
    block_alphas: Optional[list[float]] = None
    # The same for LoCon's 3x3 convs (kohya's conv_block_dims / conv_block_alphas); null: lora.conv_rank /
    # conv_alpha everywhere; conv_block_alphas null with conv_alpha null: each block's alpha = its rank
    conv_block_ranks: Optional[list[int]] = None
    conv_block_alphas: Optional[list[float]] = None


@dataclass
class TrainConfig:
    max_steps: Optional[int] = None  # optimizer steps; wins over epochs when both are set
    epochs: Optional[int] = None
    batch_size: int = 1
    grad_accum: int = 1
    lr: float = 1e-4  # UNet adapter learning rate
    text_encoder_lr: Optional[float] = None  # None: same as lr
    # adamw8bit needs bitsandbytes and CUDA; prodigy needs prodigyopt (use lr 1.0); adafactor is
    # the transformers one with a fixed lr; lion needs lion-pytorch (pip install 'lora-trainer[lion]')
    # and an lr 3-10x smaller than AdamW's; its betas are adam_beta1/adam_beta2 (the Lion paper's
    # are 0.9, 0.99) and its weight decay weight_decay; lion8bit is bitsandbytes' Lion (CUDA only)
    optimizer: Literal["adamw", "adamw8bit", "prodigy", "adafactor", "lion", "lion8bit"] = "adamw"
    weight_decay: float = 1e-2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0  # 0 disables clipping
    scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = "constant"
    warmup: int = 0  # warmup steps
    # Schedule options (kohya's --lr_scheduler_num_cycles, --lr_scheduler_power,
    # --lr_scheduler_min_lr_ratio). cosine_with_restarts: this many cosine cycles, each from lr
    # down to 0, over the steps after warmup
    scheduler_cycles: int = 1
    scheduler_power: float = 1.0  # polynomial: the decay's exponent (1: linear; 2: falls fast, then slowly)
    # cosine: the lr after warmup never goes below min_lr_ratio × lr (kohya's cosine_with_min_lr);
    # 0: down to 0
    min_lr_ratio: float = 0.0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    seed: int = 42
    # cache VAE latents (and frozen text embeddings) the first time each image is seen
    cache_latents: bool = True
    cache_latents_to_disk: bool = False  # keep the latent cache between runs (keyed by file content + crop)
    cache_dir: Optional[str] = None  # where the disk cache lives; None: <data.path>/.cache/lora-trainer
    noise_offset: float = 0.0
    # kohya's --noise_offset_random_strength: each item's offset strength uniform in [0, noise_offset)
    noise_offset_random_strength: bool = False
    # kohya's --adaptive_noise_scale: offset noise_offset + this × |latent channel mean|, clamped at 0; null: off
    adaptive_noise_scale: Optional[float] = None
    snr_gamma: Optional[float] = None  # min-SNR-γ loss weighting (5.0 is the paper's value); null: off
    # extra noise on the model input only (0.1 in the paper; kohya's ip_noise_gamma); 0: off
    input_perturbation: float = 0.0
    # kohya's --ip_noise_gamma_random_strength: each item's strength uniform in [0, input_perturbation)
    input_perturbation_random_strength: bool = False
    # The per-element loss (kohya's --loss_type): l2 (mean squared error), l1, or the robust huber /
    # smooth_l1, which grow like l2 for errors below a threshold c and like l1 above it
    loss_type: Literal["l2", "l1", "huber", "smooth_l1"] = "l2"
    huber_c: float = 0.1  # huber/smooth_l1: the threshold c (constant), or its value at the last timestep
    # how c depends on the timestep t: constant (huber_c · huber_scale); exponential (huber_scale at
    # t = 0 down to huber_c · huber_scale at the end); snr (about 1 where the latent is clean, falling
    # to huber_c as the noise grows: (1 - huber_c) / (1 + σ_t)² + huber_c; kohya's default)
    huber_schedule: Literal["constant", "exponential", "snr"] = "snr"
    huber_scale: float = 1.0  # multiplies c in the constant and exponential schedules
    # Timesteps are drawn uniformly from [min_timestep, max_timestep); max null: the scheduler's
    # num_train_timesteps (1000). The validation loss spreads its fixed timesteps over the same range
    min_timestep: int = 0
    max_timestep: Optional[int] = None
    # Rescale the training noise schedule so the last timestep is pure noise (SNR 0; Lin et al. 2023);
    # meant for v-prediction bases. Samples and class images keep the base's own schedule
    zero_terminal_snr: bool = False
    # Weight each sample's loss by 1/sqrt(SNR_t) (kohya's --debiased_estimation_loss; SNR clamped to
    # [0.001, 1000]); combines with snr_gamma by multiplication
    debiased_estimation: bool = False
    # epsilon bases, kohya's --v_pred_like_loss: loss · (1 + this · (SNR + 1) / SNR), SNR in [0.001, 1000]; null: off
    v_pred_like_loss: Optional[float] = None
    # v-prediction bases, kohya's --scale_v_pred_loss_like_noise_pred: each loss × SNR / (SNR + 1)
    scale_v_pred_loss_like_noise_pred: bool = False
    # Multi-resolution ("pyramid") noise: the noise plus upsampled noise drawn at lower resolutions,
    # the i-th level weighted by multires_noise_discount^i, renormalised to unit std; 0: off (6-10 usual)
    multires_noise_iterations: int = 0
    multires_noise_discount: float = 0.3
    # LoRA+ (kohya's loraplus_lr_ratio network arg): the up factors B (peft lora_B, and DoRA's
    # magnitudes, as peft's LoRA+ optimizer groups them) train at lr × ratio, the down factors A at lr.
    # The paper suggests 16 (lower lr a little); null: off. The unet/text encoder keys win over it.
    loraplus_lr_ratio: Optional[float] = None
    loraplus_unet_lr_ratio: Optional[float] = None
    loraplus_text_encoder_lr_ratio: Optional[float] = None
    # Max-norm regularisation (kohya's --scale_weight_norms): after each update, a module whose
    # ΔW = (alpha/r)·B·A has a Frobenius norm above this is scaled back to it (B and A each by
    # sqrt(limit / norm)); 1.0 is kohya's suggested start; null: off
    scale_weight_norms: Optional[float] = None
    # EMA of the adapter weights (SimpleTuner's --use_ema/--ema_decay, ai-toolkit's ema_config, the
    # diffusers scripts' --use_ema; README: EMA): after each optimizer step ema <- d·ema + (1 - d)·weights,
    # in fp32. The adapter files, samples and validation loss use the EMA; training continues from the
    # trained weights. In [0, 1): 0.99 for a few hundred steps, 0.999 for a few thousand; null: off
    ema_decay: Optional[float] = None
    # the diffusers scripts' warm-up: the t-th update (t from 0) uses d = min(ema_decay, (1 + t) / (10 + t)),
    # the first copies the weights, so the untrained start fades at once; false: d = ema_decay from the
    # first update, which averages the initial adapter in
    ema_warmup: bool = True
    # where the fp32 copy lives: accelerator (the training device: fastest) or cpu (keeps the
    # accelerator's memory free; each step then copies the adapter to the CPU)
    ema_device: Literal["accelerator", "cpu"] = "accelerator"
    log_every_n_steps: int = 1
    # With held-out images (data.validation_split or data.validation_path): the validation loss at
    # step 0, every n steps and at the end. null: about 10 times a run (every ceil(steps / 10));
    # 0: at step 0 and the end only
    validate_every_n_steps: Optional[int] = None
    validation_timesteps: int = 8  # each held-out image is scored at this many evenly spaced timesteps
    # continue a stopped run: "latest" (the newest complete checkpoint in output.dir/checkpoints;
    # starts fresh when there is none yet; a run that already finished at this length does nothing,
    # a longer one trains on) or the path of a checkpoint folder; null: a new run
    resume: Optional[str] = None


@dataclass
class OutputConfig:
    dir: str = "outputs/run"
    name: str = "lora"  # the adapter is DIR/<name>.safetensors
    format: Literal["kohya", "diffusers", "both"] = "kohya"
    # a checkpoint (full training state + that step's adapter) every n steps; 0: only the final adapter
    save_every_n_steps: int = 0
    keep_checkpoints: int = 3  # newest checkpoints kept; 0 keeps all
    # also keep each of those checkpoints' adapter as DIR/<name>-step<step:08d>.safetensors (kohya's
    # --save_every_n_steps naming; format both adds <name>-step<step:08d>.diffusers.safetensors),
    # which stays when its checkpoint rotates out; adapter files only
    save_step_adapters: bool = False
    save_last_n_step_adapters: int = 0  # newest step files kept (older ones removed); 0 keeps all
    # the adapter at the end of every n-th epoch (not the last: that is the final adapter) as
    # DIR/<name>-<epoch:06d>.safetensors (kohya's naming; with format both, the diffusers layout is
    # <name>-<epoch:06d>.diffusers.safetensors); adapter files only, no training state; 0: off
    save_every_n_epochs: int = 0
    save_last_n_epochs: int = 0  # newest epoch files kept (older ones removed); 0 keeps all
    overwrite: bool = False  # allow a new run in a folder that holds another run (its old artefacts are removed)
    dtype: Literal["fp16", "bf16", "fp32"] = "fp16"  # precision of the saved adapter


@dataclass
class LogConfig:
    tensorboard: bool = False
    wandb: bool = False
    project: str = "lora-trainer"


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    dreambooth: DreamboothConfig = field(default_factory=DreamboothConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)  # pivotal tuning (config_embedding.py)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)  # samples while training (config_sample.py)
    output: OutputConfig = field(default_factory=OutputConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def lora_alpha(self) -> float:
        return float(self.lora.alpha if self.lora.alpha is not None else self.lora.rank)

    @property
    def conv_alpha(self) -> float:
        return float(self.lora.conv_alpha if self.lora.conv_alpha is not None else self.lora.conv_rank)

    @property
    def prior_preservation(self) -> bool:
        return self.dreambooth.num_class_images > 0

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        # a subset's null keys take data.*'s values: written out, they would only hide the keys it sets
        out["data"]["subsets"] = [{k: v for k, v in s.items() if v is not None} for s in out["data"]["subsets"]]
        return out


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Build and validate a RunConfig; raise ConfigError listing every problem, one per line."""
    errors: list[str] = []
    cfg = build_dataclass(RunConfig, data, "", errors)
    if not errors:
        try:
            cfg.data.caption_extension = normalize_caption_extension(cfg.data.caption_extension)
        except ConfigError as exc:
            errors.append(str(exc))
        normalize_subset_extensions(cfg.data, errors)
        check_run(cfg, errors)
        check_sample(cfg.sample, errors)
        check_embedding(cfg, errors)
    if errors:
        raise ConfigError("\n".join(errors))
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | None = None, warn: bool = True) -> RunConfig:
    """Read a YAML config (or start from defaults when `path` is None) and apply overrides; `warn`
    logs the options set that the run will not read (off where a finished run's config is re-read)."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            data = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections (model, data, lora, train, ...)")
    data = merge_dicts(data, parse_overrides(overrides or []))
    # Each problem names where its key was set: the file, or a key=value on the command line. A
    # problem between two keys (train.warmup with train.scheduler) that an override of the other key
    # caused names that override beside the file, which holds the first.
    given = {item.split("=", 1)[0].strip(): item.strip() for item in overrides or []}

    def overridden(key: str) -> list[str]:
        return [item for k, item in given.items() if k == key or k.startswith(key + ".") or key.startswith(k + ".")]

    def source(line: str) -> str:
        key = line.split(":", 1)[0]
        if path is None or any(k == key or k.startswith(key + ".") for k in given):
            return "command line"
        others = [item for named in _DOTTED_KEY.findall(line.split(":", 1)[-1]) for item in overridden(named)]
        return f"{path} with the command line override {', '.join(dict.fromkeys(others))}" if others else str(path)

    try:
        cfg = config_from_dict(data)
    except ConfigError as exc:
        if path is None:
            raise
        lines = [f"{source(line)}: {line}" for line in str(exc).splitlines()]
        raise ConfigError("\n".join(lines)) from None
    for line in config_warnings(cfg) if warn else []:
        log.warning("%s: %s", source(line), line)
    return cfg


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML, loadable again with load_config."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
