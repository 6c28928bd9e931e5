"""Prompts as A1111 reads them: weight syntax, 75-token windows, scale-then-restore-mean, clip skip;
unweighted prompts encode exactly as diffusers' own `encode_prompt`."""

from __future__ import annotations

import pytest
import torch

from lora_trainer.inference.prompts import CHUNK, apply_weights, chunk_tokens, encode_pair, encode_prompt, parse_weights


@pytest.mark.parametrize("text, want", [
    ("a (cat:1.5) dog", [("a ", 1.0), ("cat", 1.5), (" dog", 1.0)]),
    ("(cat)", [("cat", 1.1)]),
    ("((cat))", [("cat", 1.1 * 1.1)]),
    ("[cat]", [("cat", 1 / 1.1)]),
    ("(a [b] c:2)", [("a ", 2.0), ("b", 2 / 1.1), (" c", 2.0)]),
    (r"\(literal\) \[x\]", [("(literal) [x]", 1.0)]),
    ("(unclosed", [("unclosed", 1.1)]),
    ("stray) ]closers", [("stray closers", 1.0)]),
    ("(x:word)", [("x:word", 1.1)]),
    ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("BREAKFAST", [("BREAKFAST", 1.0)]),
    # a weight of -1 is a weight, not BREAK; a BREAK inside brackets is still a BREAK
    ("(blurry:-1) sky", [("blurry", -1.0), (" sky", 1.0)]),
    ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.0), ("b", 1.1)]),
    ("", [("", 1.0)]),
])
def test_weight_syntax_follows_a1111(text, want):
    got = parse_weights(text)
    assert [t for t, _ in got] == [t for t, _ in want]
    assert [w for _, w in got] == pytest.approx([w for _, w in want])


@pytest.fixture(scope="module")
def sd15_pipe(tiny_sd15):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_sd15, safety_checker=None, requires_safety_checker=False)


def test_long_prompt_is_chunked_into_75_token_windows_with_bos_and_eos(sd15_pipe):
    tok = sd15_pipe.tokenizer
    words = " ".join(f"w{i}x" for i in range(60))  # well over 75 tokens, no commas
    chunks = chunk_tokens(tok, words)
    flat = tok(words, add_special_tokens=False).input_ids
    assert len(chunks.ids) == -(-len(flat) // CHUNK) >= 2
    for ids in chunks.ids[:-1]:  # full windows: [BOS] 75 tokens [EOS]
        assert len(ids) == CHUNK + 2 and ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    last = chunks.ids[-1]
    n = len(flat) - CHUNK * (len(chunks.ids) - 1)
    assert len(last) == CHUNK + 2 and last[0] == tok.bos_token_id and last[n + 1] == tok.eos_token_id
    body = [t for ids in chunks.ids[:-1] for t in ids[1:-1]] + last[1:n + 1]
    assert body == flat and set(last[n + 2:]) == {tok.pad_token_id}


def test_full_window_breaks_after_a_recent_comma(sd15_pipe):
    tok = sd15_pipe.tokenizer
    comma = tok.convert_tokens_to_ids(",</w>")
    one = tok("q", add_special_tokens=False).input_ids
    assert len(one) == 1
    text = " ".join(["q"] * 70) + ", " + " ".join(["q"] * 10)  # the comma is token 71
    chunks = chunk_tokens(tok, text)
    first = chunks.ids[0][1:-1]
    assert first[70] == comma and first[71:] == [tok.eos_token_id] + [tok.pad_token_id] * 3  # ends at the comma
    assert chunks.ids[1][1:11] == one * 10
    assert chunk_tokens(tok, "a BREAK b").ids[1][1] == tok("b", add_special_tokens=False).input_ids[0]
    assert len(chunk_tokens(tok, "(a BREAK b)").ids) == 2


def test_a_word_weighted_minus_one_stays_in_its_window(sd15_pipe):
    tok = sd15_pipe.tokenizer
    q = tok("q", add_special_tokens=False).input_ids[0]
    chunks = chunk_tokens(tok, "(q:-1) q")
    assert len(chunks.ids) == 1 and chunks.ids[0][1:3] == [q, q] and chunks.weights[0][1:3] == [-1.0, 1.0]


def test_unweighted_prompt_matches_diffusers_encode_prompt(sd15_pipe):
    ours = encode_prompt([(sd15_pipe.tokenizer, sd15_pipe.text_encoder)], "a red circle")
    theirs, _ = sd15_pipe.encode_prompt("a red circle", "cpu", 1, False)
    assert torch.equal(ours.embeds, theirs)


def test_clip_skip_2_is_the_text_encoder_without_its_last_layer(sd15_pipe, tiny_sd15):
    from transformers import CLIPTextModel

    # Reference: the same weights loaded with one layer fewer; its output passes the final
    # LayerNorm, as A1111's clip skip does. (diffusers' own clip_skip path assumes `.text_model`,
    # which transformers 5 no longer has.)
    layers = sd15_pipe.text_encoder.config.num_hidden_layers
    shorter = CLIPTextModel.from_pretrained(tiny_sd15, subfolder="text_encoder", num_hidden_layers=layers - 1)
    ours = encode_prompt([(sd15_pipe.tokenizer, sd15_pipe.text_encoder)], "a red circle", clip_skip=2)
    want = encode_prompt([(sd15_pipe.tokenizer, shorter)], "a red circle", clip_skip=1)
    torch.testing.assert_close(ours.embeds, want.embeds, rtol=0, atol=1e-6)
    assert not torch.allclose(ours.embeds, encode_prompt([(sd15_pipe.tokenizer, sd15_pipe.text_encoder)],
                                                         "a red circle").embeds)


def test_sdxl_embeddings_and_pooled_match_diffusers(tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    encoders = [(pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)]
    pos, neg = encode_pair(encoders, "a red circle", "blurry", sdxl=True)
    want, want_neg, want_pooled, want_neg_pooled = pipe.encode_prompt(
        "a red circle", device="cpu", do_classifier_free_guidance=True, negative_prompt="blurry")
    torch.testing.assert_close(pos.embeds, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(pos.pooled, want_pooled, rtol=0, atol=1e-6)
    torch.testing.assert_close(neg.embeds, want_neg, rtol=0, atol=1e-6)
    torch.testing.assert_close(neg.pooled, want_neg_pooled, rtol=0, atol=1e-6)
    zeros, zero_neg = encode_pair(encoders, "a red circle", "", sdxl=True, zero_empty_negative=True)
    assert zero_neg.embeds.abs().sum() == 0 and zero_neg.pooled.abs().sum() == 0


def test_weight_scales_its_tokens_then_restores_the_mean(sd15_pipe):
    encoders = [(sd15_pipe.tokenizer, sd15_pipe.text_encoder)]
    plain = encode_prompt(encoders, "a red cat").embeds[0]
    weighted = encode_prompt(encoders, "a red (cat:1.5)").embeds[0]
    cat = sd15_pipe.tokenizer("cat", add_special_tokens=False).input_ids
    n_before = 1 + len(sd15_pipe.tokenizer("a red ", add_special_tokens=False).input_ids)
    positions = list(range(n_before, n_before + len(cat)))
    scale = torch.ones(plain.shape[0])
    scale[positions] = 1.5
    restore = plain.mean() / (plain * scale[:, None]).mean()
    torch.testing.assert_close(weighted, plain * scale[:, None] * restore, rtol=1e-6, atol=1e-7)
    # before the mean is restored, only the cat positions moved
    raw = weighted / restore
    others = [i for i in range(plain.shape[0]) if i not in positions]
    torch.testing.assert_close(raw[others], plain[others], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(raw[positions], 1.5 * plain[positions], rtol=1e-5, atol=1e-6)
    assert apply_weights(plain[None], torch.ones(1, plain.shape[0])) is not None


def test_negative_prompt_is_padded_to_the_positive_length(sd15_pipe):
    encoders = [(sd15_pipe.tokenizer, sd15_pipe.text_encoder)]
    long = ", ".join(f"(tag{i}:1.2)" for i in range(40))
    pos, neg = encode_pair(encoders, long, "blurry")
    assert pos.embeds.shape == neg.embeds.shape and pos.embeds.shape[1] % 77 == 0 and pos.embeds.shape[1] > 77
    short = encode_prompt(encoders, "blurry").embeds
    assert torch.equal(neg.embeds[:, :77], short)


def test_a_zero_mean_window_is_weighted_without_nan():
    z = torch.tensor([[[1.0, -1.0], [2.0, -2.0], [0.5, -0.5]]])  # mean exactly 0
    weights = torch.tensor([[1.5, 1.0, 1.0]])
    out = apply_weights(z, weights)
    assert torch.equal(out, z * torch.tensor([1.5, 1.0, 1.0])[:, None])
    shifted = z + 1.0  # mean 1: restored after weighting
    assert apply_weights(shifted, weights).mean().item() == pytest.approx(1.0)
