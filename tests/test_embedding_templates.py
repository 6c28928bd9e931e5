"""embedding.templates: textual inversion's caption templates. Each image, each time it is drawn,
is captioned by a template naming the token, chosen from (seed, epoch, item); the config refuses bad
templates and other caption sources in one line; a run whose captions never name the token trains
with them (from-kohya's mapping of kohya's template flags: test_kohya_import_textual_inversion.py)."""

from __future__ import annotations

import json
import logging

import pytest
import safetensors
from conftest import run_config

from lora_trainer.config import load_config
from lora_trainer.data import ImageCaptionDataset, scan_dataset
from lora_trainer.data.templates import OBJECT_TEMPLATES, STYLE_TEMPLATES, template_captions
from lora_trainer.errors import ConfigError
from lora_trainer.training.caches import embedding_cache_reason
from lora_trainer.training.loaders import make_dataset

BASE = ["model.base=x", "data.path=d", "train.max_steps=1"]
TI = ["embedding.token=ohwx", "lora.train_unet=false", "data.caption_prefix=", "sample.prompts=[]",
      "train.warmup=0", "output.dtype=fp32"]


def _error(*overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(None, [*BASE, *overrides])
    return str(info.value)


def test_the_lists_hold_the_token_place_once_and_differ():
    for templates in (OBJECT_TEMPLATES, STYLE_TEMPLATES):
        assert len(templates) >= 20 and len(set(templates)) == len(templates)
        assert all(t.count("{}") == 1 for t in templates)
    assert "a photo of a {}" in OBJECT_TEMPLATES and "a painting in the style of {}" in STYLE_TEMPLATES
    assert template_captions("style", "ohwx")[0] == "a painting in the style of ohwx"
    assert template_captions(["{} at night", "a {} again"], "ohwx") == ["ohwx at night", "a ohwx again"]
    assert template_captions(None, "ohwx") == []


def test_bad_templates_and_other_caption_sources_are_refused_in_one_line():
    token = "embedding.token=ohwx"
    cases = ((["embedding.templates=object"], "embedding.templates: got 'object' with no embedding.token"),
             ([token, "embedding.templates=objects"], "embedding.templates: got 'objects'; expected 'object', 'style'"),
             ([token, "embedding.templates=['a {} {}', 'b {}']"], "embedding.templates: 'a {} {}' holds {} 2 times"),
             ([token, "embedding.templates=['a {}', 'b']"], "embedding.templates: 'b' holds {} 0 times"),
             ([token, "embedding.templates=[]"], "embedding.templates: got an empty list"),
             ([token, "embedding.templates=style", "dreambooth.instance_prompt=a ohwx"],
              "embedding.templates: set with dreambooth.instance_prompt"),
             ([token, "embedding.templates=style", "data.caption_prefix=ohwx, "],
              "data.caption_prefix: got 'ohwx,' with embedding.templates"),
             ([token, "embedding.templates=style", "data.caption_suffix=, art"],
              "data.caption_suffix: got ', art' with embedding.templates"))
    for overrides, needle in cases:
        text = _error(*overrides)
        assert len(text.splitlines()) == 1 and text.startswith(needle), text
    for value, expected in (("object", "object"), ("'a photo of {}'", "a photo of {}"),
                            ("['{} art', 'a {}']", ["{} art", "a {}"])):
        cfg = load_config(None, [*BASE, token, f"embedding.templates={value}"])
        assert cfg.embedding.templates == expected


def test_captions_are_templates_drawn_per_epoch_from_the_seed(example_data):
    cfg = load_config(None, [*BASE[:1], f"data.path={example_data}", "train.max_steps=1", "data.resolution=64",
                             "embedding.token=ohwx", "embedding.templates=object", "data.repeats=3",
                             "data.shuffle_tags=true", "data.caption_tag_dropout=0.5"])
    examples = scan_dataset(example_data)
    assert not any("ohwx" in ex.caption for ex in examples)

    def captions(seed: int, epoch: int) -> list[str]:
        dataset = make_dataset(cfg, examples, seed)
        dataset.set_epoch(epoch)
        return [dataset[i]["caption"] for i in range(len(dataset))]

    allowed = set(template_captions("object", "ohwx"))
    first, second = captions(42, 0), captions(42, 1)
    assert len(first) == 24 and set(first) <= allowed and set(second) <= allowed
    assert len(set(first)) >= 8  # many templates, not one per image
    assert first != second  # drawn anew each epoch
    assert captions(42, 0) == first and captions(42, 1) == second  # the same seed: the same draws
    assert captions(7, 0) != first
    # the same item in a fresh dataset (another process, a resumed run) draws the same template
    fresh = ImageCaptionDataset(examples, 64, seed=42, repeats=3, templates=template_captions("object", "ohwx"))
    fresh.set_epoch(1)
    assert [fresh[i]["caption"] for i in (0, 5, 23)] == [second[i] for i in (0, 5, 23)]
    # caption dropout still drops them; the pixels are those of the run without templates
    plain = ImageCaptionDataset(examples, 64, seed=42, random_flip=True, caption_dropout=1.0)
    templated = ImageCaptionDataset(examples, 64, seed=42, random_flip=True, caption_dropout=1.0,
                                    templates=["a {}".format("ohwx")])
    assert templated[3]["caption"] == "" and (templated[3]["pixel_values"] == plain[3]["pixel_values"]).all()
    assert embedding_cache_reason(cfg) == "embedding.templates draws each image's caption anew every epoch"


def test_textual_inversion_with_templates_trains_on_captions_without_the_token(tiny_sd15, example_data, tmp_path,
                                                                               caplog):
    out = tmp_path / "ti"
    cfg = run_config(tiny_sd15, example_data, out, *TI, "embedding.templates=style", "train.max_steps=2",
                     "embedding.lr=1e-2")
    with caplog.at_level(logging.INFO, logger="lora_trainer"):
        from lora_trainer.training.loop import train

        result = train(cfg, show_progress=False)
    assert result.adapter_paths == [] and result.steps == 2
    path = out / "embeddings" / "ohwx.safetensors"
    assert [p.name for p in (out / "embeddings").iterdir()] == ["ohwx.safetensors"]
    with safetensors.safe_open(str(path), "pt") as fh:
        assert fh.metadata()["ss_caption_templates"] == "style" and fh.get_tensor("emb_params").shape == (1, 32)
    rows = [json.loads(line) for line in (out / "captions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 8 and not any("ohwx" in r["caption"] for r in rows)  # the images' own captions
    assert "every image is captioned by a template naming 'ohwx'" in caplog.text
    assert "text embeddings are not cached: embedding.templates draws" in caplog.text
    # without templates the same run is refused: no caption names the token
    with pytest.raises(ConfigError, match="'ohwx' is in none of the 8 training captions"):
        train(run_config(tiny_sd15, example_data, tmp_path / "plain", *TI, "train.max_steps=2"), show_progress=False)


def test_images_without_captions_need_none_with_templates(tiny_sd15, example_data, tmp_path, caplog):
    """Templates caption every image, so uncaptioned images are neither warned about nor left empty."""
    import shutil

    from lora_trainer.data.prepare import prepare_examples

    (tmp_path / "img").mkdir()
    for image in example_data.glob("*.png"):
        shutil.copy(image, tmp_path / "img" / image.name)

    def prepared(*overrides: str) -> str:
        caplog.clear()
        cfg = run_config(tiny_sd15, tmp_path / "img", tmp_path / "out", *TI, *overrides)
        with caplog.at_level(logging.INFO, logger="lora_trainer"):
            assert len(prepare_examples(cfg, False)) == 8
        return caplog.text

    assert "8 image(s) have no caption" in prepared() and "have no caption" not in prepared("embedding.templates=object")
