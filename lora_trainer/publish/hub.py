"""HuggingFace Hub publishing: build a repo folder from a run, then create the repo and upload it.

The folder is complete on disk before anything is sent (that is what --dry-run shows). The token
is resolved by huggingface_hub (HF_TOKEN or the saved login) and handed only to its client.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..config import dump_config
from ..errors import PublishError, first_line
from ..fileio import new_dir_mode, unwritable_reason, write_text_atomic
from .adapters import write_diffusers, write_kohya
from .card import CardFiles, model_card
from .embedding_card import model_card as embedding_card
from .embeddings import embedding_sources, publish_embedding
from ..models.lycoris import type_name
from .guidance import prompt_guide, weight_advice
from .run import BASE_LICENSES, HUB_ID, Run, hub_base_model, is_local

# The diffusers file under the name `pipe.load_lora_weights(repo_id)` looks for by default.
DIFFUSERS_NAME = "pytorch_lora_weights.safetensors"
# Which files this tool wrote into a folder, with their hashes: lets a rebuild tell its own files
# from ones the user edited or added. Never uploaded.
MANIFEST = ".lora-trainer-publish.json"


@dataclass
class HubOptions:
    repo_id: str
    license: str | None = None  # None: the base model's licence
    base_model: str | None = None  # hub id for the card when model.base is a local folder
    description: str | None = None
    weight: float | None = None
    weight_range: tuple[float, float] | None = None


@dataclass
class HubFolder:
    path: Path
    files: list[str]  # relative paths, sorted
    notes: list[str] = field(default_factory=list)  # things the user should know (assumed base model, ...)


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
        ok = bool(HUB_ID.fullmatch(repo_id))
    except HFValidationError:
        ok = False
    if not ok:
        raise PublishError(f"--hub: got {repo_id!r}; expected USER/REPO (letters, digits, '-', '_', '.')")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _listing(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def _check_replaceable(out: Path, overwrite: bool) -> None:
    """A rebuild may replace `out` only when it holds exactly the files this tool last wrote there."""
    if not out.exists() or overwrite:
        if out.exists() and not out.is_dir():
            raise PublishError(f"--out {out}: is a file, not a folder")
        return
    if not out.is_dir():
        raise PublishError(f"--out {out}: is a file, not a folder; choose another --out")
    present = _listing(out)
    if not present:
        return
    try:
        written = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise PublishError(f"--out {out}: folder exists and was not written by lora-trainer publish; "
                           "choose another --out, or pass --overwrite to replace it") from None
    changed = [p for p in present if written.get(p) != _sha256(out / p)]
    if changed:
        raise PublishError(f"--out {out}: {changed[0]} was edited or added since lora-trainer wrote the folder; "
                           "upload it as it is with `hf upload`, or pass --overwrite to rebuild it")


def _public_config(run: Run, base_model: str) -> str:
    """config.yaml as published: the hub base instead of a local path, no local folders."""
    cfg = copy.deepcopy(run.cfg)
    cfg.model.base = base_model
    cfg.data.path = Path(cfg.data.path).name or cfg.data.path
    for subset in cfg.data.subsets:
        subset.path = Path(subset.path).name or subset.path
    cfg.output.dir = f"outputs/{run.name}"
    # local folders and files by their names only; the latent cache's location is this machine's
    for section, key in (("dreambooth", "class_data"), ("data", "mask_dir"), ("data", "validation_path"),
                         ("lora", "init_from"), ("embedding", "init_from"),
                         ("model", "config_dir")):
        value = getattr(getattr(cfg, section), key)
        if value:
            setattr(getattr(cfg, section), key, Path(value).name)
    if cfg.model.vae and is_local(cfg.model.vae):  # a hub id (madebyollin/sdxl-vae-fp16-fix) is kept
        cfg.model.vae = Path(cfg.model.vae).name
    cfg.train.cache_dir = None
    return dump_config(cfg)


def _write_folder(run: Run, folder: Path, opts: HubOptions) -> list[str]:
    base_model, note = hub_base_model(run, opts.base_model)
    advice = weight_advice(run, opts.weight, opts.weight_range)
    kohya_name = None if run.embedding_only else f"{run.name}.safetensors"
    # diffusers' load_lora_weights reads no LoHa/LoKr: their repo holds the kohya file alone
    diffusers_name = DIFFUSERS_NAME if kohya_name and type_name(run.cfg.lora.type) == "LoRA" else None
    if kohya_name:
        write_kohya(run, folder / kohya_name)
    if diffusers_name:
        write_diffusers(run, folder / diffusers_name)
    (folder / "images").mkdir()
    images = []
    for i, sample in enumerate(run.samples):  # byte copies: the `parameters` chunk stays
        images.append(f"images/{i:02d}.png")
        shutil.copyfile(sample.path, folder / images[-1])
    sweep = None
    if advice is not None and advice.grid is not None:
        sweep = "images/sweep.png"
        shutil.copyfile(advice.grid, folder / sweep)
    loss = None
    if (run.dir / "loss.png").is_file():  # the loss curve training draws at the end
        loss = "images/loss.png"
        shutil.copyfile(run.dir / "loss.png", folder / loss)
    license = opts.license or BASE_LICENSES[run.variant]
    if run.embedding_only:
        # The embedding is the model: one file, at the top like a LoRA repo's adapter, named by its
        # token because A1111, Forge and ComfyUI take the prompt word from the file name. diffusers
        # reads it as `load_textual_inversion(repo_id, weight_name="<TOKEN>.safetensors", token=...)`.
        # No second copy under embeddings/: a snapshot download would fetch it twice, and users
        # would wonder which one to take.
        name = run.adapter.name
        publish_embedding(run, folder / name)
        files = CardFiles(images=images, loss=loss, embeddings=[name])
        card = embedding_card(run, opts.repo_id, base_model, license, files, opts.description)
    else:
        embeddings = []
        with tempfile.TemporaryDirectory() as scratch:  # bundled embeddings without a file of their own
            for name, source in embedding_sources(run, Path(scratch)):
                (folder / name).parent.mkdir(exist_ok=True)
                shutil.copyfile(source, folder / name)
                embeddings.append(name)
        files = CardFiles(images=images, kohya=kohya_name, diffusers=diffusers_name, sweep=sweep, loss=loss,
                          embeddings=embeddings)
        card = model_card(run, opts.repo_id, base_model, license, files, advice, opts.description)
    write_text_atomic(folder / "README.md", card)
    write_text_atomic(folder / "prompts.json", json.dumps(prompt_guide(run, advice), indent=2, ensure_ascii=False) + "\n")
    write_text_atomic(folder / "config.yaml", _public_config(run, base_model))
    return [note] if note else []


def build_hub_folder(run: Run, out: str | Path, opts: HubOptions, overwrite: bool = False) -> HubFolder:
    """Write the repo folder at `out`: both adapter layouts (LoHa/LoKr: the kohya one; an embedding
    alone: its file), images/,
    README.md, prompts.json, config.yaml. Built in a temporary sibling folder and swapped in, so `out` is never half written."""
    check_repo_id(opts.repo_id)
    out = Path(out)
    if run.dir.resolve() == out.resolve() or out.resolve() in run.dir.resolve().parents:
        raise PublishError(f"--out {out}: would replace the run folder itself; choose a folder inside or beside it")
    _check_replaceable(out, overwrite)
    unwritable = unwritable_reason(out.parent)
    if unwritable:
        raise PublishError(f"--out: {out.parent} {unwritable}; give a folder you can write to")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        os.chmod(tmp, new_dir_mode())  # mkdtemp's folder is private (0o700)
        notes = _write_folder(run, tmp, opts)
        manifest = {p: _sha256(tmp / p) for p in _listing(tmp)}
        write_text_atomic(tmp / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return HubFolder(out, _listing(out), notes)


def _endpoint() -> str | None:
    # huggingface_hub reads HF_ENDPOINT once, at import; read it per call so a mirror (or a test
    # server) set later is honoured too.
    endpoint = os.environ.get("HF_ENDPOINT", "").strip().rstrip("/")
    return endpoint or None


def upload_token() -> str:
    """The token an upload will use, or a one-line PublishError saying why there can be no upload
    (offline, no token); `publish` asks before it builds the repo folder."""
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise PublishError("HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it, or use --dry-run")
    token = get_token()
    if not token:
        raise PublishError("no HuggingFace token: set HF_TOKEN or run `hf auth login` with a token that can write")
    return token


def upload_folder(folder: str | Path, repo_id: str, private: bool = False, what: str = "LoRA") -> str:
    """Create `repo_id` (kept if it exists) and upload `folder` in one commit; return the repo URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    check_repo_id(repo_id)
    api = HfApi(endpoint=_endpoint(), token=upload_token())
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                          commit_message=f"Upload {what} {repo_id.split('/')[1]} (lora-trainer)",
                          ignore_patterns=[MANIFEST])
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        hint = {401: "the token was rejected; check HF_TOKEN or `hf auth login`",
                403: f"the token may not write to {repo_id.split('/')[0]}; use a token with write access"}.get(status, "")
        raise PublishError(f"--hub {repo_id}: upload failed with HTTP {status} ({first_line(exc)}){'; ' + hint if hint else ''}") from None
    except ValueError as exc:  # huggingface_hub's report of card metadata the Hub refused
        raise PublishError(f"--hub {repo_id}: the Hub refused README.md's metadata "
                           f"({' '.join(str(exc).split())}); fix the card in {folder}") from None
    except Exception as exc:  # network errors come from several libraries (httpx, hf_xet, ssl)
        raise PublishError(f"--hub {repo_id}: cannot reach {api.endpoint} ({first_line(exc)})") from None
    return str(url)
