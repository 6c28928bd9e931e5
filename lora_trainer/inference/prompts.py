"""Prompt encoding as AUTOMATIC1111 does it: `(word:1.3)` weights, prompts of any length in
75-token chunks, clip skip; the result goes to diffusers pipelines as `prompt_embeds`. The windows
and clip skip are lora_trainer.textencode's, the same training reads captions with.

We parse the syntax ourselves rather than use compel: compel speaks its own syntax (`word++`,
`(word)1.3`), not A1111's `(word:1.3)` / `[word]`, and it down-weights by blending with masked
embeddings instead of A1111's scale-then-restore-the-mean, so images would not match what users get
from the same prompt in A1111 or Forge. The rule here is small and fully tested.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..textencode import BREAK as BREAK_WEIGHT
from ..textencode import CHUNK, Chunks, chunk_runs, pad_windows, select_hidden  # noqa: F401 (CHUNK re-exported)

ROUND, SQUARE = 1.1, 1 / 1.1  # what one pair of (...) or [...] multiplies by
WEIGHT = re.compile(r":\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)")  # the `:1.3)` that ends an explicitly weighted group
BREAK = re.compile(r"\s*\bBREAK\b\s*")


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
            run[1] *= factor

    def add(piece: str) -> None:
        parts = BREAK.split(piece)
        for k, part in enumerate(parts):
            if k:
                runs.append(["BREAK", BREAK_WEIGHT])
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
        if merged and merged[-1][1] == weight and weight != BREAK_WEIGHT:
            merged[-1] = (merged[-1][0] + piece, weight)
        else:
            merged.append((piece, weight))
    return merged or [("", 1.0)]


def chunk_tokens(tokenizer, text: str) -> Chunks:
    """The prompt's weighted runs in 75-token windows (the rule lives in lora_trainer.textencode,
    shared with training)."""
    return chunk_runs(tokenizer, parse_weights(text))


def apply_weights(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's rule: scale each position's embedding by its weight, then rescale the whole chunk so
    its mean is what it was (so emphasis shifts attention without changing overall magnitude)."""
    if bool((weights == 1).all()):
        return z  # exactly the unweighted embedding, not a rounding of it
    before = z.mean()
    z = z * weights.to(z.dtype).reshape(*weights.shape, 1)
    return z * (before / z.mean())


@dataclass
class PromptEmbeds:
    embeds: torch.Tensor  # (1, 77·chunks, dim), encoders' features concatenated
    pooled: torch.Tensor | None  # SDXL: the projected text embedding of the first window


@torch.no_grad()
def encode_prompt(encoders, text: str, clip_skip: int = 1, sdxl: bool = False, chunks: int | None = None,
                  ) -> PromptEmbeds:
    """Encode `text` with each (tokenizer, text encoder) pair and concatenate their features.

    `chunks` pads the prompt with empty windows to that many (positive and negative prompts must
    have the same length; A1111 pads the shorter one the same way)."""
    per_encoder, pooled = [], None
    for tokenizer, text_encoder in encoders:
        tokens = chunk_tokens(tokenizer, text)
        if chunks is not None:
            tokens = pad_windows(tokenizer, tokens, chunks)
        device = next(text_encoder.parameters()).device
        zs = []
        for k, (ids, weights) in enumerate(zip(tokens.ids, tokens.weights)):
            z, pool = select_hidden(text_encoder, torch.tensor([ids], device=device), clip_skip, sdxl)
            zs.append(apply_weights(z, torch.tensor([weights], device=device)))
            if k == 0 and pool is not None:
                pooled = pool
        per_encoder.append(torch.cat(zs, dim=1))
    return PromptEmbeds(torch.cat(per_encoder, dim=-1), pooled)


def count_chunks(tokenizer, text: str) -> int:
    return len(chunk_tokens(tokenizer, text).ids)


def encode_pair(encoders, prompt: str, negative: str, clip_skip: int = 1, sdxl: bool = False,
                zero_empty_negative: bool = False) -> tuple[PromptEmbeds, PromptEmbeds]:
    """Positive and negative embeddings of equal length. `zero_empty_negative`: an empty negative
    prompt becomes zeros, as SDXL's pipeline config (`force_zeros_for_empty_prompt`) asks."""
    tokenizer = encoders[0][0]
    n = max(count_chunks(tokenizer, prompt), count_chunks(tokenizer, negative))
    pos = encode_prompt(encoders, prompt, clip_skip, sdxl, chunks=n)
    if zero_empty_negative and not negative:
        neg = PromptEmbeds(torch.zeros_like(pos.embeds), None if pos.pooled is None else torch.zeros_like(pos.pooled))
    else:
        neg = encode_prompt(encoders, negative, clip_skip, sdxl, chunks=n)
    return pos, neg
