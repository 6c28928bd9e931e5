"""What the UNet is conditioned on besides the noisy latents: prompt embeddings (one CLIP encoder
for SD1.x; two for SDXL, plus a pooled embedding) and SDXL's size/crop `add_time_ids`."""

from __future__ import annotations

from typing import Sequence

import torch


def tokenize(tokenizer, captions: Sequence[str]) -> torch.Tensor:
    return tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def encode_prompts(base, text_encoders: Sequence[torch.nn.Module], captions: Sequence[str],
                   device: torch.device) -> tuple[torch.Tensor, ...]:
    """(hidden states,) for SD1.x; (hidden states, pooled) for SDXL.

    SD1.x uses the last hidden state of its CLIP encoder. SDXL, as its pipeline does, takes the
    penultimate hidden state of each encoder, concatenated on the feature axis (768 + 1280), and
    the projected pooled output of the second encoder. `text_encoders` are the (possibly wrapped)
    modules to call, in the base's order.
    """
    if base.variant != "sdxl":
        return (text_encoders[0](tokenize(base.tokenizer, captions).to(device))[0],)
    hidden, pooled = [], None
    for tokenizer, encoder in zip((base.tokenizer, base.tokenizer_2), text_encoders):
        out = encoder(tokenize(tokenizer, captions).to(device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]  # CLIPTextModelWithProjection: text_embeds; only the second one is kept
    return torch.cat(hidden, dim=-1), pooled


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
