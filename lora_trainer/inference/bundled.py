"""Embeddings bundled in a `--lora` file (`bundle_emb.<TOKEN>.*`, see export/bundle.py): read with
the adapter and used exactly as `--embedding` files are, for as long as the adapter is loaded.

As in A1111 they are used whatever the adapter's weight; a bundled token that another `--lora`
file or an `--embedding` also uses is refused (A1111 skips the bundled one with a warning, which
leaves the user guessing which vectors a prompt gets).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ModelError
from .adapter_fit import pipe_family
from .embeddings import NOT_IN_TOKEN, WIDTH_FAMILY, Embedding, check_words, encoder_parts

FLAG = "--lora"


def bundled_embeddings(path: Path) -> list[Embedding]:
    """The embeddings bundled in the adapter file at `path` (none for most files), as
    `--embedding` reads them: float vectors, by token."""
    from ..export.bundle import read_bundle

    try:
        bundle = read_bundle(path)
    except ModelError as exc:
        raise ModelError(f"{FLAG}: {exc}") from None
    embeddings = []
    for token, parts in bundle.items():
        if any(c in token for c in NOT_IN_TOKEN):
            raise ModelError(f"{FLAG}: {path} bundles the embedding {token!r}, which a prompt cannot hold as a word "
                             "(brackets and backslashes are weight syntax)")
        embeddings.append(Embedding(path, token, {part: t.float() for part, t in parts.items()}))
    return embeddings


def _origin(e: Embedding, bundled_by: dict[str, list[Embedding]]) -> str:
    """How the user gave `e`, for messages that name both files of a conflict."""
    return f"--lora {e.path}" if any(e is b for es in bundled_by.values() for b in es) else f"--embedding {e.path}"


def check_bundled(new: list[Embedding], fixed: list[Embedding], bundled_by: dict[str, list[Embedding]],
                  pipe) -> None:
    """Refuse, in one line naming both files, a bundled token that an `--embedding` or another loaded
    `--lora` file already uses (or that the tokenizer reads as the same word), and a bundled
    embedding whose vectors do not fit the pipeline's text encoders."""
    from .pipelines import encoders_of

    loaded = fixed + [e for es in bundled_by.values() for e in es]
    for e in new:
        for other in loaded:
            if other.token.lower() == e.token.lower():
                same = any(other is f for f in fixed) and other.parts.keys() == e.parts.keys() and all(
                    torch.equal(other.parts[p], e.parts[p]) for p in e.parts)
                hint = ("they are the same vectors (a pivotal run's embedding.bundle): leave out the --embedding, "
                        "the --lora file alone draws with them" if same else "leave one of them out")
                raise ModelError(f"{FLAG}: {e.path} bundles the embedding {e.token!r}, which "
                                 f"{_origin(other, bundled_by)} also gives; {hint}")
    variant = pipe_family(pipe)
    encoders = encoders_of(pipe)
    widths = [encoder.get_input_embeddings().embedding_dim for _, encoder in encoders]
    for e in new:
        for part, width in zip(encoder_parts(pipe, variant), widths):
            have = e.parts.get(part)
            if have is None or have.shape[1] != width:
                base = ("SDXL" if variant == "sdxl" else WIDTH_FAMILY.get(widths[0], "a base")) + \
                       f" (text vectors {' and '.join(str(w) for w in widths)} wide)"
                raise ModelError(f"{FLAG}: {e.path} bundles the embedding {e.token!r} for {e.fits()}, but the base "
                                 f"is {base}; use the adapter with the base it was trained on")
    try:
        check_words(loaded + new, pipe)
    except ModelError as exc:
        raise ModelError(str(exc).replace("--embedding: ", f"{FLAG}: ", 1)) from None


def bundle_owner(token: str, bundled_by: dict[str, list[Embedding]]) -> str | None:
    """The name of the loaded adapter that bundles `token`, or None."""
    return next((name for name, es in bundled_by.items() if any(e.token == token for e in es)), None)
