"""Lazy caches for the frozen parts of a step: VAE latents and text embeddings.

Nothing is precomputed: an entry is filled the first time a step needs it and reused after, so a
short run pays only for what it uses and a long run encodes each image once.
"""

from __future__ import annotations

from typing import Callable, Hashable, Sequence

import torch


class LatentCache:
    """VAE latent distributions (mean, std) keyed by (image index, crop, flip).

    The distribution, not a sample, is cached, so each step still draws fresh latents as an
    uncached run would.
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._store: dict[Hashable, tuple[torch.Tensor, torch.Tensor]] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._store)

    def distributions(
        self,
        keys: Sequence[Hashable],
        pixels: torch.Tensor,
        encode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) for each item of the batch; `encode` runs only on the missing ones."""
        if not self.enabled:
            return encode(pixels)
        missing = [i for i, k in enumerate(keys) if k not in self._store]
        if missing:
            mean, std = encode(pixels[missing])
            for j, i in enumerate(missing):
                self._store[keys[i]] = (mean[j], std[j])
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        means = torch.stack([self._store[k][0] for k in keys])
        stds = torch.stack([self._store[k][1] for k in keys])
        return means, stds


class EmbeddingCache:
    """Frozen text-encoder outputs keyed by caption string (valid only while the encoder is frozen)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._store: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._store)

    def embeddings(self, captions: Sequence[str], encode: Callable[[list[str]], torch.Tensor]) -> torch.Tensor:
        if not self.enabled:
            return encode(list(captions))
        missing = sorted({c for c in captions if c not in self._store})
        if missing:
            for caption, emb in zip(missing, encode(missing)):
                self._store[caption] = emb
        return torch.stack([self._store[c] for c in captions])
