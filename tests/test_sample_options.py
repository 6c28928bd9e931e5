"""sample.at_start (the prompts drawn before the first step) and sample.scheduler (the samples'
sampler, one of infer.py's --scheduler names); their kohya arguments are in test_kohya_import_arguments.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_config
from lora_trainer.cli import main
from lora_trainer.config import config_warnings, load_config
from lora_trainer.errors import ConfigError
from lora_trainer.publish.run import read_png_parameters
from lora_trainer.training.loop import train

PROMPT = "geoshape, a red circle"
RUN = ["train.max_steps=2", "data.resolution=32", f'sample.prompts=["{PROMPT}"]', "sample.steps=3",
       "sample.at_start=true", "output.save_every_n_steps=1", "output.dtype=fp32"]
EULER_A = ["sample.scheduler=euler_a", "sample.grid_weights=[0, 1]"]


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _run(tiny_sd15, example_data, out: Path, *overrides: str):
    """A run of RUN, noting whether step 0's samples were on disk when the first step's loss came."""
    seen = {}

    def hook(step, loss):
        seen.setdefault(step, (out / "samples" / "step_00000" / "00.png").is_file())
        return loss

    result = train(run_config(tiny_sd15, example_data, out, *RUN, *overrides), show_progress=False, loss_hook=hook)
    return result, seen


@pytest.fixture(scope="module")
def runs(tiny_sd15, example_data, tmp_path_factory):
    """The same run drawn with euler_a (with the sweep grid and tensorboard) and with the default sampler."""
    folder = tmp_path_factory.mktemp("sample-options")
    return {"euler_a": _run(tiny_sd15, example_data, folder / "euler_a", *EULER_A, "log.tensorboard=true"),
            "default": _run(tiny_sd15, example_data, folder / "default", "sample.grid_weights=[]")}


def _infer(tiny_sd15, out: Path, scheduler: str) -> np.ndarray:
    """What infer.py draws of PROMPT with the base alone: sample.* settings, seed sample.seed."""
    assert main(["infer", "--model", str(tiny_sd15), "--prompt", PROMPT, "--steps", "3", "--seed", "0",
                 "--width", "32", "--height", "32", "--scheduler", scheduler, "--out", str(out)]) == 0
    return _pixels(next(out.glob("*.png")))


def test_at_start_draws_the_base_before_the_first_step(runs, tiny_sd15, tmp_path):
    for name, (result, seen) in runs.items():
        first = result.output_dir / "samples" / "step_00000" / "00.png"
        assert seen[1] is True, name  # on disk when step 1 began
        assert sorted(p.name for p in (result.output_dir / "samples").iterdir() if p.is_dir()) == ["step_00000",
                                                                                                   "step_00002"]
        # the adapter starts at B = 0, so step 0 is the base: what infer.py draws without an adapter
        sampler = {"euler_a": "euler_a", "default": "dpm++_2m"}[name]
        assert np.array_equal(_pixels(first), _infer(tiny_sd15, tmp_path / name, sampler)), name
        # the trained adapter's samples, same seed, differ from the base's
        assert not np.array_equal(_pixels(first), _pixels(result.output_dir / "samples" / "step_00002" / "00.png"))


def test_sample_scheduler_draws_every_sample_and_leaves_training_alone(runs):
    (chosen, _), (default, _) = runs["euler_a"], runs["default"]
    for step in ("step_00000", "step_00002"):
        a, b = (r.output_dir / "samples" / step / "00.png" for r in (chosen, default))
        assert not np.array_equal(_pixels(a), _pixels(b))
        assert "Sampler: Euler a," in read_png_parameters(a) and "Sampler: DPM++ 2M," in read_png_parameters(b)
    assert "Sampler: Euler a," in read_png_parameters(chosen.output_dir / "samples" / "sweep.png")
    assert chosen.losses == default.losses  # the training noise schedule is untouched
    assert load_config(chosen.output_dir / "config.yaml").sample.scheduler == "euler_a"
    assert load_config(default.output_dir / "config.yaml").sample.at_start is True


def test_at_start_samples_are_logged_at_step_0(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result, _ = runs["euler_a"]
    acc = EventAccumulator(str(next((result.output_dir / "logs").rglob("events.out.tfevents.*")).parent))
    acc.Reload()
    assert [e.step for e in acc.Images("samples")] == [0, 2]


def test_a_resumed_run_does_not_draw_step_0_again(runs, tiny_sd15, example_data, tmp_path):
    result, _ = runs["euler_a"]
    out = tmp_path / "out"
    shutil.copytree(result.output_dir / "checkpoints" / "step-000001", out / "checkpoints" / "step-000001")
    resumed, seen = _run(tiny_sd15, example_data, out, *EULER_A, "train.resume=latest")
    assert resumed.resumed_from is not None and list(seen) == [2]
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step_00002", "sweep.png"]
    # the resumed run ends where the straight one did, samples included
    final = "samples/step_00002/00.png"
    assert np.array_equal(_pixels(out / final), _pixels(result.output_dir / final))


def test_an_unknown_sample_scheduler_is_refused_in_one_line_before_loading(tmp_path):
    with pytest.raises(ConfigError) as caught:  # the base does not exist: nothing was loaded
        load_config(None, [f"model.base={tmp_path / 'nowhere'}", "data.path=d", "train.max_steps=1",
                           "sample.scheduler=eulr_a"])
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("sample.scheduler: got 'eulr_a', not a sampler infer.py knows; "
                              "did you mean euler_a? choose one of ddim, ddpm, pndm, euler, euler_a,")
    assert message.endswith("or null (DPM++ 2M)")
    # infer.py's spellings are taken as infer.py takes them
    cfg = load_config(None, ["model.base=m", "data.path=d", "train.max_steps=1", "sample.scheduler=Euler A",
                             "sample.at_start=true"])
    assert cfg.sample.sampler_name == "Euler a"
    # without prompts both are kept for later, with a warning
    assert config_warnings(cfg) == [
        "sample.at_start: got True with no sample.prompts, so no samples are drawn; set sample.prompts to see them",
        "sample.scheduler: got 'Euler A' with no sample.prompts, so no samples are drawn; set sample.prompts to "
        "see them"]


def test_the_published_prompt_guide_names_the_samples_sampler(runs):
    from lora_trainer.publish.guidance import prompt_guide, weight_advice
    from lora_trainer.publish.run import read_run

    for name, sampler in (("euler_a", "Euler a"), ("default", "DPM++ 2M")):
        run = read_run(runs[name][0].output_dir)
        assert prompt_guide(run, weight_advice(run))["settings"]["sampler"] == sampler
