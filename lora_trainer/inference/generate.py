"""The Python API the CLI is a thin layer over: a base with stacked adapters, then txt2img,
img2img, inpainting, outpainting, ControlNet and the Hires. fix, each image with its A1111 parameters.

    gen = Generator("runwayml/stable-diffusion-v1-5", loras=["style.safetensors:0.8"],
                    embeddings=["EasyNegative.safetensors"])
    for result in gen.txt2img("a harbour at dawn, (mystyle:1.2)", negative_prompt="EasyNegative", seed=1, batch_size=4):
        result.image.show()
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..errors import ConfigError, ModelError
from ..models.vae import png_vae_fields
from ..pnginfo import GenerationInfo, save_png
from .adapters import AdapterSpec, AdapterStack, adapter_hash, check_adapter_file, parse_adapter_spec
from .block_weights import check_file_count
from .bundled import bundle_owner
from .embeddings import Embedding, check_embeddings_fit, check_words, embedding_hash, load_embeddings, word_tables
from .hires import LANCZOS, check_hires, hires_fix, hires_parameters, hires_strength
from .images import crop_and_resize, extend_canvas, pad_to_multiple, paste_outside_mask, preprocess_control
from .pipelines import (check_clip_skip, check_controlnet_fits, default_device_dtype, encoders_of, job_pipeline,
                        load_base, load_controlnet, load_refiner)
from .prompts import encode_pair
from .schedulers import MAX_STEPS, a1111_name, check_sampler, make_scheduler

__all__ = ["AdapterSpec", "Generated", "Generator", "Request", "parse_adapter_spec"]


@dataclass
class Request:
    """Everything that describes one generation job (defaults as in A1111 where it has them)."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 25
    guidance_scale: float = 7.5
    seed: int = 0
    batch_size: int = 1  # images per pipeline call
    batch_count: int = 1  # calls; image k of the whole run has seed `seed + k`
    width: int | None = None
    height: int | None = None
    sampler: str = "dpm++_2m"
    clip_skip: int = 1  # A1111 numbering: 1 = the last CLIP layer, 2 = the one before
    init_image: Image.Image | None = None  # img2img / inpainting source
    strength: float = 0.75  # how much of the init image is re-noised (0 keeps it, 1 ignores it)
    mask: Image.Image | None = None  # white = repaint
    mask_blur: int = 4  # softens the seam where repainted pixels meet kept ones
    control_image: Image.Image | None = None
    control_scale: float = 1.0
    control_preprocess: str = "none"  # or "canny"
    refiner_start: float = 0.8  # fraction of the steps the base does when a refiner is loaded
    # Hires. fix (txt2img only): the image is upscaled this much (sides rounded to multiples of 8) by
    # hires_upscaler (Lanczos, or an A1111 latent upscaler: "Latent", "Latent (nearest-exact)", ...) and
    # redrawn by img2img at hires_strength (None: 0.5, 0.7 after a latent upscaler), in hires_steps
    # (default: `steps`); hires_scale None: off
    hires_scale: float | None = None
    hires_strength: float | None = None
    hires_steps: int | None = None
    hires_upscaler: str = LANCZOS


@dataclass
class Generated:
    image: Any  # PIL image, or a latent tensor with output_type="latent"
    info: GenerationInfo


def check_request(req: Request) -> None:
    """One-line errors for values no pipeline can use, naming the CLI flag."""
    check_sampler(req.sampler)
    checks = [
        (1 <= req.steps <= MAX_STEPS, "--steps", req.steps, f"1 to {MAX_STEPS} (the noise levels a base knows)"),
        (req.batch_size >= 1, "--batch-size", req.batch_size, "an integer >= 1"),
        (req.batch_count >= 1, "--num-images", req.batch_count, "an integer >= 1"),
        (0 <= req.strength <= 1, "--strength", req.strength, "a number from 0 to 1"),
        (req.clip_skip >= 1, "--clip-skip", req.clip_skip, "1 (no skip) or more"),
        (0 < req.refiner_start < 1, "--refiner-start", req.refiner_start, "a number between 0 and 1"),
        (req.mask_blur >= 0, "--mask-blur", req.mask_blur, "0 (a hard seam) or more pixels"),
    ]
    for size, flag in ((req.width, "--width"), (req.height, "--height")):
        checks.append((size is None or (size > 0 and size % 8 == 0), flag, size, "a positive multiple of 8"))
    for ok, flag, value, allowed in checks:
        if not ok:
            raise ConfigError(f"{flag}: {value!r} is not allowed; give {allowed}")
    if req.init_image is not None and (req.width is None) != (req.height is None):
        given, missing = ("--width", "--height") if req.width is not None else ("--height", "--width")
        raise ConfigError(f"{given} with --init-image needs {missing} too (the init image is resized to both); "
                          "give both, or neither to keep the init image's size")
    if req.mask is not None and req.init_image is None:
        raise ConfigError("--mask needs --init-image (the picture to inpaint)")
    check_hires(req)


class Generator:
    """A base model (SD1.x or SDXL, its VAE replaced by `vae`: a file, folder or hub id) with any number of
    adapters, optional ControlNet and refiner, and textual-inversion embeddings (`embeddings`: "FILE[:TOKEN]"
    strings, Paths or EmbeddingSpecs; `loras`: "FILE[:WEIGHT][:lbw=SPEC]" strings, Paths or AdapterSpecs; either
    may be one file alone). Embeddings bundled in a `loras` file are used as `embeddings` are, while loaded.
    `vae_tiling`: the VAE (the refiner's too) decodes and encodes large images in tiles, to save memory."""

    def __init__(self, model: str | Path, loras=(), *, controlnet: str | Path | None = None,
                 refiner: str | Path | None = None, device: str | None = None, dtype: torch.dtype | None = None,
                 config_dir: str | Path | None = None, embeddings=(), vae: str | Path | None = None,
                 vae_tiling: bool = False):
        self.device, self.dtype = default_device_dtype(device, dtype)
        self.model, vae, config_dir = str(model), vae and str(vae), config_dir and str(config_dir)
        # One file given alone, and Path objects, are what Python callers naturally pass: a bare
        # string would otherwise be read letter by letter ("E: file not found")
        loras = [loras] if isinstance(loras, (str, Path)) else loras
        embeddings = [embeddings] if isinstance(embeddings, (str, Path)) else embeddings
        specs = [parse_adapter_spec(spec) if isinstance(spec, str) else AdapterSpec(spec) if isinstance(spec, Path)
                 else spec for spec in loras]
        for spec in specs:  # a missing file or a pickle is named before minutes of model loading
            check_adapter_file(spec.path)
            check_file_count(spec)  # its block weights' count, for the family its header tells
        self.embeddings = load_embeddings(embeddings)  # the same for embeddings: read and checked now
        self.pipe, self.variant = load_base(self.model, self.device, self.dtype, config_dir=config_dir, vae=vae)
        self.vae_fields = png_vae_fields(vae)  # A1111's VAE and VAE hash
        check_embeddings_fit(self.embeddings, self.pipe, self.variant, self.model)
        # the adapters' bundled embeddings are checked against these and used beside them
        self.adapters = AdapterStack(self.pipe, fixed_embeddings=self.embeddings)
        for spec in specs:
            self.adapters.load(spec)
        self.controlnet_name = Path(str(controlnet)).name if controlnet else None
        self.controlnet = load_controlnet(str(controlnet), self.device, self.dtype) if controlnet else None
        if self.controlnet is not None:
            check_controlnet_fits(self.controlnet, self.pipe, self.variant, str(controlnet))
        self.refiner_name, self.refiner = (Path(str(refiner)).name if refiner else None), None
        if refiner:
            if self.variant != "sdxl":
                raise ConfigError(f"--refiner: {refiner} is an SDXL refiner, but --model {self.model} is not SDXL")
            self.refiner = load_refiner(str(refiner), self.pipe, self.device, self.dtype, vae=vae)
            check_embeddings_fit(self.embeddings, self.refiner, self.variant, str(refiner))
        for pipe in [p for p in (self.pipe, self.refiner) if p is not None and vae_tiling]:
            pipe.vae.enable_tiling()  # every job's pipeline shares these VAEs
        self._hashes: dict[Path, str | None] = {}
        self._embedding_hashes = {e.token: embedding_hash(e.path) for e in self.embeddings}

    # -- adapters --------------------------------------------------------------------------------
    def set_weight(self, name: str, weight: float) -> None:
        self.adapters.set_weight(name, weight)

    def set_enabled(self, name: str, on: bool) -> None:
        self.adapters.set_enabled(name, on)

    def unload(self, name: str) -> None:
        """Take one adapter out for good, with the embeddings its file bundles."""
        self.adapters.unload(name)

    def merge(self) -> None:
        self.adapters.merge()

    def load_embedding(self, spec) -> Embedding:
        """Add one embedding ("FILE[:TOKEN]", a Path, an EmbeddingSpec or an Embedding already read)
        beside those loaded, checked as `embeddings` are: it must fit the base (and refiner), and its
        token must be none of the loaded ones, bundled ones included. Returns it."""
        [new] = [spec] if isinstance(spec, Embedding) else load_embeddings([spec])
        for pipe, name in ((self.pipe, self.model), (self.refiner, self.refiner_name)):
            if pipe is not None:
                check_embeddings_fit([new], pipe, self.variant, str(name))
        for other in self.all_embeddings():
            if other.token.lower() == new.token.lower():
                raise ModelError(f"--embedding: {other.path} and {new.path} both use the token {new.token!r}; "
                                 "unload one first or give another with FILE:TOKEN")
        check_words(self.all_embeddings() + [new], self.pipe)
        self.embeddings.append(new)  # the list the adapter stack reads too
        self._embedding_hashes[new.token] = embedding_hash(new.path)
        return new

    def unload_embedding(self, token: str) -> Embedding:
        """Take out the loaded `--embedding` (not a bundled one) that `token` names; returns it."""
        found = next((e for e in self.embeddings if e.token.lower() == token.lower()), None)
        if found is None:
            raise ConfigError(f"--embedding: no loaded embedding uses the token {token!r}; loaded: "
                              f"{', '.join(e.token for e in self.embeddings) or 'none'}")
        self.embeddings.remove(found)
        self._embedding_hashes.pop(found.token, None)
        return found

    def all_embeddings(self) -> list:
        """The `--embedding` files' embeddings and those bundled in the loaded adapters."""
        return self.adapters.all_embeddings()

    def _ti_hash(self, token: str) -> str | None:
        """A1111's 'TI hashes' value: a file's short hash, or for a bundled embedding (which has no
        file of its own) the name of the adapter that bundles it, as A1111 writes it."""
        if token in self._embedding_hashes:
            return self._embedding_hashes[token]
        return bundle_owner(token, self.adapters.bundled)

    def unmerge(self) -> None:
        self.adapters.unmerge()

    # -- generation ------------------------------------------------------------------------------
    def _job(self, req: Request) -> str:
        if req.mask is not None:
            return "inpaint"
        return "img2img" if req.init_image is not None else "txt2img"

    def _embeds(self, pipe, req: Request) -> tuple[dict[str, torch.Tensor], list[str]]:
        """The pipeline's prompt tensors for `req`, and the embeddings its prompts use."""
        sdxl = self.variant == "sdxl"
        zero_negative = sdxl and bool(pipe.config.get("force_zeros_for_empty_prompt", False))
        check_clip_skip(pipe, req.clip_skip)
        embeddings = self.all_embeddings()
        words = word_tables(embeddings, pipe, self.variant) if embeddings else None
        pos, neg = encode_pair(encoders_of(pipe), req.prompt, req.negative_prompt, req.clip_skip, sdxl, zero_negative,
                               words=words)
        out = {"prompt_embeds": pos.embeds, "negative_prompt_embeds": neg.embeds}
        if sdxl:
            out.update(pooled_prompt_embeds=pos.pooled, negative_pooled_prompt_embeds=neg.pooled)
        return out, pos.used + [name for name in neg.used if name not in pos.used]

    def _call_kwargs(self, req: Request, job: str) -> dict[str, Any]:
        kw: dict[str, Any] = {}
        init = req.init_image
        # --width and --height with an init image resize it to that size first (A1111's "Just
        # resize"); without them the output has the init image's own size.
        if init is not None and req.width and req.height and init.size != (req.width, req.height):
            init = init.resize((req.width, req.height), Image.LANCZOS)
        if job == "txt2img":
            kw.update(width=req.width, height=req.height)
        elif torch.is_tensor(init):  # a latent hires fix's upscaled latents: img2img starts from them as they are
            kw.update(image=init, strength=req.strength)
        else:
            # diffusers would silently resize an image whose sides are not multiples of 8 (the VAE's
            # step) down to the next ones (60x52 -> 56x48), every pixel resampled and the result
            # smaller than the input. Padding right and down by repeating the edge, then cutting
            # the result back, keeps the image's size and pixel geometry; the few pixels added are
            # generated like any others and thrown away. Resizing to the nearest multiple and back
            # would blur the image twice and shift features by up to half a pixel.
            kw["crop"] = init.size
            kw.update(image=pad_to_multiple(init), strength=req.strength)
        if job == "inpaint":
            # The mask follows the image when --width/--height resize it, so the two stay aligned;
            # a padded mask is black (kept) where the image was padded.
            mask = req.mask if req.mask.size == init.size else req.mask.resize(init.size, Image.NEAREST)
            mask = pad_to_multiple(mask)
            # Without an explicit size diffusers would resize to the model's default resolution.
            kw.update(mask_image=mask, width=kw["image"].width, height=kw["image"].height)
        if self.controlnet is not None:
            if req.control_image is None:
                raise ConfigError("--controlnet needs --control-image (the map that guides the image)")
            control = preprocess_control(req.control_image, req.control_preprocess)
            if job != "txt2img":
                # The map is laid over the init image pixel for pixel, so it is brought to the init
                # image's size (scaled, and cut around its centre when its shape differs, as A1111's
                # "Crop and Resize") and padded as it was (not stretched over the padding).
                control = pad_to_multiple(crop_and_resize(control, _size(init)))
            kw["controlnet_conditioning_scale"] = req.control_scale
            kw["image" if job == "txt2img" else "control_image"] = control
        return kw

    def _info(self, req: Request, seed: int, size: tuple[int, int], job: str, k: int,
              used: list[str] = ()) -> GenerationInfo:
        extra: dict[str, Any] = {}
        if req.batch_size > 1:
            extra.update({"Batch size": req.batch_size, "Batch pos": k % req.batch_size})
        if job == "inpaint":
            extra["Mask blur"] = req.mask_blur
        if self.controlnet is not None:
            extra["ControlNet 0"] = (f"Module: {req.control_preprocess}, Model: {self.controlnet_name}, "
                                     f"Weight: {req.control_scale:g}")
        if self.refiner is not None and job != "inpaint":
            extra.update({"Refiner": self.refiner_name, "Refiner switch at": f"{req.refiner_start:g}"})
        if req.hires_scale is not None:
            extra.update(hires_parameters(req, size))
        strength = hires_strength(req) if req.hires_scale is not None else req.strength if job != "txt2img" else None
        return GenerationInfo(
            prompt=req.prompt, negative_prompt=req.negative_prompt, steps=req.steps, sampler=a1111_name(req.sampler),
            cfg_scale=req.guidance_scale, seed=seed, width=size[0], height=size[1],
            model_name=Path(self.model).name or None, **self.vae_fields,
            adapters=[(s.name, s.weight, self._short_hash(s.path)) for s in self.adapters.active()],
            block_weights={s.name: s.lbw for s in self.adapters.active() if s.lbw},
            denoising_strength=strength, clip_skip=req.clip_skip, extra=extra,
            embeddings=[(name, self._ti_hash(name)) for name in used],
        )

    def _short_hash(self, path: Path) -> str | None:
        if path not in self._hashes:
            self._hashes[path] = adapter_hash(path)
        full = self._hashes[path]
        return full[:12] if full else None

    def _round_trip(self, pipe, image, output_type: str):
        """Strength 0 (or so few steps that none is left) denoises nothing: the answer is the init
        image (or latents) through the VAE, which diffusers' img2img cannot return (it fails on 0 timesteps)."""
        if torch.is_tensor(image):
            latents = image.to(self.device, pipe.vae.dtype) / pipe.vae.config.scaling_factor
        else:
            pixels = pipe.image_processor.preprocess(image).to(self.device, pipe.vae.dtype)
            latents = pipe.vae.encode(pixels).latent_dist.mode()
        if output_type == "latent":
            return latents[0] * pipe.vae.config.scaling_factor
        decoded = pipe.vae.decode(latents).sample
        return pipe.image_processor.postprocess(decoded, output_type="pil")[0]

    @torch.no_grad()
    def generate(self, req: Request, output_type: str = "pil") -> list[Generated]:
        """Run `req`: batch_count calls of batch_size images; image k uses seed `req.seed + k`, so
        any image can be re-made alone from its seed whatever the batch size."""
        check_request(req)
        if req.hires_scale is not None:
            return hires_fix(self, req, output_type)  # the two passes, on this Generator's modules
        job = self._job(req)
        drawn, used = self._draw(req, job, output_type)
        return [Generated(image, self._info(req, seed, _size(image), job, k, used))
                for k, (seed, image) in enumerate(drawn)]

    def _draw(self, req: Request, job: str, output_type: str, refine: bool = True) -> tuple[list, list[str]]:
        """[(seed, image)] for every image of `req` as `job`, and the embeddings its prompts use."""
        pipe = job_pipeline(self.pipe, self.variant, job, self.controlnet)
        pipe.scheduler = make_scheduler(req.sampler, self.pipe.scheduler.config)
        embeds, used = self._embeds(pipe, req)
        kw = self._call_kwargs(req, job)
        crop = kw.pop("crop", None)  # an init image's own size, before padding
        use_refiner = refine and self.refiner is not None and job != "inpaint"
        if use_refiner:
            self.refiner.scheduler = make_scheduler(req.sampler, self.refiner.scheduler.config)
            refiner_embeds, _ = self._embeds(self.refiner, req)
        drawn: list[tuple[int, Any]] = []
        for b in range(req.batch_count):
            seeds = [req.seed + b * req.batch_size + i for i in range(req.batch_size)]
            generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
            common = dict(num_inference_steps=req.steps, guidance_scale=req.guidance_scale,
                          num_images_per_prompt=req.batch_size, generator=generators)
            if job != "txt2img" and int(req.steps * req.strength) == 0:
                images = [self._round_trip(pipe, kw["image"], output_type)] * req.batch_size
            elif use_refiner:
                latents = pipe(**embeds, **kw, **common, denoising_end=req.refiner_start, output_type="latent").images
                images = self.refiner(**refiner_embeds, **common, image=latents, denoising_start=req.refiner_start,
                                      output_type=output_type).images
            else:
                images = pipe(**embeds, **kw, **common, output_type=output_type).images
            for seed, image in zip(seeds, images):
                if job == "inpaint" and output_type == "pil":
                    image = paste_outside_mask(image, kw["image"], kw["mask_image"], req.mask_blur)
                if crop and output_type == "pil" and image.size != crop:
                    image = image.crop((0, 0, *crop))
                drawn.append((seed, image))
        return drawn, used

    def txt2img(self, prompt: str, **kw) -> list[Generated]:
        return self.generate(Request(prompt=prompt, **kw))

    def img2img(self, prompt: str, init_image: Image.Image, strength: float = 0.75, **kw) -> list[Generated]:
        return self.generate(Request(prompt=prompt, init_image=init_image, strength=strength, **kw))

    def inpaint(self, prompt: str, image: Image.Image, mask: Image.Image, strength: float = 1.0,
                **kw) -> list[Generated]:
        return self.generate(Request(prompt=prompt, init_image=image, mask=mask, strength=strength, **kw))

    def outpaint(self, prompt: str, image: Image.Image, left: int = 0, right: int = 0, top: int = 0,
                 bottom: int = 0, **kw) -> list[Generated]:
        """Extend the canvas by the given pixels, mask the new area and inpaint it."""
        canvas, mask = extend_canvas(image, left, right, top, bottom)
        kw.setdefault("strength", 1.0)
        kw.pop("width", None), kw.pop("height", None)
        return self.generate(Request(prompt=prompt, init_image=canvas, mask=mask, **kw))


def _size(image) -> tuple[int, int]:
    """A PIL image's size, or the pixel size a latent tensor decodes to."""
    return image.size if isinstance(image, Image.Image) else (image.shape[-1] * 8, image.shape[-2] * 8)


def next_image_number(out_dir: Path) -> int:
    """One past the highest NNNNN of the OUT/NNNNN-SEED.png files already there (0 in a new folder),
    so that a folder's images number on across runs in the order they were made, whatever their seeds,
    as A1111 numbers its outputs."""
    numbers = [int(p.name[:5]) for p in out_dir.glob("[0-9][0-9][0-9][0-9][0-9]-*.png")] if out_dir.is_dir() else []
    return max(numbers, default=-1) + 1


def save_results(results: list[Generated], out_dir: str | Path, start: int | None = None) -> list[Path]:
    """Write OUT/NNNNN-SEED.png for each result, numbering from `start` (default: after the folder's
    last image, `next_image_number`), never over an existing file."""
    out_dir = Path(out_dir)
    paths = []
    k = next_image_number(out_dir) if start is None else start
    for result in results:
        while (path := out_dir / f"{k:05d}-{result.info.seed}.png").exists():
            k += 1
        paths.append(save_png(result.image, path, result.info))
        k += 1
    return paths
