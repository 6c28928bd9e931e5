"""kohya-ss sd-scripts setups as lora-trainer configs: a saved command line (`accelerate launch
train_network.py --network_dim 16 ...`) or a `--config_file` TOML, with an optional
`--dataset_config` TOML, become one YAML config plus a note for everything that does not carry over.

Reading the inputs and writing the result live here; the argument-by-argument mapping is in
mapping.py (the textual-inversion scripts' own arguments in embedding_options.py). Nothing is dropped silently: an argument we cannot honour becomes a note.
"""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path
from typing import Any, Optional

import yaml

from ..config import config_from_dict
from ..errors import ConfigError
from ..fileio import write_text_atomic
from .mapping import config_from_kohya  # noqa: F401 (re-exported)

# Continuations: `\` (sh), `^` (cmd.exe) and a backtick (PowerShell) at the end of a line.
_CONTINUATION = re.compile(r"[ \t]*(?:\\|\^|`)[ \t]*\r?\n")
_SEPARATORS = {"&&", "||", ";", "|", "&"}
# kohya arguments that take several values (nargs="*"): always kept as lists.
LIST_ARGS = {"network_args", "optimizer_args", "lr_scheduler_args", "base_weights", "base_weights_multiplier"}


def parse_command_line(text: str, source: str = "command") -> dict[str, Any]:
    """The arguments of the kohya command in `text` as {name: value}: `--key=value` and `--key value`
    give strings, a bare `--flag` gives True, `--key a b` a list. The training script's file name,
    when the text names one, is kept under "_script", and what comes before it (the launcher)
    under "_launcher". A text with several commands (a .sh or .bat file) is read at the line that
    runs the script."""
    joined = _CONTINUATION.sub(" ", text)
    windows = re.search(r"\^\r?\n|^\s*(rem|set|call)\s|[A-Za-z]:\\", text, re.IGNORECASE | re.MULTILINE)
    lines = [line for line in joined.splitlines() if line.strip() and not line.lstrip().startswith(("#", "::"))]
    script_line = next((line for line in lines if re.search(r"\.py\b", line)), None)
    tokens = _split(script_line if script_line is not None else " ".join(lines), bool(windows), source)
    args: dict[str, Any] = {}
    start = 0
    if script_line is not None:
        start = next((i for i, t in enumerate(tokens) if t.endswith(".py")), len(tokens) - 1) + 1
        args["_script"] = re.split(r"[/\\]", tokens[start - 1])[-1]
        args["_launcher"] = " ".join(tokens[:start - 1])
    rest = tokens[start:]
    for j, token in enumerate(rest):
        if token in _SEPARATORS:
            rest = rest[:j]
            break
    i = 0
    while i < len(rest):
        token = rest[i]
        if not token.startswith("--"):
            raise ConfigError(f"{source}: {token!r} is not a --argument; expected e.g. --network_dim 16")
        name, eq, value = token[2:].partition("=")
        name = name.replace("-", "_")
        if eq:
            values = [value]
            i += 1
        else:
            values = []
            i += 1
            while i < len(rest) and not rest[i].startswith("--"):
                values.append(rest[i])
                i += 1
        if name in LIST_ARGS:
            args[name] = values
        else:
            args[name] = True if not values else values[0] if len(values) == 1 else values
    return args


def _split(line: str, windows: bool, source: str) -> list[str]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=False)
    lexer.whitespace_split = True
    lexer.commenters = ""
    if windows:  # C:\models\sd.safetensors: a backslash is a path separator, not an escape
        lexer.escape = ""
    try:
        return list(lexer)
    except ValueError as exc:
        raise ConfigError(f"{source}: cannot split the command line ({exc}); check its quotes") from None


def read_toml(path: str | Path, what: str = "TOML file") -> dict[str, Any]:
    """A TOML file as a dict, or a one-line ConfigError naming the file (and the line)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (expected UTF-8 TOML)") from None


def flatten_config_file(data: dict[str, Any]) -> dict[str, Any]:
    """kohya reads a --config_file TOML with its sections merged into one level: do the same."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def find_file(name: str, near: Path) -> Optional[Path]:
    """`name` as given (absolute, or from the current folder), else next to the file that named it."""
    for candidate in (Path(name), near.parent / name):
        if candidate.is_file():
            return candidate
    return None


def read_kohya_setup(path: str | Path, dataset_config: str | Path | None = None
                     ) -> tuple[dict[str, Any], Optional[dict[str, Any]], list[Path]]:
    """The kohya arguments, the dataset TOML (or None) and the files read, from a command file or a
    --config_file TOML (plus the TOMLs a command names); command-line values win over the
    --config_file's, as in kohya."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: kohya command or config file not found")
    used = [path]
    if path.suffix.lower() == ".toml":
        args = flatten_config_file(read_toml(path, "kohya config file"))
        if isinstance(args.get("datasets"), list):  # a dataset config given where the training config goes
            raise ConfigError(f"{path}: this is a --dataset_config TOML ([[datasets]]); pass the training "
                              "command or --config_file as INPUT and this file with --dataset-config")
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a text file (expected a saved command line or a .toml)") from None
        args = parse_command_line(text, str(path))
        if args.get("config_file"):
            named = str(args["config_file"])
            found = find_file(named, path) or find_file(named + ".toml", path)
            if found is None:
                raise ConfigError(f"{path}: --config_file {named} not found (looked in the current folder and "
                                  f"beside {path.name})")
            used.append(found)
            args = {**flatten_config_file(read_toml(found, "kohya config file")), **args}
    args.pop("config_file", None)
    dataset = None
    if dataset_config is not None:
        dataset = read_toml(dataset_config, "dataset config")
        used.append(Path(dataset_config))
        args.pop("dataset_config", None)
    elif args.get("dataset_config"):
        named = str(args.pop("dataset_config"))
        found = find_file(named, path)
        if found is None:
            raise ConfigError(f"{path}: --dataset_config {named} not found (looked in the current folder and "
                              f"beside {path.name}); pass its path with --dataset-config")
        dataset = read_toml(found, "dataset config")
        used.append(found)
    if dataset is not None and not isinstance(dataset.get("datasets"), list):
        raise ConfigError(f"{used[-1]}: no [[datasets]] table; expected kohya's dataset config "
                          "([general], [[datasets]], [[datasets.subsets]])")
    return args, dataset, used


def train_command(launcher: str, config_path: str | Path) -> str:
    """How to train the converted config: kohya's launcher when it carried options (accelerate
    launch --num_processes 2, torchrun ...), else plain python."""
    if "--" in launcher and re.search(r"\b(accelerate\s+launch|torchrun)\b", launcher):
        return f"{launcher} train.py {config_path}"
    return f"python train.py {config_path}"


def render_yaml(config: dict[str, Any], notes: list[str], sources: list[Path], command: str) -> str:
    """The YAML text: a comment header (where it came from, how to train, every note), then the config."""
    header = [f"# Converted from kohya-ss by `lora-trainer from-kohya` from: {', '.join(map(str, sources))}",
              f"# Train with: {command}"]
    if notes:
        header.append("# Notes (what did not carry over as it was, and why):")
        header += [f"#  - {' '.join(line.splitlines())}" for line in notes]
    return "\n".join(header) + "\n" + yaml.safe_dump(config, sort_keys=False, allow_unicode=True, width=120)


def convert_kohya(input_path: str | Path, output: str | Path, dataset_config: str | Path | None = None,
                  force: bool = False) -> tuple[list[str], str]:
    """Read a kohya setup, write our config to `output` (atomically; an existing file only with
    `force`) once it validates, and return the notes and the command that trains it."""
    output = Path(output)
    args, dataset, sources = read_kohya_setup(input_path, dataset_config)
    config, notes = config_from_kohya(args, dataset, base_dir=Path(input_path).parent)
    try:
        config_from_dict(config)
    except ConfigError as exc:  # a value kohya accepted that we do not: say which, before writing
        raise ConfigError(f"{input_path}: the converted config does not validate: {'; '.join(str(exc).splitlines())}"
                          ) from None
    if output.exists() and not force:
        raise ConfigError(f"{output}: already exists; choose another -o or pass --force to replace it")
    command = train_command(args.get("_launcher", ""), output)
    write_text_atomic(output, render_yaml(config, notes, sources, command))
    return notes, command
