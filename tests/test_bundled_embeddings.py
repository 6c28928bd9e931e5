"""Embeddings bundled in a LoRA file (`bundle_emb.<TOKEN>.*`, what pivotal tuning writes and A1111
reads): `--lora` loads them as `--embedding` would load the same vectors and the LoRA part as the
file without them; conflicts are refused in one line; unloading the adapter drops them; `merge`
writes them beside the model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from infer_helpers import one_line_error, run_infer
from lora_trainer.cli import main
from lora_trainer.inference.generate import AdapterSpec, Generator, Request

TOKEN = "pivtok"


def _vectors(n: int, width: int, seed: int) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def add_bundle(src, dst, bundle: dict[str, torch.Tensor]):
    """`src` (an adapter file the suite made) with `bundle` ({key suffix: vectors}) added."""
    tensors = load_file(str(src))
    tensors.update({f"bundle_emb.{k}": v for k, v in bundle.items()})
    save_file(tensors, str(dst))
    return dst


@pytest.fixture(scope="module")
def files(random_adapters, tmp_path_factory):
    """kohya adapter 'a' with 3 bundled vectors for TOKEN, and the same vectors as a standalone file."""
    root = tmp_path_factory.mktemp("bundled")
    vectors = _vectors(3, 32, 7)
    save_file({"emb_params": vectors}, str(root / f"{TOKEN}.safetensors"))
    return {"vectors": vectors, "standalone": root / f"{TOKEN}.safetensors",
            "bundled": add_bundle(random_adapters["a"], root / "pivotal.safetensors",
                                  {f"{TOKEN}.string_to_param.*": vectors})}


def _draw(gen: Generator, prompt: str = f"a {TOKEN} photo", **kw):
    req = Request(prompt=prompt, negative_prompt="blurry", steps=2, width=64, height=64, seed=3, **kw)
    return gen.generate(req)[0]


@pytest.fixture(scope="module")
def bundled_gen(tiny_sd15, files):
    return Generator(tiny_sd15, [files["bundled"]], device="cpu")


def test_a_bundled_embedding_draws_as_the_same_vectors_given_with_embedding(tiny_sd15, random_adapters, files,
                                                                           bundled_gen):
    reference = Generator(tiny_sd15, [random_adapters["a"]], device="cpu", embeddings=[files["standalone"]])
    assert [e.token for e in bundled_gen.all_embeddings()] == [TOKEN] and bundled_gen.embeddings == []
    got, want = _draw(bundled_gen), _draw(reference)
    assert np.array_equal(np.asarray(got.image), np.asarray(want.image))
    embeds, used = bundled_gen._embeds(bundled_gen.pipe, Request(prompt=f"a {TOKEN} photo"))
    ref_embeds, _ = reference._embeds(reference.pipe, Request(prompt=f"a {TOKEN} photo"))
    assert used == [TOKEN] and torch.equal(embeds["prompt_embeds"], ref_embeds["prompt_embeds"])
    # the vectors matter (the word alone encodes otherwise) and so does the LoRA part
    plain = Generator(tiny_sd15, [random_adapters["a"]], device="cpu")
    assert not torch.equal(plain._embeds(plain.pipe, Request(prompt=f"a {TOKEN} photo"))[0]["prompt_embeds"],
                           embeds["prompt_embeds"])
    assert np.array_equal(np.asarray(_draw(plain, "a photo").image), np.asarray(_draw(bundled_gen, "a photo").image))
    base = Generator(tiny_sd15, device="cpu")
    assert not np.array_equal(np.asarray(_draw(base, "a photo").image), np.asarray(_draw(plain, "a photo").image))
    # A1111 writes a bundled embedding's 'TI hashes' entry as the name of the LoRA that bundles it
    assert got.info.embeddings == [(TOKEN, "pivotal")]


def test_bundled_embeddings_are_used_at_weight_zero_and_leave_with_their_adapter(tiny_sd15, files, bundled_gen):
    name = next(iter(bundled_gen.adapters.specs))
    alone = Generator(tiny_sd15, device="cpu", embeddings=[files["standalone"]])  # no LoRA: as weight 0
    bundled_gen.set_weight(name, 0.0)  # A1111 registers them whatever the weight
    try:
        again, used = bundled_gen._embeds(bundled_gen.pipe, Request(prompt=f"a {TOKEN} photo"))
        want = alone._embeds(alone.pipe, Request(prompt=f"a {TOKEN} photo"))[0]["prompt_embeds"]
        assert used == [TOKEN]
        torch.testing.assert_close(again["prompt_embeds"], want, rtol=0, atol=1e-6)
    finally:
        bundled_gen.set_weight(name, 1.0)
    gen = Generator(tiny_sd15, [files["bundled"]], device="cpu")
    gen.unload(next(iter(gen.adapters.specs)))
    base = Generator(tiny_sd15, device="cpu")
    after, used = gen._embeds(gen.pipe, Request(prompt=f"a {TOKEN} photo"))
    assert gen.all_embeddings() == [] and used == []
    plain = base._embeds(base.pipe, Request(prompt=f"a {TOKEN} photo"))[0]["prompt_embeds"]
    assert torch.equal(after["prompt_embeds"], plain)


def test_a_bundled_token_given_twice_is_refused_naming_both_files(tiny_sd15, random_adapters, files, tmp_path, capsys):
    assert run_infer(tmp_path, tiny_sd15, "--lora", str(files["bundled"]), "--embedding",
                     f"{files['standalone']}:{TOKEN.upper()}") == 2
    err = one_line_error(capsys)
    assert str(files["bundled"]) in err and str(files["standalone"]) in err and TOKEN in err
    assert err.endswith("they are the same vectors (a pivotal run's embedding.bundle): leave out the --embedding, "
                        "the --lora file alone draws with them")
    differs = tmp_path / "differs.safetensors"
    save_file({"emb_params": _vectors(3, 32, 8)}, str(differs))
    assert run_infer(tmp_path, tiny_sd15, "--lora", str(files["bundled"]), "--embedding", f"{differs}:{TOKEN}") == 2
    assert one_line_error(capsys).endswith("leave one of them out")
    other = add_bundle(random_adapters["b"], tmp_path / "other.safetensors",
                       {f"{TOKEN}.emb_params": _vectors(1, 32, 9)})
    assert run_infer(tmp_path, tiny_sd15, "--lora", str(files["bundled"]), "--lora", str(other)) == 2
    err = one_line_error(capsys)
    assert str(files["bundled"]) in err and str(other) in err and "leave one of them out" in err


def test_a_bundled_embedding_for_another_base_or_with_a_dotted_token_is_refused(tiny_sd15, random_adapters, tmp_path,
                                                                               capsys):
    wide = add_bundle(random_adapters["a"], tmp_path / "wide.safetensors", {"w.emb_params": _vectors(2, 48, 1)})
    assert run_infer(tmp_path, tiny_sd15, "--lora", str(wide), "--prompt", "w") == 2
    assert "bundles the embedding 'w' for a text encoder of width 48" in one_line_error(capsys)
    dotted = add_bundle(random_adapters["a"], tmp_path / "dotted.safetensors", {"my.tok.clip_l": _vectors(2, 32, 1)})
    assert run_infer(tmp_path, tiny_sd15, "--lora", str(dotted)) == 2
    assert "'bundle_emb.my.tok.clip_l' is not a bundled embedding part" in one_line_error(capsys)


def test_infer_with_a_bundled_file_writes_ti_hashes_and_warns_about_an_unused_token(tiny_sd15, files, tmp_path,
                                                                                   caplog):
    from PIL import Image

    with caplog.at_level("WARNING", logger="lora_trainer.inference.command"):
        assert run_infer(tmp_path, tiny_sd15, "--lora", str(files["bundled"]), "--prompt", f"({TOKEN}:1.1) x") == 0
        assert run_infer(tmp_path, tiny_sd15, "--lora", f"{files['bundled']}:0.5", "--prompt", "a photo") == 0
    texts = [Image.open(p).text["parameters"] for p in sorted((tmp_path / "out").glob("*.png"))]
    # run_infer draws "x" first: only the image whose prompt names the token lists it
    assert [f'TI hashes: "{TOKEN}: pivotal"' in t for t in texts] == [False, True, False, False]
    warned = [r.getMessage() for r in caplog.records if "bundles" in r.getMessage()]
    assert warned == [f"--lora: {files['bundled']} bundles the embedding '{TOKEN}', which no prompt uses; write "
                      f"{TOKEN} in --prompt or --negative-prompt to use it (case does not matter)"]


def test_compare_draws_each_file_with_its_own_bundle_and_refuses_a_clash_first(tiny_sd15, random_adapters, files,
                                                                              tmp_path, capsys):
    from lora_trainer.inference.compare import compare_grid

    gen = Generator(tiny_sd15, device="cpu")
    req = Request(prompt=f"a {TOKEN} photo", steps=2, width=64, height=64, seed=3)
    specs = [AdapterSpec(files["bundled"]), AdapterSpec(random_adapters["a"])]
    result = compare_grid(gen, specs, [req.prompt], req)
    assert [c.info.embeddings for c in result.cells[0]] == [[(TOKEN, "pivotal")], []] and gen.all_embeddings() == []
    assert result.info.embeddings == []  # the grid's parameters: one column's bundle is not the whole grid's
    assert run_infer(tmp_path, tiny_sd15, "--compare", str(random_adapters["a"]), str(files["bundled"]),
                     "--embedding", str(files["standalone"])) == 2
    assert one_line_error(capsys).startswith(f"error: --compare: {files['bundled']} bundles the embedding")
    assert not (tmp_path / "out").exists()  # nothing drawn


def test_merge_bakes_the_lora_and_writes_its_embeddings_beside_the_model(tiny_sd15, random_adapters, files, tmp_path):
    out = tmp_path / "merged"
    assert main(["merge", "--model", str(tiny_sd15), "--lora", str(files["bundled"]), "--out", str(out)]) == 0
    written = load_file(str(out / "embeddings" / f"{TOKEN}.safetensors"))
    assert list(written) == ["emb_params"] and torch.equal(written["emb_params"], files["vectors"])
    merged = Generator(out, device="cpu", embeddings=[out / "embeddings" / f"{TOKEN}.safetensors"])
    reference = Generator(tiny_sd15, [random_adapters["a"]], device="cpu", embeddings=[files["standalone"]])
    got, want = np.asarray(_draw(merged).image, dtype=float), np.asarray(_draw(reference).image, dtype=float)
    assert np.abs(got - want).max() <= 2  # fused weights round differently from the unfused sum
    single = tmp_path / "single" / "merged.safetensors"
    assert main(["merge", "--model", str(tiny_sd15), "--lora", str(files["bundled"]), "--out", str(single),
                 "--single-file"]) == 0
    assert (single.parent / "embeddings" / f"{TOKEN}.safetensors").is_file()


def test_an_sdxl_lycoris_file_with_a_bundle_draws_as_its_parts_given_apart(tiny_sdxl, tmp_path, capsys):
    from lycoris_helpers import write_lycoris

    from lora_trainer.inference.pipelines import load_base

    pipe, _ = load_base(str(tiny_sdxl), "cpu", torch.float32)
    layers = [("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "loha"),
              ("text_encoder_2", "encoder.layers.1.mlp.fc2", "lokr")]
    clip_l, clip_g = _vectors(2, 32, 11), _vectors(2, 32, 12)
    write_lycoris(pipe, "sdxl", tmp_path / "plain.safetensors", layers, seed=4)
    write_lycoris(pipe, "sdxl", tmp_path / "xl.safetensors", layers, seed=4,
                  extra={"bundle_emb.xltok.clip_l": clip_l, "bundle_emb.xltok.clip_g": clip_g})
    save_file({"clip_l": clip_l, "clip_g": clip_g}, str(tmp_path / "xltok.safetensors"))
    got = _draw(Generator(tiny_sdxl, [tmp_path / "xl.safetensors"], device="cpu"), "a xltok photo")
    want = _draw(Generator(tiny_sdxl, [tmp_path / "plain.safetensors"], device="cpu",
                           embeddings=[tmp_path / "xltok.safetensors"]), "a xltok photo")
    assert np.array_equal(np.asarray(got.image), np.asarray(want.image)) and got.info.embeddings == [("xltok", "xl")]
    assert main(["inspect", str(tmp_path / "xl.safetensors")]) == 0
    assert "xltok (2 vectors, SDXL (clip_l 32-wide + clip_g 32-wide))" in capsys.readouterr().out
