"""kohya's loss and noise options (loss type and huber schedule, timestep range, zero terminal SNR,
debiased estimation, multi-resolution noise, random noise strengths, adaptive noise scale, the
v-prediction loss scalings) as `train.*` keys. A value equal to our default (which
is kohya's) is not written, so kohya_ss GUI files, which write every field, stay short."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .options import set_key

if TYPE_CHECKING:
    from .mapping import Args

# kohya argument -> (our key, the values we have, our default)
CHOICES = {"loss_type": ("train.loss_type", ("l2", "l1", "huber", "smooth_l1"), "l2"),
           "huber_schedule": ("train.huber_schedule", ("constant", "exponential", "snr"), "snr")}
# kohya argument -> (our key, getter, our default)
NUMBERS = {
    "huber_c": ("train.huber_c", "float", 0.1),
    "huber_scale": ("train.huber_scale", "float", 1.0),
    "multires_noise_iterations": ("train.multires_noise_iterations", "int", 0),
    "multires_noise_discount": ("train.multires_noise_discount", "float", 0.3),
}
SWITCHES = {"zero_terminal_snr": "train.zero_terminal_snr", "debiased_estimation_loss": "train.debiased_estimation",
            "scale_v_pred_loss_like_noise_pred": "train.scale_v_pred_loss_like_noise_pred"}
# kohya argument -> (our key, the kohya argument it modifies, its getter): kept only with that argument set
MODIFIERS = {"noise_offset_random_strength": ("train.noise_offset_random_strength", "noise_offset", "bool"),
             "adaptive_noise_scale": ("train.adaptive_noise_scale", "noise_offset", "float"),
             "ip_noise_gamma_random_strength": ("train.input_perturbation_random_strength", "ip_noise_gamma", "bool")}
# kohya argument -> what must be set for it to count (kohya ignores it otherwise; our config refuses it)
READ_ONLY_WITH = {"huber_schedule": "--loss_type huber or smooth_l1", "huber_c": "--loss_type huber or smooth_l1",
                  "huber_scale": "--loss_type huber or smooth_l1",
                  "multires_noise_discount": "--multires_noise_iterations"}


def loss_options(a: "Args", cfg: dict, notes: list[str]) -> None:
    train = cfg.setdefault("train", {})

    def keep(kohya: str, ours: str, value) -> None:
        """Set `ours`, or note that kohya would not read this argument here."""
        if kohya.startswith("huber"):
            read = train.get("loss_type") in ("huber", "smooth_l1")
        else:
            read = kohya != "multires_noise_discount" or bool(train.get("multires_noise_iterations"))
        if read:
            set_key(cfg, ours, value)
        else:
            notes.append(f"{a.name(kohya)} {a.get(kohya)}: only read with {READ_ONLY_WITH[kohya]}; left out")

    for kohya, (ours, allowed, default) in CHOICES.items():
        value = (a.str(kohya) or default).lower()
        if value not in allowed:
            notes.append(f"{a.name(kohya)} {a.get(kohya)}: not supported (we have {', '.join(allowed)}); "
                         f"{ours} stays {default}")
        elif value != default:
            keep(kohya, ours, value)
    for kohya, (ours, kind, default) in NUMBERS.items():
        if a.has(kohya):
            value = a.int(kohya) if kind == "int" else a.float(kohya)
            if value != default:
                keep(kohya, ours, value)
    for kohya, ours in SWITCHES.items():
        if a.bool(kohya):
            set_key(cfg, ours, True)
    if a.float("v_pred_like_loss"):  # 0 is off in kohya, null here
        set_key(cfg, "train.v_pred_like_loss", a.float("v_pred_like_loss"))
    for kohya, (ours, modified, kind) in MODIFIERS.items():
        if not a.has(kohya):
            continue
        value = a.bool(kohya) if kind == "bool" else a.float(kohya)
        if not value:  # false or 0 (kohya_ss GUI files write adaptive_noise_scale = 0): off, as here
            continue
        if not a.float(modified):
            # kohya refuses adaptive_noise_scale only when --noise_offset is absent; at 0 it is unused
            refused = kind == "float" and not a.has(modified)
            notes.append(f"{a.name(kohya)}: without --{modified} it has nothing to act on "
                         f"({'kohya refuses it' if refused else 'kohya ignores it'}); left out")
        else:
            set_key(cfg, ours, value)
    _timesteps(a, cfg, notes)


def _timesteps(a: "Args", cfg: dict, notes: list[str]) -> None:
    """kohya draws timesteps from [min_timestep, max_timestep), as we do; when the two are equal it
    trains every step at that one timestep, which is the range [t, t + 1) here."""
    low, high = a.int("min_timestep"), a.int("max_timestep")
    if low is not None and high is not None and low == high:
        low = min(low, 999)
        notes.append(f"--min_timestep {a.get('min_timestep')} --max_timestep {a.get('max_timestep')}: every step "
                     f"trains at timestep {low}, the range [{low}, {low + 1}) here")
        high = low + 1
    if low:
        set_key(cfg, "train.min_timestep", low)
    if high is not None and high != 1000:
        set_key(cfg, "train.max_timestep", high)
