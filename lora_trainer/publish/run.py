"""What a finished run folder says about its adapter, read once for the card and the packages.

Everything comes from files training already wrote (config.yaml, the adapter's metadata,
samples/, train_log.jsonl); nothing is re-run. A run that trained an embedding alone (textual
inversion: no LoRA) is read from its embeddings/<TOKEN>.safetensors instead of a LoRA file. The
facts the training-details tables quote are read here too; the prompt guidance is in guidance.py.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..config import RunConfig, load_config
from ..errors import ConfigError, ModelError, PublishError
from ..export.files import load_adapter
from ..export.layouts import detect_layout
from ..run_folder import EMBEDDINGS_DIR
from ..sample_prompts import parse_sample_prompt

# Hub ids are `owner/name`; anything else (absolute paths, ./models/x, C:\...) is a local file.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# The hub ids of the bases our variants stand for, used when the run's base is a local folder.
DEFAULT_BASES = {"sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
                 "sdxl": "stabilityai/stable-diffusion-xl-base-1.0"}
# The licence a derivative inherits from each base.
BASE_LICENSES = {"sd15": "creativeml-openrail-m", "sdxl": "openrail++"}
_LORA_TAG = re.compile(r"\s*<lora:[^>]*>")


@dataclass
class Sample:
    path: Path
    prompt: str  # without the <lora:...> tags the PNG's parameters add
    negative_prompt: str
    parameters: str  # the full A1111 text, as stored in the PNG


@dataclass
class Run:
    dir: Path
    cfg: RunConfig
    # DIR/<name>.safetensors, in `layout`; for an embedding alone, DIR/embeddings/<TOKEN>.safetensors
    # (layout "embedding"), whose tensors and metadata (ss_steps, ss_base_model_version) stand in
    adapter: Path
    layout: str
    tensors: dict
    metadata: dict[str, str]
    diffusers_file: Path | None  # DIR/<name>.diffusers.safetensors when the run wrote both
    variant: str  # "sd15" or "sdxl"
    samples: list[Sample] = field(default_factory=list)
    sweep: Path | None = None
    bundle: dict = field(default_factory=dict)  # embeddings bundled in the adapter file {token: vectors}
    embedding_files: list[Path] = field(default_factory=list)  # DIR/embeddings/<TOKEN>.safetensors
    embedding_only: bool = False  # textual inversion: no LoRA was trained; `adapter` is the embedding

    @property
    def name(self) -> str:
        return self.cfg.output.name

    @property
    def token(self) -> str | None:
        """The trained embedding's trigger word (embedding.token), if the run trained one."""
        return self.cfg.embedding.token

    @property
    def vae(self) -> str | None:
        """The model.vae the run encoded its images and drew its samples with, by name (a local path's
        file or folder name, a hub id as it is): the LoRA's ss_vae_name; an embedding's file records
        none, so for an embedding alone config.yaml's model.vae. None: the base's own VAE."""
        if not self.embedding_only:
            return self.metadata.get("ss_vae_name") or None
        source = self.cfg.model.vae
        return (Path(source).name if is_local(source) else source) if source else None


def read_png_parameters(path: Path) -> str:
    from PIL import Image

    with Image.open(path) as image:
        return str(image.info.get("parameters", ""))


def _split_parameters(text: str) -> tuple[str, str]:
    """(prompt without <lora:> tags, negative prompt) of an A1111 `parameters` text."""
    lines = text.splitlines()
    if lines and "Steps: " in lines[-1]:  # the settings line closes the text; prompts may span lines
        lines = lines[:-1]
    cut = next((i for i, ln in enumerate(lines) if ln.startswith("Negative prompt:")), len(lines))
    prompt = _LORA_TAG.sub("", "\n".join(lines[:cut])).strip()
    negative = "\n".join(lines[cut:])[len("Negative prompt:"):].strip() if cut < len(lines) else ""
    return prompt, negative


def _latest_samples(run_dir: Path, cfg: RunConfig) -> list[Sample]:
    """The images of the last sample step: what the finished adapter makes."""
    steps = sorted(p for p in (run_dir / "samples").glob("step_*") if p.is_dir())
    if not steps:
        return []
    samples = []
    for i, path in enumerate(sorted(steps[-1].glob("*.png"))):
        text = read_png_parameters(path)
        prompt, negative = _split_parameters(text)
        if not prompt and i < len(cfg.sample.prompts):
            prompt, negative = prompt_and_negative(cfg, cfg.sample.prompts[i])
        samples.append(Sample(path, prompt, negative, text))
    return samples


def _find_sweep(run_dir: Path) -> Path | None:
    grids = [p for pattern in ("sweep*.png", "samples/sweep*.png", "samples/**/sweep*.png")
             for p in run_dir.glob(pattern)]
    return max(grids, key=lambda p: p.stat().st_mtime) if grids else None


def _variant(cfg: RunConfig, tensors: dict, metadata: dict[str, str]) -> str:
    version = metadata.get("ss_base_model_version", "")
    sdxl_keys = any(k.startswith(("lora_te2_", "lora_unet_input_blocks", "lora_unet_output_blocks",
                                  "text_encoder_2.")) for k in tensors) or "clip_g" in tensors
    if version.startswith("sdxl") or sdxl_keys or cfg.model.variant == "sdxl":
        return "sdxl"
    if version and version != "sd_v1":
        raise PublishError(f"ss_base_model_version is {version!r}: only SD 1.5 (sd_v1) and SDXL (sdxl_base_v1-0) "
                           "adapters can be published")
    return "sd15"


def read_run(run_dir: str | Path) -> Run:
    """Load what a training run left in `run_dir`; a folder that is not a run is a one-line error."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PublishError(f"{run_dir}: no such folder; pass the output.dir of a training run")
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise PublishError(f"{config_path}: not found; {run_dir} is not a training run folder "
                           "(python train.py CONFIG output.dir=DIR writes one)")
    try:
        cfg = load_config(config_path, warn=False)  # the run warned when it started
    except ConfigError as exc:
        raise PublishError(f"{config_path}: cannot be read as a run config ({str(exc).splitlines()[0]})") from None
    adapter = run_dir / f"{cfg.output.name}.safetensors"
    if not adapter.is_file() and not (cfg.lora.train_unet or cfg.lora.train_text_encoder):
        return _read_embedding_run(run_dir, cfg)
    if not adapter.is_file():
        raise PublishError(f"{adapter}: adapter not found (config.yaml names output.name={cfg.output.name!r}); "
                           "did the run finish?")
    tensors, metadata = load_adapter(adapter)
    diffusers_file = run_dir / f"{cfg.output.name}.diffusers.safetensors"
    return Run(
        dir=run_dir, cfg=cfg, adapter=adapter, layout=detect_layout(tensors), tensors=tensors, metadata=metadata,
        diffusers_file=diffusers_file if diffusers_file.is_file() else None,
        variant=_variant(cfg, tensors, metadata), samples=_latest_samples(run_dir, cfg), sweep=_find_sweep(run_dir),
        bundle=_read_bundle(adapter), embedding_files=_final_embeddings(run_dir, cfg),
    )


def _final_embeddings(run_dir: Path, cfg: RunConfig) -> list[Path]:
    """DIR/embeddings/*.safetensors without the token's epoch and step saves (<TOKEN>-000002,
    <TOKEN>-step00000100): those are earlier states of the same trigger word, not words of their own."""
    from ..training.numbered import EPOCHS, STEPS, numbered_files

    token, where = cfg.embedding.token, run_dir / EMBEDDINGS_DIR
    saves = {p for tag, digits in (EPOCHS, STEPS) if token
             for files in numbered_files(where, token, tag, digits).values() for p in files}
    return sorted(p for p in where.glob("*.safetensors") if p not in saves)


def _read_embedding_run(run_dir: Path, cfg: RunConfig) -> Run:
    """A run that trained no LoRA: its result is DIR/embeddings/<TOKEN>.safetensors (A1111's layout)."""
    import safetensors

    if not cfg.embedding.token:
        raise PublishError(f"{run_dir / 'config.yaml'}: trains no LoRA (lora.train_unet and lora.train_text_encoder "
                           "false) and no embedding.token, so the run has nothing to publish")
    path = run_dir / EMBEDDINGS_DIR / f"{cfg.embedding.token}.safetensors"
    if not path.is_file():
        raise PublishError(f"{path}: embedding not found (config.yaml trains embedding.token={cfg.embedding.token!r} "
                           "alone, with no LoRA); did the run finish?")
    try:
        with safetensors.safe_open(str(path), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            metadata = dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types for a bad header
        raise PublishError(f"{path}: cannot be read as a safetensors file ({str(exc).splitlines()[0]})") from None
    if set(tensors) not in ({"emb_params"}, {"clip_l", "clip_g"}):
        raise PublishError(f"{path}: holds {sorted(tensors)}; expected an embedding as training writes it "
                           "(emb_params, or SDXL's clip_l and clip_g)")
    return Run(
        dir=run_dir, cfg=cfg, adapter=path, layout="embedding", tensors=tensors, metadata=metadata,
        diffusers_file=None, variant=_variant(cfg, tensors, metadata), samples=_latest_samples(run_dir, cfg),
        # only the trained token's own file: the embedding is the model, and the card is about one word
        embedding_files=[path], embedding_only=True,
    )


def _read_bundle(adapter: Path) -> dict:
    from ..export.bundle import read_bundle

    try:
        return read_bundle(adapter)
    except ModelError as exc:
        raise PublishError(str(exc)) from None


def prompt_and_negative(cfg: RunConfig, text: str) -> tuple[str, str]:
    """A sample prompt without its kohya-style options, and the negative prompt it was drawn with."""
    parsed = parse_sample_prompt(text)
    return parsed.prompt, cfg.sample.negative_prompt if parsed.negative is None else parsed.negative


# ---- facts for the training-details table ------------------------------------------------------


def is_local(source: str) -> bool:
    return Path(source).expanduser().exists() or not HUB_ID.fullmatch(source)


def hub_base_model(run: Run, override: str | None = None) -> tuple[str, str | None]:
    """(hub id for `base_model`, a note when it had to be assumed). A local path is never published."""
    if override:
        if not HUB_ID.fullmatch(override):
            raise PublishError(f"--base-model: got {override!r}; expected a hub id like {DEFAULT_BASES[run.variant]}")
        return override, None
    base = run.cfg.model.base
    if not is_local(base):
        return base, None
    assumed = DEFAULT_BASES[run.variant]
    return assumed, (f"model.base is the local path {Path(base).name!r}; the card names {assumed} as the base; "
                     "pass --base-model OWNER/NAME if it was another model")


def dataset_size(run: Run) -> int | None:
    """Distinct training images, as the adapter's metadata recorded them, else as the run's
    captions.jsonl lists them (an embedding's file records no dataset)."""
    try:
        dirs = json.loads(run.metadata.get("ss_dataset_dirs", "{}"))
        count = sum(int(d["img_count"]) for d in dirs.values())
        if count:
            return count
    except (ValueError, KeyError, TypeError, AttributeError):
        pass
    images = run.metadata.get("ss_num_train_images")
    if images and images.isdigit():
        return int(images) // max(1, run.cfg.data.repeats)
    record = run.dir / "captions.jsonl"  # one line per training image (lora_trainer.data.prepare)
    if record.is_file():
        return sum(1 for line in record.read_text(encoding="utf-8").splitlines() if line.strip()) or None
    return None


def embedding_vectors(run: Run) -> int:
    """Vectors the trigger word of an embedding alone stands for, as its file holds them."""
    vectors = run.metadata.get("vectors", "")
    return int(vectors) if vectors.isdigit() else next(iter(run.tensors.values())).shape[0]


def top_tags(run: Run, n: int = 10) -> list[tuple[str, int]]:
    try:
        per_dir = json.loads(run.metadata.get("ss_tag_frequency", "{}"))
        counts: dict[str, int] = {}
        for tags in per_dir.values():
            for tag, count in tags.items():
                counts[tag] = counts.get(tag, 0) + int(count)
    except (ValueError, TypeError, AttributeError):
        return []
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]


def final_loss(run: Run, last: int = 10) -> float | None:
    """Mean loss of the last logged steps (one step's loss is too noisy to quote)."""
    path = run.dir / "train_log.jsonl"
    if not path.is_file():
        return None
    losses = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            losses.append(float(json.loads(line)["loss"]))
        except (ValueError, KeyError, TypeError):
            continue
    return sum(losses[-last:]) / len(losses[-last:]) if losses else None


def ema_setting(run: Run) -> tuple[float, bool] | None:
    """(decay, warm-up) when the adapter's tensors are an EMA of the trained weights (train.ema_decay),
    as its metadata records it: a resumed run may have changed config.yaml's value since."""
    try:
        decay = float(run.metadata["ss_ema_decay"])
    except (KeyError, ValueError):
        return None
    return (decay, run.metadata.get("ss_ema_warmup") != "False") if decay > 0 else None


def trained_steps(run: Run) -> int | None:
    steps = run.metadata.get("ss_steps")
    return int(steps) if steps and steps.isdigit() else run.cfg.train.max_steps
