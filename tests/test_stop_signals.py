"""Stopping a run from outside: SIGTERM (kill, a scheduler's time limit) saves a checkpoint as
Ctrl-C does, and a Ctrl-C that Python drops inside a finalizer still stops the run."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
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


def test_a_deferred_sigterm_is_only_noted_for_the_next_batch():
    # several processes: the signal must not interrupt a collective or a save midway; the loop reads
    # the flag with the next batch's loss instead
    from lora_trainer.training.guards import StopSignals

    with StopSignals() as stop:
        stop.defer()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # the handler runs here, and raises nothing
        stop.check()
        assert stop.received == signal.SIGTERM and float(stop.flag("cpu")) == 1.0
    with StopSignals() as stop:  # one process: raised at once, as Ctrl-C is
        assert float(stop.flag("cpu")) == 0.0
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_sigterm_to_torchrun_stops_both_processes_at_one_step_and_resumes(tiny_sd15, example_data, tmp_path, caplog):
    # torchrun passes a SIGTERM on to its 2 processes, which get it at different moments (one maybe
    # waiting in a collective or a checkpoint's barrier): both must stop after the same step, save
    # it once, whole, and exit, well within torchrun's 30 s before it SIGKILLs them.
    out = tmp_path / "out"
    run = [f"model.base={tiny_sd15}", f"data.path={example_data}", f"output.dir={out}", "train.batch_size=1",
           "output.save_every_n_steps=2", "output.keep_checkpoints=2", "sample.prompts=[]"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "stderr.txt", "w") as stderr:  # a file: a full pipe nobody reads would stall the run
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                                 str(REPO / "train.py"), str(REPO / "configs" / "example.yaml"), *run,
                                 "train.max_steps=1000"],
                                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
    try:
        log = out / "train_log.jsonl"
        deadline = time.monotonic() + 240
        while not (log.is_file() and len(log.read_text().splitlines()) >= 3):
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "stderr.txt").read_text()[-3000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:  # hung: end torchrun and its processes (a session of their own)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    err = (tmp_path / "stderr.txt").read_text()
    # each process's line (searched, not split: the main process's progress bar may share its line)
    stopped = re.findall(r"stopped: interrupted at step (\d+); saved (\S+);", err)
    assert len(stopped) == 2 and stopped[0] == stopped[1], err[-3000:]  # the same step, the same folder
    step, newest = int(stopped[0][0]), out / "checkpoints" / f"step-{int(stopped[0][0]):06d}"
    assert stopped[0][1] == str(newest)
    assert not list((out / "checkpoints").glob(".*.tmp"))  # no half-written folder left
    assert {p.name for p in newest.iterdir()} >= {"trainer_state.json", "adapter_state.pt", "optimizer.bin",
                                                  "scheduler.bin", "random_states_0.pkl", "random_states_1.pkl"}
    assert json.loads((newest / "trainer_state.json").read_text())["step"] == step
    assert json.loads((newest / "trainer_state.json").read_text())["processes"] == 2
    assert max(json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()) == step
    # train.resume=latest, here in 1 process, trains on from there to the end, and says what that changes
    with caplog.at_level(logging.WARNING, logger="lora_trainer.training.checkpoints"):
        resumed = train(run_config(tiny_sd15, example_data, out, *run[3:], "train.resume=latest",
                                   f"train.max_steps={step + 2}"), show_progress=False)
    assert f"{newest} was saved by 2 process(es), and this run has 1: a step now takes 1/2 as many images" in caplog.text
    assert resumed.resumed_from == newest and resumed.steps == step + 2 and len(resumed.losses) == 2
    assert (out / "example-lora.safetensors").is_file()


def test_resuming_with_another_number_of_processes_is_named_and_the_same_is_not():
    from lora_trainer.training.checkpoints import TrainerState, process_change

    saved = TrainerState(10, 1, 3, processes=2)
    assert process_change(saved, 2) == "" and process_change(TrainerState(10, 1, 3), 4) == ""  # same, or unknown
    note = process_change(saved, 4)
    assert note.startswith("was saved by 2 process(es), and this run has 4: a step now takes 4/2 as many images")
    assert note.endswith("resume with 2 process(es) to continue exactly")


def test_output_read_by_a_reader_that_went_away_ends_quietly(random_adapters):
    # `lora-trainer inspect FILE | head -1`: head exits after its line and the pipe closes under the
    # command; it stops as a shell command ended by SIGPIPE does (141), with no traceback.
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lora_trainer.cli", "inspect", "--json", str(random_adapters["a"])],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # long before it writes (it is still importing)
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141, err[-2000:]
    assert "Traceback" not in err and "Exception ignored" not in err, err[-2000:]
