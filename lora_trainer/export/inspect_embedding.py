"""`lora-trainer inspect` on a textual-inversion embedding file (A1111's `emb_params`, SDXL's
`clip_l`/`clip_g`, diffusers' `{token: vectors}`): its token, vectors, widths, the base family it
fits, the vectors' norms (an embedding trained too long or too fast grows far past the norms of the
base's own word embeddings) and its metadata."""

from __future__ import annotations

import os
from pathlib import Path

from ..inference.embeddings import DIFFUSERS_STEM, EmbeddingSpec, embedding_from
from .layouts import embedding_keys


def is_embedding_file(path: str | os.PathLike) -> bool:
    """Whether a .safetensors file's keys are an embedding's (not an adapter's)."""
    import safetensors

    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
            keys = list(f.keys())
    except Exception:
        return False
    return embedding_keys(keys)


def inspect_embedding(path: str | os.PathLike) -> dict:
    """The inspect report of an embedding file, as plain JSON-ready values."""
    import safetensors

    path = Path(path)
    with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
        metadata = dict(sorted((f.metadata() or {}).items()))
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
    embedding = embedding_from(EmbeddingSpec(path), tensors)  # the word as A1111 and infer.py name it
    trained_as = metadata.get("token")
    parts = {name: {"width": int(v.shape[1]),
                    "norms": [round(float(n), 4) for n in v.norm(dim=1)]} for name, v in embedding.parts.items()}
    return {"file": str(path), "size_bytes": path.stat().st_size, "layout": "embedding", "token": embedding.token,
            "token_from": "the key" if path.stem == DIFFUSERS_STEM and embedding.token != path.stem else "the file name",
            "trained_as": trained_as, "vectors": embedding.vectors, "fits": embedding.fits(), "parts": parts,
            "dtypes": dtypes, "metadata": metadata, "warnings": []}


def format_embedding(report: dict) -> list[str]:
    from .inspect import _hash_and_metadata_lines

    lines = [f"file        {report['file']} ({report['size_bytes'] / 1024:.1f} KiB, {', '.join(report['dtypes'])})",
             "layout      textual-inversion embedding",
             f"token       {report['token']} (from {report['token_from']}: the word prompts use in A1111 and infer.py)"
             + (f"; trained as {report['trained_as']!r}: --embedding FILE:{report['trained_as']} uses that word"
                if report["trained_as"] and report["trained_as"].lower() != report["token"].lower() else ""),
             f"vectors     {report['vectors']} (each takes one of a prompt window's 75 tokens)",
             f"fits        {report['fits']}"]
    for name, part in report["parts"].items():
        norms = part["norms"]
        lines.append(f"norms       {name}: {', '.join(f'{n:.3g}' for n in norms)}" if len(norms) <= 8 else
                     f"norms       {name}: {min(norms):.3g} to {max(norms):.3g} (mean {sum(norms) / len(norms):.3g})")
    return lines + _hash_and_metadata_lines(report, "warning")
