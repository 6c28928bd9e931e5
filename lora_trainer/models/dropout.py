"""LoRA dropout whose masks belong to the sample, not to the process that happens to run it.

peft's `lora_dropout` is an `nn.Dropout`, which draws from the global RNG: the masks then depend
on how many processes share the batch and on what else drew before. Here each sample's mask in
each layer comes from its own generator, seeded by (the sample's key, the layer's name). The
training loop gives every sample a key derived from (seed, epoch, item, stream), as it does for
the noise, so a 2-process run equals a 1-process run with dropout too, a resumed run continues
exactly, and gradient checkpointing's recomputation draws the same masks again (the loop installs
`DropoutKeys.checkpoint` / `transformers_kwargs()` as the checkpointing function for that).
kohya_dropout.py adds kohya's neuron, rank and module dropouts on the same keys.
"""

from __future__ import annotations

import contextlib
import hashlib
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.utils.checkpoint

from .lora import ADAPTER_NAME, lora_layers


def keyed_seed(*parts) -> int:
    """A 63-bit generator seed that is a function of `parts` (sample key, layer name, row, ...) only."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def sample_rows(keys: Sequence[int], n: int, layer: str) -> int:
    """How many consecutive rows of a batch of `n` each sample owns: a text encoder reads a long
    caption as several 77-token windows, batched sample-major (sample 0's windows, then sample 1's...)."""
    rows, remainder = divmod(n, len(keys))
    if remainder or not rows:
        raise RuntimeError(f"LoRA dropout in {layer}: {len(keys)} sample keys for a batch of {n}")
    return rows


class DropoutKeys:
    """The per-sample keys of the batch being computed, shared by every dropout layer of a run.
    Outside `batch(...)` (sampling, inference) the layers do nothing."""

    def __init__(self) -> None:
        self.keys: tuple[int, ...] | None = None

    @contextmanager
    def batch(self, keys: Sequence[int] | None) -> Iterator[None]:
        before, self.keys = self.keys, None if keys is None else tuple(int(k) for k in keys)
        try:
            yield
        finally:
            self.keys = before

    def checkpoint_context(self):
        """torch.utils.checkpoint's `context_fn`: the backward pass recomputes a checkpointed block
        outside the forward's `batch(...)`, so the keys the forward saw are put back for it."""
        return contextlib.nullcontext(), self.batch(self.keys)

    def checkpoint(self, module, *args):
        """A diffusers `gradient_checkpointing_func` that keeps the dropout masks of the forward."""
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False,
                                                 context_fn=self.checkpoint_context)

    def transformers_kwargs(self) -> dict:
        """`gradient_checkpointing_kwargs` for a transformers model, to the same effect."""
        return {"use_reentrant": False, "context_fn": self.checkpoint_context}


class SampleDropout(torch.nn.Module):
    def __init__(self, p: float, layer: str, keys: DropoutKeys):
        super().__init__()
        self.p, self.layer, self.shared = p, layer, keys

    def extra_repr(self) -> str:
        return f"p={self.p}, layer={self.layer!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keys = self.shared.keys
        if not self.training or self.p == 0 or keys is None:
            return x
        rows = sample_rows(keys, x.shape[0], self.layer)
        masks = []
        for key in keys:
            for row in range(rows):
                g = torch.Generator(device=x.device).manual_seed(keyed_seed(key, self.layer, row))
                masks.append(torch.rand(x.shape[1:], generator=g, device=x.device) >= self.p)
        return x * torch.stack(masks).to(x.dtype) / (1.0 - self.p)


def use_sample_dropout(module: torch.nn.Module, p: float, keys: DropoutKeys, component: str) -> int:
    """Replace the dropout of every LoRA layer of `module` with `SampleDropout`; return how many."""
    layers = lora_layers(module)
    for name, layer in layers.items():
        layer.lora_dropout[ADAPTER_NAME] = SampleDropout(p, f"{component}.{name}", keys)
    return len(layers)
