"""Adapters on a loaded pipeline: each under its own name and weight (and per-block weights,
`block_weights.py`), switchable off without reloading, fused into the weights (merge) and restored
bit for bit (unmerge). What a `--lora` argument names is read in `adapter_spec.py`.

diffusers' `load_lora_weights` loads both our layouts and other trainers' files (kohya files are read
here once and handed to it as diffusers-layout tensors; diffusers-layout files it reads itself);
the weighted sum W + Σ mᵢ·(alphaᵢ/rᵢ)·BᵢAᵢ is computed by peft, unmerged or fused. DoRA files
load too (a weight m scales ΔW inside the normalisation: m · (W + w·ΔW) / ‖W + w·ΔW‖, as peft does).
LyCORIS files (LoHa, LoKr, full, (IA)^3, CP cores) are merged into the base weights instead
(`lycoris.py`), undoably, and stack with the others.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ModelError, first_line
from .adapter_fit import FAMILY_NAMES, pipe_family, why_not_loadable
from .adapter_spec import AdapterSpec, adapter_hash, adapter_named, check_adapter_file, parse_adapter_spec
from .block_weights import check_stack_count, layer_scales
from .bundled import bundled_embeddings, check_bundled
from .lycoris import WeightPatches

log = logging.getLogger(__name__)
# what a --lora argument names, read in adapter_spec.py; imported from here too
__all__ = ["AdapterSpec", "AdapterStack", "adapter_hash", "adapter_named", "check_adapter_file", "parse_adapter_spec",
           "quiet_diffusers"]


def _own_reading(path: Path, pipe):
    """The file read as an `Adapter` when we hand it to diffusers ourselves, else None.

    Every kohya file we can read is: its tensors are read here once and given to diffusers as a
    diffusers-layout state dict (`_folded_state`), so diffusers never reads the file again and none
    of its kohya quirks apply (see `export.inspect.kohya_load_quirks`: dropped `dora_scale` keys,
    attention alphas other than the most common one, text-encoder q/k/v without out_proj).
    diffusers-layout DoRA files are read too, for their magnitudes, set after diffusers loads them;
    other diffusers-layout files are left to diffusers, which reads them exactly. A file whose keys
    and metadata do not tell SD 1.x from SDXL is read for the pipeline's family (else diffusers would
    read it, dropping a kohya file's `dora_scale`)."""
    import safetensors

    from ..export.adapter import read_adapter

    try:
        with safetensors.safe_open(str(path), framework="pt") as f:  # the header only: no tensor is read
            keys = list(f.keys())
    except Exception:  # not a safetensors file: let diffusers say what is wrong with it
        return None
    dora = any(k.endswith((".dora_scale", ".lora_magnitude_vector")) for k in keys)
    # diffusers refuses bundled embeddings' keys ("have not been correctly renamed"): read such files here
    bundled = any(k.startswith("bundle_emb.") for k in keys)
    if not dora and not bundled and not any(k.startswith("lora_") for k in keys):
        return None  # a plain diffusers-layout file: diffusers reads it exactly
    try:
        return read_adapter(path, fallback=pipe_family(pipe))
    except ModelError:
        return None  # not ours to read: diffusers may still know it


def _folded_state(adapter) -> dict[str, torch.Tensor]:
    """A kohya adapter as a diffusers-layout state dict, alpha / r folded into up (a bare state dict
    carries no alpha, and diffusers then gives every module scale 1). The folded up is float32, so
    a half-precision file is not rounded a second time (its layers compute in their own dtype)."""
    from ..export.layouts import peft_to_diffusers

    states = adapter.peft_states(fold_alpha=True)
    # diffusers 0.42 tells a text encoder's state dict apart only by its attention projections' keys or
    # by `lora_linear_layer`, so one adapting only the MLPs (fc1/fc2) would not load as peft keys
    return {_text_encoder_key(k): v for k, v in peft_to_diffusers(states).items()}


def _text_encoder_key(key: str) -> str:
    """A text-encoder key in the `lora_linear_layer` spelling diffusers reads for every module."""
    if not key.startswith(("text_encoder.", "text_encoder_2.")):
        return key
    return key.replace(".lora_A.weight", ".lora_linear_layer.down.weight").replace(
        ".lora_B.weight", ".lora_linear_layer.up.weight")


@torch.no_grad()
def _set_magnitudes(pipe, adapter, name: str) -> None:
    """Put the file's DoRA magnitudes into the loaded layers. diffusers 0.42 + transformers 5 load
    text-encoder LoRA through transformers, which leaves `lora_magnitude_vector` at its initial
    value (‖W‖); setting every magnitude again is exact for the UNet too."""
    for component, module_path, m in adapter.items():
        model = getattr(pipe, component, None)
        if m.magnitude is None or model is None:
            continue
        modules = dict(model.named_modules())
        layer = modules.get(module_path) or modules.get(module_path.removeprefix("text_model."))
        if layer is None or name not in getattr(layer, "lora_magnitude_vector", {}):
            raise ModelError(f"--lora: {adapter.metadata.get('ss_output_name', name)}: {component}.{module_path} "
                             "was not loaded as a DoRA layer")
        weight = layer.lora_magnitude_vector[name].weight  # (d_out,), or (1, d_out, 1, 1) for a conv
        weight.copy_(m.magnitude.reshape(weight.shape).to(weight.dtype))


@contextlib.contextmanager
def quiet_diffusers(errors: bool = True):
    """Silence diffusers/transformers loading chatter (e.g. a 'missing keys' report for the base
    weights when an adapter is added to a text encoder, which is expected). errors=False also hides
    the errors diffusers logs before raising, for callers that report the exception themselves."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    before = dlog.get_verbosity(), tlog.get_verbosity()
    dlog.set_verbosity(dlog.ERROR if errors else dlog.CRITICAL)
    tlog.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            # peft warns on a second adapter in one model: stacking them is the point here.
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            yield
    finally:
        dlog.set_verbosity(before[0])
        tlog.set_verbosity(before[1])


def _lora_modules(pipe):
    """(component name, module) of every peft LoRA layer in the pipeline's adapter-carrying parts."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for component in getattr(pipe, "_lora_loadable_modules", ("unet", "text_encoder", "text_encoder_2")):
        model = getattr(pipe, component, None)
        if isinstance(model, torch.nn.Module):
            for name, module in model.named_modules():
                if isinstance(module, BaseTunerLayer):
                    yield f"{component}.{name}", module


def _lycoris_reading(path: Path, pipe):
    """The file read as a LyCORIS adapter when it is one (else None), checked against the base family."""
    from ..export.lycoris import needs_lycoris_reader, read_lycoris

    if not needs_lycoris_reader(path):
        return None
    base = pipe_family(pipe)
    adapter = read_lycoris(path, fallback=base)
    if adapter.base != base:
        raise ModelError(f"{path}: an {FAMILY_NAMES[adapter.base]} LyCORIS adapter does not fit an "
                         f"{FAMILY_NAMES[base]} base; use an {FAMILY_NAMES[adapter.base]} --model")
    return adapter


@dataclass
class AdapterStack:
    """The adapters loaded into one pipeline, by name, with their weights and on/off state."""

    pipe: object
    specs: dict[str, AdapterSpec] = field(default_factory=dict)
    enabled: dict[str, bool] = field(default_factory=dict)
    _saved_base: dict[str, torch.Tensor] | None = None  # base weights before a merge, for an exact unmerge
    _patches: WeightPatches | None = None  # LyCORIS adapters, merged into the base weights
    # textual-inversion embeddings: the `--embedding` files, and those bundled in loaded adapter files
    fixed_embeddings: list = field(default_factory=list)
    bundled: dict[str, list] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._patches = WeightPatches(self.pipe)

    @property
    def merged(self) -> bool:
        return self._saved_base is not None

    def _peft_names(self) -> list[str]:
        return [n for n in self.specs if n not in self._patches.adapters]

    def _load_lycoris(self, spec: AdapterSpec, name: str, adapter) -> str:
        layers = self._patches.add(name, adapter, f"--lora: {spec.path}")
        self.specs[name] = AdapterSpec(spec.path, spec.weight, spec.lbw)
        self.enabled[name] = True
        try:
            self._apply()
        except Exception as exc:  # a layer of another shape: take it out again, the others stay as they were
            self._patches.remove(name)
            del self.specs[name], self.enabled[name]
            self._apply()
            raise ModelError(f"--lora: {spec.path}: {first_line(exc)}") from None
        kinds = ", ".join(f"{n} {k}" for k, n in adapter.kinds.items())
        log.info("--lora %s: LyCORIS adapter (%s) merged into the base weights of %d layers at weight %g; "
                 "the original weights are kept and put back when it is reweighted or switched off",
                 spec.path.name, kinds, layers, spec.weight)
        return name

    def load(self, spec: AdapterSpec, name: str | None = None) -> str:
        """Load one adapter file under `name` (default: the file's stem, made unique)."""
        check_adapter_file(spec.path)
        check_stack_count(spec, self.pipe)
        name = name or spec.name
        base, k = name, 1
        while name in self.specs:
            k += 1
            name = f"{base}_{k}"
        if self.merged:
            raise ModelError(f"--lora: cannot add {spec.path} while adapters are merged; unmerge first")
        bundled = bundled_embeddings(spec.path)  # checked before the weights load; kept once they have
        check_bundled(bundled, self.fixed_embeddings, self.bundled, self.pipe)
        try:
            lycoris = _lycoris_reading(spec.path, self.pipe)
        except ModelError as exc:
            raise ModelError(f"--lora: {exc}") from None
        if lycoris is not None:
            name = self._load_lycoris(spec, name, lycoris)
        else:
            self._load_peft(spec, name, bundled)
        if bundled:
            self.bundled[name] = bundled
        return name

    def all_embeddings(self) -> list:
        """The `--embedding` files' embeddings, then those the loaded adapters bundle."""
        return self.fixed_embeddings + [e for es in self.bundled.values() for e in es]

    def _load_peft(self, spec: AdapterSpec, name: str, bundled: list) -> None:
        """A LoRA/DoRA file through diffusers and peft (a kohya or bundling file as tensors we read)."""
        try:
            own = _own_reading(spec.path, self.pipe)
            # a file with bundled embeddings is handed over without them, whatever its layout
            ours = own is not None and (own.layout == "kohya" or bool(bundled))
            source = _folded_state(own) if ours else str(spec.path)
            with quiet_diffusers(errors=False):  # it warns when a file has no text-encoder part: normal for ours
                self.pipe.load_lora_weights(source, adapter_name=name)
            if own is not None and any(m.magnitude is not None for _, _, m in own.items()):
                _set_magnitudes(self.pipe, own, name)
        except Exception as exc:  # diffusers and peft fail in many ways (IndexError, AttributeError, ...)
            why = why_not_loadable(spec.path, self.pipe) or f"cannot load as a LoRA adapter for this base ({first_line(exc)})"
            raise ModelError(f"--lora: {spec.path}: {why}") from None
        self.specs[name] = AdapterSpec(spec.path, spec.weight, spec.lbw)
        self.enabled[name] = True
        self._apply()

    def _check(self, name: str) -> None:
        if name not in self.specs:
            raise ModelError(f"adapter {name!r} is not loaded; loaded: {', '.join(self.specs) or 'none'}")

    def _apply(self) -> None:
        """Push names/weights to peft (disabled adapters are left out of the active set) and rebuild
        the layers LyCORIS adapters change."""
        peft = self._peft_names()
        active = [n for n in peft if self.enabled[n]]
        scale = layer_scales(self.pipe, self.specs)  # lbw: each layer at weight × its block's value
        blocked = [n for n in active if self.specs[n].lbw]
        if active:
            self.pipe.enable_lora()
            self.pipe.set_adapters(active, adapter_weights=[self.specs[n].weight for n in active])
            for key, module in _lora_modules(self.pipe) if blocked else ():
                for n in blocked:
                    if n in module.scaling:  # peft's scaling = scale × alpha / r
                        module.set_scale(n, self.specs[n].weight * scale(n, *key.split(".", 1)))
        elif peft:
            self.pipe.disable_lora()
        if self._patches.originals:
            self._patches.apply({n: self.specs[n].weight for n in self._patches.adapters if self.enabled[n]}, scale)

    def _while_unmerged(self, change) -> None:
        was_merged = self.merged
        if was_merged:
            self.unmerge()
        change()
        self._apply()
        if was_merged:
            self.merge()

    def set_weight(self, name: str, weight: float) -> None:
        self._check(name)
        self._while_unmerged(lambda: setattr(self.specs[name], "weight", float(weight)))

    def set_block_weights(self, name: str, lbw: str | None) -> None:
        """Give one adapter other per-block weights (a preset or numbers, as after `lbw=`; None: none)
        without reloading it; their count is checked against the base first."""
        self._check(name)
        spec = self.specs[name]
        changed = AdapterSpec(spec.path, spec.weight, lbw)  # spells and checks the text
        check_stack_count(changed, self.pipe)
        self._while_unmerged(lambda: setattr(spec, "lbw", changed.lbw))

    def set_enabled(self, name: str, on: bool) -> None:
        """Switch one adapter off (or back on) without reloading it."""
        self._check(name)
        self._while_unmerged(lambda: self.enabled.__setitem__(name, bool(on)))

    def unload(self, name: str) -> None:
        """Take one adapter out for good (its layers and memory), leaving the others as they were;
        the base weights it changed come back bit for bit. `--compare` loads, draws and unloads
        each compared file in turn, so only one of them is in memory at a time."""
        self._check(name)
        if self.merged:
            raise ModelError(f"cannot unload {name!r} while adapters are merged; unmerge first")
        del self.specs[name], self.enabled[name]
        self.bundled.pop(name, None)  # its embeddings go with it
        if name in self._patches.adapters:
            self._patches.remove(name)
        else:
            with warnings.catch_warnings():  # peft says which adapter it makes active next: _apply decides
                warnings.filterwarnings("ignore", message=".*which is now deleted")
                self.pipe.delete_adapters(name)
        self._apply()

    def active(self) -> list[AdapterSpec]:
        return [self.specs[n] for n in self.specs if self.enabled[n]]

    def merge(self) -> None:
        """Fuse the active adapters, at their weights, into the base weights (faster sampling).
        LyCORIS adapters are always merged."""
        if self.merged or not any(self.enabled[n] for n in self._peft_names()):
            return
        # peft's unmerge subtracts ΔW again, which is exact only up to rounding: keep the touched
        # base weights so unmerge can put back the very same bits.
        self._saved_base = {name: module.get_base_layer().weight.detach().clone()
                            for name, module in _lora_modules(self.pipe)}
        components = [c for c in self.pipe._lora_loadable_modules if getattr(self.pipe, c, None) is not None]
        self.pipe.fuse_lora(components=components)

    def unmerge(self) -> None:
        """Take the fused adapters out again; the base weights are restored exactly."""
        if not self.merged:
            return
        components = [c for c in self.pipe._lora_loadable_modules if getattr(self.pipe, c, None) is not None]
        self.pipe.unfuse_lora(components=components)
        with torch.no_grad():
            for name, module in _lora_modules(self.pipe):
                module.get_base_layer().weight.copy_(self._saved_base[name])
        self._saved_base = None

    def bake(self) -> None:
        """Fuse and drop the adapter layers for good: the pipeline becomes a plain merged model. Their
        bundled embeddings cannot be fused into weights: they stay, as if given with `--embedding`."""
        self.merge()
        if self._peft_names():
            self.pipe.unload_lora_weights()
        self._patches.forget()
        self._saved_base = None
        self.fixed_embeddings.extend(e for es in self.bundled.values() for e in es)
        self.bundled.clear()
        self.specs.clear()
        self.enabled.clear()
