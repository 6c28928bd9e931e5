"""kohya's textual-inversion scripts (train_textual_inversion.py, sdxl_train_textual_inversion.py):
their embedding arguments as `embedding.*`, with no LoRA (lora.train_unet and train_text_encoder
false). Everything else (data, schedule, optimizer, outputs) goes through mapping.py as for the
network scripts."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

from ..data.templates import template_captions, template_list
from ..errors import ConfigError
from .options import note_for, parse_network_args, set_key

if TYPE_CHECKING:
    from .mapping import Args

TI_SCRIPTS = ("train_textual_inversion.py", "sdxl_train_textual_inversion.py")
# The textual-inversion scripts' own arguments: a --config_file TOML (which names no script) holding
# one of them is a textual-inversion setup.
TI_ARGS = ("token_string", "init_word", "num_vectors_per_token", "weights", "use_object_template",
           "use_style_template")
# kohya's template flags -> embedding.templates: each image captioned by a template at random
TEMPLATES = {"use_object_template": "object", "use_style_template": "style"}
# train_network.py's arguments that the textual-inversion scripts do not take (kohya refuses them);
# with every network_* argument they are left out.
NETWORK_ONLY = ("unet_lr", "text_encoder_lr", "dim_from_weights", "scale_weight_norms", "base_weights",
                "base_weights_multiplier")
PICKLE_SUFFIXES = (".pt", ".ckpt", ".bin", ".pth")


def is_textual_inversion(a: "Args", script: Optional[str]) -> bool:
    """A textual-inversion setup: the script says so, or (a TOML, no script) its arguments do."""
    if script:
        return script in TI_SCRIPTS
    return any(a.has(key) for key in TI_ARGS)


def embedding_options(a: "Args", cfg: dict, notes: list[str], default_lr: float) -> None:
    """The embedding alone: embedding.token, vectors, init_words or init_from, lr (kohya's one
    --learning_rate, also train.lr), the template flags, and the file it writes."""
    token = a.str("token_string")
    if not token:
        raise ConfigError("--token_string: missing; kohya's textual inversion needs it too: the trigger word the "
                          "captions hold, e.g. --token_string mychar")
    _network_arguments(a, notes)
    set_key(cfg, "lora.train_unet", False)
    set_key(cfg, "lora.train_text_encoder", False)
    set_key(cfg, "embedding.token", token)
    set_key(cfg, "embedding.vectors", a.int("num_vectors_per_token", 1))
    if a.has("weights"):
        weights = a.str("weights")
        set_key(cfg, "embedding.init_from", weights)
        if Path(weights).suffix.lower() in PICKLE_SUFFIXES:
            notes.append(f"--weights {weights}: a pickle is not read here (it can run code when loaded); save it as "
                         ".safetensors and point embedding.init_from at that, or training refuses it")
        if a.has("init_word"):
            notes.append(f"--init_word {a.get('init_word')}: the --weights vectors replace what it starts, as in "
                         "kohya; left out (embedding.init_words and embedding.init_from exclude each other)")
    elif a.has("init_word"):
        set_key(cfg, "embedding.init_words", a.str("init_word"))
    else:
        notes.append(f"--init_word not given: kohya starts the vectors at random; here they start from the trigger "
                     f"word's own tokens ({token!r} as the base reads it); set embedding.init_words to choose")
    lr = a.float("learning_rate")
    set_key(cfg, "embedding.lr", lr if lr is not None else default_lr)
    _templates(a, token, cfg, notes)
    _files(a, token, cfg, notes)
    decay = dict(parse_network_args(a.values.get("optimizer_args") or []))
    if "weight_decay" in decay:
        notes.append(f"--optimizer_args weight_decay={decay['weight_decay']}: the vectors have no weight decay here "
                     "(it would pull them toward zero); kohya decays them")


def _network_arguments(a: "Args", notes: list[str]) -> None:
    """network_* and the other train_network.py-only arguments: noted and taken out."""
    for key in [k for k in a.values if a.has(k) and (k.startswith("network_") or k in NETWORK_ONLY)]:
        reason = "an argument of train_network.py, which the textual-inversion scripts refuse; no LoRA trains here"
        notes.append(note_for(a.name(key), key, a.values.pop(key), {key: reason}))


def _templates(a: "Args", token: str, cfg: dict, notes: list[str]) -> None:
    """--use_object_template / --use_style_template: embedding.templates object / style, which, as
    kohya's, caption each image at random by a template naming the token instead of its caption."""
    chosen = [key for key in TEMPLATES if a.bool(key)]
    if not chosen:
        return
    if len(chosen) == 2:
        notes.append("--use_style_template: --use_object_template wins, as in kohya")
    kind = TEMPLATES[chosen[0]]
    set_key(cfg, "embedding.templates", kind)
    example = template_captions(kind, token)[0]
    notes.append(f"--{chosen[0]}: embedding.templates {kind}: each image, each time it is drawn, is captioned by one "
                 f"of {len(template_list(kind))} {kind} templates at random ({example!r}, ...) as in kohya, whose "
                 f"list is worded a little otherwise; the captions are not trained on. To train on the captions "
                 f"instead, remove it: they must then hold {token!r} (data.caption_prefix '{token}, ' adds it to each)")


def _files(a: "Args", token: str, cfg: dict, notes: list[str]) -> None:
    """Where the embedding goes. kohya names its file --output_name (default: the token); here the
    file is always named after the token (A1111 names an embedding after its file, so the file's
    name is the prompt word), and output.name names the run."""
    name = a.str("output_name") or token
    if not a.has("output_name"):
        set_key(cfg, "output.name", token)
    ext = a.str("save_model_as") or "pt"  # kohya's textual-inversion default
    a.values.pop("save_model_as", None)  # said here: the network scripts' note speaks of adapters
    out = a.str("output_dir") or "OUT"
    notes.append(f"embedding file: {Path(out) / 'embeddings' / (token + '.safetensors')} in A1111's layout (its "
                 f"file name is the prompt word, {token!r}), where kohya writes {Path(out) / (name + '.' + ext)}; "
                 "epoch and step files go beside it")
