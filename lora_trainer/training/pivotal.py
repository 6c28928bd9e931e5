"""Pivotal tuning (config section `embedding`): a textual-inversion embedding trained with the LoRA.

The trigger word stands for N learned vectors per text encoder, put where the captions name it at
the encoders' input, exactly as an embedding file is read at inference (lora_trainer.textencode:
the word's own token ids are found and replaced; no token is added to the tokenizers). So the
file written here reads in A1111, ComfyUI and infer.py as the run read it.

Files (A1111's layouts): OUT/embeddings/<token>.safetensors holds `emb_params` (N, 768) on SD1.x, or
`clip_l` (N, 768) and `clip_g` (N, 1280) on SDXL; with embedding.bundle the kohya file also holds
them as `bundle_emb.<token>.string_to_param.*` (SD1.x) or `bundle_emb.<token>.clip_l/clip_g`.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Mapping

import torch

from ..config import resolve_subsets
from ..errors import ConfigError
from ..export import bundle
from ..fileio import atomic_path
from ..run_folder import EMBEDDINGS_DIR
from ..textencode import Words

log = logging.getLogger(__name__)

COMPONENT = "embedding"  # its name among the trained modules, the optimizer groups and the logs


def part_names(variant: str) -> list[str]:
    """The vectors' part for each text encoder, in the base's order (as inference names them)."""
    return list(bundle.SDXL_PARTS) if variant == "sdxl" else [bundle.ONE]


class TrainedWords(torch.nn.Module):
    """The trained vectors, {part: (N, width)} in fp32. Its forward returns them, so that under
    several processes the wrapper accelerate puts around it averages their gradients."""

    def __init__(self, token: str, parts: Mapping[str, torch.Tensor]):
        super().__init__()
        self.token = token
        self.vectors = torch.nn.ParameterDict(
            {name: torch.nn.Parameter(v.detach().float().clone()) for name, v in parts.items()})

    def forward(self) -> dict[str, torch.Tensor]:
        return {name: v.clone() for name, v in self.vectors.items()}

    def fixed(self) -> dict[str, torch.Tensor]:
        """The vectors as they are, out of the graph (validation, samples, files, frozen steps)."""
        return {name: v.detach() for name, v in self.vectors.items()}


def _token_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, verbose=False).input_ids


def start_words(cfg, base, initial=None) -> TrainedWords | None:
    """The run's embedding (None without embedding.token): each vector starts as the input embedding
    of a token of embedding.init_words (or of the trigger word itself), in order, repeated; or, with
    `initial` (embedding_init.InitialVectors), as those earlier vectors."""
    e = cfg.embedding
    if e.token is None:
        return None
    tokenizers = [base.tokenizer, base.tokenizer_2][:len(base.text_encoders)]
    parts = {}
    for part, tokenizer, encoder in zip(part_names(base.variant), tokenizers, base.text_encoders):
        if not _token_ids(tokenizer, e.token):
            raise ConfigError(f"embedding.token: got {e.token!r}, which the tokenizer reads as no word at all; "
                              "use letters or digits")
        table = encoder.get_input_embeddings().weight.detach()
        if initial is not None:
            width = initial.parts[part].shape[1]
            if width != table.shape[1]:
                raise ConfigError(f"embedding.init_from: {initial.source} has {width}-wide vectors ({part}) but the "
                                  f"text encoder's are {table.shape[1]}-wide; give an embedding of this base family")
            parts[part] = initial.parts[part].float().cpu().clone()
            continue
        source = e.init_words if e.init_words is not None else e.token
        ids = _token_ids(tokenizer, source)
        if not ids:
            raise ConfigError(f"embedding.init_words: got {source!r}, which the tokenizer reads as no word; give "
                              "words such as 'woman' or 'watercolor'")
        if e.init_words is not None and len(ids) > e.vectors and not parts:  # once, not per encoder
            log.warning("embedding.init_words: %r is %d tokens but embedding.vectors is %d, so the vectors start "
                        "from the first %d only (%r); raise embedding.vectors to %d or give fewer words",
                        source, len(ids), e.vectors, e.vectors, tokenizer.decode(ids[:e.vectors]), len(ids))
        parts[part] = table[[ids[i % len(ids)] for i in range(e.vectors)]].float().cpu()
    words = TrainedWords(e.token, parts)
    log.info("embedding %r: %d vector%s per text encoder, from %s; trains for %d%% of the steps at lr %g",
             e.token, e.vectors, "s" * (e.vectors > 1), initial.source if initial else repr(e.init_words or e.token),
             round(100 * e.train_fraction), embedding_lr(cfg))
    return words


def embedding_lr(cfg) -> float:
    return cfg.embedding.lr if cfg.embedding.lr is not None else cfg.train.lr


def optimizer_group(cfg, words: TrainedWords) -> dict:
    """The vectors' optimizer group: their own lr and no weight decay (decay would pull the vectors
    towards zero, a point no word has)."""
    return {"params": list(words.parameters()), "lr": embedding_lr(cfg), "weight_decay": 0.0}


def trained_until(cfg, max_steps: int) -> int:
    """The steps during which the vectors train (embedding.train_fraction of the run, at least one)."""
    return max(1, math.ceil(cfg.embedding.train_fraction * max_steps))


def word_tables(base, token: str, vectors: Mapping[str, torch.Tensor]) -> list[Words]:
    """One table per text encoder for lora_trainer.textencode: the token's ids -> (token, vectors)."""
    tokenizers = [base.tokenizer, base.tokenizer_2][:len(base.text_encoders)]
    return [{tuple(_token_ids(tokenizer, token)): (token, vectors[part])}
            for part, tokenizer in zip(part_names(base.variant), tokenizers)]


def _parts(vectors: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {part: v.detach().to("cpu", dtype) for part, v in vectors.items()}


def bundle_tensors(token: str, vectors: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The `bundle_emb.*` keys A1111 reads from a LoRA file (lora_trainer.export.bundle)."""
    return bundle.bundle_tensors({token: _parts(vectors, dtype)})


def save_embedding(folder: Path, token: str, vectors: Mapping[str, torch.Tensor], dtype: torch.dtype,
                   suffix: str = "", metadata: Mapping[str, str] | None = None) -> Path:
    """OUT/embeddings/<token><suffix>.safetensors, written atomically. A1111 names an embedding by its
    file stem, so the final file's prompt word is the trigger word itself."""
    import safetensors.torch

    path = Path(folder) / EMBEDDINGS_DIR / f"{token}{suffix}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(bundle.standalone_tensors(_parts(vectors, dtype)), str(tmp),
                                    metadata=dict(metadata or {}))
    log.info("saved embedding %r: %s", token, path)
    return path


def check_token_in_run(cfg, examples) -> None:
    """Refuse a run whose captions (as trained: with data.caption_prefix/suffix, or the instance
    prompt) never name embedding.token: its vectors would never train. Before any model loads.
    embedding.templates: the templates caption every image and each names the token."""
    from ..data import training_caption
    from ..data.templates import describe_templates

    token, d = cfg.embedding.token, cfg.data
    if token is None:
        return
    if cfg.embedding.templates is not None:  # every template holds the token: the captions are not read
        log.info("embedding.templates %s: every image is captioned by a template naming %r, drawn anew each epoch; "
                 "its own caption is not trained on", describe_templates(cfg.embedding.templates), token)
        return
    word = re.compile(rf"(?<!\w){re.escape(token)}(?!\w)", re.IGNORECASE)
    subs = resolve_subsets(d)
    of = (lambda ex: subs[ex.subset]) if d.subsets else (lambda ex: d)  # each image's own prefix and suffix
    captions = [training_caption(ex.caption, of(ex).caption_prefix, of(ex).caption_suffix, of(ex).keep_tokens_separator)
                for ex in examples]
    if not any(word.search(c) for c in captions):
        folders = ", ".join(s.path for s in subs)
        where = "dreambooth.instance_prompt" if cfg.dreambooth.instance_prompt else f"the captions of {folders}"
        raise ConfigError(f"embedding.token: {token!r} is in none of the {len(captions)} training captions ({where}), "
                          "so its vectors would never train; put it in the captions (or data.caption_prefix) or fix "
                          "its spelling")
    db = cfg.dreambooth
    if db.num_class_images and db.class_prompt and word.search(db.class_prompt):
        log.warning("dreambooth.class_prompt %r names embedding.token %r: the class images are drawn without its "
                    "vectors, and the prior loss then pulls them towards the class in general; leave the trigger "
                    "word out of the class prompt", db.class_prompt, token)
