"""The `lora-trainer` command: train, infer, merge, serve, caption, check-data, from-kohya, make-tiny (and
the adapter and publishing tools). The only place that reads argv or exits."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys

from .errors import LoraTrainerError
from .interrupts import CtrlC, noting_ctrl_c


def _train(args) -> int:
    from .config import load_config
    from .training.loop import train

    cfg = load_config(args.config, args.overrides)
    result = train(cfg, show_progress=not args.quiet)
    if result.finished:
        print(result.finished)
        return 0
    for path in result.adapter_paths:
        print(f"adapter: {path}")
    if result.embedding is not None:  # embedding.token: the prompt word is the file's stem, the token
        print(f"embedding: {result.output_dir / 'embeddings' / cfg.embedding.token}.safetensors")
    return 0


def _infer(args) -> int:
    from .inference.command import run_infer

    for path in run_infer(args):
        print(path)
    return 0


def _merge(args) -> int:
    from .inference.command import run_merge

    print(run_merge(args))
    return 0


def _serve(args) -> int:
    from .inference.server import run_serve

    return run_serve(args)


def _make_tiny(args) -> int:
    from .testing.tiny import make_tiny_model

    print(make_tiny_model(args.variant, args.out_dir, seed=args.seed))
    return 0


def _caption(args) -> int:
    from .config import CaptionConfig, check_caption_config, normalize_caption_extension
    from .data.captioning import caption_folder, format_caption_table
    from .errors import ConfigError

    args.undesired_tags = [t.strip() for t in args.undesired_tags.split(",") if t.strip()]
    _refuse_other_methods_flags(args)
    if args.min_length is None:  # --max-length 3 alone must not fail on the default --min-length
        args.min_length = max(0, min(CaptionConfig().min_length, args.max_length))
    options = CaptionConfig(**{k: v for k, v in vars(args).items() if k in CAPTION_FLAGS})
    errors: list[str] = []
    check_caption_config(options, errors, key=lambda name: "--" + name.replace("_", "-"))
    if errors:
        raise ConfigError("; ".join(errors))
    ext = normalize_caption_extension(args.caption_extension, "--caption-extension")
    results = caption_folder(args.dir, options, show_progress=not args.quiet, caption_extension=ext,
                             extension_key="--caption-extension", skip_parked=args.folder_repeats)
    if not results:  # as check-data: exit 1 when the folder holds nothing to work on
        from .data.images import IMAGE_EXTENSIONS

        read = ", ".join(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)
        print(f"error: {args.dir}: no images to caption (formats read: {read}); put the images in this folder "
              "or a subfolder", file=sys.stderr)
        return 1
    print(format_caption_table(args.dir, results))
    return 0


def _refuse_other_methods_flags(args) -> None:
    """A flag the chosen --method does not read stops the command before any model loads: tagger
    options without --method wd14 (which would caption with BLIP-2 instead), BLIP-2's with it."""
    from .config import CaptionConfig
    from .config_data_checks import WD14_OPTIONS
    from .errors import ConfigError

    default = CaptionConfig()
    others = WD14_OPTIONS if args.method != "wd14" else BLIP2_FLAGS
    given = [name for name in others if getattr(args, name) not in (getattr(default, name), None)]
    if not given:
        return
    flags = ", ".join("--" + name.replace("_", "-") for name in given)
    if args.method != "wd14":
        raise ConfigError(f"{flags}: tagger options, read with --method wd14 only; add --method wd14, or leave them out")
    raise ConfigError(f"{flags}: BLIP-2 options, which --method wd14 does not read; leave them out (or use --method blip2)")


def _from_kohya(args) -> int:
    from .kohya.setup import convert_kohya

    notes, command = convert_kohya(args.input, args.output, args.dataset_config, force=args.force)
    for line in notes:
        print(f"note: {line}")
    print(f"wrote {args.output} ({len(notes)} note{'s' if len(notes) != 1 else ''}, also at its top)")
    print(f"train with: {command}")
    return 0


def _check_data(args) -> int:
    import json

    from .config import normalize_caption_extension
    from .data.checks import check_dataset, load_clip_tokenizer
    from .errors import ConfigError

    if (args.config is None) == (args.dir is None):
        raise ConfigError("check-data: give a dataset folder, or --config RUN.yaml to check the run's folders")
    tokenizer = load_clip_tokenizer(args.model) if args.model else load_clip_tokenizer(DEFAULT_TOKENIZER_SOURCE)
    if args.config is not None:
        return _check_run_data(args, tokenizer)
    ext = normalize_caption_extension(args.caption_extension, "--caption-extension")
    report = check_dataset(args.dir, args.resolution, tokenizer, args.prefix, args.folder_repeats,
                           caption_extension=ext, caption_suffix=args.suffix, extension_key="--caption-extension",
                           weighted_captions=args.weighted_captions, mask_dir=args.mask_dir,
                           separator=args.keep_tokens_separator)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format_text())
    # 1 = the set cannot train (or has warnings, with --strict); 2 stays for usage/config errors.
    return 1 if not report.can_train or (args.strict and report.warnings) else 0


def _check_run_data(args, tokenizer) -> int:
    """check-data --config: each image folder of the run (data.path, or each of data.subsets) checked with
    its own caption keys, under a line with its image count, repeats and uncaptioned images."""
    import json

    from .config import load_config, resolve_subsets, subset_label
    from .data.checks import check_dataset

    cfg = load_config(args.config, warn=False)
    reports, texts, failed = [], [], False
    for index, d in enumerate(resolve_subsets(cfg.data)):
        report = check_dataset(d.path, d.resolution or args.resolution, tokenizer, d.caption_prefix, d.folder_repeats,
                               cfg.model.max_token_length, caption_extension=d.caption_extension,
                               caption_suffix=d.caption_suffix, weighted_captions=d.weighted_captions,
                               mask_dir=d.mask_dir, separator=d.keep_tokens_separator,
                               instance_prompt=cfg.dreambooth.instance_prompt)
        reports.append({"subset": subset_label(cfg.data, index), "repeats": d.repeats, **report.to_dict()})
        texts.append(f"{subset_label(cfg.data, index)}: {report.num_readable} image(s) × repeats {d.repeats}, "
                     f"{report.num_readable - report.num_captioned} without a caption\n{report.format_text()}")
        failed = failed or not report.can_train or bool(args.strict and report.warnings)
    print(json.dumps(reports, indent=2) if args.json else "\n".join(texts))
    return 1 if failed else 0


# Counts caption tokens exactly when this tokenizer is already in the local HF cache.
DEFAULT_TOKENIZER_SOURCE = "openai/clip-vit-large-patch14"
CAPTION_FLAGS = ("method", "model", "prefix", "suffix", "overwrite", "batch_size", "prompt", "keep_prompt",
                 "max_length", "min_length", "num_beams", "do_sample", "top_p", "temperature", "repetition_penalty",
                 "dtype", "load_in_8bit", "device", "seed", "general_threshold", "character_threshold", "rating_tag",
                 "replace_underscores", "undesired_tags")
BLIP2_FLAGS = ("prompt", "keep_prompt", "max_length", "min_length", "num_beams", "do_sample", "top_p", "temperature",
               "repetition_penalty", "dtype", "load_in_8bit", "seed")  # what --method wd14 does not read


def add_caption_arguments(p: argparse.ArgumentParser) -> None:
    from .config import DEFAULT_CAPTION_MODELS, CaptionConfig

    d = CaptionConfig()
    p.add_argument("dir", help="folder of images; a caption file (.txt) is written beside each image that has none")
    p.add_argument("--method", choices=("blip2", "wd14"), default="blip2",
                   help="blip2: a sentence; wd14: booru tags from a WD14 tagger (needs onnxruntime)")
    p.add_argument("--model", help="BLIP-2 hub id or folder (default {blip2}); with --method wd14 a folder or hub "
                   "id holding model.onnx and selected_tags.csv (default {wd14})".format(**DEFAULT_CAPTION_MODELS))
    p.add_argument("--prefix", default="", help='written before each new caption, e.g. "sks dog, "')
    p.add_argument("--suffix", default="", help="written after each new caption")
    p.add_argument("--caption-extension", default=".txt",
                   help="data.caption_extension: caption files are <image stem><this> "
                        "(default %(default)s; kohya: .caption)")
    p.add_argument("--overwrite", action="store_true",
                   help="re-caption images that have a caption file (the old one kept as e.g. .txt.bak)")
    p.add_argument("--folder-repeats", action=argparse.BooleanOptionalAction, default=True,
                   help="data.folder_repeats: leave out kohya's parked 0_<name> folders, as training does "
                        "(--no-folder-repeats: caption them too)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--prompt", default="", help='text the caption continues, e.g. "a photo of"')
    p.add_argument("--keep-prompt", action=argparse.BooleanOptionalAction, default=True,
                   help="start the caption with the prompt (--no-keep-prompt for question prompts)")
    p.add_argument("--max-length", type=int, default=d.max_length, help="most new tokens per caption")
    p.add_argument("--min-length", type=int, default=None,
                   help=f"fewest new tokens per caption (default {d.min_length}, or --max-length when smaller)")
    p.add_argument("--num-beams", type=int, default=d.num_beams, help="beam search when > 1")
    p.add_argument("--do-sample", action="store_true", help="nucleus sampling (seeded) instead of greedy/beams")
    p.add_argument("--top-p", type=float, default=d.top_p)
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty)
    p.add_argument("--dtype", choices=("auto", "fp32", "fp16", "bf16"), default="auto", help="auto: fp16 on GPU, fp32 on CPU")
    p.add_argument("--load-in-8bit", action="store_true", help="8-bit weights through bitsandbytes (CUDA)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: the GPU if any (wd14: the CPU; cuda needs onnxruntime-gpu)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--general-threshold", type=float, default=d.general_threshold,
                   help="wd14: lowest confidence of a general tag (default %(default)s)")
    p.add_argument("--character-threshold", type=float, default=d.character_threshold,
                   help="wd14: lowest confidence of a character tag (default %(default)s)")
    p.add_argument("--rating-tag", action="store_true", help="wd14: start with the most likely rating tag")
    p.add_argument("--replace-underscores", action=argparse.BooleanOptionalAction, default=True,
                   help="wd14: long_hair as 'long hair' (kaomoji such as ^_^ kept)")
    p.add_argument("--undesired-tags", default="",
                   help='wd14: tags never written, comma-separated: "solo,simple background"')
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    from .inference.command import add_infer_arguments, add_merge_arguments  # imports torch: see main
    from .inference.server import add_serve_arguments

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

    p = sub.add_parser("merge", help="fuse LoRA adapters into a base model and save it")
    add_merge_arguments(p)
    p.set_defaults(func=_merge)

    p = sub.add_parser("serve", help="serve AUTOMATIC1111's web API (txt2img, img2img, <lora:NAME:W> in prompts) "
                                     "over a base model")
    add_serve_arguments(p)
    p.set_defaults(func=_serve)

    p = sub.add_parser("caption", help="caption images that have none with BLIP-2 or WD14 tags (sidecar .txt "
                                       "files, or --caption-extension)")
    add_caption_arguments(p)
    p.set_defaults(func=_caption)

    p = sub.add_parser("check-data", help="report problems in a dataset folder; exit 1 when it cannot train")
    p.add_argument("dir", nargs="?", help="the dataset folder (or --config)")
    p.add_argument("--config", help="a run config: check its data.path, or each of its data.subsets with its "
                                    "own keys (of the flags below, only --model, --resolution, --json and --strict "
                                    "are read then)")
    p.add_argument("--resolution", type=int, default=512, help="training resolution: smaller images are flagged")
    p.add_argument("--model", help="base model whose tokenizer counts caption tokens (else an estimate)")
    p.add_argument("--prefix", default="", help="data.caption_prefix: counts towards caption length and tags")
    p.add_argument("--suffix", default="", help="data.caption_suffix: counts towards caption length and tags")
    p.add_argument("--caption-extension", default=".txt",
                   help="data.caption_extension: captions are read from <image stem><this> (default %(default)s)")
    p.add_argument("--folder-repeats", action=argparse.BooleanOptionalAction, default=True,
                   help="data.folder_repeats: kohya's <N>_<name> folders repeat their images N times")
    p.add_argument("--weighted-captions", action="store_true",
                   help="data.weighted_captions: count caption tokens without the (word:1.3) weight syntax")
    p.add_argument("--keep-tokens-separator", default="",
                   help="data.keep_tokens_separator: taken out of captions, so not counted")
    p.add_argument("--mask-dir", help="data.mask_dir: check that every image has a readable mask of its size")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.add_argument("--strict", action="store_true", help="exit 1 on warnings too")
    p.set_defaults(func=_check_data)

    p = sub.add_parser("from-kohya", help="turn a kohya-ss sd-scripts command line or config TOML into a config")
    p.add_argument("input", help="a saved train_network.py / train_textual_inversion.py command (or their sdxl_ "
                                 "versions; .sh, .bat, .txt) or its --config_file TOML")
    p.add_argument("--dataset-config", help="kohya's --dataset_config TOML (default: the one the input names)")
    p.add_argument("-o", "--output", required=True, help="the YAML config to write")
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    p.set_defaults(func=_from_kohya)

    from .publish.commands import add_commands as add_publish_commands

    add_publish_commands(sub)  # publish, package

    p = sub.add_parser("make-tiny", help="build a randomly initialised pipeline offline")
    p.add_argument("--variant", default="sd15", help="sd15, sdxl (tiny), sd15-full, sdxl-full (real layer sizes), "
                   "blip2 (tiny captioner) or wd14 (tiny tagger)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("out_dir")
    p.set_defaults(func=_make_tiny)

    from .cli_adapters import add_adapter_commands

    add_adapter_commands(sub)  # convert, inspect, resize, merge-loras, extract
    return parser


def _setup_logging(verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    if int(os.environ.get("RANK", "0") or 0) > 0:
        level = logging.WARNING  # several processes (torchrun, accelerate launch): the main one tells the story
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("diffusers", "transformers", "accelerate", "httpx", "urllib3", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # transformers 5 says on every run that CLIPImageProcessor falls back to PIL without
    # torchvision; we never need torchvision (images are PIL/numpy throughout).
    logging.getLogger("transformers.utils.import_utils").addFilter(
        lambda record: "requires torchvision (not installed)" not in record.getMessage())
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not verbose:  # per-file loading bars bury the messages that matter
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        dlog.disable_progress_bar()
        tlog.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    with noting_ctrl_c():
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    try:  # the parser imports torch: inside the try, so a Ctrl-C in those seconds is no traceback
        args = build_parser().parse_args(argv)
        _setup_logging(args.verbose)
        return args.func(args)
    except LoraTrainerError as exc:  # a run stopped by Ctrl-C after saving a checkpoint is one too
        print(f"{exc.label}: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # the reader of the output went away (`lora-trainer inspect F | head`)
        _drop_stdout()
        return 141  # as a shell reports a command ended by SIGPIPE
    except Exception as exc:
        if _ctrl_c_inside(exc):
            print("interrupted", file=sys.stderr)
            return 130
        if isinstance(exc, OSError) and exc.errno in _WRITE_ERRORS:  # a full disk or a read-only folder
            print(f"error: {exc.filename or 'writing'}: {exc.strerror}; {_WRITE_ERRORS[exc.errno]}", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _drop_stdout() -> None:
    """Point stdout at the null device, so the interpreter's flush at exit does not fail on the
    closed pipe again (with a traceback of its own)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):  # no real file behind sys.stdout
        pass


def _ctrl_c_inside(exc: BaseException) -> bool:
    """A Ctrl-C that a library turned into another error: transformers' lazy imports, for one, report
    a KeyboardInterrupt met while importing a model class as a ModuleNotFoundError raised from it."""
    if CtrlC.seen:
        return True
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


_FULL = "free some space or write to another disk (output.dir, train.cache_dir)"
_DENIED = "write to a folder you may write to (output.dir, train.cache_dir, dreambooth.class_data)"
_WRITE_ERRORS = {errno.ENOSPC: _FULL, errno.EDQUOT: _FULL, errno.EROFS: _DENIED, errno.EACCES: _DENIED,
                 errno.EPERM: _DENIED}


if __name__ == "__main__":
    sys.exit(main())
