"""WD14 tagging (data.caption.method: wd14): SmilingWolf's booru taggers as captioners, for anime
and illustration sets ("1girl, solo, long hair, smile").

A tagger is an ONNX model (`model.onnx`: NHWC float32 BGR images of 0-255, padded white to a square
of the model's input size; one confidence per tag) with its tag list (`selected_tags.csv`:
tag_id,name,category,count; category 9 is a rating, 4 a character, the rest general tags). It runs
on onnxruntime, an optional package: a run or command that needs it and lacks it stops first.
"""

from __future__ import annotations

import csv
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from lora_trainer.config import CaptionConfig, caption_model
from lora_trainer.data.captioning import _key  # option names as the BLIP-2 options are named
from lora_trainer.errors import ConfigError, ModelError, first_line
from lora_trainer.hubcheck import check_hub_model

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
TAGS_FILE = "selected_tags.csv"
RATING, CHARACTER = 9, 4  # selected_tags.csv categories; every other one is a general tag
# Kaomoji are tags whose underscore is the face: kohya keeps every tag of 3 characters or fewer
# as it is (^_^, >_<, o_o, 0_0, u_u, x_x, |_|); these are the longer ones (the A1111 tagger's list).
LONG_KAOMOJI = frozenset({"(o)_(o)", "<o>_<o>", "<|>_<|>", "||_||"})


@dataclass
class WD14Tagger:
    """A loaded tagger: its onnxruntime session, its input size and its tags."""

    session: Any  # onnxruntime.InferenceSession; None once released
    input_name: str
    size: int  # input side in pixels (448 for SmilingWolf's models)
    fixed_batch: int | None  # a model exported for one batch size runs in chunks of it
    names: list[str]  # as selected_tags.csv spells them
    categories: list[int]
    options: CaptionConfig
    device: torch.device = torch.device("cpu")  # for captioning's RNG fork and release(): no torch state here


def check_onnxruntime() -> None:
    """A one-line ConfigError, before any work, when the onnxruntime package is missing."""
    if importlib.util.find_spec("onnxruntime") is None:
        raise ConfigError(f"{_key('method')}: wd14 needs the onnxruntime package; pip install 'lora-trainer[wd14]' "
                          "(onnxruntime-gpu for a CUDA GPU)")


def tagger_files(c: CaptionConfig) -> tuple[Path, Path]:
    """(model.onnx, selected_tags.csv) of `c`'s tagger: in a local folder, or from the hub (its
    cache; downloaded once)."""
    source = caption_model(c)
    folder = Path(source).expanduser()
    if folder.is_dir():
        files = folder / MODEL_FILE, folder / TAGS_FILE
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelError(f"{_key('model')}: {source} has no {' or '.join(missing)}; give a folder holding a WD14 "
                             f"tagger's {MODEL_FILE} and {TAGS_FILE}, or a hub id like SmilingWolf/wd-vit-tagger-v3")
        return files
    if folder.exists() or source.count("/") != 1:
        raise ModelError(f"{_key('model')}: {source!r} is neither a folder nor a hub id; give a folder holding "
                         f"{MODEL_FILE} and {TAGS_FILE}, or a hub id like SmilingWolf/wd-vit-tagger-v3")
    check_hub_model(source, _key("model"), MODEL_FILE)
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(source, MODEL_FILE)), Path(hf_hub_download(source, TAGS_FILE))
    except Exception as err:  # noqa: BLE001 -- missing file, network or cache errors: one line for the user
        raise ModelError(f"{_key('model')}: cannot download a WD14 tagger from {source!r} ({first_line(err)}); "
                         f"the repo must hold {MODEL_FILE} and {TAGS_FILE}") from None


def read_tags(path: Path) -> tuple[list[str], list[int]]:
    """Tag names and categories from a selected_tags.csv, in the model's output order."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as err:
        raise ModelError(f"{path}: cannot read the tag list ({first_line(err)})") from None
    if not rows or [h.strip() for h in rows[0][:3]] != ["tag_id", "name", "category"]:
        raise ModelError(f"{path}: expected a header tag_id,name,category,count (a WD14 tagger's tag list)")
    try:
        tags = [(row[1], int(row[2])) for row in rows[1:] if row]
    except (IndexError, ValueError):
        raise ModelError(f"{path}: every row needs a name and a number category (tag_id,name,category,count)") from None
    return [name for name, _ in tags], [category for _, category in tags]


def _providers(c: CaptionConfig, available: list[str]) -> list[str]:
    if c.device != "cuda":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in available:
        raise ConfigError(f"{_key('device')}: got 'cuda' but onnxruntime has no CUDA provider here (it has "
                          f"{', '.join(available)}); pip install onnxruntime-gpu, or use 'cpu'")
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]  # ops CUDA lacks run on the CPU


def load_wd14(c: CaptionConfig) -> WD14Tagger:
    """Open the tagger `c.model` names (folder or hub id) on the CPU, or CUDA with device cuda."""
    check_onnxruntime()
    import onnxruntime as ort

    providers = _providers(c, ort.get_available_providers())
    model_path, tags_path = tagger_files(c)
    names, categories = read_tags(tags_path)
    try:
        session = ort.InferenceSession(str(model_path), providers=providers)
    except Exception as err:  # noqa: BLE001 -- onnxruntime raises its own error types for bad files
        raise ModelError(f"{model_path}: cannot load the ONNX model ({first_line(err)})") from None
    (spec,), (out,) = session.get_inputs(), session.get_outputs()
    shape = list(spec.shape)
    if len(shape) != 4 or shape[3] != 3 or not isinstance(shape[1], int) or shape[1] != shape[2]:
        raise ModelError(f"{model_path}: input shape {shape}; a WD14 tagger takes [batch, side, side, 3] images")
    width = out.shape[-1] if out.shape else None
    if isinstance(width, int) and width != len(names):
        raise ModelError(f"{model_path}: {width} outputs but {tags_path.name} lists {len(names)} tags; "
                         "use the tag list that came with the model")
    fixed = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
    return WD14Tagger(session, spec.name, shape[1], fixed, names, categories, c)


def preprocess(image: Image.Image, size: int) -> np.ndarray:
    """An RGB image as the tagger reads it: padded with white to a centred square, resized to
    `size` (bicubic), as float32 BGR 0-255 of shape [size, size, 3]."""
    side = max(image.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(image.convert("RGB"), ((side - image.width) // 2, (side - image.height) // 2))
    if side != size:
        square = square.resize((size, size), Image.BICUBIC)
    return np.asarray(square, dtype=np.float32)[:, :, ::-1].copy()


def tag_probabilities(tagger: WD14Tagger, images: Sequence[Image.Image]) -> np.ndarray:
    """The tagger's confidences, one row of len(tagger.names) per image."""
    batch = np.stack([preprocess(image, tagger.size) for image in images])
    step = tagger.fixed_batch or len(batch)
    rows = [tagger.session.run(None, {tagger.input_name: batch[i:i + step]})[0] for i in range(0, len(batch), step)]
    return np.concatenate(rows).astype(np.float64)


def tag_name(name: str, replace_underscores: bool) -> str:
    """A tag as written to a caption: underscores as spaces unless asked not to, kaomoji kept."""
    if not replace_underscores or len(name) <= 3 or name in LONG_KAOMOJI:
        return name
    return name.replace("_", " ")


def caption_tags(tagger: WD14Tagger, probabilities: np.ndarray) -> str:
    """One image's tags as a caption: the rating (with rating_tag), then the characters and then the
    general tags at or above their thresholds, each most confident first, joined with ", "."""
    c = tagger.options
    unwanted = {t.strip() for item in c.undesired_tags for t in item.split(",") if t.strip()}

    def chosen(indices) -> list[str]:
        names = [tagger.names[i] for i in indices]
        return [tag_name(n, c.replace_underscores) for n in names
                if n not in unwanted and tag_name(n, True) not in unwanted]

    def above(category_ok, threshold) -> list[int]:
        found = [i for i, cat in enumerate(tagger.categories) if category_ok(cat) and probabilities[i] >= threshold]
        return sorted(found, key=lambda i: -probabilities[i])  # stable: ties keep the list's order

    tags = []
    ratings = [i for i, cat in enumerate(tagger.categories) if cat == RATING]
    if c.rating_tag and ratings:
        tags += chosen([max(ratings, key=lambda i: probabilities[i])])
    tags += chosen(above(lambda cat: cat == CHARACTER, c.character_threshold))
    tags += chosen(above(lambda cat: cat not in (RATING, CHARACTER), c.general_threshold))
    return ", ".join(tags)


def tag_images(tagger: WD14Tagger, images: Sequence[Image.Image]) -> list[str]:
    """Captions (without prefix/suffix) for a batch of RGB PIL images, as `tagger.options` says."""
    return [caption_tags(tagger, row) for row in tag_probabilities(tagger, images)]
