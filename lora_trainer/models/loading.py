"""Base-model loading: a hub id, a diffusers folder or a single-file checkpoint, its variant
(SD1.x or SDXL) detected, the frozen components in one place."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from ..config import ModelConfig
from ..errors import ModelError, first_line, looked_in
from ..hubcheck import check_hub_model

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}
NATIVE_RESOLUTION = {"sd15": 512, "sdxl": 1024}
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


@dataclass
class BaseModel:
    """The frozen pieces of a Stable Diffusion pipeline the trainer needs.

    SDXL has a second tokenizer/text encoder (OpenCLIP bigG with projection); SD1.x leaves them None.
    """

    variant: str
    source: str
    tokenizer: Any
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: Any  # DDPMScheduler built from the base's scheduler config
    tokenizer_2: Any = None
    text_encoder_2: Optional[torch.nn.Module] = None

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [m for m in (self.text_encoder, self.text_encoder_2) if m is not None]


def weight_dtype_for(model_cfg: ModelConfig, mixed_precision: str) -> torch.dtype:
    """Frozen weights live in the compute dtype: bf16/fp16 under mixed precision, fp32 otherwise."""
    dtype = DTYPES[model_cfg.dtype] if model_cfg.dtype != "auto" else DTYPES[mixed_precision]
    if dtype == torch.bfloat16 and not torch.cuda.is_available() and not cpu_has_fast_bf16():
        log.warning("bf16 on this CPU (%s, no AVX512-BF16/AMX) is emulated and runs many times slower than "
                    "fp32; on this machine use train.mixed_precision=no", torch.backends.cpu.get_cpu_capability())
    return dtype


def cpu_has_fast_bf16() -> bool:
    """Whether the CPU multiplies bf16 natively (AVX512-BF16 or AMX), which makes bf16 a speed-up."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:
        return False


def is_single_file(base: str) -> bool:
    return Path(base).suffix.lower() in SINGLE_FILE_SUFFIXES


def _hub_index(base: str, revision: Optional[str]) -> Optional[Path]:
    """The hub repo's model_index.json (a few hundred bytes, from the cache when it is there)."""
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(base, "model_index.json", revision=revision))
    except Exception:  # offline or unknown repo: loading the model will say what is wrong
        return None


def detect_variant(base: str, revision: Optional[str] = None) -> str:
    """'sd15' or 'sdxl': from the pipeline's model_index.json (a folder's, or a hub repo's) or a
    single file's tensor names. Unreadable hub ids count as SD1.x; the UNet check in load_base
    catches a wrong guess."""
    if is_single_file(base):
        from .single_file import detect_single_file_variant

        return detect_single_file_variant(base)
    index = Path(base).expanduser() / "model_index.json"
    if not index.is_file() and not Path(base).expanduser().exists():
        index = _hub_index(base, revision) or index
    if not index.is_file():
        return "sd15"
    try:
        info = json.loads(index.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{index}: cannot read ({exc}); is this a diffusers pipeline folder?") from None
    if "text_encoder_2" in info or "XL" in str(info.get("_class_name", "")):
        return "sdxl"
    return "sd15"


def resolve_variant(model_cfg: ModelConfig) -> str:
    """`model.variant` when set, else what the base says it is; checks the source (and model.vae)
    exists first."""
    check_source(model_cfg.base)
    if model_cfg.vae:
        from .vae import check_vae_source

        check_vae_source(model_cfg.vae)
    return model_cfg.variant if model_cfg.variant != "auto" else detect_variant(model_cfg.base, model_cfg.revision)


# What a hub id looks like for each flag that takes a model (the base is the default).
_HUB_EXAMPLES = {"--controlnet": "lllyasviel/sd-controlnet-canny",
                 "--refiner": "stabilityai/stable-diffusion-xl-refiner-1.0"}


def check_source(base: str, key: str = "model.base", single_file_ok: bool = True,
                 index_file: str = "model_index.json") -> None:
    """One-line errors for a model reference that cannot load, before anything is read: a missing
    file or folder, a folder without `index_file`, a pickle checkpoint, a malformed hub id."""
    path = Path(base).expanduser()
    if is_single_file(base):
        if not single_file_ok:
            raise ModelError(f"{key}: {base!r} is a single-file checkpoint; {key} takes a diffusers folder or a hub id")
        if not path.is_file():
            raise ModelError(f"{key}: {base!r} does not exist{looked_in(base)}; "
                             "give a .safetensors checkpoint that does")
        if path.suffix.lower() == ".ckpt":
            raise ModelError(f"{key}: {base!r} is a pickle .ckpt, which can run code when loaded; "
                             "use the .safetensors version of the checkpoint")
        return
    if path.exists() and not (path / index_file).is_file():
        # the commonest mix-up: a whole pipeline where one model goes (a ControlNet), or the reverse
        other = {"model_index.json": "config.json", "config.json": "model_index.json"}.get(index_file)
        if other and (path / other).is_file():
            what = ("a whole pipeline's folder (model_index.json), not a single model's"
                    if other == "model_index.json" else "a single model's folder (config.json), not a whole pipeline's")
            raise ModelError(f"{key}: {base!r} is {what}; point it at a diffusers folder with {index_file}")
        raise ModelError(f"{key}: {base!r} is a folder without {index_file}; point it at a diffusers folder")
    if not path.exists() and (base.startswith((".", "/", "~")) or base.count("/") != 1):
        example = _HUB_EXAMPLES.get(key, "runwayml/stable-diffusion-v1-5")
        raise ModelError(f"{key}: {base!r} does not exist{looked_in(base)} and is not a hub id like '{example}'")
    if not path.exists():
        try:
            check_hub_model(base, key, index_file)
        except ModelError as err:  # "owner/name" may as well be a folder given from another working folder
            raise ModelError(f"{err}; nor is it a folder{looked_in(base)}") from None


def diffusers_dtype(dtype: torch.dtype) -> dict:
    """The dtype keyword of diffusers' `from_pretrained`: `dtype` where it has replaced the
    deprecated `torch_dtype` (0.42 warns on every load otherwise), `torch_dtype` before."""
    from diffusers.utils import deprecation_utils

    return {"dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype": dtype}


def transformers_dtype(dtype: torch.dtype) -> dict:
    """The same for transformers, which took `dtype` in 4.56."""
    import transformers
    from packaging.version import Version

    return {"dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype": dtype}


def _load_components(base: str, variant: str, weight_dtype: torch.dtype, revision: Optional[str]) -> dict:
    """The pipeline's components from a diffusers folder or hub id, loaded one by one (no
    safety checker, no feature extractor)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    kw = dict(revision=revision)
    clip_dtype, unet_dtype = transformers_dtype(weight_dtype), diffusers_dtype(weight_dtype)
    parts = {
        "tokenizer": CLIPTokenizer.from_pretrained(base, subfolder="tokenizer", **kw),
        "text_encoder": CLIPTextModel.from_pretrained(base, subfolder="text_encoder", **clip_dtype, **kw),
        "vae": AutoencoderKL.from_pretrained(base, subfolder="vae", **unet_dtype, **kw),
        "unet": UNet2DConditionModel.from_pretrained(base, subfolder="unet", **unet_dtype, **kw),
    }
    if variant == "sdxl":
        parts["tokenizer_2"] = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer_2", **kw)
        parts["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(
            base, subfolder="text_encoder_2", **clip_dtype, **kw)
    return parts


def load_base(model_cfg: ModelConfig, weight_dtype: torch.dtype) -> BaseModel:
    """Load tokenizer(s), text encoder(s), VAE, UNet (frozen, in `weight_dtype`) and the noise schedule."""
    from diffusers import DDPMScheduler

    base = model_cfg.base
    variant = resolve_variant(model_cfg)
    try:
        if is_single_file(base):
            from .single_file import load_single_file

            parts, scheduler_config = load_single_file(base, variant, weight_dtype, model_cfg.config_dir)
            noise_scheduler = DDPMScheduler.from_config(scheduler_config)
        else:
            parts = _load_components(base, variant, weight_dtype, model_cfg.revision)
            noise_scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler", revision=model_cfg.revision)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"model.base: cannot load {base!r} as {variant}: {first_line(exc)}") from None
    unet = parts["unet"]
    if variant == "sdxl" and getattr(unet.config, "addition_embed_type", None) != "text_time":
        raise ModelError(f"model.variant: {base!r} has no SDXL UNet (no text_time conditioning); set model.variant=sd15")
    if variant == "sd15" and getattr(unet.config, "addition_embed_type", None) == "text_time":
        raise ModelError(f"model.variant: {base!r} has an SDXL UNet; set model.variant=sdxl")
    vae = parts["vae"]
    if model_cfg.vae:  # instead of the base's, once it is known to fit it
        from .vae import load_vae

        vae = load_vae(model_cfg.vae, vae, weight_dtype)
    if variant == "sdxl" and weight_dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        # SDXL's VAE overflows in fp16 (NaN latents); it stays fp32, as kohya's --no_half_vae does
        # (a VAE whose config says it does not, as the fp16-fix one, stays in fp16).
        vae.to(torch.float32)
    for module in (parts["text_encoder"], parts.get("text_encoder_2"), vae, unet):
        if module is not None:
            module.requires_grad_(False)
            module.eval()
    return BaseModel(variant, base, parts["tokenizer"], parts["text_encoder"], vae, unet, noise_scheduler,
                     parts.get("tokenizer_2"), parts.get("text_encoder_2"))
