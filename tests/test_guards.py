"""Guards and run artefacts that need no model: output-folder protection, NaN stop, disk check, loss plot."""

from __future__ import annotations

import json

import pytest
from conftest import REPO
from PIL import Image

from lora_trainer.errors import ConfigError
from lora_trainer.training.guards import TrainingStopped, check_finite, check_free_space, check_output_dir
from lora_trainer.training.plots import plot_loss


def test_another_runs_folder_is_not_overwritten(tmp_path):
    check_output_dir(tmp_path / "new", overwrite=False, resuming=False)
    for i, made in enumerate(("train_log.jsonl", "samples/step_00002/00.png",
                              "checkpoints/step-000002/trainer_state.json", "mine.safetensors")):
        run = tmp_path / f"run{i}"
        run.mkdir()
        (run / "config.yaml").write_text("x: 1")
        check_output_dir(run, overwrite=False, resuming=False)  # stopped before its first step: nothing to lose
        (run / made).parent.mkdir(parents=True, exist_ok=True)
        (run / made).write_text("")
        with pytest.raises(ConfigError, match="output.overwrite=true"):
            check_output_dir(run, overwrite=False, resuming=False)
    (tmp_path / "config.yaml").write_text("x: 1")
    (tmp_path / "train_log.jsonl").write_text("")
    check_output_dir(tmp_path, overwrite=True, resuming=False)
    check_output_dir(tmp_path, overwrite=False, resuming=True)


def test_output_dir_that_is_a_file_is_named(tmp_path):
    (tmp_path / "out").write_text("")
    for overwrite, resuming in ((False, False), (True, False), (False, True)):
        with pytest.raises(ConfigError, match="output.dir: .*out is a file"):
            check_output_dir(tmp_path / "out", overwrite=overwrite, resuming=resuming)


def test_non_finite_loss_names_step_and_checkpoint(tmp_path):
    check_finite(0.5, 3, None)
    with pytest.raises(TrainingStopped, match="step 7.*step-000004"):
        check_finite(float("nan"), 7, tmp_path / "step-000004")
    with pytest.raises(TrainingStopped, match="no checkpoint"):
        check_finite(float("inf"), 1, None)


def test_free_space_check(tmp_path):
    check_free_space(tmp_path / "not-yet", 1024, "the adapter")
    with pytest.raises(TrainingStopped, match="MiB free"):
        check_free_space(tmp_path, 2**62, "a checkpoint")


def test_free_space_message_gives_small_sizes_in_kib(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(2**30, 2**30, 200 * 2**10))
    with pytest.raises(TrainingStopped, match=r"only 200 KiB free, the adapter needs about 150 KiB; free some"):
        check_free_space(tmp_path, 150 * 2**10, "the adapter")
    with pytest.raises(TrainingStopped, match=r"the adapter needs about 2.5 MiB"):
        check_free_space(tmp_path, int(2.5 * 2**20), "the adapter")


def test_loss_curve_png(tmp_path):
    log = tmp_path / "train_log.jsonl"
    log.write_text("".join(json.dumps({"step": i + 1, "loss": 1.0 / (i + 1)}) + "\n" for i in range(30)))
    path = plot_loss(log, tmp_path / "loss.png")
    image = Image.open(path)
    assert image.format == "PNG" and image.size == (700, 400)
    assert plot_loss(tmp_path / "missing.jsonl", tmp_path / "x.png") is None


@pytest.mark.parametrize("variable,name", [("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")])
def test_sharded_launches_are_refused_before_anything_loads(monkeypatch, tmp_path, variable, name):
    from lora_trainer.config import config_from_dict
    from lora_trainer.training.loop import train

    monkeypatch.setenv(variable, "true")
    cfg = config_from_dict({"model": {"base": str(tmp_path / "no-such-model")},
                            "data": {"path": str(tmp_path / "data")},
                            "train": {"max_steps": 1}, "output": {"dir": str(tmp_path / "out")}})
    with pytest.raises(ConfigError, match=f"^accelerate launch: {name} is not supported.*multi-gpu.yaml"):
        train(cfg)
    assert not (tmp_path / "out").exists()
    monkeypatch.setenv(variable, "false")
    with pytest.raises(Exception) as other:  # without it, the run gets as far as the missing base
        train(cfg)
    assert "no-such-model" in str(other.value)


@pytest.mark.parametrize("launch,warned", [(["--num_processes", "2", "--cpu"], True),
                                            (["--num_processes", "1", "--cpu"], False)])
def test_accelerate_launch_of_one_process_for_several_is_named(monkeypatch, caplog, launch, warned):
    # accelerate's own launcher decides the environment: --cpu (or no GPU) starts one process whatever
    # --num_processes says; the run says so, with the launch that gives several
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_simple_launcher_cmd_env

    from lora_trainer.processes import check_launch_mode

    args, _, _ = _validate_launch_command(launch_command_parser().parse_args([*launch, "train.py"]))
    _, env = prepare_simple_launcher_cmd_env(args)
    for name in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    for name in ("ACCELERATE_USE_CPU", "MASTER_ADDR"):
        if name in env:
            monkeypatch.setenv(name, env[name])
    with caplog.at_level("WARNING", logger="lora_trainer.processes"):
        check_launch_mode()
    assert ("--multi_gpu --num_processes N" in caplog.text) is warned
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun or --multi_gpu: several processes did start
    caplog.clear()
    check_launch_mode()
    assert "--multi_gpu" not in caplog.text


def test_resuming_with_a_changed_config_names_the_changed_keys(tmp_path, caplog):
    from lora_trainer.config import dump_config, load_config
    from lora_trainer.training.guards import resume_changes, warn_resume_changes

    example = REPO / "configs" / "example.yaml"
    saved = tmp_path / "config.yaml"
    saved.write_text(dump_config(load_config(example)))
    # a longer run, another log cadence or other outputs continue the same run
    same = load_config(example, ["train.max_steps=80", "train.resume=latest", "sample.every_n_steps=5",
                                 "output.save_every_n_steps=10"])
    assert resume_changes(saved, same) == []
    changed = load_config(example, ["train.batch_size=1", "data.resolution=32", "train.resume=latest"])
    assert resume_changes(saved, changed) == ["data.resolution (64 -> 32)", "train.batch_size (2 -> 1)"]
    warn_resume_changes(saved, changed, tmp_path / "checkpoints" / "step-000004")
    assert len(caplog.records) == 1 and caplog.records[0].levelname == "WARNING"
    assert "changed in data.resolution (64 -> 32), train.batch_size (2 -> 1)" in caplog.text
    assert resume_changes(tmp_path / "missing.yaml", changed) == []


def test_resuming_longer_warns_that_a_decaying_schedule_is_stretched(tmp_path, caplog):
    """The checkpoint keeps the schedule's step, not its length: a longer cosine run takes the new
    curve's rates from the checkpoint on, and says so; a flat schedule changes nothing and is silent."""
    from lora_trainer.config import dump_config, load_config
    from lora_trainer.training.guards import warn_resume_changes

    example = REPO / "configs" / "example.yaml"
    saved = tmp_path / "config.yaml"
    for scheduler, warned in (("cosine", True), ("constant_with_warmup", False)):
        saved.write_text(dump_config(load_config(example, [f"train.scheduler={scheduler}"])))
        longer = load_config(example, [f"train.scheduler={scheduler}", "train.max_steps=80", "train.resume=latest"])
        caplog.clear()
        warn_resume_changes(saved, longer, tmp_path / "checkpoints" / "step-000030")
        assert len(caplog.records) == int(warned)
        if warned:
            assert "continues with train.max_steps (40 -> 80); the cosine lr schedule now spans the new length" \
                in caplog.text


def test_files_of_the_runs_names_in_a_folder_without_a_run_are_not_replaced(tmp_path):
    """output.dir pointed at a folder of one's adapters: one of output.name's name is not overwritten."""
    for taken in ("mine.safetensors", "mine.diffusers.safetensors", "loss.png", "samples"):
        folder = tmp_path / taken.replace(".", "-")
        folder.mkdir()
        (folder / taken).write_text("someone's file")
        with pytest.raises(ConfigError, match=rf"^output.dir: {folder} already holds {taken}, which this run "
                                              r"would replace; .*output.name.*output.overwrite=true$"):
            check_output_dir(folder, overwrite=False, resuming=False, name="mine")
        check_output_dir(folder, overwrite=True, resuming=False, name="mine")
    check_output_dir(tmp_path / "mine-safetensors", overwrite=False, resuming=False, name="other")  # other names
