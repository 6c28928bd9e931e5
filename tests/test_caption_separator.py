"""kohya's keep_tokens_separator (`sks dog ||| red, blue ||| best quality`: only the middle is shuffled
and dropped) and caption_dropout_every_n_epochs (every caption of epochs n, 2n, ... is dropped),
through the dataset, the config, the adapter's metadata and from-kohya."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import safetensors
from conftest import run_config
from PIL import Image

from lora_trainer.config import load_config
from lora_trainer.data import Example, ImageCaptionDataset
from lora_trainer.data.tags import shuffle_tags, training_caption
from lora_trainer.errors import ConfigError
from lora_trainer.kohya.mapping import config_from_kohya
from lora_trainer.kohya.setup import parse_command_line

CAPTION = "sks dog ||| red, blue, green, yellow, small ||| best quality"


@pytest.fixture()
def image(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGB", (8, 8), (90, 20, 200)).save(path)
    return path


def test_only_the_part_between_separators_is_shuffled_and_dropped(image):
    dataset = ImageCaptionDataset([Example(image, CAPTION)], 8, caption_prefix="geo, ", caption_suffix=", x",
                                  shuffle_tags=True, keep_tokens=4, caption_tag_dropout=0.4, repeats=40,
                                  keep_tokens_separator="|||")
    captions = [dataset[i]["caption"] for i in range(len(dataset))]
    middle = {"red", "blue", "green", "yellow", "small"}
    orders, kept = set(), set()
    for caption in captions:
        tags = caption.split(", ")
        # the prefix is part of the fixed head; keep_tokens is not read when the separator is there
        assert tags[:2] == ["geo", "sks dog"] and tags[-2:] == ["best quality", "x"] and "|||" not in caption
        assert set(tags[2:-2]) <= middle
        orders.add(tuple(tags[2:-2]))
        kept.add(len(tags) - 4)
    assert len(orders) > 10 and min(kept) < 5 and max(kept) >= 4  # shuffled, and tags dropped


def test_separated_caption_matches_the_shuffle_of_the_middle_drawn_from_the_same_stream(image):
    dataset = ImageCaptionDataset([Example(image, CAPTION)], 8, shuffle_tags=True, repeats=3, seed=7,
                                  keep_tokens_separator="|||")
    dataset.set_epoch(2)
    for i in range(3):
        middle = shuffle_tags(" red, blue, green, yellow, small ", 0, random.Random(f"7:2:{i}:tags"))
        assert dataset[i]["caption"] == f"sks dog, {middle}, best quality"


def test_without_shuffling_the_separator_is_only_taken_out_and_off_it_is_text(image):
    fixed = ImageCaptionDataset([Example(image, CAPTION)], 8, keep_tokens_separator="|||")
    assert fixed[0]["caption"] == "sks dog, red, blue, green, yellow, small, best quality"
    assert training_caption(CAPTION, "geo, ", ", x", "|||") == ("geo, sks dog, red, blue, green, yellow, small, "
                                                               "best quality, x")
    # no separator in the caption: keep_tokens holds the first tags, as kohya falls back to it
    plain = ImageCaptionDataset([Example(image, "a, b, c, d, e")], 8, shuffle_tags=True, keep_tokens=2, repeats=20,
                                keep_tokens_separator="|||")
    assert all(plain[i]["caption"].startswith("a, b, ") for i in range(20))
    off = ImageCaptionDataset([Example(image, CAPTION)], 8)
    assert off[0]["caption"] == CAPTION


def test_every_nth_epoch_trains_on_empty_captions(image):
    dataset = ImageCaptionDataset([Example(image, "sks dog, red")], 8, caption_prefix="geo, ", repeats=4,
                                  caption_dropout_every_n_epochs=2)
    by_epoch = []
    for epoch in range(5):
        dataset.set_epoch(epoch)
        by_epoch.append({dataset[i]["caption"] for i in range(4)})
    # kohya counts epochs from 1: its 2nd and 4th epochs (ours 1 and 3) drop every caption
    assert by_epoch == [{"geo, sks dog, red"}, {""}, {"geo, sks dog, red"}, {""}, {"geo, sks dog, red"}]


def test_bad_values_are_one_line_errors():
    base = ["model.base=b", "data.path=d"]
    with pytest.raises(ConfigError, match=r"data.keep_tokens_separator: got ','; expected a marker"):
        load_config(None, [*base, "data.keep_tokens_separator=,"])
    with pytest.raises(ConfigError, match=r"data.caption_dropout_every_n_epochs: got -1; expected an integer >= 0"):
        load_config(None, [*base, "data.caption_dropout_every_n_epochs=-1"])


def test_from_kohya_maps_both_from_arguments_and_subsets(tmp_path):
    line = ("python train_network.py --pretrained_model_name_or_path m --train_data_dir d --network_dim 4 "
            "--network_alpha 4 --learning_rate 1e-4 --max_train_steps 10 --caption_extension .txt "
            "--shuffle_caption --keep_tokens_separator '|||' --caption_dropout_every_n_epochs 3")
    cfg, notes = config_from_kohya(parse_command_line(line))
    assert (cfg["data"]["keep_tokens_separator"], cfg["data"]["caption_dropout_every_n_epochs"]) == ("|||", 3)
    assert not any("separator" in n or "every_n_epochs" in n for n in notes)
    dataset = {"datasets": [{"subsets": [{"image_dir": str(tmp_path / "5_dog"), "num_repeats": 5,
                                          "keep_tokens_separator": "###", "caption_dropout_every_n_epochs": 2}]}]}
    cfg, notes = config_from_kohya(parse_command_line(line.split(" --shuffle")[0]), dataset)
    assert (cfg["data"]["keep_tokens_separator"], cfg["data"]["caption_dropout_every_n_epochs"]) == ("###", 2)
    assert not any("separator" in n or "every_n_epochs" in n for n in notes)


def test_run_records_the_options_and_keeps_the_embedding_cache(tiny_sd15, example_data, tmp_path, caplog):
    from lora_trainer.training.loop import train

    data = tmp_path / "data"
    shutil.copytree(example_data, data)
    for txt in data.glob("*.txt"):
        text = txt.read_text(encoding="utf-8")
        txt.write_text(text.replace(", ", " ||| ", 1), encoding="utf-8")
    cfg = run_config(tiny_sd15, data, tmp_path / "out", "train.max_steps=8", "sample.prompts=[]",
                     "data.keep_tokens_separator=|||", "data.caption_dropout_every_n_epochs=2")
    with caplog.at_level("INFO"):
        result = train(cfg, show_progress=False)
    assert len(result.losses) == 8  # 8 images in batches of 2: the second epoch trains uncaptioned
    # captions are either the fixed text or empty: the cache, keyed by the text, stays right and on
    assert not any("text embeddings are not cached" in r.message for r in caplog.records)
    # the dataset report the run logs counts tags as check-data --keep-tokens-separator does
    report = next(r.getMessage() for r in caplog.records if "tags:" in r.getMessage())
    assert "|||" not in report and "geometric style (8)" in report
    with safetensors.safe_open(str(result.adapter_paths[0]), "pt") as f:
        meta = f.metadata()
    assert meta["ss_caption_dropout_every_n_epochs"] == "2"
    assert "|||" not in meta["ss_tag_frequency"] and "geometric style" in meta["ss_tag_frequency"]
    records = [json.loads(line) for line in (tmp_path / "out" / "captions.jsonl").read_text().splitlines()]
    assert records[0]["caption"] == "geoshape, a red circle on a light blue background, geometric style"
