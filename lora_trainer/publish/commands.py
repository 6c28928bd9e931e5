"""The `publish` and `package` subcommands: their arguments and what they print.

cli.py registers them with `add_commands`; errors propagate as PublishError for it to report.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def _weight_range(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"got {text!r}; expected LOW,HIGH, e.g. 0.6,1.0") from None
    return low, high


def run_publish(args) -> int:
    from .hub import HubOptions, build_hub_folder, check_repo_id, upload_folder, upload_token
    from .run import read_run

    if not args.dry_run:  # before the folder is built: an upload that cannot happen is said first
        check_repo_id(args.hub)
        upload_token()
    run = read_run(args.run_dir)
    opts = HubOptions(repo_id=args.hub, license=args.license, base_model=args.base_model,
                      description=args.description, weight=args.weight, weight_range=args.weight_range)
    folder = build_hub_folder(run, args.out or Path(args.run_dir) / "hub-repo", opts, overwrite=args.overwrite)
    for note in folder.notes:
        print(f"note: {note}")
    verb = "would upload" if args.dry_run else "uploading"
    print(f"{verb} {folder.path} to {args.hub} ({'private' if args.private else 'public'}):")
    for name in folder.files:
        print(f"  {name}  ({(folder.path / name).stat().st_size:,} bytes)")
    if not args.dry_run:
        what = "embedding" if run.embedding_only else "LoRA"
        print(f"published: {upload_folder(folder.path, args.hub, private=args.private, what=what)}")
    return 0


def run_package(args) -> int:
    from .civitai import build_civitai_package
    from .guidance import weight_advice
    from .run import read_run

    run = read_run(args.run_dir)
    advice = weight_advice(run, args.weight, args.weight_range)
    names = build_civitai_package(run, args.civitai, advice, args.description, overwrite=args.overwrite)
    print(f"{args.civitai}:")
    for name in names:
        print(f"  {name}")
    return 0


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a training run folder (its output.dir)")
    p.add_argument("--description", default=None, help="one paragraph on what the adapter does")
    p.add_argument("--weight", type=float, default=None,
                   help="recommended weight (default: from a sweep grid, else 0.8); not for an embedding alone")
    p.add_argument("--weight-range", type=_weight_range, default=None, metavar="LOW,HIGH",
                   help="recommended weight range (default: from a sweep grid, else 0.6,1.0); not for an embedding alone")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output even if it was edited")


def add_commands(sub) -> None:
    """Register `publish` and `package` on the CLI's subparsers."""
    p = sub.add_parser("publish", help="build a HuggingFace repo folder with a model card and upload it")
    _add_common(p)
    p.add_argument("--hub", required=True, metavar="USER/REPO", help="the model repo to create or update")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--dry-run", action="store_true", help="write the folder and list it; upload nothing")
    p.add_argument("--out", default=None, help="repo folder to write (default: RUN_DIR/hub-repo)")
    p.add_argument("--license", default=None, help="licence id (default: the base model's)")
    p.add_argument("--base-model", default=None, metavar="OWNER/NAME",
                   help="hub id of the base, when model.base was a local folder")
    p.set_defaults(func=run_publish)

    p = sub.add_parser("package", help="build a CivitAI-ready zip from a run folder")
    _add_common(p)
    p.add_argument("--civitai", required=True, metavar="OUT.zip", help="the zip to write")
    p.set_defaults(func=run_package)
