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

from ..errors import ConfigError
from ..export.lycoris import LycorisAdapter, LycorisModule
from ..models.lora import ADAPTER_NAME, is_locon_3x3
from ..models.lycoris import LYCORIS_TYPES, layer_parts

KEY = "lora.init_from"
# Parts a LyCORIS file may have that peft's LoHa/LoKr (as this trainer builds them) cannot hold.
_NOT_HELD = {"hada_t1": "a Tucker/CP core (LyCORIS' use_tucker)", "hada_t2": "a Tucker/CP core (LyCORIS' use_tucker)",
             "lokr_t2": "a Tucker/CP core (LyCORIS' use_tucker)", "lokr_w1_a": "a low-rank w1 (LyCORIS' decompose_both)",
             "lokr_w1_b": "a low-rank w1 (LyCORIS' decompose_both)"}
# The factor the scale ratio goes on, by type (see the module docstring).
_RESCALED = {"LoHa": "hada_w1_a", "LoKr": "lokr_w1"}


def check_lycoris(adapter: LycorisAdapter, path: str, kind: str, rank: int, conv_rank: int = 0,
                  factor: int = -1) -> LycorisAdapter:
    """Check a LoHa/LoKr file read for a run of lora.type `kind` (`init_adapter.read_initial_adapter`
    reads it and checks its family and components): it is of that type, at the run's ranks
    (`conv_rank` for the 3x3 convs, when > 0; a LoKr of whole factors has none) and LoKr `factor`
    (lora.lokr_factor), with no part peft cannot hold."""
    want = LYCORIS_TYPES[kind]
    kinds = adapter.kinds
    if set(kinds) != {want}:
        found = "/".join(kinds)
        hint = (f"set lora.type={found.lower()}" if found.lower() in (*LYCORIS_TYPES, "lora")
                else "start afresh without lora.init_from")
        raise ConfigError(f"{KEY}: {path} is a {found} adapter but lora.type is {kind!r} ({want}); {hint}")
    for component, layer, module in adapter.items():
        if module.dora_scale is not None:
            raise ConfigError(f"{KEY}: {path}: {module.name}.dora_scale is a DoRA magnitude, which a {want} run "
                              "does not train; start afresh without lora.init_from")
        held = sorted(set(module.parts) & set(_NOT_HELD))
        if held:
            raise ConfigError(f"{KEY}: {path}: {module.name}.{held[0]} is {_NOT_HELD[held[0]]}, which this "
                              f"trainer's {want} does not have; start afresh without lora.init_from")
    _check_ranks(adapter, path, rank, conv_rank)
    _check_lokr_factor(adapter, path, factor)
    return adapter


def _lokr_split(module: LycorisModule) -> tuple[tuple[int, int], tuple[int, int]]:
    """((w1's, w2's share of the output), (of the input, 0 where a low-rank w2 does not tell it)): how
    the file split the layer; the output's side is always known, the input's from a whole w2."""
    w1, parts = module.parts["lokr_w1"], module.parts
    w2_out = parts["lokr_w2"].shape[0] if "lokr_w2" in parts else parts["lokr_w2_a"].shape[0]
    w2_in = parts["lokr_w2"].shape[1] if "lokr_w2" in parts else 0
    return (w1.shape[0], w2_out), (w1.shape[1], w2_in)


def _splits(split: tuple[int, int], factor: int) -> bool:
    from peft.tuners.lokr.layer import factorization

    return not split[1] or factorization(split[0] * split[1], factor) == split


def _check_lokr_factor(adapter: LycorisAdapter, path: str, factor: int) -> None:
    """Each LoKr module splits its layer as the run's lora.lokr_factor would (read from the parts'
    shapes, before any model loads), else the factor that splits them all is named."""
    modules = [m for _, _, m in adapter.items() if m.kind == "LoKr" and "lokr_w1" in m.parts]
    wrong = next((m for m in modules if not all(_splits(s, factor) for s in _lokr_split(m))), None)
    if wrong is None:
        return
    fits = [f for f in (-1, *range(1, 257)) if all(_splits(s, f) for m in modules for s in _lokr_split(m))]
    hint = f"set lora.lokr_factor={fits[0]}" if fits else "start afresh without lora.init_from"
    (out1, out2), _ = _lokr_split(wrong)
    raise ConfigError(f"{KEY}: {path}: {wrong.name} splits its {out1 * out2} outputs {out1} × {out2} (lokr_w1 "
                      f"{tuple(wrong.parts['lokr_w1'].shape)}), not as lora.lokr_factor {factor} does; {hint}")


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

