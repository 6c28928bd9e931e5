"""Adapters kept per N steps (kohya's --save_every_n_steps / --save_last_n_steps): kohya's names,
kept when their checkpoint rotates out, the newest few kept, the same files after a resumed run
(none rewritten), the config checks and from-kohya's mapping."""

from __future__ import annotations

import os

import pytest
import safetensors
import safetensors.torch
import torch
from conftest import run_config

from lora_trainer.config import config_from_dict, load_config
from lora_trainer.errors import ConfigError
from lora_trainer.kohya.setup import config_from_kohya
from lora_trainer.training.guards import RunInterrupted
from lora_trainer.training.loop import train
from lora_trainer.training.step_adapters import step_suffix

# 8 steps, a checkpoint every 2 (only the newest kept): step files of 2, 4, 6 (8 is the final
# adapter), the newest 2 kept.
RUN = ["train.max_steps=8", "output.save_every_n_steps=2", "output.keep_checkpoints=1", "output.save_step_adapters=true",
       "output.save_last_n_step_adapters=2", "output.dtype=fp32", "output.format=both", "sample.prompts=[]",
       "sample.grid_weights=[]"]
NAME = "example-lora"


def _names(out) -> list[str]:
    return sorted(p.name for p in out.glob(f"{NAME}-step*.safetensors"))


def _tensors(path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(path))


@pytest.fixture(scope="module")
def straight(tiny_sd15, example_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("steps") / "out"
    train(run_config(tiny_sd15, example_data, out, *RUN), show_progress=False)
    return out


def test_step_files_are_named_like_kohya_and_outlive_their_checkpoints(straight):
    assert _names(straight) == [f"{NAME}-step0000000{s}{tail}.safetensors" for s in (4, 6)
                                for tail in (".diffusers", "")]
    assert [p.name for p in (straight / "checkpoints").iterdir()] == ["step-000006"]  # step 4's rotated out
    kept = straight / f"{NAME}-step00000006.safetensors"
    exported = straight / "checkpoints" / "step-000006" / kept.name  # one name inside and beside the checkpoint
    assert sorted(p.name for p in exported.parent.glob("*.safetensors") if p.name.startswith(NAME)) == \
        [f"{NAME}{step_suffix(6)}{tail}.safetensors" for tail in (".diffusers", "")]
    assert kept.read_bytes() == exported.read_bytes()  # the checkpoint's adapter, metadata and all
    with safetensors.safe_open(str(kept), "pt") as f:
        assert (f.metadata()["ss_steps"], f.metadata()["ss_output_name"]) == ("6", NAME)
    assert not list(straight.glob(".*.tmp"))


def test_resumed_run_keeps_earlier_step_files_and_writes_the_same_later_ones(straight, tiny_sd15, example_data,
                                                                             tmp_path):
    out = tmp_path / "out"

    def stop_at(at):
        def hook(step, loss):
            if step == at:
                raise KeyboardInterrupt
            return loss
        return hook

    # Ctrl-C at step 3: its checkpoint (step 2 done) is the scheduled one; then at step 5, after
    # step 4's scheduled checkpoint, so nothing is saved again.
    with pytest.raises(RunInterrupted):
        train(run_config(tiny_sd15, example_data, out, *RUN), show_progress=False, loss_hook=stop_at(3))
    with pytest.raises(RunInterrupted):
        train(load_config(out / "config.yaml", ["train.resume=latest"]), show_progress=False, loss_hook=stop_at(5))
    assert _names(out) == [f"{NAME}-step0000000{s}{tail}.safetensors" for s in (2, 4) for tail in (".diffusers", "")]
    before = os.stat(out / f"{NAME}-step00000004.safetensors")
    resumed = train(load_config(out / "config.yaml", ["train.resume=latest"]), show_progress=False)
    assert resumed.resumed_from.name == "step-000004"
    after = os.stat(out / f"{NAME}-step00000004.safetensors")
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), "step 4's file was rewritten"
    assert _names(out) == _names(straight)
    for name in _names(straight):
        ours, theirs = _tensors(out / name), _tensors(straight / name)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name


def test_ctrl_c_checkpoints_between_saves_keep_no_step_file(tiny_sd15, example_data, tmp_path):
    out = tmp_path / "out"

    def stop_at_4(step, loss):  # step 3 is done: Ctrl-C saves its checkpoint, off the every-2 schedule
        if step == 4:
            raise KeyboardInterrupt
        return loss

    with pytest.raises(RunInterrupted):
        train(run_config(tiny_sd15, example_data, out, *RUN), show_progress=False, loss_hook=stop_at_4)
    assert (out / "checkpoints" / "step-000003").is_dir()
    assert _names(out) == [f"{NAME}-step00000002{tail}.safetensors" for tail in (".diffusers", "")]


@pytest.mark.parametrize("output, message", [
    ({"save_step_adapters": True}, "output.save_step_adapters: got True with output.save_every_n_steps 0"),
    ({"save_every_n_steps": 5, "save_last_n_step_adapters": 2}, "output.save_last_n_step_adapters: got 2 with "
                                                                "output.save_step_adapters false"),
    ({"save_every_n_steps": 5, "save_step_adapters": True, "save_last_n_step_adapters": -1},
     "output.save_last_n_step_adapters: got -1; expected an integer >= 0"),
])
def test_step_file_options_are_checked_with_one_line_naming_the_key(output, message):
    with pytest.raises(ConfigError) as info:
        config_from_dict({"model": {"base": "m"}, "data": {"path": "d"}, "train": {"max_steps": 10}, "output": output})
    assert message in str(info.value) and "\n" not in str(info.value)


def test_from_kohya_keeps_step_files_and_turns_the_step_span_into_a_count():
    base = {"pretrained_model_name_or_path": "m", "train_data_dir": "img", "caption_extension": ".txt", "network_dim": 4, "network_alpha": 4,
            "learning_rate": 1e-4, "max_train_steps": 1000}
    cfg, notes = config_from_kohya({**base, "save_every_n_steps": 100, "save_last_n_steps": 250})
    # kohya at step 500 keeps the files of steps 300, 400 and 500: those within 250 steps
    assert cfg["output"] == {"save_every_n_steps": 100, "save_step_adapters": True, "save_last_n_step_adapters": 3}
    assert notes == []
    config_from_dict(cfg)
    cfg, notes = config_from_kohya({**base, "save_last_n_steps": 250})
    assert "output" not in cfg and notes == ["--save_last_n_steps 250: no step files are saved (no "
                                             "--save_every_n_steps); left out"]


def test_a_kept_step_embedding_is_logged_as_an_embedding(tmp_path, caplog):
    from lora_trainer.config import OutputConfig
    from lora_trainer.training.step_adapters import keep_step_adapters

    folder = tmp_path / "checkpoints" / "step-000004"
    (folder / "embeddings").mkdir(parents=True)
    (folder / "run-step00000004.safetensors").write_bytes(b"a")
    (folder / "embeddings" / "ohwx-step00000004.safetensors").write_bytes(b"e")
    with caplog.at_level("INFO", logger="lora_trainer.training.step_adapters"):
        kept = keep_step_adapters([folder / "run-step00000004.safetensors"], "-step00000004", tmp_path,
                                  OutputConfig(name="run"), 4, "ohwx", folder)
    assert kept == [tmp_path / "run-step00000004.safetensors", tmp_path / "embeddings" / "ohwx-step00000004.safetensors"]
    assert [r.getMessage() for r in caplog.records] == [f"kept the adapter of step 4: {kept[0]}",
                                                        f"kept the embedding of step 4: {kept[1]}"]
