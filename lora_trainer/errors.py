"""Errors meant for users: the CLI prints their message on one line and exits non-zero."""


class LoraTrainerError(Exception):
    """Base class for every error whose message is written for the user."""

    label, exit_code = "error", 2  # the CLI prints "<label>: <message>" and exits with the code


class ConfigError(LoraTrainerError):
    """A config key or value is wrong; the message names the key, the value and what is allowed."""


class DataError(LoraTrainerError):
    """The dataset cannot be used as given (empty folder, all images unreadable, bad metadata)."""


class ModelError(LoraTrainerError):
    """The base model or an adapter file cannot be loaded."""


class PublishError(LoraTrainerError):
    """A run folder cannot be published or packaged as asked (missing files, bad repo id, upload refused)."""


def looked_in(path) -> str:
    """For a "not found" message: where a relative path was looked for. Paths in a config are read
    from the folder the command runs in (as kohya's and diffusers' are), not the config file's."""
    from pathlib import Path

    if Path(path).expanduser().is_absolute():
        return ""
    return f" (looked for in {Path.cwd()}: relative paths are read from the folder the command runs in)"


def first_line(exc: BaseException) -> str:
    """The first line of a library exception's message (or its type), for one-line user errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# What to do about a file that cannot be parsed: most often a download or copy that stopped early.
DAMAGED = "it is damaged or incomplete (an interrupted download or copy?): download or copy it again"
