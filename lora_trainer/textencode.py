"""How text becomes CLIP hidden states, the one definition that training and inference share:
A1111's 75-token windows ([BOS] 75 tokens [EOS + padding], hidden states concatenated along the
sequence) and clip skip (which layer's hidden states are read)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import torch

CHUNK = 75  # tokens per window; BOS and EOS make it CLIP's 77
COMMA_BACKTRACK = 20  # a full window breaks after a comma this close to its end, as A1111 does
BREAK = -1.0  # the weight of a run that stands for A1111's BREAK (start a new window)


@dataclass
class Chunks:
    """Token windows of one text for one tokenizer: ids and weights, each CHUNK + 2 long."""

    ids: list[list[int]]
    weights: list[list[float]]


def _tokens(tokenizer, runs: Iterable[tuple[str, float]]) -> Iterator[tuple[Optional[int], float]]:
    """(token, weight) for each token of each run; (None, BREAK) for a BREAK run."""
    for text, weight in runs:
        if weight == BREAK:
            yield None, BREAK
            continue
        # verbose=False: text past 77 tokens is what the windows are for; no "too long" warning
        for token in tokenizer(text, add_special_tokens=False, verbose=False).input_ids:
            yield token, weight


def chunk_runs(tokenizer, runs: Iterable[tuple[str, float]], max_windows: Optional[int] = None) -> Chunks:
    """Tokenize (text, weight) runs and cut them into 75-token windows, each [BOS] text [EOS]
    padded to 77 with the tokenizer's pad id; a window that fills up breaks after a recent comma.

    `max_windows` keeps at most that many windows and drops the rest of the text. The last window
    kept is filled to the end rather than broken at a comma (what would follow is dropped anyway),
    so `max_windows=1` is exactly the tokenizer's own truncation to 77.
    """
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    windows: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def close() -> None:
        nonlocal ids, weights, last_comma
        fill = CHUNK - len(ids)
        # EOS right after the text, then padding: what CLIP was trained on and where its pooled
        # output is read (A1111 builds [BOS] text [EOS…EOS] and then swaps the extra EOS for the
        # pad id, which is the same sequence).
        windows.append(([bos, *ids, eos, *[pad] * fill], [1.0, *weights, 1.0, *[1.0] * fill]))
        ids, weights, last_comma = [], [], -1

    for token, weight in _tokens(tokenizer, runs):
        last = max_windows is not None and len(windows) >= max_windows - 1
        if token is None:  # BREAK
            if last:
                break
            close()
            continue
        if token == comma:
            last_comma = len(ids)
        elif len(ids) == CHUNK and not last and last_comma != -1 and CHUNK - last_comma <= COMMA_BACKTRACK:
            cut = last_comma + 1
            rest_ids, rest_w = ids[cut:], weights[cut:]
            ids, weights = ids[:cut], weights[:cut]
            close()
            ids, weights = rest_ids, rest_w
        if len(ids) == CHUNK:
            if last:
                break
            close()
        ids.append(token)
        weights.append(weight)
    if ids or not windows:
        close()
    return Chunks([w[0] for w in windows], [w[1] for w in windows])


def pad_windows(tokenizer, chunks: Chunks, count: int) -> Chunks:
    """`chunks` followed by empty windows ([BOS][EOS] padding) up to `count` windows."""
    extra = count - len(chunks.ids)
    if extra <= 0:
        return chunks
    empty = chunk_runs(tokenizer, [("", 1.0)])
    return Chunks(chunks.ids + empty.ids * extra, chunks.weights + empty.weights * extra)


def literal_windows(tokenizer, text: str, count: int) -> list[list[int]]:
    """Exactly `count` windows of token ids for `text` read literally: no weight syntax, no BREAK
    (a caption's `(word:1.2)` is those characters). Longer text is cut, shorter text padded with
    empty windows, so every text has the same length (count · 77)."""
    return pad_windows(tokenizer, chunk_runs(tokenizer, [(text, 1.0)], max_windows=count), count).ids


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
