"""Per-prompt options in `sample.prompts`, written as kohya-ss's sample prompt files write them:

    "sks dog on a beach --n blurry, lowres --w 512 --h 768 --d 7 --l 6.5 --s 28"

--n negative prompt, --w width, --h height, --d seed, --l guidance (CFG) scale, --s steps. An
option runs from its flag to the next flag; options a prompt leaves out take the `sample.*` values.
Used by the training samples and by the publishing step (which shows the prompts on the card).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

# A flag is `--` + letters, preceded by whitespace or the start and followed by whitespace or the
# end, so "a--b" or "x --no-border" inside the text stays text only when it is not of that shape.
_FLAG = re.compile(r"(?:^|\s)--([A-Za-z]+)(?=\s|$)")
_OPTIONS = {"n": "negative prompt", "w": "width", "h": "height", "d": "seed", "l": "guidance scale", "s": "steps"}
_KNOWN = ", ".join(f"--{k} ({v})" for k, v in _OPTIONS.items())


@dataclass(frozen=True)
class SamplePrompt:
    prompt: str
    negative: Optional[str] = None
    width: Optional[int] = None
    height: Optional[int] = None
    seed: Optional[int] = None
    guidance: Optional[float] = None
    steps: Optional[int] = None


def parse_sample_prompt(text: str) -> SamplePrompt:
    """The prompt and its options; ValueError (one line, naming the option) on a bad one."""
    parts = _FLAG.split(text)
    prompt, values = parts[0].strip(), {}
    for flag, raw in zip(parts[1::2], parts[2::2]):
        value = raw.strip()
        if flag not in _OPTIONS:
            raise ValueError(f"unknown option --{flag}; the options are {_KNOWN}")
        if flag in values:
            raise ValueError(f"--{flag} is given twice")
        if flag != "n" and not value:
            raise ValueError(f"--{flag} needs a value")
        values[flag] = value
    if not prompt:
        raise ValueError("the prompt text before the options is empty")
    try:
        size = {k: int(values[k]) for k in ("w", "h") if k in values}
        seed = int(values["d"]) if "d" in values else None
        steps = int(values["s"]) if "s" in values else None
        guidance = float(values["l"]) if "l" in values else None
    except ValueError:
        bad = next(k for k in values if k != "n" and not _number(values[k], k == "l"))
        raise ValueError(f"--{bad} {values[bad]!r} is not {'a number' if bad == 'l' else 'an integer'}") from None
    for key, side in size.items():
        if side < 8 or side % 8:
            raise ValueError(f"--{key} {side} is not a positive multiple of 8")
    if steps is not None and steps < 1:
        raise ValueError(f"--s {steps} is not a number of steps >= 1")
    return SamplePrompt(prompt, values.get("n"), size.get("w"), size.get("h"), seed, guidance, steps)


def _number(text: str, real: bool) -> bool:
    try:
        float(text) if real else int(text)
    except ValueError:
        return False
    return True
