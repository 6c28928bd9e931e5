"""The prompt guidance users see, derived once from a read run so the HF card and the CivitAI
package agree: trigger words, recommended prompts, the weight range, prompts.json.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from ..config import main_side
from ..errors import PublishError
from .run import Run, embedding_vectors, prompt_and_negative, read_png_parameters

# Without a sweep, the range most style/character LoRAs are used at; shown as a default, not a measurement.
DEFAULT_WEIGHTS = (0.6, 1.0, 0.8)
# How a sweep grid's weights are written in its `parameters` chunk: ours, as the inference sweep writes
# it ('Sweep: "my-lora: 0,0.5,1"', the adapter's name optional) or A1111's X/Y/Z plot ("X Values: ...").
_SWEEP_VALUES = re.compile(r'(?:Sweep(?: weights)?|[XYZ] Values):\s*"?(?:[^":,\n]+:\s*)?([-0-9.,\s]+)"?')


@dataclass
class WeightAdvice:
    low: float
    high: float
    default: float
    source: str  # "sweep", "user" or "default"
    grid: Path | None = None  # the sweep grid the range was read from



def trigger_words(run: Run) -> list[str]:
    """The words that switch the adapter on: the recorded trigger phrase, else the instance prompt
    or caption prefix the run trained with; then the tokens of its textual-inversion embeddings
    (bundled in the adapter or in DIR/embeddings/), which are words to write in prompts too. An
    embedding alone has its token only: the rest of a caption prefix is ordinary words to it."""
    if run.embedding_only:
        return [p.stem for p in run.embedding_files]
    phrase = (run.metadata.get("modelspec.trigger_phrase") or run.cfg.dreambooth.instance_prompt
              or run.cfg.data.caption_prefix)
    words = [w.strip() for w in (phrase or "").split(",") if w.strip()]
    for token in [*run.bundle, *(p.stem for p in run.embedding_files)]:
        if not any(token.lower() in w.lower().split() for w in words):
            words.append(token)
    return words


def recommended_prompts(run: Run) -> tuple[list[str], str]:
    """(prompts, negative prompt): the run's sample prompts, which the samples show working."""
    pairs = [prompt_and_negative(run.cfg, text) for text in run.cfg.sample.prompts]
    if not pairs:
        words = ", ".join(trigger_words(run))
        prompt = run.cfg.dreambooth.instance_prompt or (f"{words}, " if words else "") + "a detailed picture"
        pairs = [(prompt, run.cfg.sample.negative_prompt)]
    return [p for p, _ in pairs], pairs[0][1]


def _sweep_weights(grid: Path) -> list[float]:
    """The weights a sweep grid shows: from a sidecar JSON `weights` list or its `parameters` chunk."""
    sidecar = grid.with_suffix(".json")
    if sidecar.is_file():
        try:
            weights = json.loads(sidecar.read_text(encoding="utf-8")).get("weights")
            return sorted(float(w) for w in weights)
        except (ValueError, TypeError, AttributeError):
            pass
    match = _SWEEP_VALUES.search(read_png_parameters(grid))
    if not match:
        return []
    try:
        return sorted(float(v) for v in match.group(1).replace(",", " ").split())
    except ValueError:
        return []


def _round(x: float) -> float:
    return round(x * 20) / 20  # to 0.05: weights are chosen by eye


def weight_advice(run: Run, weight: float | None = None, weight_range: tuple[float, float] | None = None,
                  ) -> WeightAdvice | None:
    """The recommended weight range: the user's, else the swept range of a sweep grid, else a default.
    None for an embedding alone, which has no weight (and refuses --weight/--weight-range)."""
    if run.embedding_only:
        flag = "--weight" if weight is not None else "--weight-range" if weight_range is not None else None
        if flag:
            raise PublishError(f"{flag}: {run.dir} trained an embedding alone (textual inversion), which has no LoRA "
                               f"weight; drop {flag} (the embedding acts wherever {run.token!r} is in the prompt)")
        return None
    for name, value in (("--weight", weight), *((("--weight-range", v) for v in weight_range or ()))):
        if value is not None and not (math.isfinite(value) and 0 < value <= 4):
            raise PublishError(f"{name}: got {value}; expected a number in (0, 4], e.g. 0.8")
    if weight_range is not None:
        low, high = sorted(weight_range)
        if weight is not None and not low <= weight <= high:
            # the card would say "0.3 – 0.9, start at 2"
            raise PublishError(f"--weight {weight:g} is outside --weight-range {low:g},{high:g}; "
                               "give a weight inside the range")
        return WeightAdvice(low, high, weight if weight is not None else _round((low + high) / 2), "user")
    if weight is not None:
        return WeightAdvice(max(0.05, _round(weight - 0.2)), _round(weight + 0.2), weight, "user")
    if run.sweep is not None:
        positive = [w for w in _sweep_weights(run.sweep) if w > 0]
        if positive:
            low, high = positive[0], positive[-1]
            return WeightAdvice(low, high, _round((low + high) / 2), "sweep", run.sweep)
    low, high, default = DEFAULT_WEIGHTS
    return WeightAdvice(low, high, default, "default", run.sweep)


def prompt_guide(run: Run, advice: WeightAdvice | None) -> dict:
    """The prompt guidelines as data: written as prompts.json into the HF repo and the package.
    An embedding alone (advice None) has no weight: its strength is the prompt's emphasis."""
    prompts, negative = recommended_prompts(run)
    s = run.cfg.sample
    guide: dict = {"trigger_words": trigger_words(run), "prompts": prompts, "negative_prompt": negative}
    if advice is not None:
        guide["weight"] = {"default": advice.default, "min": advice.low, "max": advice.high, "source": advice.source}
    else:
        guide["embedding"] = {"token": run.token, "file": run.adapter.name, "vectors": embedding_vectors(run)}
    guide["settings"] = {"steps": s.steps, "guidance_scale": s.guidance_scale, "sampler": s.sampler_name,
                         "width": main_side(run.cfg.data.resolution), "height": main_side(run.cfg.data.resolution),
                         **({"vae": run.vae} if run.vae else {})}
    return guide
