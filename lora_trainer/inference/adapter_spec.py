"""What a `--lora` argument names: an adapter file, its weight and its per-block weights
(`FILE[:WEIGHT][:lbw=SPEC]`), the file checked and hashed before any model loads."""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, ModelError
from .block_weights import block_weights_text


# `:LBW=`, `:Lbw=`: the per-block key in another case (the lower-case one is split off before)
_OTHER_LBW_KEY = re.compile(r":(lbw)=", re.IGNORECASE)


@dataclass
class AdapterSpec:
    path: Path
    weight: float = 1.0
    # per-block weights, A1111's `lbw=`: a preset (OUTALL, ...) or numbers (a list or "1,0,..."), see block_weights.py
    lbw: str | None = None

    def __post_init__(self) -> None:
        self.path = Path(self.path)  # AdapterSpec("style.safetensors", 0.8) from Python
        if self.lbw is not None:
            self.lbw = block_weights_text(self.lbw, f"--lora: {self.path}")

    @property
    def name(self) -> str:
        """The file's stem as an adapter name; peft refuses dots in names (`run.diffusers.safetensors`)."""
        return re.sub(r"[^\w-]", "_", self.path.stem)


def parse_adapter_spec(spec: str) -> AdapterSpec:
    """'FILE', 'FILE:WEIGHT' (the weight is the part after the last colon, when it is a number), either
    with ':lbw=SPEC' after it (per-block weights, as A1111's LoRA Block Weight extension reads them).
    The key is lower case, as the extension reads it (it passes over `LBW=` in silence): another
    spelling is a one-line error, not part of a file name that is then not found."""
    head, sep, lbw = spec.rpartition(":lbw=")
    if sep and head:
        found = parse_adapter_spec(head)
        return AdapterSpec(found.path, found.weight, lbw)
    key = _OTHER_LBW_KEY.search(spec)
    if key and not Path(spec).exists():
        fixed = spec[:key.start()] + ":lbw=" + spec[key.end():]
        raise ConfigError(f"{spec}: write the key {key.group(1)}= in lower case, as A1111's LoRA Block Weight "
                          f"reads it: {fixed}")
    path, sep, weight = spec.rpartition(":")
    if sep and path:
        try:
            value = float(weight)
            if not math.isfinite(value):  # 'nan' and 'inf' parse, and would draw black images
                raise ConfigError(f"{spec}: {weight!r} is not a weight; write FILE:WEIGHT with a finite number, "
                                  f"e.g. {path}:0.8")
            return AdapterSpec(Path(path), value)
        except ValueError:
            if not Path(spec).exists() and (Path(path).is_file() or Path(path).suffix == ".safetensors"):
                raise ConfigError(f"{spec}: {weight!r} is not a weight; write FILE:WEIGHT with a number, "
                                  f"e.g. {path}:0.8") from None
    return AdapterSpec(Path(spec), 1.0)


def adapter_named(specs: dict[str, AdapterSpec], key: str) -> str | None:
    """The name of the adapter `key` means, among `specs` ({name: spec}): its name, its file's stem
    (`run.v2`, whose name is `run_v2`) or file name, or the path given; None when none."""
    for name, spec in specs.items():
        if key in (name, spec.path.stem, spec.path.name, str(spec.path)):
            return name
    return None


def check_adapter_file(path: Path) -> None:
    """Refuse, by name and before any model loads, an adapter path that cannot be read: missing, a
    folder, or a pickle (`.ckpt`, `.pt`, `.bin`, ...), which would run whatever code it carries."""
    from ..export.files import adapter_path_problem

    problem = adapter_path_problem(path)
    if problem == "does not exist":
        raise ModelError(f"--lora: {path}: file not found")
    if problem is not None:
        raise ModelError(f"--lora: {path} {problem}")


def adapter_hash(path: str | Path) -> str | None:
    """The AddNet/A1111 hash of an adapter: SHA-256 of the tensor bytes (after the header), from the
    file's `sshs_model_hash` when present. A1111 shows its first 12 hex under 'Lora hashes'."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > path.stat().st_size:  # not a safetensors file: never read a bogus length
                return None
            header = json.loads(f.read(header_len))
            stored = (header.get("__metadata__") or {}).get("sshs_model_hash")
            if stored:
                return stored
            digest = hashlib.sha256()
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
            return digest.hexdigest()
    except (OSError, ValueError, struct.error):
        return None
