"""kohya's block network arguments (networks.lora: down/mid/up_lr_weight, block_lr_zero_threshold,
block_dims, block_alphas, conv_block_dims, conv_block_alphas) as lora.block_* config keys."""

from __future__ import annotations

from ..errors import ConfigError
from ..models.blocks import PRESETS
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
            set_key(cfg, f"lora.block_lr_weights.{side}", network_args.pop(key) if preset else numbers(key))
    if "block_lr_zero_threshold" in network_args:
        value = network_args.pop("block_lr_zero_threshold")
        set_key(cfg, "lora.block_lr_zero_threshold", parse_number(value, "--network_args block_lr_zero_threshold"))
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
        set_key(cfg, f"lora.{ours}", numbers(kohya, kind))
