"""Adapters kept per epoch (kohya's --save_every_n_epochs / --save_last_n_epochs) and epoch samples:
names, count, metadata, rotation, and a resumed run that ends with the same epoch files."""

from __future__ import annotations

import os
import shutil

import pytest
import safetensors
import safetensors.torch
import torch
from conftest import run_config

from lora_trainer.config import load_config
from lora_trainer.errors import ConfigError
from lora_trainer.export.adapter import read_adapter
from lora_trainer.training.epochs import epoch_files, remove_old_epochs
from lora_trainer.training.guards import RunInterrupted, clear_previous_run
from lora_trainer.training.loop import train
from lora_trainer.training.numbered import unnumbered_name
from lora_trainer.training.step_adapters import step_files

# 8 images, batch 4: 2 steps an epoch, 4 epochs. Epoch files after epochs 1-3 (4 is the final
# adapter), the newest 2 kept; checkpoints at steps 3 (inside epoch 2) and 6 (the end of epoch 3).
RUN = ["train.epochs=4", "train.max_steps=null", "train.batch_size=4", "output.save_every_n_epochs=1",
       "output.save_last_n_epochs=2", "output.save_every_n_steps=3", "output.keep_checkpoints=0",
       "output.dtype=fp32", "output.format=both", "sample.grid_weights=[]"]
NAME = "example-lora"


def _tensors(path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(path))


def _meta(path) -> dict[str, str]:
    with safetensors.safe_open(str(path), "pt") as f:
        return f.metadata()


def _epoch_names(out) -> list[str]:
    return sorted(p.name for p in out.glob(f"{NAME}-0*.safetensors"))


@pytest.fixture(scope="module")
def straight(tiny_sd15, example_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("epochs") / "out"
    train(run_config(tiny_sd15, example_data, out, *RUN, "sample.every_n_epochs=2", "sample.steps=2"),
          show_progress=False)
    return out


def test_epoch_files_are_named_like_kohya_and_only_the_newest_are_kept(straight):
    # epoch 1 rotated out by output.save_last_n_epochs=2; epoch 4 is the final adapter
    assert _epoch_names(straight) == [f"{NAME}-000002.diffusers.safetensors", f"{NAME}-000002.safetensors",
                                      f"{NAME}-000003.diffusers.safetensors", f"{NAME}-000003.safetensors"]
    assert (straight / f"{NAME}.safetensors").is_file() and not list(straight.glob(".*.tmp"))


def test_epoch_files_hold_that_epochs_adapter_and_metadata(straight):
    for epoch in (2, 3):
        meta = _meta(straight / f"{NAME}-{epoch:06d}.safetensors")
        assert (meta["ss_epoch"], meta["ss_steps"], meta["ss_num_epochs"]) == (str(epoch), str(2 * epoch), "4")
        assert meta["ss_max_train_steps"] == "8" and meta["ss_output_name"] == NAME
    final = _meta(straight / f"{NAME}.safetensors")
    assert (final["ss_epoch"], final["ss_steps"]) == ("4", "8")
    # The end of epoch 3 is step 6, where a checkpoint exported the same adapter independently.
    epoch3 = _tensors(straight / f"{NAME}-000003.safetensors")
    at_step6 = _tensors(straight / "checkpoints" / "step-000006" / f"{NAME}-step00000006.safetensors")
    assert epoch3.keys() == at_step6.keys() and all(torch.equal(epoch3[k], at_step6[k]) for k in epoch3)
    epoch2 = _tensors(straight / f"{NAME}-000002.safetensors")
    assert any(not torch.equal(epoch2[k], epoch3[k]) for k in epoch3 if k.endswith("lora_up.weight"))


def test_epoch_files_load_in_both_layouts(straight):
    kohya = read_adapter(straight / f"{NAME}-000002.safetensors")
    diffusers = read_adapter(straight / f"{NAME}-000002.diffusers.safetensors")
    assert (kohya.layout, diffusers.layout, kohya.base) == ("kohya", "diffusers", "sd15")
    assert set(kohya.modules["unet"]) == set(diffusers.modules["unet"])
    for path, module in kohya.modules["unet"].items():
        torch.testing.assert_close(module.delta(), diffusers.modules["unet"][path].delta(), rtol=0, atol=0)


def test_epoch_file_loads_for_generation_as_its_delta_w(straight, tiny_sd15):
    """infer.py's loading path (diffusers' load_lora_weights under the Generator) applies exactly the
    ΔW = (alpha/r)·up·down the epoch file holds."""
    from diffusers import UNet2DConditionModel

    from lora_trainer.inference.generate import Generator

    path = straight / f"{NAME}-000002.safetensors"
    loaded = Generator(tiny_sd15, [str(path)], device="cpu", dtype=torch.float32).pipe.unet
    unet = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet")
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(1, unet.config.in_channels, 8, 8, generator=g), torch.tensor([500]),
              torch.randn(1, 77, unet.config.cross_attention_dim, generator=g))
    with torch.no_grad():
        base = unet(*inputs).sample
        params = dict(unet.named_parameters())
        for module_path, module in read_adapter(path).modules["unet"].items():
            params[f"{module_path}.weight"] += module.delta()
        want = unet(*inputs).sample
        got = loaded(*inputs).sample
    assert (want - base).abs().max() > 1e-4  # the epoch's adapter changes the output
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_epoch_samples_have_their_own_folder(straight):
    samples = sorted(p.name for p in (straight / "samples").iterdir())
    assert samples == ["epoch_000002", "step_00008"]  # every 2nd epoch but the last; the final samples
    assert (straight / "samples" / "epoch_000002" / "00.png").is_file()


def test_resumed_run_leaves_earlier_epoch_files_and_writes_the_same_later_ones(straight, tiny_sd15, example_data,
                                                                               tmp_path):
    out = tmp_path / "out"
    cfg = run_config(tiny_sd15, example_data, out, *RUN, "sample.prompts=[]")

    def stop_at_4(step, loss):
        if step == 4:
            raise KeyboardInterrupt
        return loss

    with pytest.raises(RunInterrupted):  # the checkpoint of step 3 is the one to resume from
        train(cfg, show_progress=False, loss_hook=stop_at_4)
    assert _epoch_names(out) == [f"{NAME}-000001.diffusers.safetensors", f"{NAME}-000001.safetensors"]
    before = os.stat(out / f"{NAME}-000001.safetensors")
    seen = {}

    def look_at_5(step, loss):  # epoch 2 (step 4) is written, epoch 1 is still kept
        if step == 5:
            now = os.stat(out / f"{NAME}-000001.safetensors")
            seen["epoch1"] = (now.st_ino, now.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
            seen["names"] = _epoch_names(out)
        return loss

    resumed = train(load_config(out / "config.yaml", ["train.resume=latest"]), show_progress=False,
                    loss_hook=look_at_5)
    assert resumed.resumed_from.name == "step-000003"
    assert seen["epoch1"], "the resumed run rewrote the epoch-1 file"
    assert seen["names"] == [f"{NAME}-00000{e}{tail}.safetensors" for e in (1, 2) for tail in (".diffusers", "")]
    assert _epoch_names(out) == _epoch_names(straight)
    for name in [*_epoch_names(straight), f"{NAME}.safetensors"]:
        a, b = _tensors(out / name), _tensors(straight / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_resume_from_an_epochs_end_writes_its_file_only_if_missing(straight, tiny_sd15, example_data, tmp_path):
    """A checkpoint at the end of epoch 3 (step 6) whose epoch file is missing (Ctrl-C between the
    update and the file): the resumed run writes it once, and leaves epoch 2's alone."""
    out = tmp_path / "out"
    shutil.copytree(straight / "checkpoints" / "step-000006", out / "checkpoints" / "step-000006")
    for name in (f"{NAME}-000002.safetensors", f"{NAME}-000002.diffusers.safetensors"):
        shutil.copy2(straight / name, out / name)
    before = os.stat(out / f"{NAME}-000002.safetensors")
    train(run_config(tiny_sd15, example_data, out, *RUN, "sample.prompts=[]", "train.resume=latest"),
          show_progress=False)
    after = os.stat(out / f"{NAME}-000002.safetensors")
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert _epoch_names(out) == _epoch_names(straight)
    for name in (f"{NAME}-000003.safetensors", f"{NAME}.safetensors"):
        a, b = _tensors(out / name), _tensors(straight / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_rotation_counts_only_this_names_epochs_up_to_the_current_one(tmp_path):
    names = [f"lora-00000{e}.safetensors" for e in range(1, 6)] + [
        "lora-000002.diffusers.safetensors", "lora.safetensors", "lora-step00004.safetensors",
        "lora-extra-000001.safetensors", "other-000001.safetensors"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    removed = remove_old_epochs(tmp_path, "lora", keep=2, current=3)
    assert sorted(p.name for p in removed) == ["lora-000001.safetensors"]
    # epochs 4 and 5 are newer than the run's position (left by a run resumed from earlier): kept
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(set(names) - {"lora-000001.safetensors"})
    remove_old_epochs(tmp_path, "lora", keep=1, current=5)
    assert sorted(p.name for p in tmp_path.glob("lora-0*")) == ["lora-000005.safetensors"]
    assert remove_old_epochs(tmp_path, "lora", keep=0, current=5) == []


@pytest.mark.parametrize("filename, name", [
    ("me-000002.safetensors", "me"), ("me-step00000100.safetensors", "me"), ("me-000002.diffusers.safetensors", "me"),
    ("me.safetensors", "me"), ("my-tok-000001-step00000002.safetensors", "my-tok-000001"),
    ("me-00002.safetensors", "me-00002"), ("me-step100.safetensors", "me-step100"),  # not kohya's widths
])
def test_a_numbered_files_name_is_told_without_its_epoch_or_step(filename, name, tmp_path):
    assert unnumbered_name(filename) == name
    (tmp_path / filename).write_bytes(b"x")  # the name epoch_files / step_files find it under
    found = [*epoch_files(tmp_path, name).values(), *step_files(tmp_path, name).values()]
    assert found == ([[tmp_path / filename]] if name != filename.removesuffix(".safetensors") else [])


def test_overwrite_removes_the_old_runs_epoch_files(tmp_path):
    (tmp_path / "config.yaml").write_text("output:\n  name: old\n")
    for name in ("old-000001.safetensors", "old-000001.diffusers.safetensors", "keep-000001.safetensors"):
        (tmp_path / name).write_bytes(b"x")
    clear_previous_run(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["keep-000001.safetensors"]


def test_overwrite_under_another_name_removes_the_old_runs_final_adapter(tmp_path):
    (tmp_path / "config.yaml").write_text("output:\n  name: old\n")
    for name in ("old.safetensors", "old.diffusers.safetensors", "mine.safetensors"):
        (tmp_path / name).write_bytes(b"x")
    clear_previous_run(tmp_path, name="old")  # the same name: the new run writes it again
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [
        "mine.safetensors", "old.diffusers.safetensors", "old.safetensors"]
    clear_previous_run(tmp_path, name="new")  # another name: the old run's adapter would pass for the new run's
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["mine.safetensors"]


def test_overwrite_removes_the_old_runs_epoch_and_step_embeddings(tmp_path):
    (tmp_path / "config.yaml").write_text("output:\n  name: old\nembedding:\n  token: ohwx\n")
    emb = tmp_path / "embeddings"
    emb.mkdir()
    for name in ("ohwx-000001", "ohwx-step00000004", "ohwx", "other-000001"):
        (emb / f"{name}.safetensors").write_bytes(b"x")
    clear_previous_run(tmp_path, "ohwx")  # the same token: its final one is replaced by the new run, as the adapter is
    assert sorted(p.name for p in emb.iterdir()) == ["ohwx.safetensors", "other-000001.safetensors"]
    clear_previous_run(tmp_path)  # a run with no embedding (or another token) writes none in its place
    assert sorted(p.name for p in emb.iterdir()) == ["other-000001.safetensors"]


def test_overwrite_with_another_token_leaves_only_the_new_tokens_embeddings(tiny_sd15, example_data, tmp_path):
    """A run with token A, then output.overwrite=true with token B: A's final embedding goes with its
    step files, so --compare cannot pair B's run with it."""
    def run(token, *extra):
        train(run_config(tiny_sd15, example_data, tmp_path, f"embedding.token={token}",
                         f"data.caption_prefix={token}, ", "lora.train_unet=false", "train.max_steps=2",
                         "train.warmup=0", "output.save_every_n_steps=1", "output.save_step_adapters=true",
                         "sample.prompts=[]", *extra), show_progress=False)
        return sorted(p.name for p in (tmp_path / "embeddings").iterdir())

    assert run("geoshape") == ["geoshape-step00000001.safetensors", "geoshape.safetensors"]
    assert run("ohwx", "output.overwrite=true") == ["ohwx-step00000001.safetensors", "ohwx.safetensors"]


@pytest.mark.parametrize("override, message", [
    ("output.save_every_n_epochs=-1", "output.save_every_n_epochs: got -1"),
    ("output.save_last_n_epochs=2", "output.save_last_n_epochs: got 2 with output.save_every_n_epochs 0"),
    ("sample.every_n_epochs=-2", "sample.every_n_epochs: got -2"),
])
def test_bad_epoch_keys_are_one_line_errors(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.base=m", "data.path=d", "train.max_steps=1", override])
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
