"""The adapter-file commands of `lora-trainer`: convert, inspect, resize, merge-loras, extract.
Registered by cli.py; like cli.py, they only parse, call lora_trainer.export, and print."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

_DTYPE_HELP = "precision of the saved tensors (default fp16, what shared files use)"


def _dtype(name: str):
    from .export.adapter import DTYPES

    return None if name == "keep" else DTYPES[name]


def _weighted(spec: str) -> tuple[str, float]:
    """'FILE' or 'FILE:WEIGHT' (the weight is what follows the last colon, when it is a number)."""
    path, sep, weight = spec.rpartition(":")
    if sep and path:
        try:
            return path, float(weight)
        except ValueError:
            if not Path(spec).exists() and (Path(path).is_file() or Path(path).suffix == ".safetensors"):
                from .errors import ConfigError

                raise ConfigError(f"{spec}: {weight!r} is not a weight; write FILE:WEIGHT with a number, "
                                  f"e.g. {path}:0.8") from None
    return spec, 1.0


def _print_fit(report, per_module: bool) -> None:
    if report is None:
        return
    if per_module:
        for line in report.lines():
            print(line)
    print(report.summary())


def _print_bundle(bundle, out: Path, layout: str) -> None:
    """Say what became of the input's bundled embeddings: kept (kohya) or written beside (diffusers)."""
    from .export.bundle import bundle_note, embedding_file

    beside = [embedding_file(out.parent, token) for token in bundle] if layout != "kohya" else []
    note = bundle_note(bundle, beside, layout)
    if note:
        print(note)


def _print_run_embeddings(inputs: list[str], out: Path) -> None:
    """Say, for an input of a pivotal run whose embedding is a file of its own (not bundled), that
    the output does not hold it and how to use it: the new file is no longer paired with it by name."""
    from .inference.paired import separate_embedding

    for path in inputs:
        found = separate_embedding(Path(path))
        if found is not None:
            own, token = found
            print(f"note: {path} was trained with the embedding {own} (a file of its own), which {out} does not "
                  f"hold; draw it with --embedding {own}:{token}")


def _write(path, adapter, layout: str, args, bundle) -> Path:
    from .export.bundle import write_with_bundle

    return write_with_bundle(path, adapter, layout, _dtype(args.dtype), bundle, overwrite=args.overwrite)[0]


def _convert(args) -> int:
    from .export.bundle import read_bundle
    from .export.convert import convert_file

    out = convert_file(args.input, args.output, args.to, dtype=_dtype(args.dtype), base=args.variant,
                       overwrite=args.overwrite)
    print(f"wrote {out} ({args.to} layout)")
    _print_bundle(read_bundle(args.input), out, args.to)
    _print_run_embeddings([args.input], out)
    return 0


def _inspect(args) -> int:
    from .export.inspect import format_report, inspect_adapter

    report = inspect_adapter(args.file, base=args.variant)
    print(json.dumps(report, indent=2) if args.json else format_report(report, modules=args.modules))
    return 0


def _resize(args) -> int:
    from .export.adapter import check_output, read_adapter_for
    from .export.bundle import read_bundle
    from .export.lowrank import check_ranks
    from .export.lycoris import needs_lycoris_reader, read_lycoris
    from .export.lycoris_lowrank import lycoris_to_lora
    from .export.resize import resize_adapter

    check_ranks(args.rank, args.conv_rank)  # flag errors before the file is read
    check_output(args.output, args.overwrite)
    bundle = read_bundle(args.input)  # embeddings are kept as they are: only the LoRA part is resized
    if Path(args.input).is_file() and needs_lycoris_reader(args.input):  # LoHa/LoKr/... -> LoRA by SVD
        from .errors import ModelError

        lycoris = read_lycoris(args.input, base=args.variant)
        try:
            resized, report = lycoris_to_lora(lycoris, args.rank, conv_rank=args.conv_rank, dynamic=args.dynamic,
                                              param=args.dynamic_param)
        except ModelError as exc:
            raise ModelError(f"{args.input}: {exc}") from None
        layout = args.to or "kohya"
    else:
        adapter = read_adapter_for(args.input, args.variant)
        adapter.refuse_dora("resized", args.input)
        resized, report = resize_adapter(adapter, args.rank, conv_rank=args.conv_rank, dynamic=args.dynamic,
                                         param=args.dynamic_param)
        layout = args.to or adapter.layout
    out = _write(args.output, resized, layout, args, bundle)
    _print_fit(report, args.per_module)
    print(f"wrote {out} ({layout} layout)")
    _print_bundle(bundle, out, layout)
    _print_run_embeddings([args.input], out)
    return 0


def _merge_loras(args) -> int:
    from .export.adapter import check_output
    from .export.bundle import merge_bundles, read_bundle
    from .export.lowrank import check_ranks
    from .export.merge import merge_adapters

    check_ranks(args.rank, args.conv_rank)
    check_output(args.out, args.overwrite)
    specs = [_weighted(s) for s in args.adapters]
    inputs = [(_merge_input(path, args.variant), weight) for path, weight in specs]
    # embeddings are words, not weights: each input's are kept whatever its weight, as A1111 uses them
    bundle = merge_bundles([(path, read_bundle(path)) for path, _ in specs])
    merged, report = merge_adapters(inputs, rank=args.rank, conv_rank=args.conv_rank, names=[p for p, _ in specs])
    merged.metadata["modelspec.title"] = Path(args.out).stem
    layout = args.to or inputs[0][0].layout
    out = _write(args.out, merged, layout, args, bundle)
    _print_fit(report, args.per_module)
    print(f"wrote {out} ({layout} layout, {len(list(merged.items()))} modules)")
    _print_bundle(bundle, out, layout)
    _print_run_embeddings([p for p, _ in specs], out)
    return 0


def _merge_input(path: str, variant: str | None):
    """An input of merge-loras as a LoRA `Adapter`: a LyCORIS file (LoHa, LoKr, full, LoCon with CP
    cores) becomes the LoRA that holds each module's ΔW exactly (by SVD), as `resize` makes it."""
    from .export.adapter import read_adapter_for
    from .export.lycoris import needs_lycoris_reader, read_lycoris
    from .export.lycoris_lowrank import lycoris_to_lora

    if not (Path(path).is_file() and needs_lycoris_reader(path)):
        return read_adapter_for(path, variant)
    from .errors import ModelError

    try:
        lora, _ = lycoris_to_lora(read_lycoris(path, base=variant), None)
    except ModelError as exc:
        text = str(exc)
        raise ModelError(text if text.startswith(f"{path}: ") else f"{path}: {text}") from None
    return lora


def _extract(args) -> int:
    from .export.adapter import check_output, write_adapter
    from .export.extract import extract_adapter

    check_output(args.out, args.overwrite)
    adapter, report, skipped = extract_adapter(args.base, args.tuned, args.rank, conv_rank=args.conv_rank,
                                               min_diff=args.min_diff, device=args.device)
    adapter.metadata["modelspec.title"] = Path(args.out).stem
    out = write_adapter(args.out, adapter, args.to, _dtype(args.dtype), overwrite=args.overwrite)
    _print_fit(report, args.per_module)
    if skipped:
        print(f"{len(skipped)} layers unchanged (|ΔW| <= {args.min_diff}) and left out")
    print(f"wrote {out} ({args.to} layout)")
    return 0


def _common(p: argparse.ArgumentParser, dtype_default: str = "fp16", layout_default: str | None = None) -> None:
    choices = ["fp16", "bf16", "fp32"] + (["keep"] if dtype_default == "keep" else [])
    p.add_argument("--dtype", choices=choices, default=dtype_default, help=_DTYPE_HELP if dtype_default == "fp16"
                   else "precision of the saved tensors (default: keep the input's)")
    p.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")


def _variant(p: argparse.ArgumentParser) -> None:
    p.add_argument("--variant", choices=["sd15", "sdxl"], default=None,
                   help="base family, when it cannot be told from the file's keys or metadata")


def _ranks(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--rank", type=int, required=required, default=None, help="new rank")
    p.add_argument("--conv-rank", type=int, default=None, help="rank of 3x3 conv modules (default: --rank)")
    p.add_argument("--per-module", action="store_true", help="print each module's rank and retained norm")


def add_adapter_commands(sub) -> None:
    """Register the adapter-file commands on the `lora-trainer` subparsers."""
    layouts = ["kohya", "diffusers"]

    p = sub.add_parser("convert", help="convert an adapter between the kohya and diffusers layouts")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--to", choices=layouts, required=True, help="layout to write")
    _common(p, dtype_default="keep")
    _variant(p)
    p.set_defaults(func=_convert)

    p = sub.add_parser("inspect", help="show an adapter's layout, modules, ranks, alphas and metadata")
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="print everything as JSON")
    p.add_argument("--modules", action="store_true", help="list every module")
    _variant(p)
    p.set_defaults(func=_inspect)

    p = sub.add_parser("resize", help="change an adapter's rank by SVD, reporting the kept Frobenius norm; "
                       "a LyCORIS (LoHa, LoKr, full) input becomes a plain LoRA")
    p.add_argument("input")
    p.add_argument("output")
    _ranks(p, required=True)
    p.add_argument("--dynamic", choices=["sv_ratio", "sv_fro", "sv_cumulative"], default=None,
                   help="choose each module's rank (at most --rank) by its singular values, as kohya does")
    p.add_argument("--dynamic-param", type=float, default=None,
                   help="sv_ratio: largest/smallest kept singular value; sv_fro, sv_cumulative: fraction to keep")
    p.add_argument("--to", choices=layouts, default=None, help="layout to write (default: the input's)")
    _common(p)
    _variant(p)
    p.set_defaults(func=_resize)

    p = sub.add_parser("merge-loras", help="merge adapters into one: exact (ranks add up) or to --rank by SVD")
    p.add_argument("adapters", nargs="+", metavar="FILE[:WEIGHT]")
    p.add_argument("--out", required=True, help="merged adapter file")
    _ranks(p, required=False)
    p.add_argument("--to", choices=layouts, default=None, help="layout to write (default: the first input's)")
    _common(p)
    _variant(p)
    p.set_defaults(func=_merge_loras)

    p = sub.add_parser("extract", help="extract a LoRA from the difference of two model folders by SVD")
    p.add_argument("--base", required=True, help="original diffusers pipeline folder")
    p.add_argument("--tuned", required=True, help="fine-tuned diffusers pipeline folder of the same architecture")
    p.add_argument("--out", required=True, help="adapter file to write")
    _ranks(p, required=True)
    p.add_argument("--min-diff", type=float, default=0.0, help="leave out layers whose largest |ΔW| is at most this")
    p.add_argument("--device", default="cpu", help="where to run the SVDs (cpu, cuda)")
    p.add_argument("--to", choices=layouts, default="kohya", help="layout to write (default kohya)")
    _common(p)
    p.set_defaults(func=_extract)

