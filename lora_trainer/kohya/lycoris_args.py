"""LyCORIS under kohya (`--network_module lycoris.kohya`): its `--network_args` (algo, factor,
conv_dim/conv_alpha, preset and the rest that LyCORIS' kohya entry point reads) as lora.type
(loha, lokr; lora and locon are our LoRA), lora.lokr_factor and the LoCon keys. Other algorithms
are refused; what we cannot honour is noted and left out; LyCORIS' own defaults mean nothing."""

from __future__ import annotations

from ..errors import ConfigError
from .options import LORAPLUS_ARGS, parse_number, set_conv_rank, set_key

# algo= as LyCORIS names it -> lora.type (its lora and locon are one module: LoRA, plus convs)
ALGOS = {"lora": "lora", "locon": "lora", "loha": "loha", "lokr": "lokr"}
# LyCORIS' algorithms that are another kind of adapter: refused
OTHER_ALGOS = ("ia3", "full", "dylora", "glora", "diag-oft", "boft", "tlora")
# The values LyCORIS takes when an argument is absent (a flag is off unless given): they change nothing.
DEFAULTS = {"preset": "full", "factor": -1.0, "dropout": 0.0, "rank_dropout": 0.0, "module_dropout": 0.0,
            "constraint": 0.0, "constrain": 0.0, "block_size": 4.0, "disable_conv_cp": True, "wd_on_output": True}
# The preset whose layers are exactly ours: the transformer blocks and the text encoders' attention and MLP, no convs
OUR_PRESET = "attn-mlp"
# networks.lora's block arguments, which LyCORIS does not read
BLOCK_ARGS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold", "block_dims",
              "block_alphas", "conv_block_dims", "conv_block_alphas")
_OFT_ONLY = "only LyCORIS' OFT/BOFT read it; left out"
_TUCKER = "Tucker decomposition of conv kernels is not supported; left out"
NOTES = {  # use_cp, use_conv_cp, disable_conv_cp and constrain: LyCORIS' older names
    "use_tucker": _TUCKER, "use_cp": _TUCKER, "use_conv_cp": _TUCKER, "disable_conv_cp": _TUCKER,
    "use_scalar": "LyCORIS' trainable scalar is not supported; left out (ΔW starts at 0 as usual)",
    "train_norm": "training the norm layers is not supported; left out",
    "rank_dropout_scale": "LyCORIS' kohya entry point does not read it; left out",
    "decompose_both": "LoKr with w1 low-rank too is not supported (w1 is whole here); left out",
    "full_matrix": "left out: w2 is whole here when lora.rank is at least half its larger side (else a rank-r "
                   "pair); for whole factors everywhere set network_dim large (e.g. 100000): they train at scale 1, "
                   "as in LyCORIS",
    "unbalanced_factorization": "LoKr's unbalanced factorization is not supported; left out",
    "bypass_mode": "left out: it changes how LyCORIS computes a layer, not what is trained",
    "rs_lora": "not supported (the scale here is alpha/rank); for LyCORIS' alpha/√rank set lora.alpha to alpha·√rank",
    "constraint": _OFT_ONLY, "constrain": _OFT_ONLY, "rescaled": _OFT_ONLY, "block_size": _OFT_ONLY,
    "train_t5xxl": "no T5 in SD1.x/SDXL; left out", "train_llm_adapter": "no LLM adapter in SD1.x/SDXL; left out",
    "wd_on_output": "only LyCORIS' dora_wd reads it; left out",
    "dropout": "LyCORIS drops elements of the adapter's output ΔW·x; that is not supported (the nearest are "
               "lora.neuron_dropout, of A·x, and lora.dropout, of x); left out",
}
_TRANSFORMERS = ("the transformer blocks' attention, feed-forward and proj_in/proj_out (lora.unet_targets) and the "
                 "text encoders' attention and MLP (lora.text_encoder_targets)")


def lycoris_type(network_args: dict[str, str]) -> str:
    """lora.type for `--network_args algo=...` (LyCORIS' default: lora); other algorithms are refused."""
    algo = network_args.get("algo", "lora").strip().lower() or "lora"
    if algo in ALGOS:
        return ALGOS[algo]
    known = "LyCORIS' " + algo if algo in OTHER_ALGOS else "an algorithm LyCORIS does not list"
    raise ConfigError(f"--network_args algo={algo}: {known}, not supported; lora-trainer trains algo=lora/locon "
                      "(LoRA, with lora.conv_rank), loha and lokr (lora.type)")


def lycoris_args(network_args: dict[str, str], alpha: float, cfg: dict, notes: list[str]) -> None:
    """The LyCORIS arguments as config keys, taken out of `network_args` (what is left there is
    mapped or noted as for networks.lora: LoRA+, unknown names). `alpha` is --network_alpha as
    given (LyCORIS' default conv_alpha)."""
    kind = lycoris_type(network_args)
    algo = network_args.pop("algo", "lora").strip().lower() or "lora"  # lycoris_type checked it
    set_key(cfg, "lora.type", kind)
    shown = f"--network_args algo={algo}"
    for key in BLOCK_ARGS:
        if key in network_args:
            notes.append(f"--network_args {key}={network_args.pop(key)}: networks.lora's block argument; "
                         "lycoris.kohya does not read it, so it is left out")
    preset = _preset(network_args.pop("preset", "full"), kind, shown, notes)
    _factor(network_args, kind, cfg, notes)
    _convs(network_args, preset, alpha, cfg, notes)  # every algo: LyCORIS' conv_dim defaults to network_dim
    if kind == "lora":
        _dora(network_args, cfg, notes)
        for key, ours in (("rank_dropout", "lora.rank_dropout"), ("module_dropout", "lora.module_dropout")):
            value = network_args.pop(key, None)
            if value is not None and parse_number(value, f"--network_args {key}"):
                set_key(cfg, ours, parse_number(value, f"--network_args {key}"))
                notes.append(f"--network_args {key}={value}: {ours} draws per sample (rank_dropout also rescales "
                             "by 1/(1-p)), as kohya's networks.lora does; LyCORIS draws once per batch")
    else:
        unsupported = [key for key in ("dora_wd", "dropout", "rank_dropout", "module_dropout", *LORAPLUS_ARGS)
                       if key in network_args]
        for key in unsupported:
            value = network_args.pop(key)
            if not _is_default(key, value):
                notes.append(f"--network_args {key}={value}: not supported with lora.type {kind} yet (LoHa and LoKr "
                             "take no DoRA, dropouts or LoRA+ here); left out")
    for key in [k for k in network_args if k in NOTES or k in DEFAULTS]:
        value = network_args.pop(key)
        if not _is_default(key, value):
            notes.append(f"--network_args {key}={value}: {NOTES.get(key, 'not supported; left out')}")


def _preset(preset: str, kind: str, shown: str, notes: list[str]) -> str:
    """LyCORIS' layer set: attn-mlp is ours exactly; its default, full, and the rest are noted with what
    is adapted here instead."""
    if preset == OUR_PRESET:
        return preset
    convs = ("the ResNet blocks and samplers at lora.conv_rank (LyCORIS' conv_dim); conv_in, conv_out and the "
             "time embedding are not adapted")
    what = ("LyCORIS' default preset full adapts every Linear and Conv of the UNet" if preset == "full" else
            f"--network_args preset={preset}: not mapped")
    notes.append(f"--network_module lycoris.kohya {shown}: {what}; here {_TRANSFORMERS} are adapted, and {convs} "
                 f"(preset={OUR_PRESET} is exactly that set without convs)")
    return preset


def _factor(network_args: dict[str, str], kind: str, cfg: dict, notes: list[str]) -> None:
    """LoKr's factor=F as lora.lokr_factor (-1, LyCORIS' default: near √d)."""
    value = network_args.pop("factor", None)
    if value is None:
        return
    factor = parse_number(value, "--network_args factor")
    if kind != "lokr":
        if factor != -1:
            notes.append(f"--network_args factor={value}: only algo=lokr reads it; left out")
        return
    if factor != -1 and (not factor.is_integer() or factor < 1):
        raise ConfigError(f"--network_args factor={value}: expected -1 (each side split near its square root) or "
                          "an integer >= 1 (e.g. 8)")
    if factor != -1:
        set_key(cfg, "lora.lokr_factor", int(factor))


def _convs(network_args: dict[str, str], preset: str, alpha: float, cfg: dict, notes: list[str]) -> None:
    """LoCon's convs: LyCORIS adapts them unless the preset leaves convs out, at conv_dim (default
    network_dim) and conv_alpha (default network_alpha; 0 means = conv_dim)."""
    dim, conv_alpha = network_args.pop("conv_dim", None), network_args.pop("conv_alpha", None)
    if preset == OUR_PRESET:
        for key, value in (("conv_dim", dim), ("conv_alpha", conv_alpha)):
            if value is not None:
                notes.append(f"--network_args {key}={value}: preset={OUR_PRESET} adapts no 3x3 convs; left out")
        return
    if dim is None:  # LyCORIS' default: network_dim
        rank = cfg["lora"]["rank"]
        set_key(cfg, "lora.conv_rank", rank)
    elif not (rank := set_conv_rank(dim, "LyCORIS", cfg, notes)):
        return
    value = parse_number(conv_alpha, "--network_args conv_alpha") if conv_alpha is not None else alpha
    set_key(cfg, "lora.conv_alpha", value if value else float(rank))


def _dora(network_args: dict[str, str], cfg: dict, notes: list[str]) -> None:
    """dora_wd (LyCORIS' DoRA) as lora.use_dora: a magnitude per output channel, LyCORIS' wd_on_output."""
    value = network_args.pop("dora_wd", None)
    if value is None or _is_default("dora_wd", value):
        return
    set_key(cfg, "lora.use_dora", True)
    on_output = network_args.pop("wd_on_output", None)
    if on_output is not None and not _on(on_output):
        notes.append(f"--network_args wd_on_output={on_output}: our DoRA learns a magnitude per output channel "
                     "(LyCORIS' wd_on_output=true), not per input channel; left out")


def _is_default(key: str, value: str) -> bool:
    """Whether LyCORIS reads `value` as it reads the argument's absence."""
    default = DEFAULTS.get(key, False)
    if isinstance(default, bool):
        return _on(value) == default
    if isinstance(default, float):
        try:
            return float(value) == default
        except ValueError:
            return False
    return value == default


def _on(value: str) -> bool:
    """A flag's value: off for false, 0, no or nothing."""
    return value.strip().lower() not in ("false", "0", "no", "")
