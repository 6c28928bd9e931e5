"""Adapter files side by side (`infer --compare`): the epoch and step files of a run, or any list of
adapters, in one labelled grid of prompts × files with one seed, so only the adapter differs.

The base loads once; each compared file is loaded, drawn for every prompt (and weight) and unloaded
again before the next, so one of them is in memory at a time, while the other `--lora` adapters stay
loaded in every cell. A run folder expands to its files in training order: by the training step
each file records, else epochs, then steps, then the final adapter.
Each file of a pivotal-tuning run draws with the embedding of its own epoch or step, and a run that
trained an embedding alone compares its embedding files (paired.py).
"""

from __future__ import annotations

import glob
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import ConfigError, ModelError
from ..export.files import PICKLE_SUFFIXES, adapter_path_problem
from ..imagegrid import Grid, labelled_grid
from ..pnginfo import GenerationInfo, save_png
from ..run_folder import EMBEDDINGS_DIR, read_saved_config, saved_text
from ..training.numbered import numbering
from .adapter_fit import why_not_loadable
from .adapters import AdapterSpec, parse_adapter_spec
from .block_weights import check_file_count
from .generate import Generated, Generator, Request

_GLOB_CHARS = set("*?[")


def _parts(path: Path) -> tuple[str, str | None, int | None]:
    """(run name, 'epoch' | 'step' | None, number) told by a file's name (training's numberings)."""
    name, kind, number = numbering(path.name)
    return (name, kind, number) if kind else (name.removesuffix(".diffusers"), None, None)


def column_label(path: Path) -> str:
    """'epoch 3' or 'step 100' when the file's name says so, else its stem."""
    _, kind, number = _parts(path)
    return f"{kind} {number}" if kind else path.name.removesuffix(".safetensors")


def file_labels(specs: list[AdapterSpec], with_weights: bool = True) -> list[str]:
    """Each file's label: `column_label`, with the run's name when files of several runs are
    compared, ': WEIGHT' on every label when some weight is not 1, and ' lbw=SPEC' on a file given
    per-block weights (one file under two presets is two columns that must not read alike)."""
    labels = [column_label(s.path) for s in specs]
    if len({_parts(s.path)[0] for s in specs}) > 1:  # "epoch 2" alone would not say whose
        labels = [f"{_parts(s.path)[0]} {label}" if _parts(s.path)[1] else label for s, label in zip(specs, labels)]
    if with_weights and any(s.weight != 1 for s in specs):
        labels = [f"{label}: {s.weight:g}" for label, s in zip(labels, specs)]
    return [f"{label} lbw={s.lbw}" if s.lbw else label for label, s in zip(labels, specs)]


def trained_steps(path: Path) -> int | None:
    """The optimizer steps an adapter had trained when it was saved, from its header's `ss_steps`
    (this trainer's files and kohya's carry it), or None when the file does not say."""
    import safetensors

    try:
        with safetensors.safe_open(str(path), framework="pt") as f:  # the header only
            return int((f.metadata() or {})["ss_steps"])
    except Exception:  # unreadable, no metadata, no or a bad ss_steps: the name decides
        return None


def training_order(paths: list[Path]) -> list[Path]:
    """The files in the order they were trained: by the step their header records (`ss_steps`),
    when every file has one, so that epoch and step files interleave as they were saved; else epoch
    files by epoch, then step files by step. Ties, and files the name does not number (final
    adapters), follow in that order, then by name. Where a file is there in both layouts
    (`output.format: both`) only the kohya one is kept."""
    names = {p.name for p in paths}
    kept = sorted({p for p in paths if not (p.name.endswith(".diffusers.safetensors")
                                            and p.name.replace(".diffusers.safetensors", ".safetensors") in names)})
    rank = {"epoch": 0, "step": 1, None: 2}
    steps = {p: trained_steps(p) for p in kept}
    by_steps = all(n is not None for n in steps.values())
    return sorted(kept, key=lambda p: (steps[p] if by_steps else 0, rank[_parts(p)[1]], _parts(p)[2] or 0, p.name))


def _run_name(folder: Path, files: list[Path]) -> str:
    """The run whose files a folder holds: config.yaml's `output.name`, else the one numbered name."""
    name = saved_text(read_saved_config(folder / "config.yaml"), "output", "name")
    if name and any(_parts(p)[0] == name for p in files):
        return name
    numbered = sorted({_parts(p)[0] for p in files if _parts(p)[1]})
    finals = sorted({_parts(p)[0] for p in files})
    candidates = numbered or finals
    if len(candidates) > 1:
        raise ConfigError(f"--compare: {folder} holds the adapters of several runs ({', '.join(candidates)}); "
                          f"give one with a glob, e.g. '{folder / candidates[0]}*.safetensors'")
    return candidates[0]


def expand_folder(folder: Path) -> list[Path]:
    """A run folder's epoch and step files in training order, then its final adapter (its embedding
    files, OUT/embeddings/*, when the run trained an embedding and no adapter)."""
    files = [p for p in folder.glob("*.safetensors") if p.is_file()]
    if not files:  # a run that trained an embedding alone: its embedding files are compared
        from .paired import embedding_files

        files = embedding_files(folder)
        folder = folder / EMBEDDINGS_DIR if files else folder
    if not files:
        raise ConfigError(f"--compare: {folder} holds no adapter files (*.safetensors) and no embeddings/; give "
                          "the run's output.dir or the files themselves")
    name = _run_name(folder, files)
    return training_order([p for p in files if _parts(p)[0] == name])


def expand_compare(items: list[str]) -> list[AdapterSpec]:
    """`--compare` values as adapter specs: FILE[:WEIGHT], a run folder or a glob (its files in
    training order); a weight after a folder or glob applies to each of its files."""
    specs: list[AdapterSpec] = []
    for item in items:
        try:
            spec = parse_adapter_spec(item)
        except ConfigError as exc:  # a bad lbw= is named for this flag
            raise ConfigError(str(exc).replace("--lora: ", "--compare: ", 1)) from None
        path = spec.path
        if path.is_dir():
            paths = expand_folder(path)
        elif not path.exists() and _GLOB_CHARS & set(str(path)):
            paths = training_order([Path(p) for p in glob.glob(str(path)) if Path(p).is_file()])
            if not paths:
                raise ConfigError(f"--compare: no file matches {path}; check the folder and the pattern")
        elif path.is_file():
            paths = [path]
        else:
            raise ConfigError(f"--compare: {path}: file not found; give adapter files, a run folder or a glob")
        for p in paths:
            if p.suffix.lower() in PICKLE_SUFFIXES:
                raise ConfigError(f"--compare: {p} {adapter_path_problem(p)}")
            try:
                check_file_count(AdapterSpec(p, spec.weight, spec.lbw))  # lbw= fits the file's family
            except ConfigError as exc:
                raise ConfigError(str(exc).replace("--lora: ", "--compare: ", 1)) from None
        specs += [AdapterSpec(p, spec.weight, spec.lbw) for p in paths]
    return specs


def check_fits(specs: list[AdapterSpec], pipe) -> None:
    """Refuse a file that will not load before any image is drawn, rather than after the columns
    before it. Only each file's header is read for this (keys, shapes, metadata): its weights are
    read once, when it is loaded for its column."""
    for spec in specs:
        why = why_not_loadable(spec.path, pipe, unreadable_is_a_reason=False)
        if why:
            raise ModelError(f"--compare: {spec.path}: {why}")


def check_compared_bundles(specs: list[AdapterSpec], generator: Generator) -> None:
    """Refuse a compared file whose bundled embeddings clash with the loaded ones (same token) or do
    not fit the base, before any column is drawn; each is used in its own column only."""
    from .bundled import bundled_embeddings, check_bundled

    for spec in specs:
        try:
            check_bundled(bundled_embeddings(spec.path), generator.adapters.fixed_embeddings,
                          generator.adapters.bundled, generator.pipe)
        except ModelError as exc:
            raise ModelError(str(exc).replace("--lora: ", "--compare: ", 1)) from None


def check_no_swept_embeddings(specs: list[AdapterSpec], weights: list[float] | None) -> None:
    """Refuse an embedding file among the compared ones when `weights` (--sweep) are given: it has
    no weight to sweep. Told from each file's header, so `infer` refuses it before any model loads."""
    from ..export.inspect_embedding import is_embedding_file

    embeddings = [s.path for s in specs if is_embedding_file(s.path)] if weights is not None else []
    if embeddings:
        raise ConfigError(f"--compare with --sweep sweeps adapter weights; an embedding file has none "
                          f"({embeddings[0]}): leave out --sweep")


@dataclass
class Comparison:
    grid: Grid
    cells: list[list[Generated]]  # [row][column], as in the grid
    names: list[str]  # each cell's file name part: "<row>-<col>-<file stem>" (an X/Y plot's: "<row>-<col>")
    info: GenerationInfo  # the first cell's parameters, less the compared adapter, plus "Compare" (an X/Y
    # plot's: the first cell's, plus A1111's "Script", "X Type", "X Values", ...)


def _describe(spec: AdapterSpec, weight: float | None = None) -> str:
    weight = spec.weight if weight is None else weight
    if spec.lbw:  # as --compare takes it back: FILE:WEIGHT:lbw=SPEC
        return f"{spec.path}:{weight:g}:lbw={spec.lbw}"
    return f"{spec.path}" + (f":{weight:g}" if weight != 1 else "")


def compare_grid(generator: Generator, specs: list[AdapterSpec], prompts: list[str], request: Request,
                 weights: list[float] | None = None) -> Comparison:
    """Draw every prompt with every file (rows = prompts, columns = files), or with `weights` one
    prompt as rows = files × columns = weights, all with `request.seed`. The adapters already loaded
    stay as they are in every cell."""
    if not specs:
        raise ConfigError("--compare: give at least one adapter file")
    if weights is not None and len(prompts) != 1:
        raise ConfigError("--compare with --sweep draws one prompt (rows = files, columns = weights); "
                          f"give one --prompt, not {len(prompts)}")
    check_no_swept_embeddings(specs, weights)
    from .paired import column_embeddings, drawn_with

    pairings = column_embeddings(specs, generator)  # each file's own embedding (pivotal runs), or None
    adapters = [s for s, p in zip(specs, pairings) if not (p and p.alone)]
    check_fits(adapters, generator.pipe)
    check_compared_bundles(adapters, generator)
    fixed = set(generator.adapters.specs)
    jobs = [(prompt, None) for prompt in prompts] if weights is None else [(prompts[0], w) for w in weights]
    by_file: list[list[Generated]] = []
    bundled: set[str] = set()  # tokens the compared files bundle: each column's own, like a paired one
    for spec, pairing in zip(specs, pairings):
        try:
            name = None if pairing and pairing.alone else generator.adapters.load(spec)
        except ModelError as exc:
            raise ModelError(str(exc).replace("--lora: ", "--compare: ", 1)) from None
        bundled.update(e.token for e in generator.adapters.bundled.get(name, []))
        try:
            column = []
            with drawn_with(generator, pairing):
                for prompt, weight in jobs:
                    if weight is not None:  # a sweep; otherwise the file keeps the weight it loaded with
                        generator.set_weight(name, weight)
                    one = replace(request, prompt=prompt, batch_size=1, batch_count=1)
                    column.append(generator.generate(one)[0])
            by_file.append(column)
        finally:
            if name is not None:
                generator.adapters.unload(name)
    labels = file_labels(specs, with_weights=weights is None)
    if weights is None:
        cells = [list(row) for row in zip(*by_file)]  # rows = prompts
        grid = labelled_grid([[c.image for c in row] for row in cells], prompts, labels)
        names = [[f"{r:02d}-{c:02d}-{s.path.name.removesuffix('.safetensors')}" for c, s in enumerate(specs)]
                 for r in range(len(prompts))]
    else:
        cells = by_file  # rows = files
        grid = labelled_grid([[c.image for c in row] for row in cells], labels, [f"weight {w:g}" for w in weights])
        names = [[f"{r:02d}-{c:02d}-{s.path.name.removesuffix('.safetensors')}" for c in range(len(weights))]
                 for r, s in enumerate(specs)]
    first = cells[0][0].info
    varied = {p.embedding.token for p in pairings if p} | bundled  # each column's own: in its cells' TI hashes
    info = replace(first, adapters=[a for a in first.adapters if a[0] in fixed], extra=dict(first.extra),
                   embeddings=[e for e in first.embeddings if e[0] not in varied])
    info.extra["Compare"] = ", ".join(_describe(s, 1.0 if weights else None) for s in specs)
    if weights is not None:
        info.extra["Sweep"] = ",".join(f"{w:g}" for w in weights)
    return Comparison(grid, cells, [n for row in names for n in row], info)


def save_comparison(comparison: Comparison, out_dir: str | Path, prefix: str = "compare") -> list[Path]:
    """OUT/compare-NNN.png (the grid, its parameters listing the files) and each cell's PNG with
    its own parameters in OUT/compare-NNN/, every file written atomically; returns the grid first.
    `prefix` names other grids of cells so saved (`xyz` for --grid-x/--grid-y)."""
    out_dir = Path(out_dir)
    k = 0
    while (out_dir / f"{prefix}-{k:03d}.png").exists() or (out_dir / f"{prefix}-{k:03d}").exists():
        k += 1
    folder = out_dir / f"{prefix}-{k:03d}"
    cells = [cell for row in comparison.cells for cell in row]
    paths = [save_png(cell.image, folder / f"{name}.png", cell.info) for cell, name in zip(cells, comparison.names)]
    # the grid last: its presence says the cells beside it are complete
    return [save_png(comparison.grid.image, out_dir / f"{prefix}-{k:03d}.png", comparison.info), *paths]
