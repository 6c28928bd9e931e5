"""Start a LoHa/LoKr run (`lora.type` loha/lokr) from a LyCORIS file (`lora.init_from`, kohya's
`--network_weights` with algo=loha/lokr): the kohya layout our writer, LyCORIS and kohya write, each
module's `hada_*` or `lokr_*` parts and its alpha.

The parts are copied into the freshly injected peft layers as they are, except one factor, rescaled
so that the run's scale gives the file's ΔW, whatever alpha each of them uses:
    scale_file · product(parts_file) = scale_run · product(parts_run).
LoHa's scale multiplies the product of both pairs, so the ratio goes on w1_a alone; LoKr's multiplies
kron(w1, w2), so it goes on w1. A LoKr module of two whole factors is at scale 1 in the file and in the
run (`models.lycoris.whole_factor_scale`), so it is copied unchanged.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError, ModelError
from ..export.lycoris import LycorisAdapter, LycorisModule, read_lycoris
from ..export.lycoris_names import needs_lycoris_reader
from ..models.lora import ADAPTER_NAME, is_locon_3x3
from ..models.lycoris import LYCORIS_TYPES, layer_parts

KEY = "lora.init_from"
_VARIANT_NAMES = {"sd15": "SD 1.x", "sdxl": "SDXL"}
# Parts a LyCORIS file may have that peft's LoHa/LoKr (as this trainer builds them) cannot hold.
_NOT_HELD = {"hada_t1": "a Tucker/CP core (LyCORIS' use_tucker)", "hada_t2": "a Tucker/CP core (LyCORIS' use_tucker)",
             "lokr_t2": "a Tucker/CP core (LyCORIS' use_tucker)", "lokr_w1_a": "a low-rank w1 (LyCORIS' decompose_both)",
             "lokr_w1_b": "a low-rank w1 (LyCORIS' decompose_both)"}
# The factor the scale ratio goes on, by type (see the module docstring).
_RESCALED = {"LoHa": "hada_w1_a", "LoKr": "lokr_w1"}


def read_initial_lycoris(path: str, kind: str, variant: str, train_text_encoder: bool, rank: int,
                         conv_rank: int = 0, train_unet: bool = True) -> LycorisAdapter:
    """Read and check a LoHa/LoKr file for a run of lora.type `kind` before any model loads: it is
    of that type, for this base family, at the run's ranks (`conv_rank` for the 3x3 convs, when > 0;
    a LoKr of whole factors has none), with no part peft cannot hold, and adapting the text encoders
    (the UNet) only when the run trains them."""
    want = LYCORIS_TYPES[kind]
    if not needs_lycoris_reader(path):
        raise ConfigError(f"{KEY}: {path} is a LoRA adapter but lora.type is {kind!r} ({want}); set lora.type=lora")
    try:
        adapter = read_lycoris(path)
    except ModelError as exc:
        if "cannot tell" not in str(exc):
            raise ConfigError(f"{KEY}: {exc}") from None
        adapter = read_lycoris(path, base=variant)  # family unknown from the file: trust the base
    kinds = adapter.kinds
    if set(kinds) != {want}:
        found = "/".join(kinds)
        hint = (f"set lora.type={found.lower()}" if found.lower() in (*LYCORIS_TYPES, "lora")
                else "start afresh without lora.init_from")
        raise ConfigError(f"{KEY}: {path} is a {found} adapter but lora.type is {kind!r} ({want}); {hint}")
    if adapter.base != variant:
        raise ConfigError(f"{KEY}: {path} is an {_VARIANT_NAMES[adapter.base]} adapter "
                          f"({adapter.base_reason}) but model.base is {_VARIANT_NAMES[variant]}")
    for component, layer, module in adapter.items():
        if module.dora_scale is not None:
            raise ConfigError(f"{KEY}: {path}: {module.name}.dora_scale is a DoRA magnitude, which a {want} run "
                              "does not train; start afresh without lora.init_from")
        held = sorted(set(module.parts) & set(_NOT_HELD))
        if held:
            raise ConfigError(f"{KEY}: {path}: {module.name}.{held[0]} is {_NOT_HELD[held[0]]}, which this "
                              f"trainer's {want} does not have; start afresh without lora.init_from")
    _check_ranks(adapter, path, rank, conv_rank)
    encoders = [c for c in adapter.modules if c != "unet" and adapter.modules[c]]
    if encoders and not train_text_encoder:
        raise ConfigError(f"{KEY}: {path} also adapts {', '.join(encoders)}; set lora.train_text_encoder=true "
                          "(otherwise that part of the adapter would be lost)")
    if adapter.modules.get("unet") and not train_unet:
        raise ConfigError(f"{KEY}: {path} adapts the UNet but lora.train_unet is false; set lora.train_unet=true "
                          "(otherwise that part of the adapter would be lost)")
    return adapter


def _check_ranks(adapter: LycorisAdapter, path: str, rank: int, conv_rank: int) -> None:
    """Each module's rank is the run's: lora.rank, or lora.conv_rank for the UNet's 3x3 convs (LoCon's,
    told by name: LyCORIS flattens their kernels). A LoKr of two whole factors has no rank; its
    shapes are checked against the layers once they exist."""
    for conv in (True, False):
        modules = [m for c, p, m in adapter.items() if (c == "unet" and is_locon_3x3(p)) == conv and m.rank]
        ranks = sorted({m.rank for m in modules})
        if not ranks or ranks == [(conv_rank or rank) if conv else rank]:
            continue
        shown = "/".join(map(str, ranks))
        if conv:
            raise ConfigError(f"{KEY}: {path} adapts the UNet's 3x3 convs at rank {shown} but lora.conv_rank is "
                              f"{conv_rank} (lora.rank {rank}); set lora.conv_rank={ranks[-1]} (and lora.conv_alpha)")
        raise ConfigError(f"{KEY}: {path} has rank {shown} but lora.rank is {rank}; set lora.rank="
                          f"{ranks[-1] if len(ranks) == 1 else '...'}")


def copy_lycoris(module: LycorisModule, layer: torch.nn.Module, source: str, where: str = "") -> None:
    """One module's parts into one peft LoHa/LoKr layer, the scale ratio on `_RESCALED`'s factor
    (`init_adapter.load_initial_adapter` walks the file's modules); parts peft built in other shapes
    (another rank, lora.lokr_factor) are refused."""
    parts = layer_parts(layer)
    mine = {name: tuple(p.shape) for name, p in parts.items()}
    theirs = {name: tuple(t.shape) for name, t in module.parts.items()}
    if mine != theirs:
        raise ConfigError(f"{KEY}: {source}: {module.name} has {_shapes(theirs)} but this run's layer has "
                          f"{_shapes(mine)}; set lora.rank, lora.conv_rank and lora.lokr_factor to the file's "
                          "(`lora-trainer inspect FILE`), or start afresh")
    ratio = module.scale / float(layer.scaling[ADAPTER_NAME])
    rescaled = _RESCALED[module.kind]
    for name, part in parts.items():
        value = module.parts[name].double()
        part.copy_((value * ratio if name == rescaled else value).to(part.dtype))


def _shapes(shapes: dict[str, tuple[int, ...]]) -> str:
    return ", ".join(f"{name} {tuple(shape)}" for name, shape in sorted(shapes.items()))

