"""Sampler names users know (A1111/ComfyUI) → diffusers schedulers with the matching flags.

Each scheduler is built from the base model's own scheduler config, so the noise schedule (betas,
timestep spacing, prediction type) stays the model's; only the solver changes.
"""

from __future__ import annotations

import random

from ..errors import ConfigError

# name → (diffusers class, extra config, the name A1111 writes in PNG info)
SAMPLERS: dict[str, tuple[str, dict, str]] = {
    "ddim": ("DDIMScheduler", {}, "DDIM"),
    "ddpm": ("DDPMScheduler", {}, "DDPM"),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}, "PLMS"),
    "euler": ("EulerDiscreteScheduler", {}, "Euler"),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "heun": ("HeunDiscreteScheduler", {}, "Heun"),
    "dpm++_2m": ("DPMSolverMultistepScheduler",
                 {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False}, "DPM++ 2M"),
    "dpm++_2m_karras": ("DPMSolverMultistepScheduler",
                        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
                        "DPM++ 2M Karras"),
    # A1111's "DPM++ SDE Karras" is the single-step SDE solver (needs torchsde, the `sde` extra).
    "dpm++_sde_karras": ("DPMSolverSDEScheduler", {"use_karras_sigmas": True}, "DPM++ SDE Karras"),
    "unipc": ("UniPCMultistepScheduler", {}, "UniPC"),
    # LCM needs an LCM model or LCM-LoRA, 4-8 steps and guidance about 1-2.
    "lcm": ("LCMScheduler", {}, "LCM"),
}


# The noise levels SD1.x and SDXL are trained on: a sampler given more steps than this fails deep inside
MAX_STEPS = 1000


def resolve_seed(seed: int) -> int:
    """A1111's seed -1: a random one (in its range, 0 to 2^32 - 1), drawn once so the images and their
    PNG parameters carry the seed that re-makes them; any other seed as it is."""
    return random.randrange(2 ** 32) if seed == -1 else seed


# ComfyUI's and kohya's spellings of the same samplers, for the suggestion in an error
_OTHER_SPELLINGS = {"dpmpp": "dpm++", "euler_ancestral": "euler_a", "uni_pc": "unipc", "plms": "pndm"}


def _suggestion(key: str) -> str | None:
    """The known sampler an unknown name most likely means: another tool's spelling, or a typo."""
    import difflib

    key = key.removeprefix("k_").removeprefix("sample_")  # k-diffusion's names: k_euler_a, sample_euler
    for other, ours in _OTHER_SPELLINGS.items():
        key = key.replace(other, ours)
    if key in SAMPLERS:
        return key
    close = difflib.get_close_matches(key, SAMPLERS, n=1, cutoff=0.6)
    return close[0] if close else None


def sampler_key(name: str) -> str:
    """`name` as SAMPLERS spells it ("Euler A", "euler-a" -> "euler_a"); unknown names come back as they are."""
    return name.strip().lower().replace(" ", "_").replace("-", "_")


def sampler_choices(name: str) -> str:
    """What to choose instead of the unknown sampler `name`, for an error: a suggestion and the list."""
    hint = _suggestion(sampler_key(name))
    mean = f"did you mean {hint}? " if hint else ""
    return f"{mean}choose one of {', '.join(SAMPLERS)}"


def check_sampler(name: str) -> str:
    key = sampler_key(name)
    if key not in SAMPLERS:
        raise ConfigError(f"--scheduler: {name!r} is not a known sampler; {sampler_choices(name)}")
    return key


def missing_package(key: str) -> str | None:
    """What sampler `key` needs and this environment lacks ("torchsde: pip install ..."), or None."""
    import importlib.util

    if SAMPLERS[key][0] == "DPMSolverSDEScheduler" and importlib.util.find_spec("torchsde") is None:
        return "torchsde: pip install 'lora-trainer[sde]'"
    return None


def make_scheduler(name: str, base_config):
    """A scheduler for sampler `name` built on the base model's scheduler config."""
    import diffusers

    key = check_sampler(name)
    cls_name, flags, _ = SAMPLERS[key]
    missing = missing_package(key)
    if missing:
        raise ConfigError(f"--scheduler {key} needs {missing}")
    config = {k: v for k, v in dict(base_config).items() if not k.startswith("_")}
    # A Karras flag in the base config (some SDXL finetunes ship one) must not leak into plain samplers.
    config.pop("use_karras_sigmas", None)
    config.update(flags)
    return getattr(diffusers, cls_name).from_config(config)


def a1111_name(name: str) -> str:
    return SAMPLERS[check_sampler(name)][2]
