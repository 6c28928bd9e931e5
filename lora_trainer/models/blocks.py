"""kohya's UNet blocks (networks.lora network args): the block a module belongs to, and the per-block
learning-rate weights (`down_lr_weight`, `mid_lr_weight`, `up_lr_weight`, `block_lr_zero_threshold`),
ranks and alphas (`block_dims`, `block_alphas`, `conv_block_dims`, `conv_block_alphas`).

kohya numbers blocks as the original (LDM) UNet does. SD1.x: 0 is conv_in (never adapted), 1-11 the
input blocks (down level i holds 3i+1, 3i+2 and its downsampler 3i+3), 12 the middle block, 13-24
the output blocks (up level i holds 13+3i+j, its upsampler 13+3i+2): 12 down weights, 1 mid, 12 up,
and 25 per-block ranks. SDXL: LDM block names directly, 0 time/label embeddings, 1-9 input_blocks.0-8,
10-12 middle_block.0-2, 13-21 output_blocks.0-8, 22 `out`: 9 down, 3 mid, 9 up, 23 per-block ranks
(blocks 0 and 22 always train at lr weight 1). A block of lr weight 0 (or at most the threshold) is
left out of the network, as kohya does: no adapter, nothing trained, nothing in the file.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, replace
from typing import Iterable, Optional, Sequence, Union

from ..errors import ConfigError
from ..errors import ModelError
from ..export.sdxl_names import ldm_from_diffusers

# (down, mid, up) lr-weight counts, and the length of a per-block rank list.
LR_WEIGHT_COUNTS = {"sd15": (12, 1, 12), "sdxl": (9, 3, 9)}
BLOCK_COUNTS = {"sd15": 25, "sdxl": 23}
PRESETS = ("sine", "cosine", "linear", "reverse_linear", "zeros")
_SD15_BLOCK = re.compile(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.")
_SDXL_BLOCK = re.compile(r"(input_blocks|middle_block|output_blocks)\.(\d+)\.")
OUTSIDE = -1  # a module in no numbered block: trained at lr weight 1, lora.rank / lora.alpha
VARIANT_NAMES = {"sd15": "SD1.x", "sdxl": "SDXL"}
log = logging.getLogger(__name__)

Values = Union[list, str, float, int, None]


def block_index(path: str, variant: str, layers_per_block: int = 2) -> int:
    """kohya's block number of the UNet module at `path` (diffusers spelling), or OUTSIDE."""
    if variant == "sdxl":
        try:
            ldm = ldm_from_diffusers(path, layers_per_block)
        except ModelError:
            return OUTSIDE
        if ldm.startswith(("time_embed.", "label_emb.")):
            return 0
        if ldm.startswith("out."):
            return 22
        m = _SDXL_BLOCK.match(ldm)
        if m is None:
            return OUTSIDE
        first = {"input_blocks": 1, "middle_block": 10, "output_blocks": 13}[m[1]]
        return first + int(m[2])
    m = _SD15_BLOCK.match(path)
    if m is None:
        return 12 if path.startswith("mid_block.") else OUTSIDE
    slot = 3 * int(m[2]) + (2 if m[3].endswith("samplers") else int(m[4]))
    return (1 if m[1] == "down" else 13) + slot


# --- learning-rate weights -----------------------------------------------------------------------

def _preset(text: str, n: int, key: str) -> list[float]:
    """kohya's named curves over n blocks (shallow to deep for down, deep to shallow for up), with an
    optional `+offset`: sine rises 0 -> 1 along a quarter sine, cosine falls 1 -> 0, linear rises,
    reverse_linear falls, zeros is 0 everywhere."""
    name, _, offset = text.partition("+")
    try:
        extra = float(offset) if offset else 0.0
    except ValueError:
        raise ConfigError(f"{key}: got {text!r}; the part after + must be a number, e.g. sine+0.5") from None
    ramp = [i / (n - 1) for i in range(n)] if n > 1 else [0.0]
    curves = {"sine": [math.sin(math.pi / 2 * x) for x in ramp], "linear": ramp, "zeros": [0.0] * n}
    curves["cosine"], curves["reverse_linear"] = curves["sine"][::-1], ramp[::-1]
    return [w + extra for w in curves[name.strip()]]


def parse_lr_weights(value: Values, n: int | None, key: str, presets: bool = True) -> Optional[list[float]]:
    """`value` (a list of numbers, one number, "1,0.5,0" or a preset such as "cosine+0.2") as n
    weights; `n` None (the base not known yet) checks the spelling only."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().split("+")[0].strip() in PRESETS:
        if not presets:
            raise ConfigError(f"{key}: got {value!r}; presets ({', '.join(PRESETS)}) are for down and up only, "
                              "give mid as numbers")
        weights = _preset(value.strip(), n or 2, key)  # a bad +offset is refused before the base is known
        return weights if n else None
    items = value.split(",") if isinstance(value, str) else value if isinstance(value, list) else [value]
    try:
        weights = [float(v) for v in items]
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: got {value!r}; expected a list of numbers or one of {', '.join(PRESETS)} "
                          "(optionally +offset, e.g. sine+0.5)") from None
    if n is not None and len(weights) != n:
        raise ConfigError(f"{key}: got {len(weights)} values; this base has {n} such blocks, give {n} numbers")
    return weights


def fit_count(weights: list[float], n: int) -> list[float]:
    """An lr-weight list fitted to `n` blocks as kohya's networks.lora fits it: the values after the
    n-th left out, missing ones 1.0 (the block trains at train.lr)."""
    return list(weights[:n]) + [1.0] * (n - len(weights))


def fit_note(name: str, got: int, n: int, side: str, variant: str) -> str:
    """What fit_count did to a list of `got` values, for a note or a warning naming `name`."""
    base = VARIANT_NAMES[variant]
    if got > n:
        return (f"{name}: {got} values; {base} has {n} {side} blocks, so the values after the {n}th are left out, "
                "as kohya leaves them out")
    return (f"{name}: {got} value{'s' if got != 1 else ''}; {base} has {n} {side} blocks, so the missing {n - got} "
            "are 1.0, as kohya fills them")


def fit_lr_weight_counts(lora, variant: str):
    """`lora` with each block lr-weight list of another length than the base's count fitted as kohya
    fits it (fit_count), with a warning per fitted list. A user who copies a list from a guide for
    the other base (12 SD1.x down blocks, 9 on SDXL) gets kohya's run, not a refusal; presets and
    badly spelled values are left to block_config_errors."""
    fitted = {}
    for side, n in zip(("down", "mid", "up"), LR_WEIGHT_COUNTS[variant]):
        key = f"lora.block_lr_weights.{side}"
        try:
            weights = parse_lr_weights(getattr(lora.block_lr_weights, side), None, key, side != "mid")
        except ConfigError:
            continue
        if weights is not None and len(weights) != n:
            fitted[side] = fit_count(weights, n)
            log.warning("%s (the run trains with %s; give %d values to choose them)",
                        fit_note(key, len(weights), n, side, variant), format_values(fitted[side]), n)
    return replace(lora, block_lr_weights=replace(lora.block_lr_weights, **fitted)) if fitted else lora


def block_lr_weights(lora, variant: str) -> Optional[list[float]]:
    """The lr weight of every kohya block (index as `block_index`), weights at or below
    `lora.block_lr_zero_threshold` set to 0; None when no block weight is set (one UNet group)."""
    given = lora.block_lr_weights
    if given.down is None and given.mid is None and given.up is None:
        return None
    n_down, n_mid, n_up = LR_WEIGHT_COUNTS[variant]
    key = "lora.block_lr_weights."
    down = parse_lr_weights(given.down, n_down, key + "down") or [1.0] * n_down
    mid = parse_lr_weights(given.mid, n_mid, key + "mid", presets=False) or [1.0] * n_mid
    up = parse_lr_weights(given.up, n_up, key + "up") or [1.0] * n_up
    weights = [w if w > lora.block_lr_zero_threshold else 0.0 for w in down + mid + up]
    return [1.0, *weights, 1.0] if variant == "sdxl" else weights


# --- ranks and alphas ----------------------------------------------------------------------------

@dataclass
class BlockPlan:
    """Per-block rank/alpha (linear and 1x1 layers) and, with LoCon, conv rank/alpha (3x3 convs)."""

    ranks: list[int]
    alphas: list[float]
    conv_ranks: Optional[list[int]] = None
    conv_alphas: Optional[list[float]] = None

    def rank_alpha(self, index: int, is_3x3: bool, default: tuple[int, float]) -> tuple[int, float]:
        if index == OUTSIDE:
            return default
        if is_3x3 and self.conv_ranks is not None:
            return self.conv_ranks[index], self.conv_alphas[index]
        return self.ranks[index], self.alphas[index]


def _count(values: Optional[Sequence], n: int, key: str) -> None:
    if values is not None and len(values) != n:
        raise ConfigError(f"{key}: got {len(values)} values; this base has {n} kohya blocks "
                          f"({'1 + 9 input, 3 middle, 9 output + 1' if n == 23 else '12 input, 1 middle, 12 output'}), "
                          f"give {n}")


def block_plan(lora, variant: str, alpha: float, conv_alpha: float,
               lr_weights: Optional[list[float]]) -> Optional[BlockPlan]:
    """The per-block ranks as kohya builds them: on when block ranks (linear or conv) or block lr
    weights are set;
    unset lists repeat lora.rank/alpha (conv: lora.conv_rank/conv_alpha); blocks of lr weight 0 get
    rank 0 (left out). None when off: every module at lora.rank, as without this module."""
    n = BLOCK_COUNTS[variant]
    for key in ("block_ranks", "block_alphas", "conv_block_ranks", "conv_block_alphas"):
        _count(getattr(lora, key), n, f"lora.{key}")
    if lora.block_ranks is None and lora.conv_block_ranks is None and lr_weights is None:
        return None
    ranks = list(lora.block_ranks or [lora.rank] * n)
    alphas = [float(a) for a in lora.block_alphas or [alpha] * n]
    conv_ranks, conv_alphas = None, None
    if lora.conv_block_ranks is not None:
        conv_ranks = list(lora.conv_block_ranks)
        default = conv_alpha if lora.conv_alpha is not None else None  # None: each block's alpha = its rank
        conv_alphas = [float(a) for a in lora.conv_block_alphas] if lora.conv_block_alphas else \
            [float(default if default is not None else r) for r in conv_ranks]
    elif lora.conv_rank:
        conv_ranks, conv_alphas = [lora.conv_rank] * n, [conv_alpha] * n
    for i, weight in enumerate(lr_weights or []):
        if weight == 0:
            ranks[i] = 0
            if conv_ranks is not None:
                conv_ranks[i] = 0
    return BlockPlan(ranks, alphas, conv_ranks, conv_alphas)


def module_ranks(paths: Iterable[str], is_3x3, plan: BlockPlan, variant: str, default: tuple[int, float],
                 layers_per_block: int = 2) -> dict[str, tuple[int, float]]:
    """{module path: (rank, alpha)} for the candidate `paths`; `is_3x3(path)` picks the conv lists.
    Rank 0 modules are kept in the answer (the caller leaves them out)."""
    return {p: plan.rank_alpha(block_index(p, variant, layers_per_block), is_3x3(p), default) for p in paths}


def block_config_errors(lora, variant: Optional[str]) -> list[str]:
    """The block keys' problems, one line each; rank and alpha counts are checked only when `variant`
    is known (lr-weight lists of another count are fitted instead: fit_lr_weight_counts)."""
    errors = []
    for side in ("down", "mid", "up"):
        try:
            parse_lr_weights(getattr(lora.block_lr_weights, side), None, f"lora.block_lr_weights.{side}",
                             side != "mid")
        except ConfigError as exc:
            errors.append(str(exc))
    if lora.block_lr_zero_threshold < 0:
        errors.append(f"lora.block_lr_zero_threshold: got {lora.block_lr_zero_threshold!r}; expected a number >= 0 "
                      "(blocks whose lr weight is at most this are not trained)")
    elif lora.block_lr_zero_threshold > 0 and not _lr_weights_set(lora):
        errors.append(f"lora.block_lr_zero_threshold: got {lora.block_lr_zero_threshold!r} without "
                      "lora.block_lr_weights, so no block has a weight to compare; set lora.block_lr_weights "
                      "(down/mid/up) or leave the threshold at 0")
    for key in ("block_ranks", "conv_block_ranks"):
        values = getattr(lora, key)
        if values is not None and any(r < 0 for r in values):
            errors.append(f"lora.{key}: got {values!r}; expected integers >= 0 (0 leaves the block out)")
    for key in ("block_alphas", "conv_block_alphas"):
        values = getattr(lora, key)
        if values is not None and any(a <= 0 for a in values):
            errors.append(f"lora.{key}: got {values!r}; expected numbers > 0")
    if lora.block_alphas is not None and lora.block_ranks is None and not _lr_weights_set(lora):
        errors.append("lora.block_alphas: set without lora.block_ranks or lora.block_lr_weights, so no block "
                      "ranks are in use; set lora.block_ranks (e.g. the same rank 25 times on SD1.x) or remove it")
    if lora.conv_block_alphas is not None and lora.conv_block_ranks is None:
        errors.append("lora.conv_block_alphas: set without lora.conv_block_ranks; set those too or remove it")
    if lora.init_from and (lora.block_ranks is not None or lora.conv_block_ranks is not None):
        errors.append("lora.init_from: cannot start from a file with per-block ranks (lora.block_ranks / "
                      "conv_block_ranks); remove one of them")
    if variant in BLOCK_COUNTS:
        for key in ("block_ranks", "block_alphas", "conv_block_ranks", "conv_block_alphas"):
            try:
                _count(getattr(lora, key), BLOCK_COUNTS[variant], f"lora.{key}")
            except ConfigError as exc:
                errors.append(str(exc))
    return errors


def _lr_weights_set(lora) -> bool:
    w = lora.block_lr_weights
    return any(v is not None for v in (w.down, w.mid, w.up))


def blocks_in_use(lora) -> bool:
    """Whether any block key is set (the UNet then gets per-block groups or ranks)."""
    return _lr_weights_set(lora) or lora.block_ranks is not None or lora.conv_block_ranks is not None


def format_values(values: Values) -> str:
    """A list as kohya's comma string ("1,0.5,0"); a string (a preset) as given."""
    if isinstance(values, (list, tuple)):
        return ",".join(f"{float(v):g}" if isinstance(v, float) else str(v) for v in values)
    return str(values)
