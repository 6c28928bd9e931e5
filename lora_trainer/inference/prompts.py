"""Prompt encoding as AUTOMATIC1111 does it: `(word:1.3)` weights, prompts of any length in
75-token chunks, clip skip; the result goes to diffusers pipelines as `prompt_embeds`. The windows
and clip skip are lora_trainer.textencode's, the same training reads captions with.

We parse the syntax ourselves rather than use compel: compel speaks its own syntax (`word++`,
`(word)1.3`), not A1111's `(word:1.3)` / `[word]`, and it down-weights by blending with masked
embeddings instead of A1111's scale-then-restore-the-mean, so images would not match what users get
from the same prompt in A1111 or Forge. The rule here is small and fully tested.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

# The syntax and the weighting rule live in lora_trainer.textencode (training reads weighted
# captions with them); they are re-exported here, where inference users look for them.
from ..textencode import (BREAK_RUN as BREAK, ROUND, SQUARE, WEIGHT, CHUNK, Chunks, Words,  # noqa: F401
                          apply_weights, chunk_runs, pad_windows, parse_weights, select_hidden, token_vectors)


def chunk_tokens(tokenizer, text: str, words: Optional[Words] = None) -> Chunks:
    """The prompt's weighted runs in 75-token windows (the rule lives in lora_trainer.textencode,
    shared with training); `words`: textual-inversion embeddings for this tokenizer."""
    return chunk_runs(tokenizer, parse_weights(text), words=words)


@dataclass
class PromptEmbeds:
    embeds: torch.Tensor  # (1, 77·chunks, dim), encoders' features concatenated
    pooled: torch.Tensor | None  # SDXL: the projected text embedding of the first window
    used: list[str] = field(default_factory=list)  # the textual-inversion embeddings the text names


def _words(words: Optional[Sequence[Optional[Words]]], k: int) -> Optional[Words]:
    return words[k] if words else None


@torch.no_grad()
def encode_prompt(encoders, text: str, clip_skip: int = 1, sdxl: bool = False, chunks: int | None = None,
                  words: Optional[Sequence[Optional[Words]]] = None) -> PromptEmbeds:
    """Encode `text` with each (tokenizer, text encoder) pair and concatenate their features.

    `chunks` pads the prompt with empty windows to that many (positive and negative prompts must
    have the same length; A1111 pads the shorter one the same way). `words`, one per pair: the
    textual-inversion embeddings each encoder reads (lora_trainer.inference.embeddings)."""
    per_encoder, pooled, used = [], None, []
    for e, (tokenizer, text_encoder) in enumerate(encoders):
        tokens = chunk_tokens(tokenizer, text, _words(words, e))
        if chunks is not None:
            tokens = pad_windows(tokenizer, tokens, chunks)
        used = used or tokens.used
        device = next(text_encoder.parameters()).device
        zs = []
        for k, (ids, weights) in enumerate(zip(tokens.ids, tokens.weights)):
            with token_vectors(text_encoder, [tokens.vectors[k]]):
                z, pool = select_hidden(text_encoder, torch.tensor([ids], device=device), clip_skip, sdxl)
            zs.append(apply_weights(z, torch.tensor([weights], device=device)))
            if k == 0 and pool is not None:
                pooled = pool
        per_encoder.append(torch.cat(zs, dim=1))
    return PromptEmbeds(torch.cat(per_encoder, dim=-1), pooled, used)


def count_chunks(tokenizer, text: str, words: Optional[Words] = None) -> int:
    return len(chunk_tokens(tokenizer, text, words).ids)


def encode_pair(encoders, prompt: str, negative: str, clip_skip: int = 1, sdxl: bool = False,
                zero_empty_negative: bool = False, words: Optional[Sequence[Optional[Words]]] = None,
                ) -> tuple[PromptEmbeds, PromptEmbeds]:
    """Positive and negative embeddings of equal length. `zero_empty_negative`: an empty negative
    prompt becomes zeros, as SDXL's pipeline config (`force_zeros_for_empty_prompt`) asks. `words`:
    textual-inversion embeddings, one table per encoder, as encode_prompt takes them."""
    tokenizer = encoders[0][0]
    n = max(count_chunks(tokenizer, prompt, _words(words, 0)), count_chunks(tokenizer, negative, _words(words, 0)))
    pos = encode_prompt(encoders, prompt, clip_skip, sdxl, chunks=n, words=words)
    if zero_empty_negative and not negative:
        neg = PromptEmbeds(torch.zeros_like(pos.embeds), None if pos.pooled is None else torch.zeros_like(pos.pooled))
    else:
        neg = encode_prompt(encoders, negative, clip_skip, sdxl, chunks=n, words=words)
    return pos, neg
