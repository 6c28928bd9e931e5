"""What the UNet is conditioned on besides the noisy latents: prompt embeddings (one CLIP encoder
for SD1.x; two for SDXL, plus a pooled embedding) and SDXL's size/crop `add_time_ids`."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..errors import ConfigError
from ..textencode import (CHUNK, Words, apply_weights, encode_windows, literal_chunks, max_clip_skip, token_vectors,
                          weighted_windows)


def encode_prompts(base, text_encoders: Sequence[torch.nn.Module], captions: Sequence[str],
                   device: torch.device, clip_skip: int = 1, max_token_length: int = CHUNK,
                   weighted: bool = False, words: Optional[Sequence[Words]] = None) -> tuple[torch.Tensor, ...]:
    """(hidden states,) for SD1.x; (hidden states, pooled) for SDXL.

    Each caption is read literally in `max_token_length / 75` windows of 77 tokens (longer ones
    cut, shorter ones padded with empty windows), so every caption's embedding has the same
    length whatever batch it is in: cache entries stack, and a caption trains the same whether
    its batch-mates are long or short (kohya pads to max_token_length the same way). Hidden states
    are chosen by `clip_skip` (lora_trainer.textencode.select_hidden); SDXL concatenates its two
    encoders' on the feature axis (768 + 1280) and takes the projected pooled output of the second
    encoder's first window. `text_encoders` are the (possibly wrapped) modules to call, in the
    base's order; gradients flow through every window when they are trained.

    `weighted` (data.weighted_captions): `(word:1.3)`, `(word)`, `[word]` and BREAK are read as
    inference reads a prompt (lora_trainer.textencode.parse_weights): each encoder's hidden states
    are weighted window by window with A1111's rule (apply_weights); the pooled output is not.

    `words`, one table per encoder: a trained embedding (embedding.token), whose vectors stand
    where the captions name it, as an embedding file's do at inference; gradients reach them.
    """
    sdxl = base.variant == "sdxl"
    windows = max_token_length // CHUNK
    hidden, pooled = [], None
    for k, (tokenizer, encoder) in enumerate(zip((base.tokenizer, base.tokenizer_2), text_encoders)):
        table = words[k] if words else None
        read = weighted_windows if weighted else literal_chunks
        chunks = [read(tokenizer, c, windows, table) for c in captions]
        ids = torch.tensor([ch.ids for ch in chunks], device=device)
        with token_vectors(encoder, [fixes for ch in chunks for fixes in ch.vectors]):  # (B · windows) rows
            states, pool = encode_windows(encoder, ids, clip_skip, sdxl)
        if weighted:
            weights = torch.tensor([ch.weights for ch in chunks], device=device)  # (B, windows, 77)
            states = apply_weights(states.reshape(*weights.shape, -1), weights).reshape(states.shape)
        hidden.append(states)
        pooled = pool if pool is not None else pooled  # only SDXL's second encoder has one
    if not sdxl:
        return (hidden[0],)
    return torch.cat(hidden, dim=-1), pooled


def check_clip_skip(clip_skip: int, text_encoders: Sequence[torch.nn.Module]) -> None:
    """model.clip_skip against the loaded encoders (the config check only knows CLIP's usual 12)."""
    most = max_clip_skip(text_encoders)
    if clip_skip > most:
        raise ConfigError(f"model.clip_skip: got {clip_skip}; expected 1 to {most} "
                          f"(this base's text encoder has {most} layers)")


def time_ids(original_size: torch.Tensor, crop_top_left: torch.Tensor, target_size: Sequence[int]) -> torch.Tensor:
    """SDXL's micro-conditioning per image: (orig h, orig w, crop top, crop left, target h, target w).

    The crop is in the resized image's pixels, as SDXL was trained; original and crop are (B, 2).
    """
    target = torch.tensor(list(target_size), dtype=torch.long, device=original_size.device)
    target = target.expand(original_size.shape[0], 2)
    return torch.cat([original_size.long(), crop_top_left.long(), target], dim=1)


def unet_conditioning(embeddings: tuple[torch.Tensor, ...], batch: dict, target_size: Sequence[int],
                      device: torch.device) -> dict:
    """Keyword arguments for the UNet call after the latents and timesteps."""
    kwargs = {"encoder_hidden_states": embeddings[0]}
    if len(embeddings) > 1:
        pooled = embeddings[1]
        ids = time_ids(batch["original_size"], batch["crop_top_left"], target_size)
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": ids.to(device, pooled.dtype)}
    return kwargs


def pipeline_prompt_embeds(base, pipe, prompts: Sequence[str], negative: str, clip_skip: int = 1,
                           max_token_length: int = CHUNK, weighted: bool = False,
                           words: Optional[Sequence[Words]] = None) -> dict:
    """`prompt_embeds` (and SDXL's pooled) arguments for a diffusers pipeline call, so samples and
    class images read their prompts as training reads captions (clip skip, long prompts), with
    the pipeline's own (possibly adapted) text encoders. An empty negative prompt is zeros where
    the pipeline's config asks for it (SDXL's `force_zeros_for_empty_prompt`). `weighted`: prompts
    read their `(word:1.3)` weights, as captions do with data.weighted_captions."""
    encoders = [m for m in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if m is not None]
    device = next(encoders[0].parameters()).device
    with torch.no_grad():
        pos = encode_prompts(base, encoders, prompts, device, clip_skip, max_token_length, weighted, words)
        if not negative and getattr(pipe.config, "force_zeros_for_empty_prompt", False):
            neg = tuple(torch.zeros_like(t) for t in pos)
        else:
            neg = encode_prompts(base, encoders, [negative] * len(prompts), device, clip_skip, max_token_length,
                                 weighted, words)
    kwargs = {"prompt_embeds": pos[0], "negative_prompt_embeds": neg[0]}
    if len(pos) > 1:
        kwargs.update(pooled_prompt_embeds=pos[1], negative_pooled_prompt_embeds=neg[1])
    return kwargs
