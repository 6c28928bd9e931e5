"""data.weighted_captions: captions read `(word:1.3)`, `(word)`, `[word]` as infer.py reads a prompt
(kohya's --weighted_captions); off, the brackets stay literal text, as before."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import safetensors
import torch
from conftest import run_config

from lora_trainer.config import ModelConfig, load_config
from lora_trainer.textencode import comma_in_brackets, encode_windows, literal_windows, plain_text

CPU = torch.device("cpu")
WEIGHTED = "a (red:1.5) circle"


@pytest.fixture(scope="module")
def bases(tiny_sd15, tiny_sdxl):
    from lora_trainer.models.loading import load_base

    return {v: load_base(ModelConfig(base=str(p)), torch.float32) for v, p in (("sd15", tiny_sd15), ("sdxl", tiny_sdxl))}


def _train_encode(base, captions, weighted, clip_skip=1, max_token_length=75):
    from lora_trainer.training.conditioning import encode_prompts

    with torch.no_grad():
        return encode_prompts(base, base.text_encoders, captions, CPU, clip_skip, max_token_length, weighted)


@pytest.mark.parametrize("variant", ["sd15", "sdxl"])
@pytest.mark.parametrize("clip_skip", [1, 2])
def test_weighted_caption_trains_on_what_inference_encodes(bases, variant, clip_skip):
    from lora_trainer.inference.prompts import encode_prompt

    base = bases[variant]
    encoders = list(zip((base.tokenizer, base.tokenizer_2), base.text_encoders))
    inferred = encode_prompt(encoders, WEIGHTED, clip_skip, sdxl=variant == "sdxl")
    trained = _train_encode(base, [WEIGHTED], True, clip_skip)
    torch.testing.assert_close(trained[0], inferred.embeds, rtol=1e-6, atol=1e-7)
    unweighted = _train_encode(base, ["a red circle"], False, clip_skip)
    assert (trained[0] - unweighted[0]).abs().max() > 1e-3  # the emphasis changes the embedding
    if variant == "sdxl":  # the pooled output is the unweighted first window's, as inference's
        torch.testing.assert_close(trained[1], inferred.pooled, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(trained[1], unweighted[1], rtol=1e-6, atol=1e-7)


def test_flag_off_encodes_the_brackets_as_literal_text(bases):
    base = bases["sd15"]
    literal = _train_encode(base, [WEIGHTED], False)[0]
    ids = torch.tensor([literal_windows(base.tokenizer, WEIGHTED, 1)])
    assert "(red:1.5)" in base.tokenizer.decode(ids.flatten().tolist(), skip_special_tokens=True).replace(" ", "")
    with torch.no_grad():
        assert torch.equal(literal, encode_windows(base.text_encoder, ids, 1, False)[0])
    assert not torch.allclose(literal, _train_encode(base, [WEIGHTED], True)[0])


def test_plain_captions_are_bit_identical_and_batches_do_not_mix_weights(bases):
    base = bases["sdxl"]
    plain = "geoshape, a blue square"
    on = _train_encode(base, [plain, WEIGHTED], True)
    assert torch.equal(on[0][0], _train_encode(base, [plain, WEIGHTED], False)[0][0])
    torch.testing.assert_close(on[0][1], _train_encode(base, [WEIGHTED], True)[0][0], rtol=1e-6, atol=1e-7)


def test_long_weighted_captions_match_inference_window_by_window(bases):
    from lora_trainer.inference.prompts import encode_prompt

    base = bases["sd15"]
    words = " ".join(chr(ord("a") + i % 26) for i in range(90))
    caption = f"{words} (shiny:1.4) [dull]"
    encoders = [(base.tokenizer, base.text_encoder)]
    trained = _train_encode(base, [caption], True, clip_skip=2, max_token_length=150)[0]
    torch.testing.assert_close(trained, encode_prompt(encoders, caption, 2, chunks=2).embeds, rtol=1e-6, atol=1e-7)


def test_plain_text_and_comma_checks():
    assert plain_text("a (red:1.5) circle, [[dull]] BREAK x") == "a red circle, dull x"
    assert plain_text("\\(literal\\)") == "(literal)"
    assert comma_in_brackets("(red, blue:1.2), green") and comma_in_brackets("[a, b]")
    assert not comma_in_brackets("(red:1.2), green, \\(a, b\\)")


def test_comma_inside_brackets_warns_once_with_shuffling(caplog):
    from lora_trainer.data.dataset import Example
    from lora_trainer.training.loaders import warn_split_weights

    base = ["model.base=m", "data.path=d", "train.max_steps=1", "data.weighted_captions=true"]
    examples = [Example(Path("a.png"), "(red, blue:1.2), circle"), Example(Path("b.png"), "(x, y)")]
    with caplog.at_level(logging.WARNING):
        warn_split_weights(load_config(None, base), examples)  # no shuffling, no dropout: nothing is split
        assert not caplog.records
        warn_split_weights(load_config(None, [*base, "data.shuffle_tags=true"]), examples)
    assert len(caplog.records) == 1 and "2 caption(s)" in caplog.text and "a.png" in caplog.text


def test_check_data_counts_tokens_without_the_weight_syntax(tmp_path, bases):
    from PIL import Image

    from lora_trainer.data.checks import check_dataset

    Image.new("RGB", (64, 64), "red").save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("((red:1.5)) circle")
    tok = bases["sd15"].tokenizer
    weighted = check_dataset(tmp_path, 64, tok, weighted_captions=True)
    literal = check_dataset(tmp_path, 64, tok)
    assert weighted.max_tokens == len(tok("red circle", add_special_tokens=False).input_ids)
    assert literal.max_tokens > weighted.max_tokens


def test_kohya_weighted_captions_flag_maps_without_a_note():
    from lora_trainer.kohya.mapping import config_from_kohya
    from lora_trainer.kohya.setup import parse_command_line

    cfg, notes = config_from_kohya(parse_command_line(
        "python train_network.py --pretrained_model_name_or_path m --train_data_dir d --network_dim 4 "
        "--network_alpha 4 --learning_rate 1e-4 --max_train_steps 10 --caption_extension .txt --weighted_captions"))
    assert cfg["data"]["weighted_captions"] is True and notes == []


def test_a_short_run_trains_with_weighted_captions(tiny_sdxl, example_data, tmp_path):
    """On the tiny SDXL base: the tiny SD1.5 text encoder's final LayerNorm (weight 1, bias 0) makes
    every window's mean 0, where A1111's restore-the-mean rule is undefined (real CLIP's is not 0)."""
    from lora_trainer.training.loop import train

    cfg = run_config(tiny_sdxl, example_data, tmp_path / "out", "train.max_steps=2", "sample.prompts=[]",
                     "data.weighted_captions=true", "data.caption_prefix=(geoshape:1.3), ")
    result = train(cfg, show_progress=False)
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    with safetensors.safe_open(str(result.adapter_paths[0]), "pt") as f:
        assert f.metadata()["ss_weighted_captions"] == "True"


def test_non_boolean_options_are_one_line_errors_naming_the_key():
    from lora_trainer.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.base=m", "data.path=d", "train.max_steps=1", "data.weighted_captions=maybe",
                           "data.alpha_mask=2"])
    lines = str(err.value).splitlines()
    assert len(lines) == 2 and lines[0].startswith("data.weighted_captions: got 'maybe'")
    assert lines[1].startswith("data.alpha_mask: got 2")
