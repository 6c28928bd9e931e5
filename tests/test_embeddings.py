"""Textual-inversion embeddings (`--embedding FILE[:TOKEN]`): each file layout, multi-vector words in
weighted prompts, windows and clip skip, SDXL's two encoders, checked against diffusers' own
textual-inversion loader or against prompts whose words have the same vectors; refusals come
before the base loads, in one line."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from infer_helpers import one_line_error, run_infer
from lora_trainer.cli import main
from lora_trainer.errors import ModelError
from lora_trainer.inference.embeddings import (EmbeddingSpec, load_embeddings, parse_embedding_spec, read_embedding,
                                               word_tables)
from lora_trainer.inference.generate import Generator, Request
from lora_trainer.inference.prompts import CHUNK, apply_weights, chunk_tokens, encode_pair, encode_prompt
from lora_trainer.textencode import PLACEHOLDER

VECTORS = 3


def _vectors(n: int, width: int, seed: int) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def sd15_pipe(tiny_sd15):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_sd15, safety_checker=None, requires_safety_checker=False)


@pytest.fixture(scope="module")
def sd15_file(tmp_path_factory):
    """A1111/kohya layout, three vectors, named mytok by its file."""
    path = tmp_path_factory.mktemp("emb") / "mytok.safetensors"
    save_file({"emb_params": _vectors(VECTORS, 32, 0)}, str(path))
    return path


def _diffusers_reference(tiny_sd15, vectors, prompt, clip_skip=1):
    """diffusers' own loader: the token added to the tokenizer, N new rows in the embedding table,
    the prompt rewritten to N tokens (maybe_convert_prompt), encoded by diffusers' encode_prompt,
    or, with clip skip, by ours without embeddings (diffusers' clip skip reads `text_model`, which
    transformers 5 no longer has)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15, safety_checker=None, requires_safety_checker=False)
    pipe.load_textual_inversion(vectors, token="mytok")
    if clip_skip == 1:
        return pipe.encode_prompt(prompt, "cpu", 1, False)[0]
    return encode_prompt([(pipe.tokenizer, pipe.text_encoder)], pipe.maybe_convert_prompt(prompt, pipe.tokenizer),
                         clip_skip=clip_skip).embeds


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_multi_vector_embedding_encodes_as_diffusers_textual_inversion(sd15_pipe, sd15_file, tiny_sd15, clip_skip):
    emb = load_embeddings([str(sd15_file)])
    assert emb[0].token == "mytok" and emb[0].vectors == VECTORS
    words = word_tables(emb, sd15_pipe, "sd15")
    ours = encode_prompt([(sd15_pipe.tokenizer, sd15_pipe.text_encoder)], "a mytok photo", clip_skip=clip_skip,
                         words=words)
    theirs = _diffusers_reference(tiny_sd15, emb[0].parts["clip"], "a mytok photo", clip_skip)
    torch.testing.assert_close(ours.embeds, theirs, rtol=0, atol=1e-5)
    assert ours.used == ["mytok"]
    plain = encode_prompt([(sd15_pipe.tokenizer, sd15_pipe.text_encoder)], "a mytok photo", clip_skip=clip_skip)
    assert not torch.allclose(plain.embeds, ours.embeds)


def test_a_weighted_embedding_scales_all_of_its_vectors(sd15_pipe, sd15_file, tiny_sd15):
    words = word_tables(load_embeddings([str(sd15_file)]), sd15_pipe, "sd15")
    ours = encode_prompt([(sd15_pipe.tokenizer, sd15_pipe.text_encoder)], "a (MyTok:1.3) photo", words=words).embeds
    plain = _diffusers_reference(tiny_sd15, read_embedding(EmbeddingSpec(sd15_file)).parts["clip"], "a mytok photo")
    weights = torch.ones(1, CHUNK + 2)
    weights[0, 2:2 + VECTORS] = 1.3  # [BOS] a, then the three vectors
    torch.testing.assert_close(ours, apply_weights(plain, weights), rtol=0, atol=1e-5)


def test_each_layout_reads_the_same_vectors(tmp_path):
    vectors = _vectors(2, 32, 1)
    files = {"a1111.safetensors": {"emb_params": vectors},
             "string.safetensors": {"string_to_param.*": vectors},
             "learned_embeds.safetensors": {"<cat-toy>": vectors}}
    for name, tensors in files.items():
        save_file(tensors, str(tmp_path / name))
    read = {name: read_embedding(parse_embedding_spec(str(tmp_path / name))) for name in files}
    for e in read.values():
        assert torch.equal(e.parts["clip"], vectors)
    # the stem, as in A1111; diffusers' learned_embeds files carry their token inside
    assert [e.token for e in read.values()] == ["a1111", "string", "<cat-toy>"]
    save_file({"<one>": vectors[0]}, str(tmp_path / "one.safetensors"))  # a single 1-D vector
    one = read_embedding(parse_embedding_spec(f"{tmp_path / 'one.safetensors'}:single"))
    assert one.token == "single" and torch.equal(one.parts["clip"], vectors[:1])


def test_inspect_reads_an_embeddings_tensors_once(tmp_path, monkeypatch):
    import safetensors
    import safetensors.torch

    from lora_trainer.export.inspect import inspect_adapter

    reads = []

    class Counted:  # safetensors.safe_open, counting the tensors read through it
        def __init__(self, *args, **kwargs):
            self.inner = opened(*args, **kwargs)

        def __enter__(self):
            self.file = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def get_tensor(self, key):
            reads.append(key)
            return self.file.get_tensor(key)

        def __getattr__(self, name):
            return getattr(self.file, name)

    opened, load_file = safetensors.safe_open, safetensors.torch.load_file
    monkeypatch.setattr(safetensors, "safe_open", Counted)
    monkeypatch.setattr(safetensors.torch, "load_file", lambda *a, **k: reads.append("load_file") or load_file(*a, **k))
    for name, tensors in (("mytok", {"emb_params": _vectors(2, 32, 1)}),
                          ("xl", {"clip_l": _vectors(2, 32, 2), "clip_g": _vectors(2, 64, 3)})):
        save_file(tensors, str(tmp_path / f"{name}.safetensors"), metadata={"token": name})
        reads.clear()
        report = inspect_adapter(tmp_path / f"{name}.safetensors")
        assert sorted(reads) == sorted(tensors)  # each tensor once: no second pass for the dtypes or the vectors
        assert (report["token"], report["vectors"], report["dtypes"]) == (name, 2, ["float32"])


def test_an_embedding_stays_in_one_window_and_other_words_are_not_it(sd15_pipe, sd15_file):
    tok = sd15_pipe.tokenizer
    words = word_tables(load_embeddings([str(sd15_file)]), sd15_pipe, "sd15")[0]
    filler = tok("x " * 100, add_special_tokens=False).input_ids[:CHUNK - 1]
    text = tok.decode(filler) + " mytok BREAK mytok"
    chunks = chunk_tokens(tok, text, words)
    # 74 tokens leave one place: the three vectors start the second window, BREAK a third
    assert len(chunks.ids) == 3 and chunks.ids[0][1:CHUNK] == filler
    assert chunks.ids[1][1:1 + VECTORS] == [PLACEHOLDER] * VECTORS and sorted(chunks.vectors[1]) == [1, 2, 3]
    assert sorted(chunks.vectors[2]) == [1, 2, 3] and chunks.vectors[0] == {}
    torch.testing.assert_close(torch.stack([chunks.vectors[1][p] for p in (1, 2, 3)]),
                               words[next(iter(words))][1])
    # a longer word is another word: mytokx is not the embedding
    other = chunk_tokens(tok, "mytokx", words)
    assert other.used == [] and other.ids == chunk_tokens(tok, "mytokx").ids


def test_sdxl_embedding_gives_each_encoder_its_vectors(tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    clip_l, clip_g = _vectors(2, 32, 3), _vectors(2, 32, 4)
    path = tmp_path / "xltok.safetensors"
    save_file({"clip_l": clip_l, "clip_g": clip_g}, str(path))
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    encoders = [(pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)]
    words = word_tables(load_embeddings([str(path)]), pipe, "sdxl")
    pos, neg = encode_pair(encoders, "a xltok photo", "xltok", sdxl=True, words=words)
    ref = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    ref.load_textual_inversion(clip_l, token="xltok", text_encoder=ref.text_encoder, tokenizer=ref.tokenizer)
    ref.load_textual_inversion(clip_g, token="xltok", text_encoder=ref.text_encoder_2, tokenizer=ref.tokenizer_2)
    want, want_neg, want_pooled, want_neg_pooled = ref.encode_prompt(
        "a xltok photo", device="cpu", do_classifier_free_guidance=True, negative_prompt="xltok")
    for got, expected in ((pos.embeds, want), (pos.pooled, want_pooled), (neg.embeds, want_neg),
                          (neg.pooled, want_neg_pooled)):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_embedding_of_a_phrases_own_vectors_draws_that_phrase_in_every_job(tiny_sd15, random_adapters,
                                                                           tiny_controlnet, tmp_path):
    """An embedding holding the table rows of "red circle" must draw exactly what "red circle" draws:
    with a merged LoRA and a ControlNet, in txt2img and img2img (the jobs share the prompt path)."""
    from transformers import CLIPTextModel, CLIPTokenizer
    from PIL import Image

    tok = CLIPTokenizer.from_pretrained(tiny_sd15, subfolder="tokenizer")
    table = CLIPTextModel.from_pretrained(tiny_sd15, subfolder="text_encoder").get_input_embeddings().weight
    rows = table[tok("red circle", add_special_tokens=False).input_ids].detach().clone()
    save_file({"emb_params": rows}, str(tmp_path / "shape.safetensors"))
    gen = Generator(tiny_sd15, [str(random_adapters["a"])], controlnet=tiny_controlnet, device="cpu",
                    embeddings=[f"{tmp_path / 'shape.safetensors'}:redcircle"])
    gen.merge()
    picture = Image.new("RGB", (64, 64), (40, 90, 200))
    fast = dict(steps=2, width=64, height=64, seed=3, control_image=picture)
    for extra in ({}, {"init_image": picture, "strength": 0.5}):
        got = gen.generate(Request(prompt="a redcircle", negative_prompt="(redcircle:0.8)", **fast, **extra),
                           output_type="latent")[0]
        want = gen.generate(Request(prompt="a red circle", negative_prompt="(red circle:0.8)", **fast, **extra),
                            output_type="latent")[0]
        assert torch.equal(got.image, want.image)
        assert got.info.embeddings == [("redcircle", got.info.embeddings[0][1])] and want.info.embeddings == []


def test_infer_writes_ti_hashes_as_a1111(tiny_sd15, sd15_file, tmp_path):
    from PIL import Image

    from lora_trainer.pnginfo import parse_a1111_parameters

    assert run_infer(tmp_path, tiny_sd15, "--embedding", str(sd15_file), "--negative-prompt", "MyTok, blurry") == 0
    text = Image.open(next((tmp_path / "out").glob("*.png"))).text["parameters"]
    short = hashlib.sha256(sd15_file.read_bytes()).hexdigest()[:12]
    assert f'TI hashes: "mytok: {short}"' in text
    assert parse_a1111_parameters(text).embeddings == [("mytok", short)]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, random_adapters):
    root = tmp_path_factory.mktemp("bad")
    save_file({"emb_params": _vectors(2, 48, 0)}, str(root / "wide.safetensors"))
    save_file({"emb_params": _vectors(2, 32, 0)}, str(root / "sd1.safetensors"))
    save_file({"clip_l": _vectors(2, 32, 0), "clip_g": _vectors(1, 32, 0)}, str(root / "uneven.safetensors"))
    torch.save({"string_to_param": {"*": _vectors(2, 32, 0)}}, root / "EasyNegative.pt")
    return root


@pytest.mark.parametrize("name, says", [
    ("EasyNegative.pt", "is a pickle (.pt)"),
    ("missing.safetensors", "file not found"),
    ("uneven.safetensors", "2 clip_l vectors but 1 clip_g"),
    ("adapter", "is not a textual-inversion embedding"),
])
def test_unreadable_embeddings_are_refused_before_the_base_loads(bad_files, random_adapters, tmp_path, capsys,
                                                                 name, says):
    path = random_adapters["a"] if name == "adapter" else bad_files / name
    # the base does not exist: an error about the embedding means it was checked first
    assert run_infer(tmp_path, tmp_path / "no-base", "--embedding", str(path)) == 2
    err = one_line_error(capsys)
    assert err.startswith(f"error: --embedding: {path}") and says in err


@pytest.mark.parametrize("base, name, says", [
    ("sd15", "wide.safetensors", "a text encoder of width 48"),
    ("sdxl", "sd1.safetensors", "SDXL, which reads clip_l (32-wide) and clip_g (32-wide) vectors"),
])
def test_an_embedding_for_another_base_is_refused_in_one_line(tiny_sd15, tiny_sdxl, bad_files, tmp_path, capsys,
                                                              base, name, says):
    model = tiny_sd15 if base == "sd15" else tiny_sdxl
    assert run_infer(tmp_path, model, "--embedding", str(bad_files / name)) == 2
    err = one_line_error(capsys)
    assert err.startswith(f"error: --embedding: {bad_files / name} is an embedding for") and says in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_two_files_for_one_token_are_refused(sd15_file):
    with pytest.raises(ModelError, match="both use the token 'MyTok'"):
        load_embeddings([str(sd15_file), f"{sd15_file}:MyTok"])


def test_sdxl_embedding_of_a_phrases_vectors_draws_that_phrase_through_the_refiner(tiny_sdxl, tmp_path):
    """clip_l and clip_g holding each encoder's table rows of "red circle": base and refiner (which
    reads clip_g alone) draw exactly what the phrase draws."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from lora_trainer.testing.inference_models import make_sdxl_refiner

    parts = {}
    for part, sub, cls in (("clip_l", "", CLIPTextModel), ("clip_g", "_2", CLIPTextModelWithProjection)):
        tok = CLIPTokenizer.from_pretrained(tiny_sdxl, subfolder=f"tokenizer{sub}")
        table = cls.from_pretrained(tiny_sdxl, subfolder=f"text_encoder{sub}").get_input_embeddings().weight
        parts[part] = table[tok("red circle", add_special_tokens=False).input_ids].detach().clone()
    save_file(parts, str(tmp_path / "redcircle.safetensors"))
    gen = Generator(tiny_sdxl, refiner=make_sdxl_refiner(tiny_sdxl, tmp_path / "refiner"), device="cpu",
                    embeddings=[str(tmp_path / "redcircle.safetensors")])
    fast = dict(steps=2, width=64, height=64, seed=3, refiner_start=0.5)
    got = gen.generate(Request(prompt="a RedCircle", negative_prompt="blurry", **fast), output_type="latent")[0]
    want = gen.generate(Request(prompt="a red circle", negative_prompt="blurry", **fast), output_type="latent")[0]
    assert torch.equal(got.image, want.image)
    assert [name for name, _ in got.info.embeddings] == ["redcircle"]


def test_embedding_spec_parsing(tmp_path):
    assert parse_embedding_spec("neg.safetensors") == EmbeddingSpec(Path("neg.safetensors"))
    assert parse_embedding_spec("neg.safetensors:bad-hands") == EmbeddingSpec(Path("neg.safetensors"), "bad-hands")
    odd = tmp_path / "a:b.safetensors"  # an existing file is read whole, colon and all
    odd.touch()
    assert parse_embedding_spec(str(odd)) == EmbeddingSpec(odd)
    with pytest.raises(ModelError, match="^--embedding 'neg.safetensors:': nothing after the ':'"):
        parse_embedding_spec("neg.safetensors:")


@pytest.mark.parametrize("first, second", [("my-style", "my - style"), ("caf\u00e9", "cafe\u0301")])
def test_two_tokens_the_tokenizer_reads_as_one_word_are_refused(tiny_sd15, sd15_file, tmp_path, capsys,
                                                                 first, second):
    # punctuation spacing and Unicode normalisation (a macOS NFD file stem) give the same token ids:
    # without the check the second file silently replaced the first in every prompt
    assert run_infer(tmp_path, tiny_sd15, "--embedding", f"{sd15_file}:{first}",
                     "--embedding", f"{sd15_file}:{second}") == 2
    err = one_line_error(capsys)
    assert err.startswith(f"error: --embedding: {sd15_file} and {sd15_file} use the tokens {first!r} and {second!r}")
    assert "the same word" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_generator_takes_path_objects_and_one_file_alone(tiny_sd15, random_adapters, sd15_file):
    # Path objects raised AttributeError, and one string alone was read letter by letter
    # ("--embedding: m file not found")
    gen = Generator(tiny_sd15, random_adapters["a"], device="cpu", embeddings=sd15_file)
    assert [e.token for e in gen.embeddings] == ["mytok"] and torch.equal(
        gen.embeddings[0].parts["clip"], read_embedding(EmbeddingSpec(sd15_file)).parts["clip"])
    assert list(gen.adapters.specs) == [random_adapters["a"].stem]
    both = Generator(tiny_sd15, [str(random_adapters["a"]), random_adapters["b"]], device="cpu",
                     embeddings=[Path(sd15_file), f"{sd15_file}:other"])
    assert [e.token for e in both.embeddings] == ["mytok", "other"]
    assert list(both.adapters.specs) == [random_adapters["a"].stem, random_adapters["b"].stem]


def test_an_embedding_no_prompt_names_is_warned_about(tiny_sd15, sd15_file, tmp_path, caplog):
    # a misspelt token ("mytokk") drew without the embedding and said nothing
    other = tmp_path / "neg.safetensors"
    save_file({"emb_params": _vectors(2, 32, 5)}, str(other))
    with caplog.at_level("WARNING", logger="lora_trainer.inference.command"):
        assert main(["infer", "--model", str(tiny_sd15), "--prompt", "a (MyTok:1.2) circle", "--negative-prompt",
                     "negg", "--steps", "1", "--width", "64", "--height", "64", "--out", str(tmp_path / "out"),
                     "--embedding", str(sd15_file), "--embedding", str(other)]) == 0
    warned = [r.getMessage() for r in caplog.records if "--embedding" in r.getMessage()]
    assert warned == [f"--embedding: {other}: no prompt uses its token 'neg', so it changes nothing; write neg in "
                      "--prompt or --negative-prompt (case does not matter)"]
