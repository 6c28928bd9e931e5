"""Plain data (YAML, `key=value` overrides) into typed dataclasses: coercion by the declared field
types, and one message per bad key or value (name, value, what is allowed)."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Union

import yaml

from .errors import ConfigError


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        parts = [_describe(a) for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(parts) + " or null"
    if origin is list:
        item = typing.get_args(tp)[0]
        plural = {int: "integers", float: "numbers", bool: "true/false values", str: "strings"}
        return "a list of " + plural.get(item, _describe(item))
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


# Names kohya users type for values that are spelled otherwise here.
_KOHYA_SPELLINGS = {("train.scheduler", "cosine_with_min_lr"): "cosine, with train.min_lr_ratio set"}


def _hint(dotted: str, value: Any, tp: Any) -> str:
    """" (did you mean ...?)" for a choice given in another case (kohya's `Lion`, `AdamW8bit`) or a
    kohya name spelled otherwise here; "" when there is nothing to suggest."""
    if not isinstance(value, str):
        return ""
    known = _KOHYA_SPELLINGS.get((dotted, value.lower()))
    if known:
        return f" (kohya's {value!r} is {known} here)"
    choices = [a for t in (tp, *typing.get_args(tp)) if typing.get_origin(t) is Literal for a in typing.get_args(t)]
    same = [c for c in choices if isinstance(c, str) and c.lower() == value.lower()]
    return f" (did you mean {same[0]!r}?)" if same else ""


def _coerce(value: Any, tp: Any) -> Any:
    """Return `value` as type `tp`, or raise ValueError."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value is False and "no" in typing.get_args(tp):
            return "no"  # YAML 1.1 reads a bare `no` as false
        if not isinstance(value, bool) and value in typing.get_args(tp):
            return value
        raise ValueError
    if origin in (Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        for arg in typing.get_args(tp):
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg)
            except ValueError:
                pass
        raise ValueError
    if origin is list:
        if isinstance(value, str):  # a single string where a list is expected
            value = [value]
        if not isinstance(value, list):
            raise ValueError
        return [_coerce(v, typing.get_args(tp)[0]) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError
    raise ValueError


# Names users bring from kohya-ss and the diffusers scripts, for "did you mean" on an unknown key.
_FOREIGN_NAMES = {
    "pretrained_model_name_or_path": "model.base", "train_data_dir": "data.path", "instance_data_dir": "data.path",
    "enable_bucket": "data.buckets", "flip_aug": "data.random_flip", "network_dim": "lora.rank",
    "network_alpha": "lora.alpha", "network_dropout": "lora.neuron_dropout", "learning_rate": "train.lr",
    "unet_lr": "train.lr", "max_train_steps": "train.max_steps", "max_train_epochs": "train.epochs",
    "num_train_epochs": "train.epochs", "train_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum", "lr_scheduler": "train.scheduler",
    "lr_warmup_steps": "train.warmup", "min_snr_gamma": "train.snr_gamma", "optimizer_type": "train.optimizer",
    "resume_from_checkpoint": "train.resume", "output_dir": "output.dir", "output_name": "output.name",
    "save_precision": "output.dtype", "use_ema": "train.ema_decay", "ema_config": "train.ema_decay",
    "train_text_encoder_ti": "embedding.token", "token_abstraction": "embedding.token",
    "num_new_tokens_per_abstraction": "embedding.vectors", "train_text_encoder_ti_frac": "embedding.train_fraction",
    "initializer_concept": "embedding.init_words", "token_string": "embedding.token", "init_word": "embedding.init_words",
    "num_vectors_per_token": "embedding.vectors",
}
_FOREIGN_SOURCE = {"ema_config": "ai-toolkit"}  # the others: kohya's or the diffusers scripts' names


def _meant(key: str, section: str, names: set[str], root: type | None) -> str | None:
    """The key a mistyped, misplaced or foreign (kohya/diffusers) `key` most likely means, or None."""
    close = difflib.get_close_matches(key, sorted(names), n=1, cutoff=0.75)
    if close:
        return section + close[0]
    foreign = difflib.get_close_matches(key, sorted(_FOREIGN_NAMES), n=1, cutoff=0.85)
    if foreign:
        source = _FOREIGN_SOURCE.get(foreign[0], "kohya/diffusers")
        return f"{_FOREIGN_NAMES[foreign[0]]} ({source}: {foreign[0]})"
    if root is None or not section:
        return None
    hints = typing.get_type_hints(root)
    others = {f"{f.name}.{g.name}": g.name for f in dataclasses.fields(root) if dataclasses.is_dataclass(hints[f.name])
              and f"{f.name}." != section for g in dataclasses.fields(hints[f.name])}
    elsewhere = difflib.get_close_matches(key, sorted(set(others.values())), n=1, cutoff=0.85)
    return next((dotted for dotted, name in sorted(others.items()) if elsewhere and name == elsewhere[0]), None)


def build_dataclass(cls: type, data: Any, prefix: str, errors: list[str], root: type | None = None) -> Any:
    """`cls` from `data`, one line in `errors` per bad key or value; `root` is the whole config's
    class, where an unknown key is looked for in the other sections."""
    root = root or cls
    if data is None:
        data = {}
    if not isinstance(data, dict):
        errors.append(f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys, got {data!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            refused = getattr(cls, "unknown_key_error", lambda *_: None)(str(key), dotted)
            if refused:
                errors.append(refused)
                continue
            meant = _meant(str(key), prefix, names, root)
            allowed = f"did you mean {meant}?" if meant else "allowed keys here: " + ", ".join(sorted(names))
            errors.append(f"{dotted}: unknown key; {allowed}")
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = build_dataclass(tp, value, dotted + ".", errors, root)
            continue
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
        if dataclasses.is_dataclass(item):  # a list of sections, e.g. data.subsets: each named data.subsets[i]
            if not isinstance(value, list):
                errors.append(f"{dotted}: got {value!r}; expected a list of mappings (one per entry, `- path: ...`)")
                continue
            kwargs[key] = [build_dataclass(item, v, f"{dotted}[{i}].", errors, root) for i, v in enumerate(value)]
            continue
        if value is None and tp is str and defaults.get(key) == "":
            kwargs[key] = ""  # `caption_prefix:` with nothing after it (YAML null), or key=null: empty
            continue
        try:
            kwargs[key] = _coerce(value, tp)
        except ValueError:
            errors.append(f"{dotted}: got {value!r}; expected {_describe(tp)}{_hint(dotted, value, tp)}")
    return cls(**kwargs)


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping: YAML keeps the last one
    silently, so a second `lora:` section further down would drop every key of the first."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if isinstance(key, typing.Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} is given twice (lines {seen[key]} and {line}); keep one and merge "
                    "what is under them", key_node.start_mark)
            if isinstance(key, typing.Hashable):
                seen[key] = line
        return super().construct_mapping(node, deep)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ["train.max_steps=50", "lora.rank=8"] into a nested dict; values are read as YAML."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.max_steps=50")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty key part in {key!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = value
    return nested


def merge_dicts(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_dicts(out[key], value)
        else:
            out[key] = value
    return out


