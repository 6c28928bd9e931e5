"""kohya's block network arguments (networks.lora: down/mid/up_lr_weight, block_lr_zero_threshold,
block_dims, block_alphas, conv_block_dims, conv_block_alphas) as lora.block_* config keys.

kohya fits lr-weight lists of another length to the base (a long one is cut, a short one filled with
1.0); the import does that fitting when the base is known and says so (the run fits a list it
could not, with a warning). The per-block rank and alpha lists kohya takes at their exact length
only, as the config does."""

from __future__ import annotations

from ..errors import ConfigError
from ..models.blocks import BLOCK_COUNTS, LR_WEIGHT_COUNTS, PRESETS, VARIANT_NAMES, fit_count, fit_note
from .options import parse_number, set_key


def block_args(network_args: dict[str, str], cfg: dict, notes: list[str]) -> None:
    """kohya's block arguments (down/mid/up_lr_weight, block_lr_zero_threshold, block_dims,
    block_alphas, conv_block_dims, conv_block_alphas) as lora.block_* keys; taken out of `network_args`.
    Value counts are checked against the base when the run starts."""

    def numbers(key: str, kind=float) -> list:
        value = network_args.pop(key)
        try:
            return [kind(float(v)) for v in value.split(",")]
        except ValueError:
            raise ConfigError(f"--network_args {key}={value}: expected comma-separated numbers") from None

    for side in ("down", "mid", "up"):
        key = f"{side}_lr_weight"
        if key in network_args:
            value = network_args[key].strip()
            preset = side != "mid" and value.split("+")[0] in PRESETS
            weights = network_args.pop(key) if preset else fit_lr_weights(key, numbers(key), side, cfg, notes)
            set_key(cfg, f"lora.block_lr_weights.{side}", weights)
    if "block_lr_zero_threshold" in network_args:
        value = network_args.pop("block_lr_zero_threshold")
        threshold = parse_number(value, "--network_args block_lr_zero_threshold")
        if "block_lr_weights" in cfg.get("lora", {}):
            set_key(cfg, "lora.block_lr_zero_threshold", threshold)
        elif threshold:  # kohya compares it with the lr weights only
            notes.append(f"--network_args block_lr_zero_threshold={value}: kohya uses it only with "
                         "down/mid/up_lr_weight; left out")
    blocks_on = "block_dims" in network_args or "block_lr_weights" in cfg.get("lora", {})
    for kohya, ours, kind in (("block_dims", "block_ranks", int), ("block_alphas", "block_alphas", float),
                              ("conv_block_dims", "conv_block_ranks", int),
                              ("conv_block_alphas", "conv_block_alphas", float)):
        if kohya not in network_args:
            continue
        if not blocks_on:  # kohya reads the per-block lists only with block_dims or block lr weights
            notes.append(f"--network_args {kohya}={network_args.pop(kohya)}: kohya uses it only with block_dims or "
                         "down/mid/up_lr_weight; left out")
            continue
        if kohya == "conv_block_alphas" and "conv_block_dims" not in network_args and \
                "conv_block_ranks" not in cfg.get("lora", {}):
            notes.append(f"--network_args conv_block_alphas={network_args.pop(kohya)}: kohya uses it only with "
                         "conv_block_dims; left out")
            continue
        values = numbers(kohya, kind)
        check_block_count(kohya, values, cfg)
        set_key(cfg, f"lora.{ours}", values)


def fit_lr_weights(key: str, weights: list[float], side: str, cfg: dict, notes: list[str]) -> list[float]:
    """`weights` cut or filled with 1.0 to the base's count of `side` blocks, as kohya's networks.lora
    does (with a note); unchanged, with a note when the count is wrong, if the base is not known (the
    run then fits it the same way, with a warning)."""
    variant = cfg.get("model", {}).get("variant")
    position = ("down", "mid", "up").index(side)
    if variant not in LR_WEIGHT_COUNTS:
        counts = sorted({counts[position] for counts in LR_WEIGHT_COUNTS.values()})
        if len(weights) not in counts:
            notes.append(f"--network_args {key}: {len(weights)} values; kohya cuts or fills the list (with 1.0) to "
                         f"the base's count ({' or '.join(map(str, counts))}), and so does the run once it reads the "
                         "base (with a warning)")
        return weights
    n = LR_WEIGHT_COUNTS[variant][position]
    if len(weights) == n:
        return weights
    notes.append(fit_note(f"--network_args {key}", len(weights), n, side, variant))
    return fit_count(weights, n)


def check_block_count(kohya: str, values: list, cfg: dict) -> None:
    """kohya refuses per-block rank and alpha lists of another count than the base's blocks; so does
    the import, naming the argument, when the base is known (else the run does, before any model loads)."""
    variant = cfg.get("model", {}).get("variant")
    if variant in BLOCK_COUNTS and len(values) != BLOCK_COUNTS[variant]:
        n = BLOCK_COUNTS[variant]
        raise ConfigError(f"--network_args {kohya}: {len(values)} values; {VARIANT_NAMES[variant]} has {n} kohya "
                          f"blocks, and kohya refuses another count too; give {n}")
