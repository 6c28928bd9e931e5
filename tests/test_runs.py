"""Runs that scale and survive, on the tiny SD1.5 model: two processes train like one, checkpoints
rotate and resume bit for bit (after a stop, a Ctrl-C or a SIGKILL mid-save), a NaN stops the run,
another run's folder is protected, and the run logs to tensorboard/wandb and draws its curves."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import safetensors.torch
import torch
from conftest import REPO, run_config
from PIL import Image

from lora_trainer.errors import ConfigError
from lora_trainer.training.guards import RunInterrupted, TrainingStopped
from lora_trainer.training.loop import train
from rank_helpers import TWO_PROCESS_RUNS, write_mixed_aspect_images

# 8 images, batch 2: 4 steps an epoch, so 8 steps cross an epoch boundary; checkpoints at 2, 4, 6.
RUN = ["train.max_steps=8", "output.save_every_n_steps=2", "output.keep_checkpoints=2", "output.dtype=fp32"]


def _adapter(result) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in result.unet.named_parameters() if v.requires_grad}


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} adapter tensors differ, e.g. {different[0]}"


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


@pytest.fixture(scope="module", autouse=True)
def rank1_logging():
    """The root logger's level after the CLI sets up logging in a process of rank 1 (logging is set up
    once per process, so in a process of its own), started with the module to run beside it."""
    code = "import logging; from lora_trainer.cli import _setup_logging; _setup_logging(False); print(logging.getLogger().level)"
    proc = subprocess.Popen([sys.executable, "-c", code], env=_env(RANK="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    yield proc
    if proc.poll() is None:  # the test did not run
        proc.kill()
    proc.communicate()


KILLED_ON_SECOND_SAVE = textwrap.dedent("""
    import os, signal, sys
    import torch
    import lora_trainer.training.checkpoints as checkpoints
    from lora_trainer.config import load_config
    from lora_trainer.training.loop import train

    torch.set_num_threads(1)
    publish, calls = checkpoints._publish, []

    def killed_on_second(tmp, final, state):
        calls.append(state.step)
        if len(calls) == 2:  # the folder is written, not yet published
            os.kill(os.getpid(), signal.SIGKILL)
        publish(tmp, final, state)

    checkpoints._publish = killed_on_second
    train(load_config(sys.argv[1], sys.argv[2:]), show_progress=False)
""")


@pytest.fixture(scope="module")
def killed_run(tiny_sd15, example_data, tmp_path_factory):
    """A run SIGKILLed while publishing its second checkpoint, in its own process. Started before the
    module's in-process runs (see `uninterrupted`): the process spends most of its time importing,
    on a core those runs leave idle."""
    folder = tmp_path_factory.mktemp("killed")
    out, script = folder / "out", folder / "killed.py"
    script.write_text(KILLED_ON_SECOND_SAVE)
    overrides = [f"model.base={tiny_sd15}", f"data.path={example_data}", f"output.dir={out}", *RUN, "sample.prompts=[]"]
    # stderr to a file, not a pipe: nobody reads a pipe until the test, and a full one would stall the run
    with open(folder / "stderr.txt", "w") as stderr:
        proc = subprocess.Popen([sys.executable, str(script), str(REPO / "configs" / "example.yaml"), *overrides],
                                cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=stderr)
    yield proc, folder
    if proc.poll() is None:  # the test did not run
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def uninterrupted(killed_run, tiny_sd15, example_data, tmp_path_factory):
    """The reference: 8 steps straight through, with tensorboard, samples and the sweep grid."""
    out = tmp_path_factory.mktemp("straight") / "out"
    result = train(run_config(tiny_sd15, example_data, out, *RUN, "log.tensorboard=true"), show_progress=False)
    return result, _adapter(result)


def test_checkpoints_keep_the_newest_with_a_usable_adapter(uninterrupted):
    result, _ = uninterrupted
    folders = sorted(p.name for p in (result.output_dir / "checkpoints").iterdir())
    assert folders == ["step-000004", "step-000006"]  # step 2 rotated out; none at the final step
    state = json.loads((result.output_dir / "checkpoints" / "step-000006" / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["epoch"] == 1 and state["batches_in_epoch"] == 2
    assert state["processes"] == 1  # a resume with another number of processes is warned about
    exported = result.output_dir / "checkpoints" / "step-000006" / "example-lora-step00000006.safetensors"
    tensors = safetensors.torch.load_file(str(exported))
    assert any(k.endswith("lora_down.weight") for k in tensors)
    # Only the adapter is stored, never the frozen base.
    assert not list((result.output_dir / "checkpoints").rglob("model*.safetensors"))


def test_resume_is_bit_identical(uninterrupted, tiny_sd15, example_data, tmp_path):
    result, reference = uninterrupted
    out = tmp_path / "out"
    shutil.copytree(result.output_dir / "checkpoints" / "step-000004", out / "checkpoints" / "step-000004")
    resumed = train(run_config(tiny_sd15, example_data, out, *RUN, "train.resume=latest", "sample.prompts=[]"),
                    show_progress=False)
    assert resumed.resumed_from == out / "checkpoints" / "step-000004"
    assert resumed.steps == 8 and len(resumed.losses) == 4
    assert resumed.losses == result.losses[4:]
    _assert_same(_adapter(resumed), reference)
    log_steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log_steps == [5, 6, 7, 8]


def test_resume_with_another_rank_is_a_one_line_error(uninterrupted, tiny_sd15, example_data, tmp_path):
    result, _ = uninterrupted
    out = tmp_path / "out"
    shutil.copytree(result.output_dir / "checkpoints" / "step-000004", out / "checkpoints" / "step-000004")
    cfg = run_config(tiny_sd15, example_data, out, *RUN, "train.resume=latest", "sample.prompts=[]", "lora.rank=8")
    with pytest.raises(ConfigError, match=r"holds a different adapter \(\d+ weights of another shape, e\.g\. .*: "
                                          r"\(4, .*\) there, \(8, .*\) now\); resume with the config that wrote it"):
        train(cfg, show_progress=False)


def test_resume_with_another_optimizer_is_a_one_line_error(uninterrupted, tiny_sd15, example_data, tmp_path):
    result, _ = uninterrupted
    saved = json.loads((result.output_dir / "checkpoints" / "step-000004" / "trainer_state.json").read_text())
    assert saved["optimizer"] == "adamw"
    out = tmp_path / "out"
    shutil.copytree(result.output_dir / "checkpoints" / "step-000004", out / "checkpoints" / "step-000004")
    cfg = run_config(tiny_sd15, example_data, out, *RUN, "train.resume=latest", "sample.prompts=[]",
                     "train.optimizer=adafactor")
    with pytest.raises(ConfigError, match=r"^train.resume: .*step-000004 was saved by train.optimizer=adamw, not "
                                          r"adafactor; resume with train.optimizer=adamw"):
        train(cfg, show_progress=False)


def test_sigkill_while_saving_resumes_from_the_previous_checkpoint(killed_run, uninterrupted, tiny_sd15,
                                                                   example_data):
    _, reference = uninterrupted
    proc, folder = killed_run
    proc.wait(timeout=300)
    out = folder / "out"
    assert proc.returncode == -9, (folder / "stderr.txt").read_text()[-2000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [".step-000004.tmp", "step-000002"]
    resumed = train(run_config(tiny_sd15, example_data, out, *RUN, "sample.prompts=[]", "train.resume=latest"),
                    show_progress=False)
    assert resumed.resumed_from == out / "checkpoints" / "step-000002"
    _assert_same(_adapter(resumed), reference)
    assert not list((out / "checkpoints").glob(".*.tmp"))  # the half-written folder is cleaned up


def test_ctrl_c_saves_a_checkpoint_and_resumes_bit_identically(uninterrupted, tiny_sd15, example_data, tmp_path):
    _, reference = uninterrupted
    out = tmp_path / "out"

    def interrupt_at_6(step, loss):
        if step == 6:
            raise KeyboardInterrupt
        return loss

    cfg = run_config(tiny_sd15, example_data, out, *RUN, "sample.prompts=[]")
    with pytest.raises(RunInterrupted, match=r"step 5; saved .*step-000005; continue with train.resume=latest"):
        train(cfg, show_progress=False, loss_hook=interrupt_at_6)
    assert (out / "checkpoints" / "step-000005" / "trainer_state.json").is_file()
    resumed = train(run_config(tiny_sd15, example_data, out, *RUN, "sample.prompts=[]", "train.resume=latest"),
                    show_progress=False)
    assert resumed.resumed_from.name == "step-000005"
    _assert_same(_adapter(resumed), reference)


def test_cli_exits_130_with_how_to_resume_on_ctrl_c(monkeypatch, tmp_path, capsys):
    from lora_trainer import cli

    def interrupted(cfg, show_progress=True, loss_hook=None):
        raise RunInterrupted(12, tmp_path / "checkpoints" / "step-000012")

    monkeypatch.setattr("lora_trainer.training.loop.train", interrupted)
    assert cli.main(["train", str(REPO / "configs" / "example.yaml"), f"output.dir={tmp_path}"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.resume=latest" in err[0] and "step-000012" in err[0]


def test_nan_loss_stops_naming_step_and_last_good_checkpoint(tiny_sd15, example_data, tmp_path):
    out = tmp_path / "out"

    def nan_at_3(step, loss):
        return loss * float("nan") if step == 3 else loss

    cfg = run_config(tiny_sd15, example_data, out, *RUN, "sample.prompts=[]")
    with pytest.raises(TrainingStopped, match=r"loss became nan at step 3.*step-000002") as err:
        train(cfg, show_progress=False, loss_hook=nan_at_3)
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]
    assert not (out / "example-lora.safetensors").exists()


def test_another_runs_folder_needs_overwrite(tiny_sd15, example_data, tmp_path):
    out = tmp_path / "out"
    short = ["train.max_steps=2", "sample.prompts=[]", "output.save_every_n_steps=1"]
    train(run_config(tiny_sd15, example_data, out, *short), show_progress=False)
    with pytest.raises(ConfigError, match="output.dir: .*already holds a run.*output.overwrite=true"):
        train(run_config(tiny_sd15, example_data, out, *short), show_progress=False)
    # overwrite starts afresh: the old run's checkpoints and log are gone, not mixed in
    train(run_config(tiny_sd15, example_data, out, "train.max_steps=1", "sample.prompts=[]", "output.overwrite=true"),
          show_progress=False)
    assert not (out / "checkpoints").exists()
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 1


def test_a_run_stopped_before_its_first_step_runs_again_with_the_same_command(tiny_sd15, example_data, tmp_path):
    out = tmp_path / "out"
    cfg = run_config(tiny_sd15, example_data, out, "train.max_steps=2", "sample.prompts=[]")

    def ctrl_c_at_1(step, loss):
        raise KeyboardInterrupt

    with pytest.raises(RunInterrupted, match="before the first step finished; nothing saved, run the same command"):
        train(cfg, show_progress=False, loss_hook=ctrl_c_at_1)
    assert (out / "config.yaml").is_file()  # all it left, with captions.jsonl
    assert train(cfg, show_progress=False).steps == 2  # as the message says, not "already holds a run"
    assert (out / "example-lora.safetensors").is_file()


def test_tensorboard_events_hold_the_loss_and_lr(uninterrupted):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result, _ = uninterrupted
    events = [p for p in (result.output_dir / "logs").rglob("events.out.tfevents.*")]
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"loss", "lr/unet", "grad_norm", "step_time"} <= set(tags)
    loss = acc.Scalars("loss")
    assert [e.step for e in loss] == list(range(1, 9))
    assert [e.value for e in loss] == pytest.approx(result.losses)
    assert "samples" in acc.Tags()["images"]


def test_train_log_has_lr_per_group_grad_norm_and_step_time(uninterrupted):
    result, _ = uninterrupted
    rows = [json.loads(line) for line in (result.output_dir / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert all(r["grad_norm"] > 0 and r["step_time"] > 0 and r["lr/unet"] == r["lr"] for r in rows)


def test_loss_curve_and_weight_sweep_grid(uninterrupted):
    from lora_trainer.pnginfo import parse_a1111_parameters

    result, _ = uninterrupted
    assert Image.open(result.output_dir / "loss.png").format == "PNG"
    sweep = Image.open(result.output_dir / "samples" / "sweep.png")
    info = parse_a1111_parameters(sweep.text["parameters"])
    assert info.extra["Sweep"] == "example-lora: 0,0.5,1"
    # one prompt row, three 64 px cells beside the label column
    assert sweep.size[0] > 3 * 64 and 64 < sweep.size[1] < 2 * 64 + 30
    # the weight-1 cell is the final sample (same seed, same adapter) and weight 0 differs from it
    final = Image.open(result.output_dir / "samples" / "step_00008" / "00.png").convert("RGB")
    top = sweep.size[1] - (64 + 2)  # one row of 64 px cells (2 px gap) under the column labels
    cells = [sweep.convert("RGB").crop((160 + c * 66, top, 160 + c * 66 + 64, top + 64)) for c in range(3)]
    assert cells[2].tobytes() == final.tobytes()
    assert cells[0].tobytes() != final.tobytes()


def test_wandb_offline_run_writes_its_files(tiny_sd15, example_data, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb-dir").mkdir()
    out = tmp_path / "out"
    train(run_config(tiny_sd15, example_data, out, "train.max_steps=2", "log.wandb=true", "sample.prompts=[]"),
          show_progress=False)
    runs = list((tmp_path / "wandb-dir").rglob("offline-run-*"))
    assert runs, list((tmp_path / "wandb-dir").rglob("*"))
    assert list(runs[0].glob("run-*.wandb"))


def test_two_processes_equal_one_process_with_the_same_global_batch(two_process_runs, tiny_sd15, example_data,
                                                                    tmp_path):
    options, _ = TWO_PROCESS_RUNS["global_batch"]  # 6 steps, a checkpoint at 4, LoRA and kohya dropouts, EMA
    two = two_process_runs["global_batch"]  # 2 processes × batch 1
    rank0, rank1 = (torch.load(two / f"rank{r}.pt") for r in (0, 1))
    _assert_same(rank0, rank1)
    # only the main process writes: one log line per step, one checkpoint
    assert len((two / "train_log.jsonl").read_text().splitlines()) == 6
    assert [p.name for p in (two / "checkpoints").iterdir()] == ["step-000004"]
    one = train(run_config(tiny_sd15, example_data, tmp_path / "one", *options, "train.batch_size=2"),
                show_progress=False)
    for name, value in _adapter(one).items():
        torch.testing.assert_close(rank0[name], value, rtol=0, atol=1e-5)
    exported = safetensors.torch.load_file(str(two / "example-lora.safetensors"))  # the EMA, by the main process
    assert "train.ema_decay=0.5" in options and one.ema is not None
    expected = safetensors.torch.load_file(str(one.adapter_paths[0]))
    assert exported.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(exported[key], value, rtol=0, atol=1e-5)
    state = torch.load(two / "checkpoints" / "step-000004" / "ema_state.pt", weights_only=True)
    assert state["updates"] == 4  # once per step, not per process


def test_two_processes_with_buckets_take_whole_bucket_batches_in_turn(two_process_runs, tiny_sd15, tmp_path):
    # 9 images in 3 buckets, batch 2: 6 batches an epoch, 3 of them short; 2 processes take them in
    # turn, so one step averages two consecutive batches, as 1 process with grad_accum 2 does
    options, _ = TWO_PROCESS_RUNS["buckets"]
    two, resumed = two_process_runs["buckets"], two_process_runs["buckets_resumed"]
    rank0, rank1 = (torch.load(two / f"rank{r}.pt") for r in (0, 1))
    _assert_same(rank0, rank1)
    records = [json.loads(line) for line in (two / "train_log.jsonl").read_text().splitlines()]
    assert [(r["step"], r["epoch"]) for r in records] == [(1, 0), (2, 0), (3, 0), (4, 1), (5, 1), (6, 1)]
    finished = json.loads((two / "finished.json").read_text())
    assert (finished["step"], finished["epochs"], finished["updates_per_epoch"]) == (6, 2, 3)
    assert (two / "example-lora-000001.safetensors").is_file()  # epoch 1 ended at its 3rd step
    state = json.loads((two / "checkpoints" / "step-000004" / "trainer_state.json").read_text())
    assert (state["epoch"], state["batches_in_epoch"]) == (1, 1)
    _assert_same(torch.load(resumed / "rank0.pt"), rank0)  # resumed there: the epoch's next batches
    data = write_mixed_aspect_images(tmp_path / "data")
    one = train(run_config(tiny_sd15, data, tmp_path / "one", *(o.format(mixed_aspect=data) for o in options),
                           "train.grad_accum=2"), show_progress=False)
    assert one.steps == 6
    for name, value in _adapter(one).items():
        torch.testing.assert_close(rank0[name], value, rtol=0, atol=1e-5)


def test_dreambooth_resume_continues_the_class_batches(tiny_sd15, example_data, tmp_path):
    db = ["dreambooth.instance_prompt=a photo of sks shape", "dreambooth.class_prompt=a photo of a shape",
          "dreambooth.num_class_images=3", f"dreambooth.class_data={tmp_path / 'class'}", "dreambooth.class_steps=2",
          "train.max_steps=6", "output.save_every_n_steps=3", "sample.prompts=[]"]
    straight = train(run_config(tiny_sd15, example_data, tmp_path / "a", *db), show_progress=False)
    state = json.loads((tmp_path / "a" / "checkpoints" / "step-000003" / "trainer_state.json").read_text())
    assert state["class_epoch"] > 0  # the class loader's own position is part of the checkpoint
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-000003", tmp_path / "b" / "checkpoints" / "step-000003")
    resumed = train(run_config(tiny_sd15, example_data, tmp_path / "b", *db, "train.resume=latest"),
                    show_progress=False)
    assert resumed.losses == straight.losses[3:]
    _assert_same(_adapter(resumed), _adapter(straight))


def test_only_the_main_process_logs_info(rank1_logging):
    out, err = rank1_logging.communicate(timeout=300)
    assert out.strip() == str(logging.WARNING), err[-2000:]  # rank 0 keeps INFO: every other test's runs show it
