"""LoRAs by prompt tag, as A1111 reads them: `<lora:NAME:WEIGHT>` (or `<lyco:...>`, `:lbw=SPEC` after
the weight) picks NAME.safetensors from the server's `--lora-dir` (by stem, or by the alias in its
metadata), is taken out of the text the encoder reads, and sets that adapter's weight for one
request. Files load once and stay loaded; adapters a request does not name are switched off."""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from .adapter_spec import AdapterSpec

log = logging.getLogger(__name__)

TAG = re.compile(r"<(lora|lyco):([^:>]+)((?::[^:>]*)*)>", re.IGNORECASE)


@dataclass
class Tag:
    name: str
    weight: float = 1.0
    lbw: str | None = None


def parse_tags(prompt: str) -> tuple[str, list[Tag]]:
    """(the prompt without its LoRA tags, the tags in order); a tag that cannot be read is refused in
    one line naming it. `<lora:NAME>` alone has weight 1, as in A1111."""
    tags = []
    for match in TAG.finditer(prompt):
        name, rest = match.group(2).strip(), [p.strip() for p in match.group(3).split(":")[1:]]
        tag = Tag(name)
        for k, part in enumerate(rest):
            if part.startswith("lbw="):
                tag.lbw = part[4:]
            elif k == 0 and _number(part) is not None:
                tag.weight = _number(part)
            else:
                raise ConfigError(f"prompt: {match.group(0)}: {part!r} is not read here; write <lora:NAME:WEIGHT> "
                                  "or <lora:NAME:WEIGHT:lbw=SPEC> (one weight for the UNet and text encoder)")
        tags.append(tag)
    # the space before a tag goes with it, so "a cat <lora:x:1>" reads as "a cat"
    text = re.sub(r"[ \t]*" + TAG.pattern, "", prompt, flags=re.IGNORECASE).strip()
    return text, tags


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def read_metadata(path: Path) -> dict[str, str]:
    """A safetensors file's metadata (its header only); {} when it has none or cannot be read."""
    import safetensors

    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # safetensors raises its own error types for a bad header
        return {}


class LoraLibrary:
    """The `--lora-dir` files (looked at again on each request, so files dropped in are found without a
    restart) and the adapters loaded from them into one Generator."""

    def __init__(self, folder: Path | None, gen):
        self.folder, self.gen = folder, gen
        self.loaded: dict[Path, str] = {}  # file → adapter name in gen.adapters
        self._meta: dict[Path, tuple[float, dict[str, str]]] = {}

    def files(self) -> list[Path]:
        """The folder's .safetensors files, subfolders included, sorted; pickles are not served."""
        if self.folder is None:
            return []
        return sorted(p for p in self.folder.rglob("*") if p.is_file() and p.suffix.lower() == ".safetensors")

    def metadata(self, path: Path) -> dict[str, str]:
        mtime = path.stat().st_mtime
        if self._meta.get(path, (None,))[0] != mtime:
            self._meta[path] = (mtime, read_metadata(path))
        return self._meta[path][1]

    def alias(self, path: Path) -> str:
        """A1111's alias: the name the file was trained under (`ss_output_name`), else its stem."""
        return self.metadata(path).get("ss_output_name") or path.stem

    def listing(self) -> list[dict]:
        """/sdapi/v1/loras: name (the stem), alias, path and metadata of every file."""
        return [{"name": p.stem, "alias": self.alias(p), "path": str(p), "metadata": self.metadata(p)}
                for p in self.files()]

    def find(self, name: str) -> Path:
        """The file `<lora:NAME:...>` means: the one whose stem is NAME, else whose alias is."""
        files = self.files()
        for match in ([p for p in files if p.stem == name], [p for p in files if self.alias(p) == name]):
            if len(match) > 1:
                log.warning("<lora:%s>: %d files answer to that name (%s); using %s", name, len(match),
                            ", ".join(str(p) for p in match), match[0])
            if match:
                return match[0]
        if self.folder is None:
            raise ConfigError(f"prompt: <lora:{name}:...>: this server has no --lora-dir; start it with --lora-dir DIR")
        raise ConfigError(f"prompt: <lora:{name}:...> names no file in --lora-dir {self.folder}; "
                          "GET /sdapi/v1/loras lists them")

    def apply(self, tags: list[Tag]) -> None:
        """Load the tags' files not loaded yet, give each its weight (and block weights), switch every
        other loaded adapter off; an adapter bundling embeddings is unloaded instead, so its words
        exist only in the requests that name it (as in A1111)."""
        wanted: dict[Path, Tag] = {}
        for tag in tags:
            wanted[self.find(tag.name)] = tag  # a file named twice: the last tag's weight, as A1111
        stack = self.gen.adapters
        for path, name in list(self.loaded.items()):
            if path in wanted:
                continue
            if name in stack.bundled:
                stack.unload(name)
                del self.loaded[path]
            elif stack.enabled.get(name):
                stack.set_enabled(name, False)
        for path, tag in wanted.items():
            spec = AdapterSpec(path, tag.weight, tag.lbw)  # lbw spelled and checked here
            name = self.loaded.get(path)
            if name is None:
                self.loaded[path] = stack.load(spec)
                continue
            current = stack.specs[name]
            if current.lbw != spec.lbw:
                stack.set_block_weights(name, spec.lbw)
            if current.weight != spec.weight:
                stack.set_weight(name, spec.weight)
            if not stack.enabled[name]:
                stack.set_enabled(name, True)
