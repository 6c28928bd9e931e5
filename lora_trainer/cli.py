"""The `lora-trainer` command: train, infer, make-tiny. The only place that reads argv or exits."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .errors import LoraTrainerError


def _train(args) -> int:
    from .config import load_config
    from .training.loop import train

    cfg = load_config(args.config, args.overrides)
    result = train(cfg, show_progress=not args.quiet)
    for path in result.adapter_paths:
        print(f"adapter: {path}")
    return 0


def _infer(args) -> int:
    from .inference.generate import GenerateOptions, generate, load_pipeline, parse_adapter_spec

    adapters = [parse_adapter_spec(s) for s in args.lora]
    pipe = load_pipeline(args.model, adapters)
    opts = GenerateOptions(prompt=args.prompt, negative_prompt=args.negative_prompt, steps=args.steps,
                           guidance_scale=args.guidance_scale, seed=args.seed, num_images=args.num_images,
                           width=args.width, height=args.height, adapters=adapters)
    for path in generate(pipe, opts, args.out):
        print(path)
    return 0


def _make_tiny(args) -> int:
    from .testing.tiny import make_tiny_model

    print(make_tiny_model(args.variant, args.out_dir, seed=args.seed))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-trainer", description="LoRA fine-tuning for Stable Diffusion")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train an adapter from a config file")
    p.add_argument("config", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=50 lora.rank=8")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_train)

    p = sub.add_parser("infer", help="generate images with a base model and LoRA adapters")
    add_infer_arguments(p)
    p.set_defaults(func=_infer)

    p = sub.add_parser("make-tiny", help="build a randomly initialised pipeline offline")
    p.add_argument("--variant", default="sd15", help="sd15, sdxl (tiny) or sd15-full, sdxl-full (real layer sizes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("out_dir")
    p.set_defaults(func=_make_tiny)

    from .cli_adapters import add_adapter_commands

    add_adapter_commands(sub)  # convert, inspect, resize, merge-loras, extract
    return parser


def add_infer_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="base: hub id or diffusers folder")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]", help="adapter file, repeatable")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--out", default="outputs/images", help="folder for the PNGs")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("diffusers", "transformers", "accelerate", "httpx", "urllib3", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not verbose:  # per-file loading bars bury the messages that matter
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        dlog.disable_progress_bar()
        tlog.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except LoraTrainerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
