"""Minimal inference: a base model plus LoRA adapters at given weights, txt2img to PNG files."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ConfigError, ModelError
from ..pnginfo import GenerationInfo, save_png

# A1111's names for diffusers' schedulers, so PNG info reads as users expect.
SAMPLER_NAMES = {"DPMSolverMultistepScheduler": "DPM++ 2M", "EulerDiscreteScheduler": "Euler",
                 "EulerAncestralDiscreteScheduler": "Euler a", "DDIMScheduler": "DDIM", "PNDMScheduler": "PLMS"}

log = logging.getLogger(__name__)


@dataclass
class AdapterSpec:
    path: Path
    weight: float = 1.0


def parse_adapter_spec(spec: str) -> AdapterSpec:
    """'FILE' or 'FILE:WEIGHT' (the weight is the part after the last colon, when it is a number)."""
    path, sep, weight = spec.rpartition(":")
    if sep and path:
        try:
            return AdapterSpec(Path(path), float(weight))
        except ValueError:
            pass
    return AdapterSpec(Path(spec), 1.0)


@dataclass
class GenerateOptions:
    prompt: str
    negative_prompt: str = ""
    steps: int = 25
    guidance_scale: float = 7.5
    seed: int = 0
    num_images: int = 1
    width: int | None = None
    height: int | None = None
    adapters: list[AdapterSpec] = field(default_factory=list)


@contextlib.contextmanager
def _quiet_diffusers():
    from diffusers.utils import logging as dlog

    before = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        yield
    finally:
        dlog.set_verbosity(before)


def load_pipeline(base: str, adapters: list[AdapterSpec], dtype: torch.dtype = torch.float32):
    """The base pipeline with each adapter loaded under its own name and set to its weight."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    if not Path(base).exists() and base.count("/") != 1:
        raise ModelError(f"--model: {base!r} is neither a folder nor a hub id like 'runwayml/stable-diffusion-v1-5'")
    try:
        pipe = StableDiffusionPipeline.from_pretrained(base, torch_dtype=dtype, safety_checker=None,
                                                       requires_safety_checker=False)
    except (OSError, ValueError) as exc:
        raise ModelError(f"--model: cannot load {base!r}: {str(exc).strip().splitlines()[0]}") from None
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    names, weights = [], []
    for i, spec in enumerate(adapters):
        if not spec.path.is_file():
            raise ConfigError(f"--lora: {spec.path}: file not found")
        name = f"lora{i}"
        try:
            with _quiet_diffusers():  # it warns when a file has no text-encoder part: normal for ours
                pipe.load_lora_weights(str(spec.path), adapter_name=name)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise ModelError(f"--lora: {spec.path}: cannot load as a LoRA adapter ({str(exc).strip().splitlines()[0]})") from None
        names.append(name)
        weights.append(spec.weight)
    if names:
        pipe.set_adapters(names, adapter_weights=weights)
    return pipe


def generate(pipe, opts: GenerateOptions, out_dir: str | Path) -> list[Path]:
    """Render `opts.num_images` images with seeds seed, seed+1, ...; write OUT/NNNNN-SEED.png."""
    out_dir = Path(out_dir)
    pipe.set_progress_bar_config(disable=True)
    paths = []
    for k in range(opts.num_images):
        seed = opts.seed + k
        generator = torch.Generator(device="cpu").manual_seed(seed)
        with torch.no_grad():
            image = pipe(opts.prompt, negative_prompt=opts.negative_prompt or None,
                         num_inference_steps=opts.steps, guidance_scale=opts.guidance_scale,
                         width=opts.width, height=opts.height, generator=generator).images[0]
        info = GenerationInfo(
            prompt=opts.prompt, negative_prompt=opts.negative_prompt, steps=opts.steps,
            sampler=SAMPLER_NAMES.get(type(pipe.scheduler).__name__, type(pipe.scheduler).__name__),
            cfg_scale=opts.guidance_scale, seed=seed, width=image.width, height=image.height,
            model_name=Path(str(pipe.name_or_path)).name or None,
            adapters=[(spec.path.stem, spec.weight, None) for spec in opts.adapters],
        )
        paths.append(save_png(image, out_dir / f"{k:05d}-{seed}.png", info))
    return paths
