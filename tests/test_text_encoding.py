"""Captions as training reads them: clip skip (model.clip_skip) and long captions in 75-token
windows (model.max_token_length), with one definition shared by training and inference."""

from __future__ import annotations

import shutil

import pytest
import safetensors
import torch
from conftest import run_config

from lora_trainer.config import ModelConfig
from lora_trainer.textencode import CHUNK, literal_windows

CPU = torch.device("cpu")
WORDS = [chr(ord("a") + i % 26) for i in range(90)]  # 90 one-token words (single letters), no commas
LONG = " ".join(WORDS)  # 90 tokens: two windows
TAGS = ", ".join(WORDS[:60])  # 119 tokens with a comma every other token: A1111 breaks at a comma


@pytest.fixture(scope="module")
def sd15(tiny_sd15):
    from lora_trainer.models.loading import load_base

    return load_base(ModelConfig(base=str(tiny_sd15)), torch.float32)


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl):
    from lora_trainer.models.loading import load_base

    return load_base(ModelConfig(base=str(tiny_sdxl)), torch.float32)


def _encode(base, captions, clip_skip=1, max_token_length=75):
    from lora_trainer.training.conditioning import encode_prompts

    with torch.no_grad():
        return encode_prompts(base, base.text_encoders, captions, CPU, clip_skip, max_token_length)


def _ids(tokenizer, captions):
    return tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def _before(base, captions):
    """What training computed before clip skip and long captions existed: 77 tokens, SD1.x's last
    hidden state, SDXL's penultimate ones and the second encoder's projected pooled output."""
    with torch.no_grad():
        if base.variant != "sdxl":
            return (base.text_encoder(_ids(base.tokenizer, captions))[0],)
        one = base.text_encoder(_ids(base.tokenizer, captions), output_hidden_states=True)
        two = base.text_encoder_2(_ids(base.tokenizer_2, captions), output_hidden_states=True)
        return torch.cat([one.hidden_states[-2], two.hidden_states[-2]], dim=-1), two[0]


def test_tiny_tokenizers_have_clips_77_token_context(sd15, sdxl):
    assert {t.model_max_length for t in (sd15.tokenizer, sdxl.tokenizer, sdxl.tokenizer_2)} == {CHUNK + 2}
    assert len(sd15.tokenizer(LONG, add_special_tokens=False).input_ids) == 90
    assert len(sd15.tokenizer(TAGS, add_special_tokens=False).input_ids) == 119


def test_clip_skip_2_is_the_penultimate_layer_through_the_final_layernorm_on_sd15(sd15):
    captions = ["a red circle", "geoshape, a blue square"]
    (got,) = _encode(sd15, captions, clip_skip=2)
    with torch.no_grad():
        out = sd15.text_encoder(_ids(sd15.tokenizer, captions), output_hidden_states=True)
        text_model = getattr(sd15.text_encoder, "text_model", sd15.text_encoder)
        want = text_model.final_layer_norm(out.hidden_states[-2])
    assert torch.equal(got, want)
    assert not torch.allclose(got, _encode(sd15, captions)[0])


def test_clip_skip_2_is_one_layer_before_the_penultimate_on_sdxl(sdxl):
    captions = ["a red circle", ""]
    got, pooled = _encode(sdxl, captions, clip_skip=2)
    with torch.no_grad():
        one = sdxl.text_encoder(_ids(sdxl.tokenizer, captions), output_hidden_states=True)
        two = sdxl.text_encoder_2(_ids(sdxl.tokenizer_2, captions), output_hidden_states=True)
    assert torch.equal(got, torch.cat([one.hidden_states[-3], two.hidden_states[-3]], dim=-1))
    assert torch.equal(pooled, two.text_embeds)  # the pooled embedding is the model's, whatever the skip


@pytest.mark.parametrize("variant", ["sd15", "sdxl"])
def test_max_token_length_75_is_exactly_the_old_encoding(variant, request):
    base = request.getfixturevalue(variant)
    captions = ["geoshape, a red circle", LONG, TAGS, ""]  # short, cut without commas, cut among commas
    got, want = _encode(base, captions), _before(base, captions)
    assert len(got) == len(want) and all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize("variant", ["sd15", "sdxl"])
def test_long_caption_reads_two_windows_the_first_being_the_truncated_caption(variant, request):
    base = request.getfixturevalue(variant)
    long = _encode(base, [LONG, "a red circle"], max_token_length=150)
    truncated = _before(base, [LONG])
    assert long[0].shape[:2] == (2, 154)
    torch.testing.assert_close(long[0][:1, :77], truncated[0], rtol=0, atol=1e-6)
    if variant == "sdxl":  # pooled: the first window's, as kohya keeps it
        torch.testing.assert_close(long[1][:1], truncated[1], rtol=0, atol=1e-6)
    # The second window holds the rest of the caption: not the empty window a short caption gets.
    empty = _before(base, [""])[0]
    torch.testing.assert_close(long[0][1:, 77:], empty, rtol=0, atol=1e-6)
    assert not torch.allclose(long[0][:1, 77:], empty)


def test_captions_are_literal_text_and_windows_are_fixed_in_number(sd15):
    tok = sd15.tokenizer
    weighted = literal_windows(tok, "(red:1.5) circle BREAK square", 2)
    plain = tok("(red:1.5) circle BREAK square", add_special_tokens=False).input_ids
    assert len(weighted) == 2 and weighted[0][1:len(plain) + 1] == plain  # brackets and BREAK are tokens
    assert weighted[1] == literal_windows(tok, "", 1)[0]
    three = literal_windows(tok, " ".join(WORDS * 3), 3)  # 270 tokens: cut after 225
    assert [len(w) for w in three] == [77] * 3 and three[2][-1] == tok.eos_token_id


@pytest.mark.parametrize("variant", ["sd15", "sdxl"])
@pytest.mark.parametrize("clip_skip", [1, 2])
def test_training_and_inference_read_a_prompt_the_same_way(variant, clip_skip, request):
    from lora_trainer.inference.prompts import encode_prompt

    base = request.getfixturevalue(variant)
    encoders = list(zip((base.tokenizer, base.tokenizer_2), base.text_encoders))
    for prompt in ("geoshape, a red circle", TAGS):
        trained = _encode(base, [prompt], clip_skip, max_token_length=225)
        inferred = encode_prompt(encoders, prompt, clip_skip, sdxl=variant == "sdxl", chunks=3)
        torch.testing.assert_close(trained[0], inferred.embeds, rtol=1e-5, atol=1e-6)
        if variant == "sdxl":
            torch.testing.assert_close(trained[1], inferred.pooled, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["sd15", "sdxl"])
def test_samples_read_prompts_as_the_pipeline_does_by_default_and_as_training_with_clip_skip(variant, request):
    from lora_trainer.training.conditioning import pipeline_prompt_embeds
    from lora_trainer.training.outputs import sampling_pipeline

    base = request.getfixturevalue(variant)
    pipe = sampling_pipeline(base)
    got = pipeline_prompt_embeds(base, pipe, ["a red circle"], "")
    # what samples were drawn with before: the pipeline's own encoding, negative_prompt None
    want = pipe.encode_prompt("a red circle", device=CPU, num_images_per_prompt=1, do_classifier_free_guidance=True)
    names = ["prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"]
    assert len(got) == len(want) and all(torch.equal(got[n], w) for n, w in zip(names, want))
    skipped = pipeline_prompt_embeds(base, pipe, [TAGS], "blurry", clip_skip=2, max_token_length=150)
    trained = _encode(base, [TAGS], clip_skip=2, max_token_length=150)
    assert torch.equal(skipped["prompt_embeds"], trained[0]) and skipped["prompt_embeds"].shape[1] == 154
    assert torch.equal(skipped["negative_prompt_embeds"], _encode(base, ["blurry"], 2, 150)[0])


def test_text_encoder_adapters_learn_from_every_window(tiny_sd15):
    from lora_trainer.models.loading import load_base
    from lora_trainer.models.lora import inject_lora, trainable_parameters
    from lora_trainer.training.conditioning import encode_prompts

    base = load_base(ModelConfig(base=str(tiny_sd15)), torch.float32)
    inject_lora(base.text_encoder, ["q_proj", "v_proj"], 4, 4.0, 0.0, "lora.text_encoder_targets")
    with torch.no_grad():  # B starts at zero; make it non-zero so A gets gradients too
        for p in trainable_parameters(base.text_encoder):
            p.add_(0.01)
    (hidden,) = encode_prompts(base, [base.text_encoder], [LONG], CPU, clip_skip=2, max_token_length=150)
    hidden[:, 77:].pow(2).mean().backward()  # a loss on the second window only
    last = f"layers.{base.text_encoder.config.num_hidden_layers - 1}."
    grads = {name: p.grad for name, p in base.text_encoder.named_parameters() if p.requires_grad}
    # Every adapter below the skipped layer learns; the skipped layer's cannot (its output is unused).
    assert all(g is not None and float(g.abs().sum()) > 0 for n, g in grads.items() if last not in n)
    assert all(g is None for n, g in grads.items() if last in n)


def test_clip_skip_beyond_the_encoder_is_a_config_error(sd15):
    from lora_trainer.errors import ConfigError
    from lora_trainer.training.conditioning import check_clip_skip

    layers = sd15.text_encoder.config.num_hidden_layers
    check_clip_skip(layers, sd15.text_encoders)
    with pytest.raises(ConfigError, match=r"model.clip_skip: got 3; expected 1 to 2"):
        check_clip_skip(layers + 1, sd15.text_encoders)


@pytest.fixture(scope="module")
def long_captions(example_data, tmp_path_factory):
    """The example images, two of them with captions past 75 tokens."""
    data = tmp_path_factory.mktemp("long-captions")
    for i, png in enumerate(sorted(example_data.glob("*.png"))):
        shutil.copy(png, data / png.name)
        text = (example_data / f"{png.stem}.txt").read_text(encoding="utf-8")
        (data / f"{png.stem}.txt").write_text(text + (", " + TAGS if i < 2 else ""), encoding="utf-8")
    return data


def _metadata(path):
    with safetensors.safe_open(str(path), "pt") as fh:
        return fh.metadata()


def test_sd15_run_with_clip_skip_2_and_long_captions(tiny_sd15, long_captions, tmp_path):
    from PIL import Image

    from lora_trainer.inference.adapters import parse_adapter_spec
    from lora_trainer.inference.command import clip_skip_hint
    from lora_trainer.pnginfo import parse_a1111_parameters
    from lora_trainer.training.loop import train

    cfg = run_config(tiny_sd15, long_captions, tmp_path / "out", "model.clip_skip=2", "model.max_token_length=150",
                     "train.max_steps=3", "sample.steps=2", "sample.grid_weights=[]")
    result = train(cfg, show_progress=False)
    assert result.steps == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    meta = _metadata(result.adapter_paths[0])
    assert (meta["ss_clip_skip"], meta["ss_max_token_length"], meta["modelspec.encoder_layer"]) == ("2", "150", "2")
    sample = next((tmp_path / "out" / "samples").rglob("*.png"))
    assert parse_a1111_parameters(Image.open(sample).info["parameters"]).clip_skip == 2
    # infer without --clip-skip says the adapter wants 2 (and changes nothing)
    hints = clip_skip_hint([parse_adapter_spec(str(result.adapter_paths[0]))])
    assert len(hints) == 1 and "--clip-skip 2" in hints[0]


def test_sdxl_run_with_clip_skip_2_and_long_captions(tiny_sdxl, long_captions, tmp_path):
    from lora_trainer.training.loop import train

    cfg = run_config(tiny_sdxl, long_captions, tmp_path / "out", "model.clip_skip=2", "model.max_token_length=150",
                     "lora.train_text_encoder=true", "train.max_steps=2", "sample.prompts=[]")
    result = train(cfg, show_progress=False)
    assert result.steps == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    meta = _metadata(result.adapter_paths[0])
    assert (meta["ss_clip_skip"], meta["ss_max_token_length"], meta["modelspec.encoder_layer"]) == ("2", "150", "2")
