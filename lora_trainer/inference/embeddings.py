"""Textual-inversion embeddings at inference: reading the `.safetensors` files A1111 and ComfyUI
users put in prompts by name ("EasyNegative"), checking that they fit the base, and the per-encoder
word tables the prompt encoder (lora_trainer.textencode) expands them with.

Layouts read (A1111 reads the same ones): one tensor of N vectors under any key (`emb_params` from
A1111/kohya, `string_to_param.*`, or diffusers' `learned_embeds.safetensors` {token: vectors}), or
SDXL's `clip_l` + `clip_g` pair, one set of vectors for each text encoder.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import DAMAGED, ModelError, first_line
from ..textencode import CHUNK, Words

FLAG = "--embedding"
SDXL_PARTS = ("clip_l", "clip_g")  # text_encoder (CLIP ViT-L) and text_encoder_2 (OpenCLIP bigG)
ONE = "clip"  # the part name of a one-encoder (SD 1.x / 2.x) embedding
# the name diffusers' textual-inversion script gives every file: its token is the one stored inside
DIFFUSERS_STEM = "learned_embeds"
# What each vector width is, for the message that names what a file fits.
WIDTH_FAMILY = {768: "SD 1.x", 1024: "SD 2.x"}
NOT_IN_TOKEN = "()[]\\"  # weight syntax: a token holding one could never be found in a prompt


@dataclass
class EmbeddingSpec:
    path: Path
    token: str | None = None  # the word prompts use; None: the file's stem


@dataclass
class Embedding:
    """One file's vectors: parts {"clip": (N, dim)} or {"clip_l": (N, 768), "clip_g": (N, 1280)}."""

    path: Path
    token: str
    parts: dict[str, torch.Tensor]

    @property
    def vectors(self) -> int:
        return next(iter(self.parts.values())).shape[0]

    def fits(self) -> str:
        """What base the file is for, in words."""
        if ONE in self.parts:
            width = self.parts[ONE].shape[1]
            family = WIDTH_FAMILY.get(width)
            return f"{family} ({width}-wide vectors)" if family else f"a text encoder of width {width}"
        return f"SDXL (clip_l {self.parts['clip_l'].shape[1]}-wide + clip_g {self.parts['clip_g'].shape[1]}-wide)"


def parse_embedding_spec(spec: str) -> EmbeddingSpec:
    """'FILE' or 'FILE:TOKEN' (the token is the part after the last colon, unless the whole text is
    an existing file or that part looks like a path)."""
    path, sep, token = spec.rpartition(":")
    if sep and path and not Path(spec).exists() and not any(c in token for c in "/\\"):
        if not token.strip():
            raise ModelError(f"{FLAG} '{spec}': nothing after the ':'; write FILE:TOKEN (the word prompts use) or FILE")
        return EmbeddingSpec(Path(path), token.strip())
    return EmbeddingSpec(Path(spec))


def _refuse(path: Path, problem: str) -> ModelError:
    return ModelError(f"{FLAG}: {path} {problem}")


def _check_path(path: Path) -> None:
    from ..export.files import PICKLE_SUFFIXES

    if path.is_dir():
        files = sorted(p.name for p in path.glob("*.safetensors"))
        inside = f" (it holds {', '.join(files[:3])})" if files else ""
        raise _refuse(path, f"is a folder; give the embedding's .safetensors file{inside}")
    if not path.is_file():
        raise _refuse(path, "file not found")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise _refuse(path, f"is a pickle ({path.suffix}), which can run code when loaded and is not read here; "
                            "save it as .safetensors first (A1111 and ComfyUI read that too)")


def _as_vectors(path: Path, key: str, tensor: torch.Tensor) -> torch.Tensor:
    """(N, dim) float vectors; one 1-D vector (diffusers' single-vector files) is N = 1."""
    if tensor.ndim == 1:
        tensor = tensor.unsqueeze(0)
    if tensor.ndim != 2 or not tensor.is_floating_point() or min(tensor.shape) == 0:
        raise _refuse(path, f"key {key!r} holds a {tuple(tensor.shape)} {str(tensor.dtype).replace('torch.', '')} "
                            "tensor, not embedding vectors (N, width); is it an embedding?")
    if tensor.shape[0] > CHUNK:
        raise _refuse(path, f"has {tensor.shape[0]} vectors; a prompt window holds {CHUNK}, so it cannot be used")
    return tensor.float()


def read_embedding(spec: EmbeddingSpec) -> Embedding:
    """The file's vectors, checked; refused in one line naming the file when it is missing, a
    pickle, damaged, or not a textual-inversion embedding. Reads no model."""
    import safetensors.torch

    path = spec.path
    _check_path(path)
    try:
        tensors = safetensors.torch.load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for a bad header
        if path.suffix.lower() != ".safetensors":
            raise _refuse(path, f"is not a .safetensors file ({first_line(exc)}); embeddings are read "
                                "from .safetensors") from None
        raise _refuse(path, f"cannot be read: {DAMAGED}") from None
    return embedding_from(spec, tensors)


def embedding_from(spec: EmbeddingSpec, tensors: dict[str, torch.Tensor]) -> Embedding:
    """The embedding the tensors read from `spec.path` hold, checked as `read_embedding` checks them."""
    path = spec.path
    if all(part in tensors for part in SDXL_PARTS):
        parts = {part: _as_vectors(path, part, tensors[part]) for part in SDXL_PARTS}
        if parts["clip_l"].shape[0] != parts["clip_g"].shape[0]:
            raise _refuse(path, f"has {parts['clip_l'].shape[0]} clip_l vectors but {parts['clip_g'].shape[0]} "
                                "clip_g vectors; an SDXL embedding has as many of each")
        stored = None
    elif len(tensors) == 1:
        stored, tensor = next(iter(tensors.items()))
        parts = {ONE: _as_vectors(path, stored, tensor)}
    else:
        keys = ", ".join(sorted(tensors)[:4]) + (", ..." if len(tensors) > 4 else "")
        raise _refuse(path, f"is not a textual-inversion embedding (keys: {keys or 'none'}); expected one tensor "
                            "(emb_params, or diffusers' {token: vectors}) or SDXL's clip_l and clip_g (an adapter "
                            "goes to --lora)")
    token = spec.token
    if token is None:
        # diffusers names every file learned_embeds: the word it was trained for is its key
        usable = stored is not None and path.stem == DIFFUSERS_STEM and stored not in ("emb_params", "*")
        token = stored if usable else path.stem
    if any(c in token for c in NOT_IN_TOKEN) or not token.strip():
        raise _refuse(path, f"gives the token {token!r}, which a prompt cannot hold as a word (brackets and "
                            "backslashes are weight syntax); name another with FILE:TOKEN")
    return Embedding(path, token.strip(), parts)


def load_embeddings(specs) -> list[Embedding]:
    """Every `--embedding` read and checked, before any model loads; two files for one token are refused."""
    embeddings = [read_embedding(s if isinstance(s, EmbeddingSpec) else EmbeddingSpec(s) if isinstance(s, Path)
                                 else parse_embedding_spec(s)) for s in specs]
    seen: dict[str, Path] = {}
    for e in embeddings:
        key = e.token.lower()  # CLIP lowercases prompts: EasyNegative and easynegative are one word
        if key in seen:
            raise ModelError(f"{FLAG}: {seen[key]} and {e.path} both use the token {e.token!r}; give one another "
                             "with FILE:TOKEN")
        seen[key] = e.path
    return embeddings


def encoder_parts(pipe, variant: str) -> list[str]:
    """The part of an embedding each of the pipeline's encoders (pipelines.encoders_of) reads."""
    from .pipelines import encoders_of

    if variant != "sdxl":
        return [ONE for _ in encoders_of(pipe)]
    first = getattr(pipe, "text_encoder", None)
    return ["clip_l" if encoder is first else "clip_g" for _, encoder in encoders_of(pipe)]


def check_embeddings_fit(embeddings: list[Embedding], pipe, variant: str, model: str) -> None:
    """Refuse, in one line naming the file and what it is for, an embedding whose vectors this
    base's text encoders cannot read (an SD 1.x file on SDXL, an SD 2.x one on SD 1.x, ...)."""
    from .pipelines import encoders_of

    parts = encoder_parts(pipe, variant)
    widths = [encoder.get_input_embeddings().embedding_dim for _, encoder in encoders_of(pipe)]
    if variant == "sdxl":
        need = "SDXL, which reads " + " and ".join(f"{part} ({w}-wide)" for part, w in zip(parts, widths)) + " vectors"
    else:
        need = f"{WIDTH_FAMILY.get(widths[0], 'a base')} with {widths[0]}-wide text vectors"
    for e in embeddings:
        for part, width in zip(parts, widths):
            have = e.parts.get(part)
            if have is None or have.shape[1] != width:
                raise ModelError(f"{FLAG}: {e.path} is an embedding for {e.fits()}, but --model {model} is {need}; "
                                 "use an embedding made for this base")
    check_words(embeddings, pipe)


def check_words(embeddings: list[Embedding], pipe) -> None:
    """Refuse two tokens the tokenizers read as one word ('my-style' and 'my - style', a name typed
    in NFC and a macOS file stem in NFD): a prompt could not tell them apart, and one file would
    silently take the other's place. The lowercase check before loading cannot see these."""
    from .pipelines import encoders_of

    for tokenizer, _ in encoders_of(pipe):
        seen: dict[tuple[int, ...], Embedding] = {}
        for e in embeddings:
            ids = tuple(tokenizer(e.token, add_special_tokens=False, verbose=False).input_ids)
            if not ids:
                raise _refuse(e.path, f"gives the token {e.token!r}, which the tokenizer reads as no word at all; "
                                      "name another with FILE:TOKEN")
            other = seen.setdefault(ids, e)
            if other is not e:
                raise ModelError(f"{FLAG}: {other.path} and {e.path} use the tokens {other.token!r} and {e.token!r}, "
                                 "which the text encoder reads as the same word; give one another with FILE:TOKEN")


def word_tables(embeddings: list[Embedding], pipe, variant: str) -> list[Words]:
    """For each of the pipeline's (tokenizer, encoder) pairs, the token ids of every embedding's
    name -> (name, its vectors for that encoder, on the encoder's device and dtype)."""
    from .pipelines import encoders_of

    tables = []
    for part, (tokenizer, encoder) in zip(encoder_parts(pipe, variant), encoders_of(pipe)):
        weight = encoder.get_input_embeddings().weight
        table: Words = {}
        for e in embeddings:
            ids = tuple(tokenizer(e.token, add_special_tokens=False, verbose=False).input_ids)
            if ids:
                table[ids] = (e.token, e.parts[part].to(weight.device, weight.dtype))
        tables.append(table)
    return tables


def unused_embeddings(embeddings: list[Embedding], pipe, texts: list[str]) -> list[Embedding]:
    """The embeddings none of `texts` names, found by token ids as the prompt encoder finds them
    (a misspelt "EasyNegatve" in the negative prompt otherwise draws without it, silently)."""
    from .pipelines import encoders_of

    tokenizer = encoders_of(pipe)[0][0]
    ids = [tokenizer(text, add_special_tokens=False, verbose=False).input_ids for text in texts if text]

    def named(e: Embedding) -> bool:
        want = tokenizer(e.token, add_special_tokens=False, verbose=False).input_ids
        return any(have[i:i + len(want)] == want for have in ids for i in range(len(have) - len(want) + 1))

    return [e for e in embeddings if not named(e)]


def embedding_hash(path: str | Path) -> str | None:
    """A1111's short hash of an embedding, shown under 'TI hashes': the first 12 hex of the SHA-256
    of the whole file."""
    digest = hashlib.sha256()
    try:
        with Path(path).open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()[:12]
