"""The `embedding` section: pivotal tuning, a textual-inversion embedding trained with the LoRA (the
diffusers advanced scripts' --train_text_encoder_ti, kohya's train_textual_inversion, ai-toolkit's
embedding). A trigger word in the captions stands for N learned vectors at the text encoders'
input, read as A1111 reads an embedding (lora_trainer.textencode), so the file the run writes means
in A1111, ComfyUI and infer.py what it meant in training."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Union

from .textencode import CHUNK

if TYPE_CHECKING:
    from .config import RunConfig

# A token is one word a prompt can hold and a file stem A1111 can read: no weight syntax, no
# whitespace, no path separators, and no dots (A1111 takes a bundled embedding's name from the
# second dot-part of its keys).
NOT_IN_TOKEN = "()[]\\/:.,"


@dataclass
class EmbeddingConfig:
    # The trigger word captions (and dreambooth.instance_prompt, sample.prompts) use, e.g. "ohwx";
    # it stands for `vectors` learned vectors. null: no embedding is trained
    token: Optional[str] = None
    # Words whose token embeddings the vectors start from (in order, repeated when fewer), e.g.
    # "woman" or "watercolor painting"; null: the token's own words as the base reads them
    init_words: Optional[str] = None
    vectors: int = 1  # learned vectors the token stands for (kohya's num_vectors_per_token), 1 to 75
    lr: Optional[float] = None  # the vectors' learning rate; null: train.lr. No weight decay on them
    # The vectors train for this fraction of the steps, then stay fixed while the LoRA trains on
    # (the diffusers scripts' --train_text_encoder_ti_frac); 1: all the way
    train_fraction: float = 1.0
    # Also write the vectors into the kohya file as `bundle_emb.<token>.*`, which A1111 loads with
    # the LoRA (and infer.py reads); diffusers' load_lora_weights refuses such a file, so off by
    # default. The standalone OUT/embeddings/<token>.safetensors is always written
    bundle: bool = False
    # Continue earlier vectors instead of starting from init_words (kohya TI's --weights): an
    # embedding .safetensors (OUT/embeddings/<token>.safetensors), or an adapter file that bundles
    # the token. null: lora.init_from's bundled vectors for the token when it has them, else init_words
    init_from: Optional[str] = None
    # Caption every image, each time it is drawn, with a template chosen at random instead of its
    # own caption (kohya TI's --use_object_template/--use_style_template, diffusers'
    # --learnable_property): "object" ("a photo of a {}", ...), "style" ("a painting in the style of
    # {}", ...) or a list of your own, each with {} once for the token (one such string: a list of one).
    # null: the captions
    templates: Optional[Union[str, list[str]]] = None


def check_embedding(cfg: RunConfig, errors: list[str]) -> None:
    """One line per bad `embedding.*` value."""
    e = cfg.embedding
    if e.token is None:
        for key, value, default in (("init_words", e.init_words, None), ("lr", e.lr, None),
                                    ("bundle", e.bundle, False), ("vectors", e.vectors, 1),
                                    ("train_fraction", e.train_fraction, 1.0), ("init_from", e.init_from, None),
                                    ("templates", e.templates, None)):
            if value != default:
                errors.append(f"embedding.{key}: got {value!r} with no embedding.token, so no embedding is "
                              "trained; set embedding.token (the trigger word in your captions) or remove it")
        return
    token = e.token
    bad = sorted({c for c in token if c in NOT_IN_TOKEN or c.isspace()})
    if not token.strip() or bad:
        what = "is empty" if not token.strip() else "holds " + " ".join(repr(c) for c in bad)
        errors.append(f"embedding.token: got {token!r}, which {what}; expected one word (letters, digits, _ or -) "
                      "that prompts can hold and that names the embedding file, e.g. 'ohwx'")
    if not 1 <= e.vectors <= CHUNK:
        errors.append(f"embedding.vectors: got {e.vectors!r}; expected 1 to {CHUNK} (a prompt window holds {CHUNK} "
                      "tokens); 1 to 8 is usual")
    if e.lr is not None and not e.lr > 0:
        errors.append(f"embedding.lr: got {e.lr!r}; expected a positive number, or null for train.lr")
    if not 0 < e.train_fraction <= 1:
        errors.append(f"embedding.train_fraction: got {e.train_fraction!r}; expected a number in (0, 1] "
                      "(0.5: the vectors train for the first half of the steps)")
    if e.init_words is not None and e.init_from is not None:
        errors.append("embedding.init_words: set with embedding.init_from, whose vectors the run starts from; "
                      "drop one")
    if e.init_words is not None and not e.init_words.strip():
        errors.append(f"embedding.init_words: got {e.init_words!r}; expected words (e.g. 'woman'), or null")
    _check_templates(cfg, errors)
    if not (cfg.lora.train_unet or cfg.lora.train_text_encoder):  # no LoRA: an embedding alone
        if e.bundle:
            errors.append("embedding.bundle: got True with no LoRA trained (lora.train_unet and "
                          "lora.train_text_encoder false), so there is no LoRA file to hold it; set "
                          "embedding.bundle=false (embeddings/<token>.safetensors is the result)")
        if e.train_fraction < 1:
            errors.append(f"embedding.train_fraction: got {e.train_fraction!r} with no LoRA trained, so nothing "
                          "would train after it; set it to 1 and shorten train.max_steps / train.epochs instead")
        if cfg.lora.init_from:
            errors.append("lora.init_from: set with no LoRA trained (lora.train_unet and lora.train_text_encoder "
                          "false), so it would start nothing; drop it, or train a LoRA")
    if e.bundle and cfg.output.format == "diffusers":
        errors.append("embedding.bundle: got True with output.format diffusers, which has no place for an "
                      "embedding; set output.format to kohya or both, or embedding.bundle=false (the standalone "
                      "embeddings/<token>.safetensors is written either way)")


def _check_templates(cfg: RunConfig, errors: list[str]) -> None:
    """embedding.templates: a named set or strings with {} once; not with another caption source."""
    from .data.templates import NAMED, PLACE

    templates = cfg.embedding.templates
    if templates is None:
        return
    if isinstance(templates, str) and templates not in NAMED and PLACE not in templates:
        errors.append(f"embedding.templates: got {templates!r}; expected 'object', 'style', a list of captions "
                      "each holding {} once (e.g. ['a photo of a {}']), or null for the captions")
    elif not templates:
        errors.append("embedding.templates: got an empty list; give captions each holding {} once "
                      "(e.g. ['a photo of a {}']), 'object', 'style', or null for the captions")
    elif not (isinstance(templates, str) and templates in NAMED):
        bad = [t for t in ([templates] if isinstance(templates, str) else templates) if t.count(PLACE) != 1]
        if bad:
            errors.append(f"embedding.templates: {bad[0]!r} holds {{}} {bad[0].count(PLACE)} times; each template "
                          "holds it exactly once, where the token goes (e.g. 'a photo of a {}')")
    if cfg.dreambooth.instance_prompt:
        errors.append("embedding.templates: set with dreambooth.instance_prompt, which also captions every image; "
                      "drop one")
    sections = [("data", cfg.data)] + [(f"data.subsets[{i}]", s) for i, s in enumerate(cfg.data.subsets)]
    for (where, section), key in ((item, key) for item in sections for key in ("caption_prefix", "caption_suffix")):
        if getattr(section, key):
            errors.append(f"{where}.{key}: got {getattr(section, key)!r} with embedding.templates, whose captions "
                          f"replace the images' own and already hold the token; set {where}.{key}='' or put the "
                          "words in your own templates")
