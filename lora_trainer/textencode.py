"""How text becomes CLIP hidden states, the one definition that training and inference share:
A1111's 75-token windows ([BOS] 75 tokens [EOS + padding], hidden states concatenated along the
sequence), clip skip (which layer's hidden states are read) and A1111's emphasis syntax
(`(word:1.3)`, `(word)`, `[word]`: parse_weights, apply_weights), read in prompts at inference and
in captions with data.weighted_captions; and textual-inversion embeddings at inference (a word that
stands for N learned vectors: `words` in chunk_runs, token_vectors)."""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional

import torch

CHUNK = 75  # tokens per window; BOS and EOS make it CLIP's 77
COMMA_BACKTRACK = 20  # a full window breaks after a comma this close to its end, as A1111 does
BREAK = -1.0  # the weight of a run that stands for A1111's BREAK (start a new window)
# The id written where an embedding's vectors go (A1111's choice too): any id below EOS keeps CLIP's
# pooled output at the EOS (old CLIP configs pool at the highest id), and token_vectors replaces
# its embedding anyway.
PLACEHOLDER = 0

# Textual-inversion words for one tokenizer: the token ids of an embedding's name -> (its name,
# its vectors (N, dim) for that tokenizer's encoder). lora_trainer.inference.embeddings builds them.
Words = dict[tuple[int, ...], tuple[str, torch.Tensor]]


def is_break(text: str, weight: float) -> bool:
    """Whether a (text, weight) run of parse_weights is BREAK. Both parts count, as in A1111: a
    prompt may weight its own words -1 (`(blurry:-1)`), and that is no BREAK."""
    return weight == BREAK and text == "BREAK"


@dataclass
class Chunks:
    """Token windows of one text for one tokenizer: ids and weights, each CHUNK + 2 long."""

    ids: list[list[int]]
    weights: list[list[float]]
    # Per window, {position: vector} where an embedding's vectors stand (at PLACEHOLDER ids); the
    # names of the embeddings the text uses, in order of first use. Both empty without `words`.
    vectors: list[dict[int, torch.Tensor]] = field(default_factory=list)
    used: list[str] = field(default_factory=list)


Piece = tuple[list[int], float, Optional[torch.Tensor], Optional[str]]


def _pieces(tokenizer, runs: Iterable[tuple[str, float]], words: Optional[Words] = None) -> Iterator[Piece]:
    """(token ids, weight, vectors, name) pieces that a window never splits: one token each, or an
    embedding's PLACEHOLDERs, one per vector (vectors and name None for plain tokens); ([], BREAK,
    None, None) for a BREAK run.

    An embedding is found, as A1111 finds it, by the token ids of its name inside a run's ids, the
    longest name first: so `EasyNegative` and `easynegative` both match (CLIP lowercases), and
    `(EasyNegative:1.2)` weights all of its vectors, but `EasyNegativeV2` is another word."""
    longest = max(map(len, words), default=0) if words else 0
    for text, weight in runs:
        if is_break(text, weight):
            yield [], BREAK, None, None
            continue
        # verbose=False: text past 77 tokens is what the windows are for; no "too long" warning
        tokens = tokenizer(text, add_special_tokens=False, verbose=False).input_ids
        i = 0
        while i < len(tokens):
            for n in range(min(longest, len(tokens) - i), 0, -1):
                found = words.get(tuple(tokens[i:i + n]))  # type: ignore[union-attr]
                if found is not None:
                    name, vectors = found
                    yield [PLACEHOLDER] * len(vectors), weight, vectors, name
                    i += n
                    break
            else:
                yield [tokens[i]], weight, None, None
                i += 1


def chunk_runs(tokenizer, runs: Iterable[tuple[str, float]], max_windows: Optional[int] = None,
               words: Optional[Words] = None) -> Chunks:
    """Tokenize (text, weight) runs and cut them into 75-token windows, each [BOS] text [EOS]
    padded to 77 with the tokenizer's pad id; a window that fills up breaks after a recent comma.

    `max_windows` keeps at most that many windows and drops the rest of the text. The last window
    kept is filled to the end rather than broken at a comma (what would follow is dropped anyway),
    so `max_windows=1` is exactly the tokenizer's own truncation to 77.

    `words`: textual-inversion embeddings; each name found stands for its N vectors (N positions
    of the same weight), kept in one window: one that does not fit starts the next, as in A1111.
    """
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    windows: list[tuple[list[int], list[float], dict[int, torch.Tensor]]] = []
    ids: list[int] = []
    weights: list[float] = []
    vecs: list[Optional[torch.Tensor]] = []  # an embedding's vector at each position, else None
    used: list[str] = []
    last_comma = -1

    def close() -> None:
        nonlocal ids, weights, vecs, last_comma
        fill = CHUNK - len(ids)
        # EOS right after the text, then padding: what CLIP was trained on and where its pooled
        # output is read (A1111 builds [BOS] text [EOS…EOS] and then swaps the extra EOS for the
        # pad id, which is the same sequence).
        windows.append(([bos, *ids, eos, *[pad] * fill], [1.0, *weights, 1.0, *[1.0] * fill],
                        {1 + k: v for k, v in enumerate(vecs) if v is not None}))  # 1 +: after BOS
        ids, weights, vecs, last_comma = [], [], [], -1

    for piece, weight, vectors, name in _pieces(tokenizer, runs, words):
        last = max_windows is not None and len(windows) >= max_windows - 1
        if not piece:  # BREAK
            if last:
                break
            close()
            continue
        if piece[0] == comma and vectors is None:
            last_comma = len(ids)
        elif len(ids) == CHUNK and not last and last_comma != -1 and CHUNK - last_comma <= COMMA_BACKTRACK:
            cut = last_comma + 1
            rest = ids[cut:], weights[cut:], vecs[cut:]
            ids, weights, vecs = ids[:cut], weights[:cut], vecs[:cut]
            close()
            ids, weights, vecs = (list(part) for part in rest)
        if len(ids) + len(piece) > CHUNK:
            if last:
                break
            close()
        ids += piece
        weights += [weight] * len(piece)
        vecs += list(vectors) if vectors is not None else [None]
        if name is not None and name not in used:
            used.append(name)
    if ids or not windows:
        close()
    return Chunks([w[0] for w in windows], [w[1] for w in windows], [w[2] for w in windows], used)


def pad_windows(tokenizer, chunks: Chunks, count: int) -> Chunks:
    """`chunks` followed by empty windows ([BOS][EOS] padding) up to `count` windows."""
    extra = count - len(chunks.ids)
    if extra <= 0:
        return chunks
    empty = chunk_runs(tokenizer, [("", 1.0)])
    return Chunks(chunks.ids + empty.ids * extra, chunks.weights + empty.weights * extra,
                  chunks.vectors + [{} for _ in range(extra)], chunks.used)


def literal_windows(tokenizer, text: str, count: int) -> list[list[int]]:
    """Exactly `count` windows of token ids for `text` read literally: no weight syntax, no BREAK
    (a caption's `(word:1.2)` is those characters). Longer text is cut, shorter text padded with
    empty windows, so every text has the same length (count · 77)."""
    return literal_chunks(tokenizer, text, count).ids


def literal_chunks(tokenizer, text: str, count: int, words: Optional[Words] = None) -> Chunks:
    """literal_windows' windows as Chunks; `words`: embeddings found in the text (chunk_runs)."""
    return pad_windows(tokenizer, chunk_runs(tokenizer, [(text, 1.0)], max_windows=count, words=words), count)


# ---- A1111 emphasis: `(word:1.3)`, `(word)`, `[word]`; prompts at inference, captions with
# data.weighted_captions ----

ROUND, SQUARE = 1.1, 1 / 1.1  # what one pair of (...) or [...] multiplies by
WEIGHT = re.compile(r":\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)")  # the `:1.3)` that ends an explicitly weighted group
BREAK_RUN = re.compile(r"\s*\bBREAK\b\s*")  # the word that starts a new window


def parse_weights(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) runs.

    `(x)` ×1.1, `((x))` ×1.21, `[x]` ÷1.1, `(x:1.3)` ×1.3 (instead of 1.1), nesting multiplies,
    `\\(` `\\)` `\\[` `\\]` `\\\\` are literal, unclosed brackets apply to the end, stray closers
    are ignored, and the word `BREAK` starts a new 75-token window (returned as ("BREAK", -1)).
    """
    runs: list[list] = []  # [text, weight] pairs, weights edited in place when brackets close
    open_round: list[int] = []  # index into runs where each still-open bracket started
    open_square: list[int] = []

    def scale(start: int, factor: float) -> None:
        for run in runs[start:]:
            if not is_break(*run):  # a BREAK inside brackets still starts a new window
                run[1] *= factor

    def add(piece: str) -> None:
        parts = BREAK_RUN.split(piece)
        for k, part in enumerate(parts):
            if k:
                runs.append(["BREAK", BREAK])
            if part:
                runs.append([part, 1.0])

    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\" and i + 1 < n:
            runs.append([text[i + 1], 1.0])
            i += 2
            continue
        if c == "(":
            open_round.append(len(runs))
        elif c == "[":
            open_square.append(len(runs))
        elif c == ")" and open_round:
            scale(open_round.pop(), ROUND)
        elif c == "]" and open_square:
            scale(open_square.pop(), SQUARE)
        elif c == ":" and open_round and (m := WEIGHT.match(text, i)):
            scale(open_round.pop(), float(m.group(1)))
            i = m.end()
            continue
        elif c in ")]":
            pass  # a closer without an opener: A1111 drops it too
        else:
            j = i
            while j < n and text[j] not in "\\()[]:":
                j += 1
            add(text[i:max(j, i + 1)])
            i = max(j, i + 1)
            continue
        i += 1
    for start in reversed(open_round):
        scale(start, ROUND)
    for start in reversed(open_square):
        scale(start, SQUARE)

    merged: list[tuple[str, float]] = []
    for piece, weight in runs:
        if merged and merged[-1][1] == weight and not is_break(piece, weight) and not is_break(*merged[-1]):
            merged[-1] = (merged[-1][0] + piece, weight)
        else:
            merged.append((piece, weight))
    return merged or [("", 1.0)]


def apply_weights(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's rule on windows z (..., 77, dim) with weights (..., 77): scale each position's
    embedding by its weight, then rescale each window so its mean is what it was (emphasis shifts
    attention without changing the overall magnitude). A window whose weights are all 1 is returned
    exactly as it was, not a rounding of it."""
    plain = (weights == 1).all(dim=-1, keepdim=True).unsqueeze(-1)
    if bool(plain.all()):
        return z
    before = z.mean(dim=(-2, -1), keepdim=True)
    scaled = z * weights.to(z.dtype).unsqueeze(-1)
    ratio = before / scaled.mean(dim=(-2, -1), keepdim=True)
    # A window whose mean is exactly 0 (a LayerNorm without bias, as in tiny test models) has no mean
    # to restore: it keeps the plain scaling instead of 0/0.
    ratio = torch.where(torch.isfinite(ratio), ratio, torch.ones_like(ratio))
    return torch.where(plain, z, scaled * ratio)


def weighted_windows(tokenizer, text: str, count: int, words: Optional[Words] = None) -> Chunks:
    """Exactly `count` windows of `text` read with its weight syntax (parse_weights): token ids and
    the weight of each position. Longer text is cut, shorter text padded with empty windows, as
    literal_windows does."""
    return pad_windows(tokenizer, chunk_runs(tokenizer, parse_weights(text), max_windows=count, words=words), count)


def plain_text(text: str) -> str:
    """`text` without its weight syntax: the words the text encoder reads (token counts)."""
    return "".join(" " if is_break(piece, weight) else piece for piece, weight in parse_weights(text)).strip()


def comma_in_brackets(text: str) -> bool:
    """Whether a comma stands inside (...) or [...]: tag shuffling and dropout split captions at
    every comma, so such a group would be torn apart (kohya warns about the same)."""
    depth, escaped = 0, False
    for c in text:
        if escaped:
            escaped = False
        elif c == "\\":
            escaped = True
        elif c in "([":
            depth += 1
        elif c in ")]":
            depth = max(0, depth - 1)
        elif c == "," and depth:
            return True
    return False


def final_layer_norm(text_encoder: torch.nn.Module) -> torch.nn.Module:
    """The CLIP text model's final LayerNorm, through DDP (`.module`) and the `.text_model` nesting
    of transformers < 5 (version 5 flattens CLIPTextModel)."""
    model = getattr(text_encoder, "module", text_encoder)
    return getattr(model, "text_model", model).final_layer_norm


def select_hidden(text_encoder, ids: torch.Tensor, clip_skip: int, sdxl: bool):
    """(hidden states, pooled or None) of `ids` (windows of 77) as UNets read them.

    Clip skip in A1111 numbering, 1 = the model's default. SD1: the last layer, or layer
    -clip_skip passed through the final LayerNorm (A1111). SDXL: the penultimate layer without
    LayerNorm, `clip_skip - 1` further back (what diffusers and ComfyUI do). Pooled: the projected
    text embedding of a CLIPTextModelWithProjection (SDXL's second encoder), else None.
    """
    out = text_encoder(ids, output_hidden_states=True)
    pooled = getattr(out, "text_embeds", None)
    if sdxl:
        return out.hidden_states[-(clip_skip + 1)], pooled
    if clip_skip <= 1:
        return out.last_hidden_state, pooled
    norm = final_layer_norm(text_encoder)
    # Called outside the encoder's forward (and so outside any autocast wrapped around it): match
    # the LayerNorm's dtype, which leaves an all-fp32 or all-fp16 encoder's numbers as they are.
    return norm(out.hidden_states[-clip_skip].to(norm.weight.dtype)), pooled


@contextlib.contextmanager
def token_vectors(text_encoder, vectors: list[dict[int, torch.Tensor]]):
    """While open, the encoder's token-embedding lookup gives, for row b of its input, the vector
    `vectors[b][position]` at each listed position instead of the placeholder id's row: that is
    how an embedding's vectors enter CLIP (A1111 swaps them in at the same point, before position
    embeddings are added). The encoder itself is not changed; nothing happens without vectors."""
    if not any(vectors):
        yield
        return
    table = getattr(text_encoder, "module", text_encoder).get_input_embeddings()

    def swap(module, args, out):
        out = out.clone()
        for row, fixes in enumerate(vectors):
            for position, vector in fixes.items():
                out[row, position] = vector.to(out.device, out.dtype)
        return out

    handle = table.register_forward_hook(swap)
    try:
        yield
    finally:
        handle.remove()


def encode_windows(text_encoder, ids: torch.Tensor, clip_skip: int, sdxl: bool):
    """(hidden states (B, n·77, dim), pooled (B, dim) or None) of `ids` (B, n windows, 77).

    All windows go through the encoder as one batch; their hidden states are concatenated along
    the sequence. The pooled embedding is the first window's, as kohya (sd-scripts keeps the first
    of the n pooled outputs for SDXL) and A1111 do.
    """
    batch, count, length = ids.shape
    hidden, pooled = select_hidden(text_encoder, ids.reshape(batch * count, length), clip_skip, sdxl)
    hidden = hidden.reshape(batch, count * length, hidden.shape[-1])
    if pooled is not None:
        pooled = pooled.reshape(batch, count, pooled.shape[-1])[:, 0]
    return hidden, pooled


def max_clip_skip(text_encoders: Iterable[torch.nn.Module]) -> int:
    """The largest clip skip every encoder can honour: its number of layers."""
    return min(getattr(e, "module", e).config.num_hidden_layers for e in text_encoders)
