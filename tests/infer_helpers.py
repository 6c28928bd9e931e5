"""The infer command as the flag tests call it, and their check that an error is one line."""

from __future__ import annotations

from lora_trainer.cli import main


def run_infer(tmp_path, model, *extra) -> int:
    """`infer` on `model` with a 2-step 64 px draw into tmp_path/out, plus `extra` flags; its exit code."""
    return main(["infer", "--model", str(model), "--prompt", "x", "--steps", "2", "--width", "64", "--height", "64",
                 "--out", str(tmp_path / "out"), *extra])


def one_line_error(capsys) -> str:
    """What the command wrote to stderr, checked to be one `error: ` line without a traceback."""
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def unwritable_folder(tmp_path):
    """A folder no file can be written into: a read-only one, or (for root, who writes anyway) one
    under /proc."""
    from pathlib import Path

    import pytest

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        (locked / "probe").touch()
    except OSError:
        return locked / "sub"
    (locked / "probe").unlink()
    if not Path("/proc/self").is_dir():
        pytest.skip("no folder here is read-only to this user")
    return Path("/proc/lora-trainer-test/out")
