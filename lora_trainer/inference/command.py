"""The `infer` and `merge` subcommands: their flags, and turning parsed flags into API calls.
cli.py registers them; nothing here reads argv or exits."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from ..errors import ConfigError
from ..fileio import unwritable_reason
from .adapters import adapter_named, parse_adapter_spec
from .hires import LANCZOS, UPSCALERS
from .images import PREPROCESSORS, read_image, read_mask
from .schedulers import SAMPLERS, resolve_seed
from .xyz_axes import AXIS_NAMES, MAX_CELLS, parse_axis

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
VAE_HELP = ("a VAE instead of the base's: a .safetensors VAE (A1111's models/VAE files), a diffusers VAE or model "
            "folder, or a hub id")

log = logging.getLogger(__name__)


def _dtype(name: str | None) -> torch.dtype | None:
    return DTYPES[name] if name else None


def add_infer_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="base: hub id, diffusers folder or single-file .safetensors (SD1.x or SDXL)")
    p.add_argument("--config-dir", default=None, help="a diffusers folder whose configs describe a single-file --model of another architecture (default: the shipped SD1.5/SDXL configs)")
    p.add_argument("--vae", default=None, help=VAE_HELP + "; with --refiner it decodes the refiner's images too")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT][:lbw=SPEC]",
                   help="adapter file (kohya or diffusers layout), repeatable; weights stack; lbw=: per-block "
                        "weights as A1111's LoRA Block Weight (17 or 26 numbers on SD1.x, 12 or 20 on SDXL, or a "
                        "preset: OUTALL, INS, ...)")
    p.add_argument("--embedding", action="append", default=[], metavar="FILE[:TOKEN]",
                   help="textual-inversion embedding (.safetensors: A1111/kohya, diffusers or SDXL clip_l+clip_g), "
                        "repeatable; prompts use it by TOKEN (default: the file's stem, e.g. EasyNegative)")
    p.add_argument("--merge", action="store_true", help="fuse the adapters into the weights (faster sampling)")
    p.add_argument("--prompt", action="append", required=True,
                   help="A1111 syntax: (word:1.3), (word), [word], BREAK; repeatable (one run per prompt)")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--scheduler", default="dpm++_2m", help=f"sampler: {', '.join(SAMPLERS)}")
    p.add_argument("--guidance-scale", "--cfg", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=0, help="image k of a run uses seed+k; -1: a random seed, written in the PNGs")
    p.add_argument("--num-images", type=int, default=1, help="batch count: pipeline calls per prompt")
    p.add_argument("--batch-size", type=int, default=1, help="images per pipeline call")
    p.add_argument("--width", type=int, default=None,
                   help="a multiple of 8; with --init-image (and --height) the init image is resized to it first")
    p.add_argument("--height", type=int, default=None, help="a multiple of 8, as --width")
    p.add_argument("--clip-skip", type=int, default=None,
                   help="1 = last CLIP layer (A1111 numbering, the default), 2 = penultimate")
    p.add_argument("--init-image", help="img2img / inpainting source image; the output has its size")
    p.add_argument("--strength", type=float, default=None, help="img2img denoising strength (default 0.75; 1 for inpainting)")
    p.add_argument("--mask", help="inpainting mask: white = repaint, black = keep")
    p.add_argument("--mask-blur", type=int, default=4, help="pixels of blur where repainted and kept areas meet")
    p.add_argument("--outpaint", metavar="L,R,T,B", help="extend --init-image by these pixels and paint the new area")
    p.add_argument("--controlnet", help="ControlNet model (hub id or diffusers folder)")
    p.add_argument("--control-image", help="control map, or a photo with --control-preprocess canny")
    p.add_argument("--control-scale", type=float, default=None, help="ControlNet strength (default 1.0)")
    p.add_argument("--control-preprocess", default=None, choices=PREPROCESSORS,
                   help="canny: detect edges; none (the default): the image is already a map "
                        "(depth, pose, seg, scribble, normal)")
    p.add_argument("--refiner", help="SDXL refiner model, run as a second stage")
    p.add_argument("--refiner-start", type=float, default=None, help="fraction of the steps done by the base (default 0.8)")
    p.add_argument("--hires-scale", metavar="F", help="Hires. fix: upscale each txt2img image F times (sides "
                   "rounded to multiples of 8) and redraw it by img2img at that size, e.g. 1.5 or 2")
    p.add_argument("--hires-upscaler", metavar="NAME", help=f"how the hires fix upscales: {', '.join(UPSCALERS)} "
                   "(A1111's names, any case; Latent ones resize the latents; default Lanczos)")
    p.add_argument("--hires-strength", metavar="S",
                   help="denoising strength of the hires pass (default 0.5; 0.7 after a Latent upscaler)")
    p.add_argument("--hires-steps", metavar="N", help="steps of the hires pass (default: --steps)")
    p.add_argument("--sweep", metavar="W1,W2,...", help="grid of prompts × weights of the first (or --sweep-adapter) --lora")
    p.add_argument("--sweep-adapter", help="adapter name (file stem) to sweep")
    p.add_argument("--compare", nargs="+", action="extend", metavar="FILE[:WEIGHT]",
                   help="grid of prompts × these adapter files (or a run folder / glob: its epoch and step files in "
                        "training order, then the final one; a pivotal run's files each with their own embedding, a "
                        "run that trained an embedding alone: its embedding files), one seed; --lora adapters stay "
                        "loaded in every cell; "
                        "with --sweep: files × weights for one prompt")
    p.add_argument("--grid-x", metavar="AXIS=V1,V2,...",
                   help="X/Y plot (A1111's X/Y/Z plot), one grid per prompt: columns drawn with these values of AXIS, "
                        f"one of {', '.join(AXIS_NAMES)} (NAME: a --lora's stem; prompt-sr: the first value is "
                        "searched in the prompt and each value put in its place); quote a value holding commas")
    p.add_argument("--grid-y", metavar="AXIS=V1,V2,...", help="rows of the X/Y plot, as --grid-x")
    p.add_argument("--grid-max-cells", type=int, default=None, metavar="N",
                   help=f"most images --grid-x/--grid-y may draw, all prompts together (default {MAX_CELLS})")
    p.add_argument("--vae-tiling", action="store_true",
                   help="decode (and encode) large images in tiles to save memory (A1111's Tiled VAE)")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: fp16 on GPU, fp32 on CPU")
    p.add_argument("--out", default="outputs/images", help="folder for the PNGs")


def clip_skip_hint(adapters) -> list[str]:
    """Say (log) which adapters were trained with a clip skip other than 1 (their `ss_clip_skip`),
    when --clip-skip was not given; nothing changes, the images use clip skip 1 as asked."""
    import safetensors

    hints = []
    for spec in adapters:
        try:
            with safetensors.safe_open(str(spec.path), framework="pt") as f:
                trained = (f.metadata() or {}).get("ss_clip_skip")
        except Exception:  # unreadable files are reported properly when the adapters load
            continue
        if trained and trained.isdigit() and int(trained) > 1:
            hints.append(f"{spec.path.name} was trained with clip skip {trained}; "
                         f"pass --clip-skip {trained} to draw as it was trained")
    for hint in hints:
        log.warning("%s", hint)
    return hints


def _outpaint_pixels(text: str) -> tuple[int, int, int, int]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4:
        raise ConfigError(f"--outpaint: {text!r} must be four pixel counts left,right,top,bottom, e.g. 0,128,0,0")
    return values  # type: ignore[return-value]


def _number(text: str | None, flag: str, kind=float):
    """A flag's number, or a one-line error naming the flag (argparse's own would print its usage too)."""
    if text is None:
        return None
    try:
        return kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise ConfigError(f"{flag}: {text!r} is not {what}") from None


def _grid_axes(args) -> tuple:
    """(X axis, Y axis) of --grid-x/--grid-y (None where not given), read and checked; () without either."""
    if not (args.grid_x or args.grid_y):
        if args.grid_max_cells is not None:
            raise ConfigError("--grid-max-cells needs --grid-x or --grid-y; without them the flag would change nothing")
        return ()
    clash = [flag for flag, on in (("--sweep", args.sweep), ("--compare", args.compare is not None),
                                   ("--merge", args.merge), ("--num-images", args.num_images != 1),
                                   ("--batch-size", args.batch_size != 1)) if on]
    if clash:
        raise ConfigError(f"--grid-x/--grid-y draw one image per cell, unmerged, in a grid of their own; leave out "
                          f"{', '.join(clash)} (an adapter's weights are an axis: --grid-x weight:NAME=0,0.5,1)")
    if args.grid_max_cells is not None and args.grid_max_cells < 1:
        raise ConfigError(f"--grid-max-cells: {args.grid_max_cells} is not allowed; give an integer >= 1")
    return tuple(parse_axis(text, flag) if text else None
                 for flag, text in (("--grid-x", args.grid_x), ("--grid-y", args.grid_y)))


def run_infer(args) -> list[Path]:
    """Generate (or sweep) as the flags say; returns the written PNG paths."""
    from ..pnginfo import save_png
    from .generate import Generator, Request, check_request, save_results
    from .embeddings import unused_embeddings
    from .images import extend_canvas
    from .compare import check_no_swept_embeddings, compare_grid, expand_compare, save_comparison
    from .paired import embedding_token, warn_unpaired
    from .sweep import parse_weights_list, sweep_grid
    from .xyz import xyz_grid
    from .xyz_axes import cell_prompts, check_axes

    if (args.mask or args.outpaint) and not args.init_image:
        raise ConfigError(f"{'--mask' if args.mask else '--outpaint'} needs --init-image")
    if args.mask and args.outpaint:
        raise ConfigError("--mask and --outpaint: give one (outpainting makes its own mask)")
    if args.outpaint and args.hires_scale:  # the img2img line would advise --width/--height, which --outpaint refuses
        raise ConfigError("--hires-scale redraws a txt2img image larger, not an outpainted one; leave out "
                          "--hires-scale, or outpaint a larger --init-image")
    if args.control_image and not args.controlnet:
        raise ConfigError("--control-image needs --controlnet MODEL")
    # Flags that only mean something with another one: silently ignoring them would hide a typo'd run.
    for flag, value, needs in (("--strength", args.strength, "--init-image"),
                               ("--sweep-adapter", args.sweep_adapter, "--sweep"),
                               ("--refiner-start", args.refiner_start, "--refiner"),
                               ("--control-scale", args.control_scale, "--controlnet"),
                               ("--control-preprocess", args.control_preprocess, "--controlnet"),
                               ("--hires-strength", args.hires_strength, "--hires-scale"),
                               ("--hires-upscaler", args.hires_upscaler, "--hires-scale"),
                               ("--hires-steps", args.hires_steps, "--hires-scale")):
        if value is not None and not getattr(args, needs[2:].replace("-", "_")):
            raise ConfigError(f"{flag} needs {needs}; without it the flag would change nothing")
    axes = _grid_axes(args)
    if args.sweep:
        ignored = [flag for flag, on in (("--merge", args.merge), ("--num-images", args.num_images != 1),
                                         ("--batch-size", args.batch_size != 1)) if on]
        if ignored:
            raise ConfigError(f"--sweep draws one image per prompt and weight, unmerged; leave out {', '.join(ignored)}")
    if args.compare is not None:
        both = [flag for flag, on in (("--merge", args.merge), ("--sweep-adapter", args.sweep_adapter),
                                      ("--num-images", args.num_images != 1), ("--batch-size", args.batch_size != 1))
                if on]
        if both:
            raise ConfigError(f"--compare draws one image per cell with the compared file loaded unmerged; "
                              f"leave out {', '.join(both)}")
        if args.sweep and len(args.prompt) != 1:
            raise ConfigError(f"--compare with --sweep draws one prompt (rows = files, columns = weights); "
                              f"give one --prompt, not {len(args.prompt)}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ConfigError(f"--out: {args.out} is a file; give a folder for the PNGs")
    unwritable = unwritable_reason(args.out)
    if unwritable:
        raise ConfigError(f"--out: {args.out} {unwritable}; give a folder you can write to")
    weights = parse_weights_list(args.sweep) if args.sweep else None
    init = read_image(args.init_image, "--init-image") if args.init_image else None
    mask = read_mask(args.mask, init.size) if args.mask else None
    if args.outpaint:
        init, mask = extend_canvas(init, *_outpaint_pixels(args.outpaint))
        if (args.width or args.height) and (args.width, args.height) != init.size:
            raise ConfigError(f"--outpaint makes a {init.width}x{init.height} canvas; leave out --width/--height "
                              "(or resize --init-image first)")
    strength = args.strength if args.strength is not None else (1.0 if mask is not None else 0.75)
    control = read_image(args.control_image, "--control-image") if args.control_image else None

    request = Request(prompt=args.prompt[0], negative_prompt=args.negative_prompt, steps=args.steps,
                      guidance_scale=args.guidance_scale, seed=resolve_seed(args.seed), batch_size=args.batch_size,
                      batch_count=args.num_images, width=args.width, height=args.height, sampler=args.scheduler,
                      clip_skip=1 if args.clip_skip is None else args.clip_skip, init_image=init, strength=strength,
                      mask=mask, mask_blur=args.mask_blur, control_image=control,
                      control_scale=1.0 if args.control_scale is None else args.control_scale,
                      control_preprocess=args.control_preprocess or "none",
                      refiner_start=0.8 if args.refiner_start is None else args.refiner_start,
                      hires_scale=_number(args.hires_scale, "--hires-scale"),
                      hires_strength=_number(args.hires_strength, "--hires-strength"),
                      hires_steps=_number(args.hires_steps, "--hires-steps", int),
                      hires_upscaler=args.hires_upscaler or LANCZOS)
    check_request(request)  # flag errors before minutes of model loading
    adapters = [parse_adapter_spec(s) for s in args.lora]
    if axes:
        check_axes(*axes, args.prompt, request, adapters, args.grid_max_cells or MAX_CELLS)
    if args.sweep_adapter and adapter_named({a.name: a for a in adapters}, args.sweep_adapter) is None:
        raise ConfigError(f"--sweep-adapter: {args.sweep_adapter!r} is none of the --lora files; give one's name "
                          f"(its file's stem): {', '.join(a.path.stem for a in adapters) or 'no --lora given'}")
    compared = expand_compare(args.compare) if args.compare is not None else None
    if compared and weights is not None and any(spec.weight != 1 for spec in compared):
        raise ConfigError("--compare FILE:WEIGHT with --sweep: the sweep sets the weights; leave out :WEIGHT")
    check_no_swept_embeddings(compared or [], weights)  # read from the headers: before the base loads
    warn_unpaired(adapters, args.embedding)  # an epoch's adapter of a pivotal run, drawn without its embedding
    if args.clip_skip is None and not any(a and a.kind == "clip-skip" for a in axes):
        clip_skip_hint(adapters + (compared or [])[:1])  # a run's files share their clip skip: say it once
    gen = Generator(args.model, adapters, controlnet=args.controlnet, refiner=args.refiner, device=args.device,
                    dtype=_dtype(args.dtype), config_dir=args.config_dir, embeddings=args.embedding, vae=args.vae,
                    vae_tiling=args.vae_tiling)
    texts = cell_prompts(args.prompt, request.negative_prompt, [a for a in axes if a])
    for e in unused_embeddings(gen.all_embeddings(), gen.pipe, texts):
        if any(e is standalone for standalone in gen.embeddings):
            trained = embedding_token(e.path)  # an epoch's or step's file is named <token>-000002
            hint = (f"; it was trained as {trained!r}: --embedding {e.path}:{trained} makes that the word"
                    if trained.lower() != e.token.lower() else "")
            log.warning("--embedding: %s: no prompt uses its token %r, so it changes nothing; write %s in --prompt or "
                        "--negative-prompt (case does not matter)%s", e.path, e.token, e.token, hint)
        else:
            log.warning("--lora: %s bundles the embedding %r, which no prompt uses; write %s in --prompt or "
                        "--negative-prompt to use it (case does not matter)", e.path, e.token, e.token)
    out = Path(args.out)
    if axes:
        return [path for prompt in args.prompt
                for path in save_comparison(xyz_grid(gen, prompt, request, *axes), out, prefix="xyz")]
    if compared is not None:
        return save_comparison(compare_grid(gen, compared, args.prompt, request, weights), out)
    if weights is not None:
        sweep = sweep_grid(gen, args.prompt, weights, args.sweep_adapter, request)
        k = 0
        while (path := out / f"sweep-{k:03d}.png").exists():
            k += 1
        return [save_png(sweep.grid.image, path, sweep.info)]
    if args.merge:
        gen.merge()
    paths: list[Path] = []
    for prompt in args.prompt:
        request.prompt = prompt
        paths += save_results(gen.generate(request), out)
    return paths


def add_merge_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="base: hub id, diffusers folder or single-file .safetensors")
    p.add_argument("--config-dir", default=None, help="a diffusers folder whose configs describe a single-file --model of another architecture (default: the shipped SD1.5/SDXL configs)")
    p.add_argument("--vae", default=None, help=VAE_HELP + "; the merged model carries it")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT][:lbw=SPEC]",
                   help="adapter to fuse, repeatable (lbw=: per-block weights, as infer); none with --vae: "
                        "the base with that VAE")
    p.add_argument("--out", required=True, help="folder for the merged diffusers model (a .safetensors file with --single-file)")
    p.add_argument("--single-file", action="store_true",
                   help="write one original-layout .safetensors checkpoint (A1111/ComfyUI); --out names the file")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="dtype of the saved weights")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def run_merge(args) -> Path:
    from .merge import merge_to_folder

    return merge_to_folder(args.model, [parse_adapter_spec(s) for s in args.lora], args.out,
                           single_file=args.single_file, overwrite=args.overwrite, dtype=DTYPES[args.dtype],
                           config_dir=args.config_dir, vae=args.vae)
