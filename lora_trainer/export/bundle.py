"""Textual-inversion embeddings bundled inside a kohya-layout LoRA file (pivotal tuning), as
AUTOMATIC1111's Lora extension reads them: `bundle_emb.<TOKEN>.<part>`, the token being the
second dot-part of the key and the word prompts use.

Parts: `string_to_param.*` or `emb_params` (N, width) for a one-encoder base (SD 1.x/2.x), or
`clip_l` (N, 768) + `clip_g` (N, 1280) for SDXL. The file tools keep them in kohya-layout outputs
and write them beside diffusers-layout ones as `embeddings/<TOKEN>.safetensors` (A1111's
standalone embedding file), since that layout has no place for them; diffusers' own
`load_lora_weights` refuses such keys.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Mapping

import torch

from ..errors import ModelError
from ..fileio import atomic_path
from ..run_folder import EMBEDDINGS_DIR

PREFIX = "bundle_emb."
SDXL_PARTS = ("clip_l", "clip_g")  # text_encoder (CLIP ViT-L) and text_encoder_2 (OpenCLIP bigG)
ONE = "clip"  # the part of a one-encoder (SD 1.x / 2.x) embedding
WIDTH_FAMILY = {768: "SD 1.x", 1024: "SD 2.x"}
MAX_VECTORS = 75  # a prompt window holds 75 tokens: more vectors could never be used

# {token: {part: (N, width) tensor}}, parts {"clip"} or {"clip_l", "clip_g"}
Bundle = dict[str, dict[str, torch.Tensor]]


def is_bundle_key(key: str) -> bool:
    return key.startswith(PREFIX)


def parse_bundle(tensors: Mapping[str, torch.Tensor], name: str | os.PathLike) -> Bundle:
    """The `bundle_emb.*` tensors grouped by token and checked (shapes, parts, SDXL pairs)."""
    found: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, tensor in sorted(tensors.items()):
        token, _, part = key[len(PREFIX):].partition(".")
        if part.startswith("string_to_param.") or part == "emb_params":
            part_name = ONE
        elif part in SDXL_PARTS:
            part_name = part
        else:
            raise ModelError(f"{name}: key {key!r} is not a bundled embedding part (bundle_emb.TOKEN.clip_l, "
                             ".clip_g, .emb_params or .string_to_param.*; a token holds no dot)")
        if not token.strip():
            raise ModelError(f"{name}: key {key!r} names no token (bundle_emb.TOKEN.PART)")
        parts = found.setdefault(token, {})
        if part_name in parts:
            raise ModelError(f"{name}: the bundled embedding {token!r} has two sets of vectors "
                             f"({parts[part_name][0]!r} and {key!r}); keep one")
        parts[part_name] = (key, _vectors(name, key, tensor))
    bundle: Bundle = {}
    for token, parts in found.items():
        if ONE in parts and len(parts) > 1:
            raise ModelError(f"{name}: the bundled embedding {token!r} mixes one-encoder vectors "
                             f"({parts[ONE][0]!r}) with SDXL's clip_l/clip_g; keep one kind")
        if ONE not in parts and set(parts) != set(SDXL_PARTS):
            missing = next(p for p in SDXL_PARTS if p not in parts)
            raise ModelError(f"{name}: the bundled SDXL embedding {token!r} has no {PREFIX}{token}.{missing}; "
                             "an SDXL embedding needs both clip_l and clip_g")
        counts = {p: t.shape[0] for p, (_, t) in parts.items()}
        if len(set(counts.values())) > 1:
            raise ModelError(f"{name}: the bundled embedding {token!r} has {counts['clip_l']} clip_l vectors but "
                             f"{counts['clip_g']} clip_g vectors; an SDXL embedding has as many of each")
        bundle[token] = {p: t for p, (_, t) in parts.items()}
    return bundle


def _vectors(name, key: str, tensor: torch.Tensor) -> torch.Tensor:
    """(N, width) float vectors; a 1-D tensor is one vector."""
    if tensor.ndim == 1:
        tensor = tensor.unsqueeze(0)
    if tensor.ndim != 2 or not tensor.is_floating_point() or min(tensor.shape) == 0:
        raise ModelError(f"{name}: key {key!r} holds a {tuple(tensor.shape)} {str(tensor.dtype).replace('torch.', '')} "
                         "tensor, not embedding vectors (N, width)")
    if tensor.shape[0] > MAX_VECTORS:
        raise ModelError(f"{name}: key {key!r} has {tensor.shape[0]} vectors; a prompt window holds {MAX_VECTORS}, "
                         "so it cannot be used")
    return tensor


def read_bundle(path: str | os.PathLike) -> Bundle:
    """The embeddings bundled in the adapter file at `path` (only those tensors are read); {} for a
    file without any, or one safetensors cannot open (the adapter's reader says what is wrong)."""
    import safetensors

    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys() if is_bundle_key(k)}
    except Exception:  # unreadable: reported by whatever reads the adapter itself
        return {}
    return parse_bundle(tensors, path)


def fits(parts: Mapping[str, torch.Tensor]) -> str:
    """The base an embedding's vectors are for, in words."""
    if ONE in parts:
        width = parts[ONE].shape[1]
        family = WIDTH_FAMILY.get(width)
        return f"{family} ({width}-wide vectors)" if family else f"a text encoder of width {width}"
    return f"SDXL (clip_l {parts['clip_l'].shape[1]}-wide + clip_g {parts['clip_g'].shape[1]}-wide)"


def describe(bundle: Bundle) -> list[dict]:
    """token, vector count, widths per part and the base they fit, for reports."""
    return [{"token": token, "vectors": next(iter(parts.values())).shape[0],
             "widths": {p: t.shape[1] for p, t in parts.items()}, "fits": fits(parts)}
            for token, parts in bundle.items()]


def bundle_tensors(bundle: Bundle) -> dict[str, torch.Tensor]:
    """The kohya-file keys A1111 reads: `bundle_emb.T.string_to_param.*` (one encoder) or
    `bundle_emb.T.clip_l` / `.clip_g` (SDXL). A token with a dot is refused: A1111 reads only the
    key's second dot-part as the token."""
    out = {}
    for token, parts in bundle.items():
        if "." in token:
            raise ModelError(f"the embedding token {token!r} holds a dot, which a bundled key cannot carry "
                             "(A1111 reads the second dot-part of the key as the token); choose a token without one")
        names = {ONE: "string_to_param.*"} if ONE in parts else {p: p for p in SDXL_PARTS}
        out.update({f"{PREFIX}{token}.{names[p]}": t.contiguous() for p, t in parts.items()})
    return out


def merge_bundles(bundles: list[tuple[str, Bundle]]) -> Bundle:
    """One bundle from several files' ({file: bundle}); one token in two files is refused unless
    both hold the very same vectors (CLIP lowercases prompts, so case does not tell tokens apart)."""
    out: Bundle = {}
    source: dict[str, tuple[str, str]] = {}
    for name, bundle in bundles:
        for token, parts in bundle.items():
            seen = source.get(token.lower())
            if seen is None:
                out[token], source[token.lower()] = parts, (name, token)
                continue
            other = out[seen[1]]
            if set(other) != set(parts) or any(not torch.equal(other[p], parts[p]) for p in parts):
                raise ModelError(f"{seen[0]} and {name} both bundle an embedding {token!r} with other vectors; "
                                 "a merged file can hold one: merge without one of them")
    return out


# --- writing ---------------------------------------------------------------------------------------

def embedding_file(folder: str | os.PathLike, token: str) -> Path:
    return Path(folder) / EMBEDDINGS_DIR / f"{token}.safetensors"


def check_embedding_files(bundle: Bundle, folder: str | os.PathLike, overwrite: bool = False) -> list[Path]:
    """Where `write_embedding_files` will write; an existing file is refused unless `overwrite`."""
    for token in bundle:
        if any(c in token for c in "/\\") or token in (".", ".."):
            raise ModelError(f"the embedding token {token!r} cannot be a file name (embeddings/<TOKEN>.safetensors); "
                             "give it a token without slashes")
    paths = [embedding_file(folder, token) for token in bundle]
    for path in paths:
        if path.exists() and not overwrite:
            raise ModelError(f"{path} already exists; remove it or pass --overwrite to replace it")
    return paths


def write_embedding_files(bundle: Bundle, folder: str | os.PathLike, overwrite: bool = False) -> list[Path]:
    """Each embedding as A1111's standalone file `FOLDER/embeddings/<TOKEN>.safetensors`
    (`emb_params`, or SDXL's `clip_l` + `clip_g`), written atomically."""
    import safetensors.torch

    paths = check_embedding_files(bundle, folder, overwrite)
    for path, (token, parts) in zip(paths, bundle.items()):
        with atomic_path(path) as tmp:
            safetensors.torch.save_file(standalone_tensors(parts), str(tmp), metadata={"format": "pt"})
    return paths


def standalone_tensors(parts: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An embedding's tensors in A1111's standalone file: `emb_params`, or SDXL's `clip_l` + `clip_g`."""
    tensors = {"emb_params": parts[ONE]} if ONE in parts else {p: parts[p] for p in SDXL_PARTS}
    return {k: t.contiguous() for k, t in tensors.items()}


def add_to_file(path: str | os.PathLike, bundle: Bundle) -> Path:
    """Rewrite the kohya file at `path` with `bundle` added, its `sshs_*` hashes recomputed over
    every tensor (they hash the file's tensor bytes, the embeddings' included)."""
    import safetensors
    import safetensors.torch

    from .metadata import with_hashes

    with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
        metadata = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors.update(bundle_tensors(bundle))
    if "sshs_model_hash" in metadata:
        metadata = with_hashes(tensors, metadata)
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


def write_with_bundle(path: str | os.PathLike, adapter, layout: str, dtype, bundle: Bundle,
                      overwrite: bool = False) -> tuple[Path, list[Path]]:
    """`write_adapter` that keeps `bundle`: inside a kohya-layout file (written complete under a
    temporary name, then renamed), or beside a diffusers-layout one as `embeddings/<TOKEN>.safetensors`.
    Returns (the adapter file, the embedding files written beside it)."""
    from .adapter import check_output, write_adapter

    path = check_output(path, overwrite)
    if not bundle:
        return write_adapter(path, adapter, layout, dtype, overwrite=overwrite), []
    if layout != "kohya":
        check_embedding_files(bundle, path.parent, overwrite)  # before the adapter is written
        out = write_adapter(path, adapter, layout, dtype, overwrite=overwrite)
        return out, write_embedding_files(bundle, path.parent, overwrite)
    bundle_tensors(bundle)  # a token kohya keys cannot carry is refused before anything is written
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as tmp:
        staged = add_to_file(write_adapter(Path(tmp) / path.name, adapter, layout, dtype), bundle)
        with atomic_path(path) as final:
            os.replace(staged, final)
    return path, []


def bundle_note(bundle: Bundle, written: list[Path], layout: str) -> str | None:
    """The line a file tool prints about the bundled embeddings it kept."""
    if not bundle:
        return None
    tokens = ", ".join(bundle)
    if written:
        return (f"bundled embeddings ({tokens}) written beside it: {', '.join(str(p) for p in written)} "
                f"(the {layout} layout has no place for them; load them with --embedding or diffusers' "
                "load_textual_inversion)")
    return f"bundled embeddings kept in the file: {tokens}"
