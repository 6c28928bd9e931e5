"""The validation loss on held-out images, on the tiny SD1.5 model: a stable split never trained
on, a number that is the base model's loss by hand at step 0 and the same whenever the weights
are, logged at the configured steps, identical after a resume and across processes, and free
when it is off."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import safetensors
import torch
from conftest import run_config
from PIL import Image

from lora_trainer.data import Example, scan_dataset
from lora_trainer.data.holdout import held_out_flags, split_examples
from lora_trainer.errors import ConfigError, DataError
from lora_trainer.training import loaders
from lora_trainer.training.guards import RunInterrupted
from lora_trainer.training.loop import train
from lora_trainer.training.validation import Validation

# 8 images, 2 held out, batch 2: 3 steps an epoch; the validation loss at steps 0, 2 and 4, each held-out
# image scored at 2 timesteps (250 and 750 of 1000).
SPLIT = ["data.validation_split=0.25", "train.validate_every_n_steps=2", "train.validation_timesteps=2",
         "train.max_steps=4", "sample.prompts=[]", "output.dtype=fp32"]


def _rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


class _UnetCalls:
    """Counts UNet forward passes, whoever makes them."""

    def __enter__(self):
        self.count = 0

        def hook(module, args, output):
            if type(module).__name__ == "UNet2DConditionModel":
                self.count += 1

        self.handle = torch.nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.fixture(scope="module")
def split_run(tiny_sd15, example_data, tmp_path_factory):
    """One run with a 25% split and tensorboard; records the training dataset it built."""
    out = tmp_path_factory.mktemp("split") / "out"
    datasets = []

    def recording(*args, **kwargs):
        datasets.append(make_dataset(*args, **kwargs))
        return datasets[-1]

    make_dataset = loaders.make_dataset
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loaders, "make_dataset", recording)
        result = train(run_config(tiny_sd15, example_data, out, *SPLIT, "log.tensorboard=true"), show_progress=False)
    return result, datasets[0]


@pytest.fixture(scope="module")
def held_folder(example_data, tmp_path_factory):
    """A separate folder of 2 held-out images with captions."""
    folder = tmp_path_factory.mktemp("held") / "held"
    folder.mkdir()
    for name in ("01_red_circle", "06_orange_triangle"):
        for ext in (".png", ".txt"):
            shutil.copy(example_data / f"{name}{ext}", folder / f"{name}{ext}")
    return folder


def test_split_is_seeded_stable_and_disjoint(example_data, tiny_sd15, tmp_path):
    examples = scan_dataset(example_data)
    cfg = run_config(tiny_sd15, example_data, tmp_path, "data.validation_split=0.25")
    training, held = split_examples(cfg, examples)
    assert len(held) == 2 and len(training) == 6
    assert {ex.path for ex in training} | {ex.path for ex in held} == {ex.path for ex in examples}
    assert not {ex.path for ex in training} & {ex.path for ex in held}
    # The same images whatever order they come in (each image's rank is its own) and every time.
    flags = held_out_flags(examples[::-1], example_data, 0.25, 42)
    assert {ex.path for ex, out in zip(examples[::-1], flags) if out} == {ex.path for ex in held}
    assert split_examples(cfg, examples)[1] == held
    # A new image joins the held-out set or leaves it as it was; another seed draws other images.
    more = [*examples, Example(example_data / "09_new.png", "new")]
    flags = held_out_flags(more, example_data, 0.25, 42)
    assert {ex.path for ex, out in zip(more, flags) if out} <= {ex.path for ex in held} | {more[-1].path}
    draws = {frozenset(i for i, out in enumerate(held_out_flags(examples, example_data, 0.25, s)) if out)
             for s in range(5)}
    assert len(draws) > 1
    # At least one image as soon as the split is on; folder repeats are for training only.
    assert sum(held_out_flags(examples, example_data, 0.01, 42)) == 1
    weighted = [replace(ex, repeats=3) for ex in examples]
    assert all(ex.repeats == 1 for ex in split_examples(cfg, weighted)[1])


@pytest.mark.parametrize("overrides, key", [
    (["data.validation_split=1.0"], "data.validation_split"),
    (["data.validation_split=-0.1"], "data.validation_split"),
    (["data.validation_split=0.2", "data.validation_path=/elsewhere"], "data.validation_path"),
    (["train.validate_every_n_steps=5"], "train.validate_every_n_steps"),
    (["data.validation_split=0.2", "train.validate_every_n_steps=-1"], "train.validate_every_n_steps"),
    (["data.validation_split=0.2", "train.validation_timesteps=0"], "train.validation_timesteps"),
])
def test_bad_validation_settings_are_refused_in_one_line(overrides, key, tiny_sd15, example_data, tmp_path):
    with pytest.raises(ConfigError) as err:
        run_config(tiny_sd15, example_data, tmp_path, *overrides)
    message = str(err.value)
    assert "\n" not in message and f"{key}: got" in message


def test_a_validation_folder_inside_the_training_data_is_refused(tiny_sd15, example_data, tmp_path):
    with pytest.raises(ConfigError, match=r"data.validation_path: .*overlaps data.path.*outside data.path"):
        run_config(tiny_sd15, example_data, tmp_path, f"data.validation_path={example_data / 'sub'}")


def test_a_split_leaving_nothing_to_train_on_stops_before_the_model_loads(tiny_sd15, example_data, tmp_path):
    data = tmp_path / "two"
    data.mkdir()
    for name in ("01_red_circle.png", "02_blue_square.png"):
        shutil.copy(example_data / name, data / name)
    cfg = run_config(tiny_sd15, data, tmp_path / "out", "data.validation_split=0.8")
    with pytest.raises(DataError, match=r"data.validation_split: 0.8 of the 2 image.*holds out 2, leaving none") as err:
        train(cfg, show_progress=False)
    assert "\n" not in str(err.value)
    cfg = run_config(tiny_sd15, example_data, tmp_path / "out2", f"data.validation_path={tmp_path / 'missing'}")
    with pytest.raises(DataError, match=r"data.validation_path: .*missing is not a folder"):
        train(cfg, show_progress=False)


def test_val_loss_is_logged_at_step_0_every_n_steps_and_at_the_end(split_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result, _ = split_run
    rows = _rows(result.output_dir)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[0] == {"step": 0, "epoch": 0, "val_loss": result.val_losses[0]}
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 2, 4] == sorted(result.val_losses)
    assert all(r["val_loss"] == result.val_losses[r["step"]] for r in rows if "val_loss" in r)
    # The adapter moves, so the number does (at step 0 LoRA's B is zero: the base model's loss).
    assert len(set(result.val_losses.values())) == 3
    acc = EventAccumulator(str(next((result.output_dir / "logs").rglob("events.out.tfevents.*")).parent))
    acc.Reload()
    assert [e.step for e in acc.Scalars("val_loss")] == [0, 2, 4]
    assert Image.open(result.output_dir / "loss.png").format == "PNG"


def test_held_out_images_are_not_trained_on(split_run, example_data):
    result, dataset = split_run
    record = [json.loads(line) for line in (result.output_dir / "captions.jsonl").read_text().splitlines()]
    held = {example_data / r["file"] for r in record if r.get("validation")}
    assert len(held) == 2 and len(record) == 8
    trained_on = {ex.path for ex in dataset.examples}
    assert len(dataset) == 6 and len(trained_on) == 6 and not trained_on & held
    # 6 images, batch 2: step 4 is in the second epoch (with 8 images it would still be the first).
    assert [r["epoch"] for r in _rows(result.output_dir) if "loss" in r] == [0, 0, 0, 1]
    meta = safetensors.safe_open(str(result.adapter_paths[0]), "pt").metadata()
    assert meta["ss_num_train_images"] == "6"
    assert sum(json.loads(meta["ss_tag_frequency"])["example"].values()) > 0


def test_val_loss_at_step_0_is_the_base_models_loss_by_hand(split_run, tiny_sd15, example_data):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from lora_trainer.training.draws import item_seed

    result, _ = split_run
    record = [json.loads(line) for line in (result.output_dir / "captions.jsonl").read_text().splitlines()]
    held = [r for r in record if r.get("validation")]
    vae = AutoencoderKL.from_pretrained(tiny_sd15, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet")
    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd15, subfolder="tokenizer")
    encoder = CLIPTextModel.from_pretrained(tiny_sd15, subfolder="text_encoder")
    acp = DDPMScheduler.from_pretrained(tiny_sd15, subfolder="scheduler").alphas_cumprod
    per_image = []
    with torch.no_grad():
        for v, row in enumerate(held):  # in file order, as the split keeps them
            pixels = np.asarray(Image.open(example_data / row["file"]).convert("RGB"), dtype=np.float32) / 127.5 - 1
            dist = vae.encode(torch.from_numpy(pixels).permute(2, 0, 1)[None]).latent_dist
            ids = tokenizer(row["caption"], padding="max_length", max_length=77, truncation=True,
                            return_tensors="pt").input_ids
            states = encoder(ids).last_hidden_state
            losses = []
            for j, t in enumerate((250, 750)):  # 2 timesteps at the middles of [0, 500) and [500, 1000)
                g = torch.Generator().manual_seed(item_seed(42, 0, v * 2 + j, "validation"))
                eps, noise = torch.randn((1, 4, 8, 8), generator=g), torch.randn((1, 4, 8, 8), generator=g)
                latents = (dist.mean + dist.std * eps) * vae.config.scaling_factor
                noisy = acp[t].sqrt() * latents + (1 - acp[t]).sqrt() * noise
                pred = unet(noisy, torch.tensor([t]), encoder_hidden_states=states).sample
                losses.append(torch.nn.functional.mse_loss(pred, noise).item())
            per_image.append(sum(losses) / 2)
    assert result.val_losses[0] == pytest.approx(sum(per_image) / len(per_image), rel=1e-5)


def test_validation_is_deterministic_and_leaves_training_unchanged(tiny_sd15, example_data, held_folder, tmp_path,
                                                                   monkeypatch):
    common = ["train.max_steps=3", "sample.prompts=[]", "output.dtype=fp32", "lora.dropout=0.25"]
    with _UnetCalls() as calls:
        plain = train(run_config(tiny_sd15, example_data, tmp_path / "plain", *common), show_progress=False)
    assert calls.count == 3  # off: one UNet pass per step (batch 2), nothing more
    assert "val_loss" not in json.dumps(_rows(tmp_path / "plain")) and plain.val_losses == {}

    once = Validation.loss
    seen = []

    def twice(self, step):
        first, second = once(self, step), once(self, step)
        seen.append((first, second))
        return second

    monkeypatch.setattr(Validation, "loss", twice)
    held = [f"data.validation_path={held_folder}", "train.validate_every_n_steps=0", "train.validation_timesteps=2"]
    with _UnetCalls() as calls:
        validated = train(run_config(tiny_sd15, example_data, tmp_path / "held", *common, *held), show_progress=False)
    assert sorted(validated.val_losses) == [0, 3]
    assert all(a == b for a, b in seen) and len(seen) == 2  # same weights, same number, bit for bit
    # 3 steps + 2 evaluations × 2 runs each × 2 images × 1 batch of 2 timesteps
    assert calls.count == 3 + 2 * 2 * 2
    # With the training images untouched (a separate folder), validating changes no training bit.
    assert validated.losses == plain.losses
    for (name, a), (_, b) in zip(plain.unet.named_parameters(), validated.unet.named_parameters()):
        assert not a.requires_grad or torch.equal(a, b), name


def test_resumed_run_logs_what_the_uninterrupted_run_logs(split_run, tiny_sd15, example_data, tmp_path):
    result, _ = split_run
    out = tmp_path / "out"

    def interrupt_at_4(step, loss):
        if step == 4:
            raise KeyboardInterrupt
        return loss

    with pytest.raises(RunInterrupted):
        train(run_config(tiny_sd15, example_data, out, *SPLIT), show_progress=False, loss_hook=interrupt_at_4)
    resumed = train(run_config(tiny_sd15, example_data, out, *SPLIT, "train.resume=latest"), show_progress=False)
    assert resumed.resumed_from.name == "step-000003" and sorted(resumed.val_losses) == [4]

    def timeless(rows):
        return [{k: v for k, v in r.items() if k != "step_time"} for r in rows]

    assert timeless(_rows(out)) == timeless(_rows(result.output_dir))


def test_ctrl_c_in_a_validation_pass_keeps_the_steps_log_line(split_run, tiny_sd15, example_data, tmp_path,
                                                                  monkeypatch):
    result, _ = split_run
    out = tmp_path / "out"
    once = Validation.loss

    def interrupted_at_2(self, step):
        if step == 2:
            raise KeyboardInterrupt
        return once(self, step)

    monkeypatch.setattr(Validation, "loss", interrupted_at_2)
    with pytest.raises(RunInterrupted) as stopped:
        train(run_config(tiny_sd15, example_data, out, *SPLIT), show_progress=False)
    assert stopped.value.step == 2 and stopped.value.checkpoint.name == "step-000002"
    rows, full = _rows(out), _rows(result.output_dir)
    assert [r["step"] for r in rows] == [0, 1, 2] and "val_loss" not in rows[2]
    # the training numbers of the interrupted step are those of the uninterrupted run
    assert rows[2]["loss"] == full[2]["loss"] and rows[2]["lr"] == full[2]["lr"]


def test_two_processes_report_the_one_process_val_loss(two_process_runs, tiny_sd15, example_data, tmp_path):
    from rank_helpers import TWO_PROCESS_RUNS

    # 3 held-out images over 2 processes: one process pads its last round.
    options, _ = TWO_PROCESS_RUNS["validation"]
    assert "data.validation_split=0.375" in options and "train.validate_every_n_steps=1" in options
    two = two_process_runs["validation"]  # 2 processes × batch 1
    one = train(run_config(tiny_sd15, example_data, tmp_path / "one", *options, "train.batch_size=2"),
                show_progress=False)
    logged = {r["step"]: r["val_loss"] for r in _rows(two) if "val_loss" in r}
    assert sorted(logged) == [0, 1, 2]
    # Batches of 1 against batches of 2: the same number to float rounding.
    assert [logged[s] for s in (0, 1, 2)] == pytest.approx([one.val_losses[s] for s in (0, 1, 2)], rel=1e-5)
    # 5 images left to train on: 2 full batches an epoch either way (2 × 1 dealt out as 1 × 2 cuts them)
    finished = [json.loads((out / "finished.json").read_text()) for out in (two, tmp_path / "one")]
    assert [f["updates_per_epoch"] for f in finished] == [2, 2]
