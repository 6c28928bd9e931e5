"""What a training run's folder (output.dir) holds, for the parts that read one back: resume and
overwrite guards, `infer --compare`, the adapter tools and publishing. Its resolved config.yaml
says the run's output.name and embedding.token; its embeddings sit in OUT/embeddings/."""

from __future__ import annotations

from pathlib import Path

EMBEDDINGS_DIR = "embeddings"  # OUT/embeddings/<token>[-000002 | -step00000100].safetensors


def read_saved_config(config: Path) -> dict:
    """A run's resolved config.yaml as plain data; {} when it is missing, unreadable or no mapping."""
    import yaml

    try:
        data = yaml.safe_load(Path(config).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def saved_text(saved: dict, section: str, key: str) -> str | None:
    """The non-empty text setting `section.key` of a config read by `read_saved_config`, or None."""
    part = saved.get(section)
    value = part.get(key) if isinstance(part, dict) else None
    return value if isinstance(value, str) and value else None
