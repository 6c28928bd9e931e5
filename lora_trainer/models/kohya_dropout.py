"""kohya's three LoRA dropouts (sd-scripts networks/lora.py), with masks that belong to the sample.

On a LoRA layer y = W·x + s·B·(A·x), with s = alpha / r:
- neuron dropout (kohya's --network_dropout, `lora.neuron_dropout`): each element of the down
  projection's output A·x is dropped with probability p, the rest are scaled by 1/(1-p);
- rank dropout (`lora.rank_dropout`): whole rank channels of A·x are dropped for a sample (the same
  channels at every token or pixel of it) and s becomes s/(1-p), as kohya "treats the rank as changed";
- module dropout (`lora.module_dropout`): with probability p a sample skips the layer's adapter: its
  output is the base layer's W·x (with DoRA too: no magnitude rescaling either).
`lora.dropout` (peft's `lora_dropout`) is another thing: it drops elements of the input x.

kohya draws these from the global RNG (module dropout once per layer call for the whole batch); here,
as in dropout.py, each sample's masks come from generators keyed by (the sample's key, the layer, the
row, the kind), so they do not depend on the processes, on resuming or on gradient checkpointing.

They are hooks on peft's own modules, not new modules: the state dict, the exported file, sampling
and inference (eval mode, or no keyed batch) are untouched. B has no bias, so scaling B's input by
1/(1-p) is the same as scaling s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .dropout import DropoutKeys, SampleDropout, keyed_seed, sample_rows
from .lora import ADAPTER_NAME, lora_layers


@dataclass(frozen=True)
class KohyaDropout:
    neuron: float = 0.0  # kohya's --network_dropout
    rank: float = 0.0  # --network_args rank_dropout=p
    module: float = 0.0  # --network_args module_dropout=p

    def __bool__(self) -> bool:
        return bool(self.neuron or self.rank or self.module)


def skipped_samples(keys: tuple[int, ...], layer: str, p: float) -> list[bool]:
    """Module dropout: whether each sample skips the adapter of `layer` (one draw per sample)."""
    return [keyed_seed(key, layer, "module") / 2.0 ** 63 < p for key in keys]


def rank_mask(keys: tuple[int, ...], rows: int, layer: str, rank: int, p: float) -> torch.Tensor:
    """Rank dropout: a (len(keys)·rows, rank) 0/1 mask, one row of channels per sample row, drawn on
    the CPU (the same masks on every device)."""
    masks = [torch.rand(rank, generator=torch.Generator().manual_seed(keyed_seed(key, layer, row, "rank"))) >= p
             for key in keys for row in range(rows)]
    return torch.stack(masks)


def _to_device(mask: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU mask on `device`; to a GPU through pinned memory, so that the copy does not make the host
    wait for the GPU at every adapted layer."""
    if device.type == "cuda":
        return mask.pin_memory().to(device, non_blocking=True)
    return mask.to(device)


class _LayerHooks:
    """The kohya dropouts of one peft LoRA layer."""

    def __init__(self, layer: torch.nn.Module, name: str, rates: KohyaDropout, keys: DropoutKeys):
        self.name, self.rates, self.shared = name, rates, keys
        self.neuron = SampleDropout(rates.neuron, f"{name}:neuron", keys) if rates.neuron else None
        self.down_input = None  # the tensor peft is about to give lora_A in this forward
        self.base_output = None  # W·x of this forward, for module dropout
        if rates.neuron or rates.rank:
            # peft hands lora_A the output of lora_dropout (DoRA: the input of its magnitude module);
            # DoRA also calls lora_A on an identity matrix to read ΔW, which must stay unmasked
            layer.lora_dropout[ADAPTER_NAME].register_forward_hook(self._mark)
            magnitude = getattr(layer, "lora_magnitude_vector", {})
            if ADAPTER_NAME in magnitude:
                magnitude[ADAPTER_NAME].register_forward_pre_hook(lambda m, args: self._mark(m, args, args[0]))
            layer.lora_A[ADAPTER_NAME].register_forward_hook(self._drop_down)
        if rates.module:
            layer.get_base_layer().register_forward_hook(self._keep_base)
            layer.register_forward_hook(self._skip)

    def _active(self, module: torch.nn.Module) -> bool:
        return module.training and self.shared.keys is not None

    def _mark(self, module, args, output):
        self.down_input = output if self._active(module) else None

    def _drop_down(self, module, args, output):
        if self.down_input is None or args[0] is not self.down_input:
            return None
        self.down_input = None
        keys = self.shared.keys
        if self.neuron is not None:
            output = self.neuron(output)
        p = self.rates.rank
        if p:
            rows = sample_rows(keys, output.shape[0], self.name)
            mask = rank_mask(keys, rows, self.name, output.shape[1 if output.dim() == 4 else -1], p)
            # the mask is (rows, r); A·x is (rows, r) for time_emb_proj, (rows, tokens, r) for attention
            # and text encoders, (rows, r, h, w) for convs: every token or pixel of a row alike
            r = mask.shape[1]
            shape = (-1, r, 1, 1) if output.dim() == 4 else (-1,) + (1,) * (output.dim() - 2) + (r,)
            output = output * (_to_device(mask, output.device).to(output.dtype) / (1.0 - p)).view(shape)
        return output

    def _keep_base(self, module, args, output):
        self.base_output = output if self._active(module) else None

    def _skip(self, module, args, output):
        base, self.base_output = self.base_output, None
        if base is None or not self._active(module):
            return None
        keys = self.shared.keys
        rows = sample_rows(keys, output.shape[0], self.name)
        skipped = skipped_samples(keys, self.name, self.rates.module)
        if not any(skipped):
            return None
        # filled in place on the device: a copy from the host would make the GPU stream wait
        mask = torch.zeros(output.shape[0], dtype=torch.bool, device=output.device)
        for i, skip in enumerate(skipped):
            if skip:
                mask[i * rows:(i + 1) * rows] = True
        return torch.where(mask.view(-1, *(1,) * (output.dim() - 1)), base.to(output.dtype), output)


def use_kohya_dropout(module: torch.nn.Module, rates: KohyaDropout, keys: DropoutKeys, component: str) -> int:
    """Give every LoRA layer of `module` kohya's dropouts at `rates`, keyed by `keys`; return how many.
    Call it after `use_sample_dropout`: it hooks the layers' final `lora_dropout` modules."""
    layers = lora_layers(module)
    for name, layer in layers.items():
        _LayerHooks(layer, f"{component}.{name}", rates, keys)
    return len(layers)
