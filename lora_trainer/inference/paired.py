"""Each epoch's and step's adapter with the embedding trained beside it. A pivotal-tuning run
(embedding.token) writes OUT/embeddings/<token><suffix>.safetensors next to OUT/<name><suffix>.safetensors
(suffix '-000002', '-step00000100' or none for the final files); an epoch-2 adapter drawn with no
embedding, or with the final one, is not what training made at epoch 2.

`infer --compare` loads each compared file's own embedding for its column (`column_embeddings`,
`drawn_with`); a run that trained an embedding alone (no LoRA) compares its embedding files
themselves; a plain `--lora` of such a run without its embedding is warned about (`warn_unpaired`).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelError
from ..export.bundle import is_bundle_key
from ..export.inspect_embedding import is_embedding_file
from ..run_folder import EMBEDDINGS_DIR, read_saved_config, saved_text
from .adapters import AdapterSpec
from .compare import _parts, trained_steps
from .embeddings import Embedding, EmbeddingSpec, check_embeddings_fit, read_embedding

log = logging.getLogger(__name__)


@dataclass
class Pairing:
    """The embedding one compared column draws with."""

    embedding: Embedding
    alone: bool  # the compared file is the embedding itself (no adapter to load for the column)


def numbered_suffix(path: Path) -> str:
    """The epoch or step part of a run file's name: '-000002', '-step00000100', or '' (final)."""
    _, kind, number = _parts(path)
    return "" if kind is None else f"-{number:06d}" if kind == "epoch" else f"-step{number:08d}"


def _header(path: Path) -> tuple[set[str], dict[str, str]]:
    """A safetensors file's keys and metadata, without its tensors; nothing when it cannot be read."""
    import safetensors

    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            return set(f.keys()), dict(f.metadata() or {})
    except Exception:  # unreadable: whatever reads the file for real says what is wrong
        return set(), {}


def _bundles(path: Path) -> bool:
    return any(is_bundle_key(k) for k in _header(path)[0])


def _config_token(folder: Path) -> str | None:
    """The run's `embedding.token` from its config.yaml, or None."""
    return saved_text(read_saved_config(folder / "config.yaml"), "embedding", "token")


def embedding_token(path: Path) -> str:
    """The word a run's embedding file stands for: its header's `token`, else the run's config.yaml
    `embedding.token` when the name is that token's, else the file's stem less its epoch/step suffix."""
    token = _header(path)[1].get("token")
    if token:
        return token
    stem = path.name.removesuffix(".safetensors")
    configured = _config_token(path.parent.parent)
    if configured and stem == configured + numbered_suffix(path):
        return configured
    return stem.removesuffix(numbered_suffix(path)) or stem


def embedding_files(folder: Path) -> list[Path]:
    """The embedding files of a run folder (OUT/embeddings/*.safetensors); [] when it has none."""
    where = Path(folder) / EMBEDDINGS_DIR
    return sorted(p for p in where.glob("*.safetensors") if p.is_file()) if where.is_dir() else []


def run_embedding(adapter: Path) -> Path | None:
    """The embedding trained with the adapter file `adapter` (OUT/embeddings/<token><suffix>.safetensors
    for OUT/<name><suffix>.safetensors), or None: no embeddings/ beside it, no file of its epoch or
    step there, several, or one whose header records another training step than the adapter's."""
    adapter = Path(adapter)
    suffix = numbered_suffix(adapter)
    token = _config_token(adapter.parent)
    found = [adapter.parent / EMBEDDINGS_DIR / f"{token}{suffix}.safetensors"] if token else []
    found = [p for p in found if p.is_file()] or [p for p in embedding_files(adapter.parent)
                                                  if numbered_suffix(p) == suffix]
    if len(found) != 1:
        return None
    steps = trained_steps(adapter), trained_steps(found[0])
    return found[0] if None in steps or steps[0] == steps[1] else None


def separate_embedding(adapter: Path) -> tuple[Path, str] | None:
    """(file, token) of the embedding trained with `adapter` when it is a file of its own
    (run_embedding) and the adapter bundles none: what an adapter drawn, merged or rewritten alone
    goes without. None otherwise."""
    own = run_embedding(adapter)
    if own is None or _bundles(adapter):
        return None
    return own, embedding_token(own)


def column_embeddings(specs: list[AdapterSpec], generator) -> list[Pairing | None]:
    """Each compared file's embedding, read and checked against the base before any column is drawn:
    an embedding file is its own; an adapter of a pivotal run has its epoch's or step's (none when
    it bundles its embeddings: those are used, as for any `--lora`). Where an `--embedding` gives the
    same token, the column's own one replaces it in that column; said once per token."""
    pairings: list[Pairing | None] = []
    for spec in specs:
        alone = is_embedding_file(spec.path)
        path = spec.path if alone else None if _bundles(spec.path) else run_embedding(spec.path)
        if path is None:
            pairings.append(None)
            continue
        embedding = read_embedding(EmbeddingSpec(path, embedding_token(path)))
        try:
            check_embeddings_fit([embedding], generator.pipe, generator.variant, generator.model)
        except ModelError as exc:
            raise ModelError(str(exc).replace("--embedding: ", "--compare: ", 1)) from None
        pairings.append(Pairing(embedding, alone))
    bundled = {e.token.lower(): e for es in generator.adapters.bundled.values() for e in es}
    for token in sorted({p.embedding.token for p in pairings if p}):
        clash = bundled.get(token.lower())
        if clash is not None:
            raise ModelError(f"--compare: the compared files' embedding {token!r} is also bundled in --lora "
                             f"{clash.path}; leave that adapter out")
        given = [e for e in generator.embeddings if e.token.lower() == token.lower()]
        if given:
            log.info("--compare: each column draws with its own embedding %r (%s/...), in place of --embedding %s",
                     token, next(p.embedding.path.parent for p in pairings if p and p.embedding.token == token),
                     given[0].path)
    return pairings


@contextmanager
def drawn_with(generator, pairing: Pairing | None):
    """The column's embedding loaded (in place of an `--embedding` of its token) while the column
    is drawn, then taken out again and the replaced one put back."""
    if pairing is None:
        yield
        return
    token = pairing.embedding.token
    replaced = next((e for e in generator.embeddings if e.token.lower() == token.lower()), None)
    if replaced is not None:
        generator.unload_embedding(replaced.token)
    generator.load_embedding(pairing.embedding)
    try:
        yield
    finally:
        generator.unload_embedding(token)
        if replaced is not None:
            generator.load_embedding(replaced)


def warn_unpaired(adapters: list[AdapterSpec], embeddings: list) -> list[str]:
    """Warn (log, one line each) about a `--lora` file of a pivotal run whose own embedding this
    command does not load (and which does not bundle it): drawn without it, the adapter is not what
    training made. `embeddings`: the `--embedding` values. Returns the warnings."""
    from .embeddings import parse_embedding_spec

    given = set()
    for spec in embeddings:
        path = spec.path if isinstance(spec, EmbeddingSpec) else Path(spec) if isinstance(spec, Path) \
            else parse_embedding_spec(spec).path
        given.add(path.resolve())
    warnings = []
    for adapter in adapters:
        found = separate_embedding(adapter.path)
        if found is None or found[0].resolve() in given:
            continue
        own, token = found
        warnings.append(f"--lora: {adapter.path} was trained with the embedding {own}, which this command does not "
                        f"load; add --embedding {own}:{token} to draw it as trained")
    for warning in warnings:
        log.warning("%s", warning)
    return warnings
