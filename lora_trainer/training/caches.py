"""Lazy caches for the frozen parts of a step: VAE latents and text embeddings.

Nothing is precomputed: an entry is filled the first time a step needs it and reused after, so a
short run pays only for what it uses and a long run encodes each image once. Latents can also be
kept on disk between runs, keyed by the image file's content, the transform and the VAE.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Callable, Hashable, Optional, Sequence

import safetensors.torch
import torch

from ..config import dataset_root, resolve_subsets
from ..fileio import atomic_path

log = logging.getLogger(__name__)

_ENTRY_NAMES = ("mean", "std", "mask")  # a latent cache entry's tensors, in order (the mask is optional)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def latent_cache_dir(cfg) -> Path:
    """Where train.cache_latents_to_disk keeps latents: train.cache_dir, else inside the dataset (the
    first subset's folder with data.subsets: entries are keyed by image content, not folder)."""
    return Path(cfg.train.cache_dir or Path(dataset_root(cfg.data)) / ".cache" / "lora-trainer") / "latents"


def module_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 of a module's parameter bytes and dtypes: two VAEs share cached latents only if
    their weights are identical."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class LatentCache:
    """VAE latent distributions (mean, std) keyed by (image path, transform), with the loss mask
    beside them when there is one (data.alpha_mask).

    The distribution, not a sample, is cached, so each step still draws fresh latents as an
    uncached run would. With `directory`, entries are also files named by the hash of the image
    bytes, the transform (size, crop, flip, and whatever else the key holds: the loop adds
    "alpha_mask" when entries carry a mask) and `fingerprint` (the VAE), so an edited image, a new
    crop or another VAE never reuses a stale entry.
    """

    def __init__(self, enabled: bool = True, directory: Optional[str | Path] = None, fingerprint: str = "",
                 device: str | torch.device = "cpu"):
        self.enabled = enabled
        self.device = torch.device(device)
        self.directory = Path(directory) if directory is not None else None
        self.fingerprint = fingerprint
        self._store: dict[Hashable, tuple[torch.Tensor, ...]] = {}  # (mean, std) or (mean, std, mask)
        self._file_hashes: dict[str, str] = {}
        self.hits = 0
        self.misses = 0
        self.disk_hits = 0

    def __len__(self) -> int:
        return len(self._store)

    def log_summary(self) -> None:
        log.info("latent cache: %d entries, %d hits, %d misses", len(self), self.hits, self.misses)
        if self.directory is not None:
            log.info("latent disk cache %s: %d entries read from disk", self.directory, self.disk_hits)

    def _disk_path(self, key: tuple) -> Path:
        path, transform = str(key[0]), key[1:]
        if path not in self._file_hashes:
            self._file_hashes[path] = file_sha256(path)
        name = hashlib.sha256(f"{self._file_hashes[path]}|{transform}|{self.fingerprint}".encode()).hexdigest()
        return self.directory / name[:2] / f"{name}.safetensors"

    def _from_disk(self, key: tuple) -> Optional[tuple[torch.Tensor, ...]]:
        path = self._disk_path(key)
        if not path.is_file():
            return None
        try:
            # read on the CPU, then moved: safetensors refuses an indexed CPU device ("cpu:0"),
            # which is what a process of a multi-process CPU run trains on
            entry = safetensors.torch.load_file(str(path))
            return tuple(entry[name].to(self.device) for name in _ENTRY_NAMES if name in entry)
        except Exception as exc:  # a damaged entry is re-encoded, never fatal
            log.warning("latent cache entry %s unreadable (%s); encoding the image again", path, exc)
            return None

    def _to_disk(self, key: tuple, entry: tuple[torch.Tensor, ...]) -> None:
        with atomic_path(self._disk_path(key)) as tmp:
            safetensors.torch.save_file({name: t.contiguous().cpu() for name, t in zip(_ENTRY_NAMES, entry)}, str(tmp))

    def distributions(
        self,
        keys: Sequence[tuple],
        pixels: torch.Tensor,
        encode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
        masks: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, ...]:
        """(mean, std) for each item of the batch; `encode` runs only on the missing ones.
        A key is (image path, *transform). With `masks` (one per item, on the latent grid), each
        is cached with its item's distribution and (mean, std, mask) is returned; keys must then
        differ from those of entries without masks."""
        if not self.enabled:
            return encode(pixels) if masks is None else (*encode(pixels), masks)
        if self.directory is not None:
            for key in keys:
                if key not in self._store and (entry := self._from_disk(key)) is not None:
                    self._store[key] = entry
                    self.disk_hits += 1
        missing = [i for i, k in enumerate(keys) if k not in self._store]
        # One image at a time: a batched encode can differ in the last bits from a single one, and
        # an entry must not depend on which batch (process, resumed run) first needed it.
        for i in missing:
            if keys[i] in self._store:  # the same image twice in one batch
                continue
            mean, std = encode(pixels[i:i + 1])
            entry = (mean[0], std[0]) if masks is None else (mean[0], std[0], masks[i])
            self._store[keys[i]] = entry
            if self.directory is not None:
                self._to_disk(keys[i], entry)
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        return tuple(torch.stack([self._store[k][n] for k in keys]) for n in range(len(self._store[keys[0]])))


class EmbeddingCache:
    """Frozen text-encoder outputs keyed by caption string (valid only while the encoders are
    frozen; everything else that shapes an embedding, such as clip skip, the windows and
    data.weighted_captions, is fixed for a run, and the cache lives in memory for one run). `encode` returns a tuple of batched tensors (SDXL: hidden states and pooled)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._store: dict[str, tuple[torch.Tensor, ...]] = {}

    def __len__(self) -> int:
        return len(self._store)

    def embeddings(self, captions: Sequence[str],
                   encode: Callable[[list[str]], tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
        if not self.enabled:
            return encode(list(captions))
        # One caption at a time, for the same reason as the latents: entries independent of batches.
        for caption in sorted({c for c in captions if c not in self._store}):
            self._store[caption] = tuple(t[0] for t in encode([caption]))
        return tuple(torch.stack([self._store[c][n] for c in captions]) for n in range(len(self._store[captions[0]])))


def embedding_cache_reason(cfg) -> str | None:
    """Why text embeddings cannot be cached (None when they can): the captions or the encoder change."""
    if cfg.lora.train_text_encoder:
        return "the text encoder is being trained"
    if cfg.embedding.templates is not None:
        return "embedding.templates draws each image's caption anew every epoch"
    if cfg.embedding.token is not None:
        return f"embedding.token {cfg.embedding.token!r} trains vectors the captions are read with"
    for i, d in enumerate(resolve_subsets(cfg.data)):  # every subset's captions must be fixed
        key = f"data.subsets[{i}] ({d.path}) " if cfg.data.subsets else "data."
        if d.shuffle_tags:
            return f"{key}shuffle_tags changes the captions every epoch"
        if d.caption_tag_dropout > 0:
            return f"{key}caption_tag_dropout changes the captions every epoch"
    return None


def run_caches(cfg, vae: torch.nn.Module, device) -> tuple[LatentCache, EmbeddingCache]:
    """The caches of a run's frozen work: latents (in memory, and on disk with
    train.cache_latents_to_disk) and text embeddings (when they cannot change; the reason logged if not)."""
    t = cfg.train
    on_disk = t.cache_latents and t.cache_latents_to_disk
    latents = LatentCache(enabled=t.cache_latents, directory=latent_cache_dir(cfg) if on_disk else None,
                          device=device, fingerprint=module_fingerprint(vae) if on_disk else "")
    no_cache = embedding_cache_reason(cfg)
    if no_cache:
        log.info("text embeddings are not cached: %s", no_cache)
    return latents, EmbeddingCache(enabled=no_cache is None)
