"""Stopping a run from outside: SIGTERM (kill, a scheduler's time limit) saves a checkpoint as
Ctrl-C does, and a Ctrl-C that Python drops inside a finalizer still stops the run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import weakref

import pytest
from conftest import REPO, run_config

from lora_trainer.training.guards import RunInterrupted
from lora_trainer.training.loop import train

RUN = ["train.max_steps=8", "output.save_every_n_steps=2", "sample.prompts=[]"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the dropped KeyboardInterrupt
def test_ctrl_c_dropped_in_a_finalizer_still_stops_the_run(tiny_sd15, example_data, tmp_path):
    def ctrl_c_in_a_finalizer_at_6(step, loss):
        if step == 6:
            box = type("Box", (), {})()
            # Python prints "Exception ignored in ..." for the KeyboardInterrupt raised in the callback
            ref = weakref.ref(box, lambda _: signal.raise_signal(signal.SIGINT))
            del box
            assert ref() is None
        return loss

    cfg = run_config(tiny_sd15, example_data, tmp_path / "out", *RUN)
    with pytest.raises(RunInterrupted, match=r"step 6; saved .*step-000006; continue with train.resume=latest"):
        train(cfg, show_progress=False, loss_hook=ctrl_c_in_a_finalizer_at_6)
    assert not (tmp_path / "out" / "example-lora.safetensors").exists()  # stopped, not finished
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(tiny_sd15, example_data, tmp_path):
    out = tmp_path / "out"
    script = tmp_path / "terminated.py"
    script.write_text(textwrap.dedent("""
        import os, signal, sys
        from lora_trainer.config import load_config
        from lora_trainer.training.guards import RunInterrupted
        from lora_trainer.training.loop import train

        def sigterm_at_5(step, loss):
            if step == 5:
                os.kill(os.getpid(), signal.SIGTERM)
            return loss

        try:
            train(load_config(sys.argv[1], sys.argv[2:]), show_progress=False, loss_hook=sigterm_at_5)
        except RunInterrupted as exc:
            print(f"stopped: {exc}", file=sys.stderr)
            sys.exit(130)
    """))
    overrides = [f"model.base={tiny_sd15}", f"data.path={example_data}", f"output.dir={out}", *RUN]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), str(REPO / "configs" / "example.yaml"), *overrides],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 130, proc.stderr[-2000:]  # not -15: killed without a checkpoint
    assert "step 4; saved" in proc.stderr and "train.resume=latest" in proc.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004"]


def test_ctrl_c_while_train_py_starts_is_one_line(tmp_path):
    # At 0.5 s the command is importing torch; a Ctrl-C there (or a little later, in the data checks)
    # ends it with exit 130 and one line, never a traceback from inside an import.
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), str(REPO / "configs" / "example.yaml"),
                             f"output.dir={tmp_path / 'out'}"], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    try:
        proc.wait(timeout=0.5)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(("interrupted", "stopped:")), err[-2000:]
