"""kohya-style options in sample.prompts (--n --w --h --d --l --s)."""

from __future__ import annotations

import pytest
from PIL import Image

from conftest import run_config
from lora_trainer.errors import ConfigError
from lora_trainer.publish.run import read_png_parameters
from lora_trainer.sample_prompts import SamplePrompt, parse_sample_prompt


def test_options_are_split_from_the_prompt():
    got = parse_sample_prompt("sks dog on a beach, --n blurry, lowres --w 48 --h 64 --d 7 --l 6.5 --s 3")
    assert got == SamplePrompt("sks dog on a beach,", "blurry, lowres", 48, 64, 7, 6.5, 3)
    assert parse_sample_prompt("  plain prompt ") == SamplePrompt("plain prompt")
    # `--` inside words and an empty negative prompt
    assert parse_sample_prompt("a--b c --n") == SamplePrompt("a--b c", "")


@pytest.mark.parametrize("text, message", [
    ("a dog --x 3", "unknown option --x"),
    ("a dog --w 50", "--w 50 is not a positive multiple of 8"),
    ("a dog --s two", "--s 'two' is not an integer"),
    ("a dog --l high", "--l 'high' is not a number"),
    ("a dog --d 1 --d 2", "--d is given twice"),
    ("--n blurry", "prompt text before the options is empty"),
])
def test_bad_options_are_one_line_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_sample_prompt(text)


def test_config_names_the_bad_prompt(tiny_sd15, example_data, tmp_path):
    with pytest.raises(ConfigError, match=r"sample\.prompts\[1\]: unknown option --q"):
        run_config(tiny_sd15, example_data, tmp_path, 'sample.prompts=["ok", "bad --q 1"]')


def test_training_samples_follow_each_prompts_options(tiny_sd15, example_data, tmp_path):
    from lora_trainer.training.loop import train

    prompts = '["geoshape, a red circle --w 32 --h 48 --d 5 --s 2 --l 3 --n green", "geoshape, a blue square"]'
    cfg = run_config(tiny_sd15, example_data, tmp_path / "run", "train.max_steps=2", f"sample.prompts={prompts}",
                     "sample.steps=3", "sample.negative_prompt=ugly", "sample.seed=11")
    out = train(cfg, show_progress=False).output_dir
    first, second = (out / "samples" / "step_00002" / f"{i:02d}.png" for i in (0, 1))
    assert Image.open(first).size == (32, 48)
    assert Image.open(second).size == (cfg.data.resolution, cfg.data.resolution)
    text = read_png_parameters(first)
    assert text.startswith("geoshape, a red circle <lora:example-lora:1>\nNegative prompt: green\n")
    assert "Steps: 2," in text and "CFG scale: 3" in text and "Seed: 5," in text
    text = read_png_parameters(second)
    assert "Negative prompt: ugly" in text and "Steps: 3," in text and "Seed: 12," in text
    # the sweep draws every row at the training size so the cells line up
    sweep = Image.open(out / "samples" / "sweep.png")
    assert sweep.height > 2 * cfg.data.resolution


def test_the_model_card_shows_prompts_without_their_options(tiny_sd15, example_data, tmp_path):
    from types import SimpleNamespace

    from lora_trainer.publish.guidance import recommended_prompts

    cfg = run_config(tiny_sd15, example_data, tmp_path, 'sample.prompts=["a cat --n dog --s 4", "a hat"]',
                     "sample.negative_prompt=ugly")
    assert recommended_prompts(SimpleNamespace(cfg=cfg, metadata={})) == (["a cat", "a hat"], "dog")
