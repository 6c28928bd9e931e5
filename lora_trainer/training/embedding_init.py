"""Where a run's embedding vectors start when they continue earlier ones (kohya's textual-inversion
`--weights`): `embedding.init_from`, an embedding file or an adapter file that bundles the token, or
else the vectors `lora.init_from` bundles for the token. Read and checked before any model loads;
the vectors' width is checked against the text encoders once they load (pivotal.start_words)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError, ModelError
from ..export import bundle

log = logging.getLogger(__name__)

KEY = "embedding.init_from"
_PARTS = {"sd15": {bundle.ONE}, "sdxl": set(bundle.SDXL_PARTS)}
_FAMILY = {"sd15": "SD 1.x", "sdxl": "SDXL"}


@dataclass
class InitialVectors:
    parts: dict[str, torch.Tensor]  # {"clip": (N, width)} or {"clip_l": ..., "clip_g": ...}
    source: str  # for the log and the errors: the file, and "bundled in" when it was an adapter


def _bundled(path: Path, token: str) -> dict[str, torch.Tensor] | None:
    """The vectors `path` bundles for `token` (CLIP lowercases prompts: the case does not matter)."""
    try:
        found = bundle.read_bundle(path)
    except ModelError as exc:
        raise ConfigError(f"{KEY}: {exc}") from None
    return next((parts for name, parts in found.items() if name.lower() == token.lower()), None)


def _standalone(path: Path, token: str) -> dict[str, torch.Tensor]:
    from ..inference.embeddings import EmbeddingSpec, read_embedding

    try:
        return read_embedding(EmbeddingSpec(path, token)).parts
    except ModelError as exc:  # its messages start "--embedding: FILE ..."
        raise ConfigError(f"{KEY}: {str(exc).partition(': ')[2]}") from None


def _read(path: Path, token: str) -> InitialVectors:
    import safetensors

    if not path.is_file():
        raise ConfigError(f"{KEY}: {path} not found; give an embedding .safetensors file (OUT/embeddings/"
                          f"{token}.safetensors of an earlier run) or an adapter file that bundles '{token}'")
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
            keys = list(f.keys())
    except Exception:
        keys = []  # not a safetensors file: the embedding reader says so in its words
    bundled = sorted({k[len(bundle.PREFIX):].partition(".")[0] for k in keys if bundle.is_bundle_key(k)})
    if bundled or any(k.startswith(("lora_", "unet.", "text_encoder")) for k in keys):
        parts = _bundled(path, token)
        if parts is None:
            has = f"bundles only {', '.join(repr(t) for t in bundled)}" if bundled else "bundles no embedding"
            raise ConfigError(f"{KEY}: {path} is an adapter file that {has}, not '{token}'; give the embedding file "
                              f"(embeddings/{token}.safetensors), or set embedding.token to the bundled token")
        return InitialVectors(parts, f"'{token}' bundled in {path}")
    return InitialVectors(_standalone(path, token), str(path))


def _say_run_embedding(lora_file, token: str) -> None:
    """Warn when lora.init_from is an adapter of a pivotal run whose embedding of `token` is a file of
    its own: the LoRA continues, but the vectors would start afresh from the init words."""
    if not lora_file:
        return
    from ..inference.paired import embedding_token, run_embedding

    own = run_embedding(Path(lora_file))
    if own is not None and embedding_token(own).lower() == token.lower():
        log.warning("lora.init_from: %s was trained with the embedding %s, but the vectors start afresh (from "
                    "embedding.init_words or the token's own words); set embedding.init_from=%s to continue them too",
                    lora_file, own, own)


def initial_vectors(cfg, variant: str) -> InitialVectors | None:
    """The vectors the run's embedding continues, checked against the base family and
    embedding.vectors; None: it starts from the init words (pivotal.start_words)."""
    e, lora_file = cfg.embedding, cfg.lora.init_from
    if e.token is None:
        found = bundle.read_bundle(lora_file) if lora_file else {}
        if found:
            log.warning("lora.init_from: %s also bundles the embedding(s) %s, which this run neither trains nor "
                        "writes; set embedding.token (and embedding.vectors) to continue one", lora_file,
                        ", ".join(repr(t) for t in sorted(found)))
        return None
    if e.init_from is not None:
        start = _read(Path(e.init_from), e.token)
    else:
        parts = _bundled(Path(lora_file), e.token) if lora_file else None
        if parts is None:
            _say_run_embedding(lora_file, e.token)
            return None
        start = InitialVectors(parts, f"'{e.token}' bundled in lora.init_from {lora_file}")
    if set(start.parts) != _PARTS[variant]:
        other = "sdxl" if variant == "sd15" else "sd15"
        raise ConfigError(f"embedding.init_from: {start.source} is an {_FAMILY[other]} embedding but model.base is "
                          f"{_FAMILY[variant]}; give an embedding trained on an {_FAMILY[variant]} base")
    count = next(iter(start.parts.values())).shape[0]
    if count != e.vectors:
        raise ConfigError(f"embedding.vectors: {e.vectors} but {start.source} has {count} vector(s); set "
                          f"embedding.vectors={count} to continue it")
    return start
