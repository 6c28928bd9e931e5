"""Start training from an existing adapter file (`lora.init_from`, kohya's `--network_weights`).

The file may be in the kohya or the diffusers layout. Its factors are copied into the freshly
injected peft layers, with `up` rescaled so that the run's alpha gives the same ΔW the file gave:
    (alpha_file / r) · up_file = (alpha_run / r) · up_run.
So the run starts exactly where the file left off, whatever alpha each of them uses. A DoRA file
also sets the magnitudes (unchanged: the rescaling keeps W + ΔW, so its row norms, the same); DoRA
and plain LoRA files/runs do not mix, since neither holds what the other needs. LoHa/LoKr runs
(`lora.type`) start from a LyCORIS file of their type instead: `init_lycoris.py`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..errors import ConfigError, ModelError, looked_in
from ..export.adapter import Adapter, read_adapter
from ..export.layouts import canonical_path
from ..export.lycoris import LycorisAdapter, read_lycoris
from ..export.lycoris_names import needs_lycoris_reader
from ..models.lora import ADAPTER_NAME, is_locon_3x3, lora_layers
from ..models.lycoris import LYCORIS_TYPES, lycoris_layers
from .init_lycoris import check_lycoris, copy_lycoris

log = logging.getLogger(__name__)
KEY = "lora.init_from"
_VARIANT_NAMES = {"sd15": "SD 1.x", "sdxl": "SDXL"}


def read_initial_adapter(path: str, variant: str, train_text_encoder: bool, rank: int,
                         use_dora: bool = False, conv_rank: int = 0, train_unet: bool = True,
                         kind: str = "lora", lokr_factor: int = -1) -> Adapter | LycorisAdapter:
    """Read and check the file before any model loads: it exists, it is of the run's type (`kind`,
    lora.type; loha/lokr: `init_lycoris.check_lycoris`), for this base family, its ranks are
    the run's (`conv_rank` for LoCon's 3x3 convs, when > 0), and it adapts the text encoders only
    when the run trains them (the UNet likewise)."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{KEY}: {path} not found{looked_in(path)}; give the path of a .safetensors adapter file")
    if kind != "lora":
        if not needs_lycoris_reader(file):
            raise ConfigError(f"{KEY}: {path} is a LoRA adapter but lora.type is {kind!r} ({LYCORIS_TYPES[kind]}); "
                              "set lora.type=lora")
        adapter = check_lycoris(_read(read_lycoris, path, variant), path, kind, rank, conv_rank, lokr_factor)
        return _check_components(adapter, path, train_text_encoder, train_unet)
    if needs_lycoris_reader(file):
        found = "/".join(read_lycoris(file, base=variant, header_only=True).kinds)
        if found.lower() in ("loha", "lokr"):
            raise ConfigError(f"{KEY}: {path} is a {found} adapter but lora.type is 'lora'; "
                              f"set lora.type={found.lower()}")
    adapter = _read(read_adapter, path, variant)
    if adapter.is_dora != use_dora:
        raise ConfigError(f"{KEY}: {path} is a {'DoRA' if adapter.is_dora else 'plain LoRA'} adapter but "
                          f"lora.use_dora is {str(use_dora).lower()}; set lora.use_dora={str(adapter.is_dora).lower()}")
    conv3 = {(c, p) for c, p, m in adapter.items()
             if c == "unet" and is_locon_3x3(p) and m.is_conv and m.down.shape[2:] != (1, 1)}
    conv_ranks = sorted({m.rank for c, p, m in adapter.items() if (c, p) in conv3})
    if conv_ranks and conv_ranks != [conv_rank or rank]:
        raise ConfigError(f"{KEY}: {path} adapts the UNet's 3x3 convs (LoCon) at rank {'/'.join(map(str, conv_ranks))} "
                          f"but lora.conv_rank is {conv_rank}; set lora.conv_rank={conv_ranks[-1]} (and lora.conv_alpha), "
                          "or resize the file with `lora-trainer resize --conv-rank`")
    ranks = sorted({m.rank for c, p, m in adapter.items() if (c, p) not in conv3})
    if ranks and ranks != [rank]:
        raise ConfigError(f"{KEY}: {path} has rank {'/'.join(map(str, ranks))} but lora.rank is {rank}; "
                          f"set lora.rank={ranks[-1] if len(ranks) == 1 else '...'} (or resize the file "
                          "with `lora-trainer resize`)")
    return _check_components(adapter, path, train_text_encoder, train_unet)


def _read(reader, path: str, variant: str):
    """`reader(path)` (the LoRA or the LyCORIS reader), in the base's family when the file cannot
    tell; one line when it is another family's adapter."""
    try:
        adapter = reader(path)
    except ModelError as exc:
        if "cannot tell" not in str(exc):
            raise ConfigError(f"{KEY}: {exc}") from None
        adapter = reader(path, base=variant)  # family unknown from the file: trust the base
    if adapter.base != variant:
        raise ConfigError(f"{KEY}: {path} is an {_VARIANT_NAMES[adapter.base]} adapter "
                          f"({adapter.base_reason}) but model.base is {_VARIANT_NAMES[variant]}")
    return adapter


def _check_components(adapter, path: str, train_text_encoder: bool, train_unet: bool):
    """The file adapts the text encoders (the UNet) only when the run trains them."""
    encoders = [c for c in adapter.modules if c != "unet" and adapter.modules[c]]
    if encoders and not train_text_encoder:
        raise ConfigError(f"{KEY}: {path} also adapts {', '.join(encoders)}; set lora.train_text_encoder=true "
                          "(otherwise that part of the adapter would be lost)")
    if adapter.modules.get("unet") and not train_unet:
        raise ConfigError(f"{KEY}: {path} adapts the UNet but lora.train_unet is false; set lora.train_unet=true "
                          "(otherwise that part of the adapter would be lost)")
    return adapter


@torch.no_grad()
def load_initial_adapter(adapter: Adapter | LycorisAdapter, components: dict[str, torch.nn.Module],
                         source: str) -> int:
    """Copy the file's factors into the peft layers of `components` ({"unet": ..., "text_encoder": ...}),
    rescaled to each layer's own alpha; return the number of layers set. Layers the run adapts but
    the file lacks keep their fresh start (ΔW = 0) and are named in a warning; layers the file has
    but the run does not adapt fail. A LyCORIS file's parts go into LoHa/LoKr layers
    (`init_lycoris.copy_lycoris`)."""
    if isinstance(adapter, LycorisAdapter):
        return _copy_into_layers(adapter, components, source, lycoris_layers, copy_lycoris)
    return _copy_into_layers(adapter, components, source, lora_layers, _copy_lora)


def _copy_into_layers(adapter, components: dict[str, torch.nn.Module], source: str, layers_of, copy) -> int:
    """Each of the file's modules into the run's layer at its path (`layers_of(model)`: {path: layer})
    with `copy(module, layer, source, where)`; the warning and the refusal `load_initial_adapter` says."""
    set_count, fresh = 0, []
    for component, model in components.items():
        layers = {canonical_path(component, name): layer for name, layer in layers_of(model).items()}
        wanted = adapter.modules.get(component, {})
        missing = sorted(set(wanted) - set(layers))
        if missing:
            shown = ", ".join(missing[:3]) + (f" (and {len(missing) - 3} more)" if len(missing) > 3 else "")
            targets = "lora.unet_targets" if component == "unet" else "lora.text_encoder_targets"
            if component == "unet" and any(is_locon_3x3(p) for p in missing):
                targets = "lora.unet_targets, or set lora.conv_rank for the 3x3 convs (LoCon)"
            raise ConfigError(f"{KEY}: {source} adapts {component} layers this run does not: {shown}; "
                              f"add their names to {targets}")
        for path, layer in layers.items():
            module = wanted.get(path)
            if module is None:
                fresh.append(f"{component}.{path}")
                continue
            copy(module, layer, source, f"{component}.{path}")
            set_count += 1
    if fresh:
        log.warning("%s: %d adapted layer(s) are not in %s and start from zero, e.g. %s",
                    KEY, len(fresh), source, ", ".join(fresh[:3]))
    log.info("%s: started from %s (%d layers)", KEY, source, set_count)
    return set_count


def _copy_lora(lora_module, layer: torch.nn.Module, source: str, where: str) -> None:
    """One LoRA (or DoRA) module's factors into one peft layer, up rescaled to the layer's alpha."""
    down, up = layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight
    if tuple(down.shape) != tuple(lora_module.down.shape) or tuple(up.shape) != tuple(lora_module.up.shape):
        raise ConfigError(f"{KEY}: {source}: {where} has down {tuple(lora_module.down.shape)} "
                          f"and up {tuple(lora_module.up.shape)}; this base's layer needs "
                          f"{tuple(down.shape)} and {tuple(up.shape)} (an adapter for another model?)")
    down.copy_(lora_module.down.to(down.dtype))
    # ΔW = (alpha_file / r) · up @ down must equal (alpha / r) · up' @ down.
    alpha = float(layer.lora_alpha[ADAPTER_NAME])
    up.copy_((lora_module.up.double() * (lora_module.alpha / alpha)).to(up.dtype))
    if lora_module.magnitude is not None:
        magnitude = layer.lora_magnitude_vector[ADAPTER_NAME].weight  # conv: (1, d_out, 1, 1)
        magnitude.copy_(lora_module.magnitude.reshape(magnitude.shape))
