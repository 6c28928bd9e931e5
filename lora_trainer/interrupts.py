"""Whether the user pressed Ctrl-C during a command, even when a library turned the KeyboardInterrupt
into another error (transformers' lazy imports report one met while importing as a
ModuleNotFoundError, sometimes with the interrupt no longer in the exception's chain)."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator


class CtrlC:
    seen = False  # set by the handler below, and by a training run's own (training/guards.StopSignals)


def note_ctrl_c(signum, frame) -> None:
    CtrlC.seen = True
    raise KeyboardInterrupt


@contextmanager
def noting_ctrl_c() -> Iterator[None]:
    """Python's Ctrl-C behaviour, remembered in `CtrlC.seen` (left alone where a handler is set)."""
    CtrlC.seen = False
    install = (threading.current_thread() is threading.main_thread()
               and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
    if install:
        signal.signal(signal.SIGINT, note_ctrl_c)
    try:
        yield
    finally:
        if install:
            signal.signal(signal.SIGINT, signal.default_int_handler)
