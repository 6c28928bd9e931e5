"""LyCORIS adapters (LoHa, LoKr, full, (IA)^3, OFT, BOFT, GLoRA, norm, LoCon with CP cores) on a
loaded pipeline: merged into the base weights of the pipeline this run uses, W' = W + m·ΔW (see
`export/lycoris.py`).

peft has no layer type for most of them, so they are not injected: the touched layers' original
weights are kept on the CPU, and every change of weight, on/off state or unload rebuilds those
layers from the originals, so nothing drifts and the base comes back bit for bit. They stack with
peft LoRA adapters: peft wraps a layer but keeps its weight in `base_layer`, which is the weight
changed here.

A layer on the CPU hands its own weight tensor over as the original (no copy) and gets a new one
for the merged weight; only a layer on another device is copied to the CPU. Besides saving a copy,
this never writes into the base's tensors, which are often the model file mapped into memory,
where the first write to each page copies it. ΔW is built in buffers reused from layer to layer
(`export/scratch.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import ModelError
from ..export import lycoris_ortho as ortho
from ..export.layouts import canonical_path
from ..export.lycoris import LycorisAdapter, component_prefix
from ..export.scratch import Scratch
from ..export.sdxl_names import ldm_from_diffusers

Key = tuple[str, str]  # (component, module path in the pipeline's model)


def _kohya_names(component: str, model: torch.nn.Module) -> dict[str, str]:
    """{kohya name without prefix: module path} for every layer with a weight, in every spelling a
    file may use (diffusers and LDM UNet names; CLIP paths with and without `text_model.`)."""
    names: dict[str, str] = {}
    for path, module in model.named_modules():
        if not isinstance(getattr(module, "weight", None), torch.Tensor) or ".base_layer" in path or ".lora_" in path:
            continue
        spellings = {path, canonical_path(component, path)}
        if component == "unet":
            try:
                spellings.add(ldm_from_diffusers(path))
            except ModelError:
                pass
        for spelling in spellings:
            names.setdefault(spelling.replace(".", "_"), path)
    return names


def _weights_of(layer: torch.nn.Module) -> tuple[torch.nn.Parameter, torch.nn.Parameter | None]:
    base = getattr(layer, "base_layer", layer)  # a peft LoRA wrapper keeps the frozen layer here
    return base.weight, base.bias


def _kept(weight: torch.Tensor) -> torch.Tensor:
    """The original of a layer weight as kept: on the CPU the tensor itself (the layer gets another
    one when it is first rebuilt), else a CPU copy."""
    return weight.detach() if weight.device.type == "cpu" else weight.detach().to("cpu", copy=True)


def _is(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether `a` and `b` are the same memory (the layer still holds its kept original)."""
    return a.device == b.device and a.data_ptr() == b.data_ptr() and a.shape == b.shape


@dataclass
class WeightPatches:
    """The LyCORIS adapters merged into one pipeline, by name, in load order."""

    pipe: object
    adapters: dict[str, dict[Key, object]] = field(default_factory=dict)  # name -> {layer: LycorisModule}
    originals: dict[Key, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)
    # the {name: weight} the layers hold now (None: unknown): a change to a peft adapter alone
    # rebuilds nothing here
    applied: dict[str, float] | None = None

    def _layer(self, key: Key) -> torch.nn.Module:
        return getattr(self.pipe, key[0]).get_submodule(key[1])

    def resolve(self, adapter: LycorisAdapter, source: str) -> dict[Key, object]:
        """Each module of `adapter` matched to a layer of the pipeline, or a one-line error."""
        by_prefix: dict[tuple[str, str], dict[str, str]] = {}
        found: dict[Key, object] = {}
        for component, _, module in adapter.items():
            prefix = component_prefix(module.name)
            model = getattr(self.pipe, component, None)
            if not isinstance(model, torch.nn.Module):
                raise ModelError(f"{source}: {module.name} adapts {component}, which this base does not have")
            if (prefix, component) not in by_prefix:  # `lycoris_` names the UNet and SD 1.x's text encoder
                by_prefix[(prefix, component)] = _kohya_names(component, model)
            path = by_prefix[(prefix, component)].get(module.name[len(prefix) + 1:])
            if path is None:
                raise ModelError(f"{source}: {module.name} names no layer of this base's {component}; "
                                 "it was made for another model")
            weight, bias = _weights_of(model.get_submodule(path))
            part = module.bias_part
            if part is not None and (bias is None or bias.numel() != module.parts[part].numel()):
                raise ModelError(f"{source}: {module.name}.{part} changes a bias the layer "
                                 f"{'does not have' if bias is None else 'has in another shape'}")
            problem = ortho.shape_problem(module, tuple(weight.shape)) if module.kind in ortho.KINDS else None
            if problem:  # told from the shapes alone, so the fit check before loading finds it too
                raise ModelError(f"{source}: {module.name} ({module.kind}) {problem}; it was made for another model")
            if (component, path) in found:
                raise ModelError(f"{source}: {module.name} and {found[(component, path)].name} name the same "
                                 f"layer ({component}.{path}); keep one of them")
            found[(component, path)] = module
        return found

    def add(self, name: str, adapter: LycorisAdapter, source: str) -> int:
        """Register `adapter` under `name` (nothing changes until `apply`); returns its layer count."""
        modules = self.resolve(adapter, source)
        self.applied = None
        for key in modules:
            if key not in self.originals:
                w, b = _weights_of(self._layer(key))
                self.originals[key] = (_kept(w), None if b is None else b.detach().to("cpu", copy=True))
        self.adapters[name] = modules
        return len(modules)

    def apply(self, weights: dict[str, float], scale=None) -> None:
        """Rebuild the touched layers from their originals with the adapters in `weights`
        ({name: weight}; a name left out is off), in load order; `scale(name, component, path)`
        multiplies a layer's weight (per-block weights, block_weights.layer_scales). Nothing is done
        when the layers already hold these adapters at these weights (an adapter's block weights
        never change while it is loaded)."""
        if weights == self.applied:
            return
        self.applied = None  # until every layer is rebuilt
        work = torch.float32  # float64 is 3-9x slower on CPUs and gains nothing after the cast back
        scratch = Scratch(max(w.numel() for w, _ in self.originals.values()) if self.originals else 0)
        for key, (weight0, bias0) in self.originals.items():
            weight, bias = _weights_of(self._layer(key))
            device = weight.device
            # the layer's own tensor for the merged weight: the kept original is never written
            fresh = _is(weight, weight0)
            target = torch.empty_like(weight) if fresh else weight.detach()
            w = weight0 if weight0.device == device and weight0.dtype == work else \
                scratch.get("base", weight0.shape, work, device).copy_(weight0)
            # each adapter's ΔW is added in `target` itself when it holds float32, else in a buffer
            into = target if target.dtype == work else scratch.get("merged", weight0.shape, work, device)
            b = None if bias0 is None else bias0.to(device, work)
            changed = False
            for name, modules in self.adapters.items():
                m = weights.get(name)
                module = modules.get(key)
                if module is None or m is None:
                    continue
                m = m if scale is None else m * scale(name, *key)
                w = module.merged(w, m, work, out=into, scratch=scratch)
                if b is not None and module.bias_delta() is not None:
                    b = b + m * module.bias_delta(work).to(device)
                changed = True
            with torch.no_grad():
                if not changed:
                    if not fresh:  # a layer that still holds its original has nothing to undo
                        target.copy_(weight0)
                else:
                    if into is not target:
                        target.copy_(into)
                    if fresh:
                        weight.data = target
                if bias is not None and bias0 is not None:
                    bias.copy_(b.to(bias.dtype) if changed else bias0.to(device))
        self.applied = dict(weights)

    def remove(self, name: str) -> None:
        """Drop adapter `name`: the layers only it changed get their original weights back and their
        kept copies are freed; the caller's `apply` rebuilds the layers others still change."""
        modules = self.adapters.pop(name)
        self.applied = None
        still_used = {key for other in self.adapters.values() for key in other}
        for key in modules:
            if key in still_used or key not in self.originals:
                continue
            weight0, bias0 = self.originals.pop(key)
            weight, bias = _weights_of(self._layer(key))
            with torch.no_grad():
                if weight0.device == weight.device and weight0.dtype == weight.dtype:
                    weight.data = weight0  # the very tensor it had: the merged one is freed
                else:
                    weight.copy_(weight0.to(weight.device))
                if bias is not None and bias0 is not None:
                    bias.copy_(bias0.to(bias.device))

    def forget(self) -> None:
        """Keep the merged weights as they are and drop the originals (the pipeline is baked)."""
        self.adapters.clear()
        self.originals.clear()
        self.applied = None
