"""`train.resume: latest` on a run that ran to its end: the same command does nothing (no model
loads, no file changes); a longer train.max_steps / train.epochs trains on from the newest
checkpoint; a run without checkpoints says how to train it longer instead of starting over."""

from __future__ import annotations

import json
import shutil

import pytest
import safetensors.torch
import torch
from conftest import REPO, run_config

from lora_trainer.errors import ConfigError
from lora_trainer.training.loop import train

# 8 images, batch 2: 4 steps are one epoch; a checkpoint at step 2, none at the last step.
RUN = ["train.max_steps=4", "output.save_every_n_steps=2", "sample.prompts=[]", "output.dtype=fp32"]


@pytest.fixture(scope="module")
def finished(tiny_sd15, example_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "out"
    return train(run_config(tiny_sd15, example_data, out, *RUN), show_progress=False)


def _copy(result, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(result.output_dir, out)
    return out


def _files(out) -> dict[str, tuple[float, bytes]]:
    return {str(p.relative_to(out)): (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}


@pytest.fixture
def no_model_loads(monkeypatch):
    def refused(*args, **kwargs):
        raise AssertionError("the base model was loaded")

    monkeypatch.setattr("lora_trainer.training.loop.load_base", refused)
    monkeypatch.setattr("lora_trainer.training.loop.resolve_variant", refused)


def test_the_finished_record_names_the_step_and_adapter(finished):
    record = json.loads((finished.output_dir / "finished.json").read_text())
    assert record == {"step": 4, "epochs": 1, "updates_per_epoch": 4, "adapters": ["example-lora.safetensors"]}
    assert sorted(p.name for p in (finished.output_dir / "checkpoints").iterdir()) == ["step-000002"]


@pytest.mark.parametrize("length", [["train.max_steps=4"], ["train.max_steps=3"],
                                    ["train.max_steps=null", "train.epochs=1"], ["output.overwrite=true"]])
def test_rerunning_a_finished_run_does_nothing(finished, tiny_sd15, example_data, tmp_path, no_model_loads, length):
    out = _copy(finished, tmp_path)
    before = _files(out)
    result = train(run_config(tiny_sd15, example_data, out, *RUN, *length, "train.resume=latest"),
                   show_progress=False)
    assert result.finished == (f"{out}: already finished at step 4, adapter at {out / 'example-lora.safetensors'}; "
                               "nothing to do (raise train.max_steps / train.epochs to train on)")
    assert result.steps == 4 and result.adapter_paths == [out / "example-lora.safetensors"]
    assert _files(out) == before  # not a byte rewritten, not a file added


def test_the_cli_says_so_in_one_line_and_exits_0(finished, tmp_path, no_model_loads, capsys):
    from lora_trainer import cli

    out = _copy(finished, tmp_path)
    assert cli.main(["train", str(out / "config.yaml"), f"output.dir={out}", "train.resume=latest", "--quiet"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{out}: already finished at step 4, adapter at ")


def test_a_longer_run_trains_on_from_the_newest_checkpoint(finished, tiny_sd15, example_data, tmp_path, caplog):
    out = _copy(finished, tmp_path)
    longer = train(run_config(tiny_sd15, example_data, out, *RUN, "train.max_steps=6", "train.resume=latest"),
                   show_progress=False)
    assert not longer.finished and longer.resumed_from == out / "checkpoints" / "step-000002"
    assert longer.steps == 6 and len(longer.losses) == 4
    assert longer.losses[:2] == finished.losses[2:]  # steps 3 and 4 again, at the same rates (a flat schedule)
    assert [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()] == list(range(1, 7))
    assert json.loads((out / "finished.json").read_text())["step"] == 6
    assert "lr schedule" not in caplog.text  # constant_with_warmup: the new length changes no rate
    # and that run, rerun with its length, is finished too
    again = train(run_config(tiny_sd15, example_data, out, *RUN, "train.max_steps=6", "train.resume=latest"),
                  show_progress=False)
    assert again.finished.startswith(f"{out}: already finished at step 6")


def test_a_finished_run_without_checkpoints_needs_overwrite_to_train_longer(finished, tiny_sd15, example_data,
                                                                           tmp_path, no_model_loads):
    out = _copy(finished, tmp_path)
    shutil.rmtree(out / "checkpoints")
    with pytest.raises(ConfigError) as err:
        train(run_config(tiny_sd15, example_data, out, *RUN, "train.max_steps=6", "train.resume=latest",
                         "output.save_every_n_steps=0"), show_progress=False)
    assert str(err.value) == (
        f"train.resume: the run in {out} finished at step 4 and saved no checkpoint to continue from to step 6 "
        "(output.save_every_n_steps was off); train it again from step 0 with output.overwrite=true (its adapter "
        f"is replaced), or start a new output.dir with lora.init_from={out / 'example-lora.safetensors'}")
    # with saves on, the line said "was off" too (a run as long as save_every_n_steps keeps none)
    with pytest.raises(ConfigError, match=r"to step 6 \(checkpoints/ holds none: output.save_every_n_steps=2 "
                                          r"saves before the last step only\); train it again"):
        train(run_config(tiny_sd15, example_data, out, *RUN, "train.max_steps=6", "train.resume=latest"),
              show_progress=False)
    assert train(run_config(tiny_sd15, example_data, out, *RUN, "train.resume=latest"), show_progress=False).finished


def test_a_finished_run_whose_adapter_is_gone_is_made_again(finished, tiny_sd15, example_data, tmp_path):
    out = _copy(finished, tmp_path)
    (out / "example-lora.safetensors").unlink()
    again = train(run_config(tiny_sd15, example_data, out, *RUN, "train.resume=latest"), show_progress=False)
    assert not again.finished and again.resumed_from.name == "step-000002" and again.steps == 4
    assert again.losses == finished.losses[2:]
    made, first = (safetensors.torch.load_file(str(o / "example-lora.safetensors")) for o in (out, finished.output_dir))
    assert made.keys() == first.keys() and all(torch.equal(made[k], first[k]) for k in made)


@pytest.mark.parametrize("record", [{"step": "12"}, {"updates_per_epoch": None}, {"adapters": "a.safetensors"}])
def test_an_edited_record_is_ignored_with_a_warning_not_a_traceback(tmp_path, caplog, record):
    # "step": "12" reached `target <= run.step` and stopped the run with a TypeError
    from lora_trainer.training.finished import FINISHED_FILE, read_finished

    (tmp_path / "a.safetensors").write_bytes(b"x")
    good = {"step": 12, "epochs": 3, "updates_per_epoch": 4, "adapters": ["a.safetensors"]}
    (tmp_path / FINISHED_FILE).write_text(json.dumps(good))
    assert read_finished(tmp_path).step == 12
    (tmp_path / FINISHED_FILE).write_text(json.dumps({**good, **record}))
    assert read_finished(tmp_path) is None
    assert f"{tmp_path / FINISHED_FILE} cannot be read as the record of a finished run" in caplog.text


def test_a_finished_run_rerun_with_changed_training_keys_names_them(finished, tiny_sd15, example_data, tmp_path,
                                                                    no_model_loads):
    # a job script passing train.resume=latest every time: an edited lr or EMA was dropped without a word
    out = _copy(finished, tmp_path)
    before = _files(out)
    result = train(run_config(tiny_sd15, example_data, out, *RUN, "train.lr=0.002", "train.ema_decay=0.99",
                              "train.resume=latest"), show_progress=False)
    assert result.finished.startswith(f"{out}: already finished at step 4, adapter at ")
    assert result.finished.endswith("nothing to do (raise train.max_steps / train.epochs to train on); the config "
                                    "changed train.lr (0.001 -> 0.002), train.ema_decay (None -> 0.99) since that run, "
                                    "which a finished run does not take: to train with them, give a new output.dir, "
                                    "or output.overwrite=true without train.resume to train it again from step 0")
    assert _files(out) == before
