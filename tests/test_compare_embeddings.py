"""`infer --compare` of a pivotal-tuning run draws each epoch's and step's adapter with that epoch's
own embedding (OUT/embeddings/<token><suffix>.safetensors), in place of an `--embedding` of its token,
and names it in each cell's TI hashes; a run that trained an embedding alone compares its embedding
files; a plain `--lora` of an epoch drawn without its embedding is warned about in one line."""

from __future__ import annotations

import hashlib
import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from lora_trainer.cli import main
from lora_trainer.inference.adapters import AdapterSpec
from lora_trainer.inference.generate import Generator, Request
from lora_trainer.inference.paired import warn_unpaired
from lora_trainer.pnginfo import parse_a1111_parameters
from lora_trainer.training.pivotal import save_embedding

TOKEN = "geoshape"
FAST = ["--steps", "2", "--seed", "5", "--width", "64", "--height", "64", "--device", "cpu"]
PROMPT = f"a {TOKEN} on a table"


def _vectors(seed: int) -> dict[str, torch.Tensor]:
    return {"clip": 3 * torch.randn(2, 32, generator=torch.Generator().manual_seed(seed))}


def _ti_hash(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


@pytest.fixture(scope="module")
def pivotal_run(random_adapters, tmp_path_factory):
    """A pivotal run's folder: one adapter ('a') saved as epochs 1 and 2 and final, and its embedding
    per epoch; epoch 2's vectors are the final ones, epoch 1's others. Only the embedding differs."""
    out = tmp_path_factory.mktemp("pivotal")
    (out / "config.yaml").write_text(f"output:\n  name: run\nembedding:\n  token: {TOKEN}\n")
    for suffix, seed in (("-000001", 1), ("-000002", 2), ("", 2)):
        shutil.copy(random_adapters["a"], out / f"run{suffix}.safetensors")
        save_embedding(out, TOKEN, _vectors(seed), torch.float32, suffix, {"token": TOKEN})
    return out


def read_png_info(path):
    return parse_a1111_parameters(Image.open(path).info["parameters"])


def _cells(out):
    cells = sorted((out / "compare-000").glob("*.png"))
    return cells, [np.asarray(Image.open(p)) for p in cells], [read_png_info(p).embeddings for p in cells]


def test_each_column_draws_with_its_own_epochs_embedding(tiny_sd15, pivotal_run, tmp_path, caplog):
    emb = pivotal_run / "embeddings"
    mine = tmp_path / "mine.safetensors"  # an --embedding of the same token: the columns' own ones win
    save_embedding(tmp_path, TOKEN, _vectors(9), torch.float32)
    shutil.move(tmp_path / "embeddings" / f"{TOKEN}.safetensors", mine)
    with caplog.at_level(logging.INFO, logger="lora_trainer.inference.paired"):
        assert main(["infer", "--model", str(tiny_sd15), "--compare", str(pivotal_run), "--prompt", PROMPT, *FAST,
                     "--embedding", f"{mine}:{TOKEN}", "--out", str(tmp_path / "grid")]) == 0
    said = [r.getMessage() for r in caplog.records if "in place of --embedding" in r.getMessage()]
    assert len(said) == 1 and str(mine) in said[0]
    names, pixels, hashes = _cells(tmp_path / "grid")
    assert [p.name for p in names] == ["00-00-run-000001.png", "00-01-run-000002.png", "00-02-run.png"]
    want = [_ti_hash(emb / f"{TOKEN}{s}.safetensors") for s in ("-000001", "-000002", "")]
    assert hashes == [[(TOKEN, h)] for h in want]
    # the same adapter in every column: cells differ exactly where the embeddings do
    assert not np.array_equal(pixels[0], pixels[1]) and np.array_equal(pixels[1], pixels[2])
    # and each cell is plain infer of that epoch's adapter with that epoch's embedding
    assert main(["infer", "--model", str(tiny_sd15), "--lora", str(pivotal_run / "run-000001.safetensors"),
                 "--embedding", f"{emb / f'{TOKEN}-000001.safetensors'}:{TOKEN}", "--prompt", PROMPT, *FAST,
                 "--out", str(tmp_path / "plain")]) == 0
    assert np.array_equal(np.asarray(Image.open(next((tmp_path / "plain").glob("*.png")))), pixels[0])
    grid = read_png_info(tmp_path / "grid" / "compare-000.png")
    assert grid.embeddings == []  # varies by column: each cell names its own


def test_the_loaded_embeddings_are_as_before_after_a_compare(tiny_sd15, pivotal_run, tmp_path):
    from lora_trainer.inference.compare import compare_grid, expand_compare

    mine = pivotal_run / "embeddings" / f"{TOKEN}-000001.safetensors"
    gen = Generator(tiny_sd15, device="cpu", embeddings=[f"{mine}:{TOKEN}"])
    before = list(gen.embeddings)
    compare_grid(gen, expand_compare([str(pivotal_run / "run-00000[2].safetensors")]), [PROMPT],
                 Request(prompt=PROMPT, steps=1, width=64, height=64))
    assert gen.embeddings == before and gen._embedding_hashes == {TOKEN: _ti_hash(mine)}
    # a file that bundles its embedding draws with the bundled one, as any --lora does
    from safetensors.torch import load_file, save_file

    from lora_trainer.inference.paired import column_embeddings, run_embedding

    tensors = load_file(str(pivotal_run / "run-000002.safetensors"))
    save_file({**tensors, f"bundle_emb.{TOKEN}.string_to_param.*": _vectors(5)["clip"]},
              str(tmp_path / "run-000003.safetensors"))
    save_embedding(tmp_path, TOKEN, _vectors(6), torch.float32, "-000003")
    assert run_embedding(tmp_path / "run-000003.safetensors") == tmp_path / "embeddings" / f"{TOKEN}-000003.safetensors"
    assert column_embeddings([AdapterSpec(tmp_path / "run-000003.safetensors")], gen) == [None]


def test_an_epochs_lora_without_its_embedding_is_warned_about_once(tiny_sd15, pivotal_run, random_adapters,
                                                                   tmp_path, caplog):
    epoch2 = pivotal_run / "run-000002.safetensors"
    own = pivotal_run / "embeddings" / f"{TOKEN}-000002.safetensors"
    with caplog.at_level(logging.WARNING):
        assert main(["infer", "--model", str(tiny_sd15), "--lora", str(epoch2), "--prompt", PROMPT, *FAST,
                     "--out", str(tmp_path)]) == 0
    said = [r.getMessage() for r in caplog.records if "was trained with the embedding" in r.getMessage()]
    assert len(said) == 1 and f"--embedding {own}:{TOKEN}" in said[0]
    assert warn_unpaired([AdapterSpec(epoch2)], [f"{own}:{TOKEN}"]) == []  # loaded: nothing to say
    assert len(warn_unpaired([AdapterSpec(epoch2)], [str(pivotal_run / "embeddings" / f"{TOKEN}.safetensors")])) == 1
    assert warn_unpaired([AdapterSpec(p) for p in random_adapters.values()], []) == []  # not a pivotal run's


def test_a_run_with_an_embedding_alone_compares_its_embedding_files(tiny_sd15, tmp_path):
    run = tmp_path / "ti"
    for suffix, seed in (("-000001", 1), ("-step00000006", 3), ("", 2)):
        save_embedding(run, TOKEN, _vectors(seed), torch.float32, suffix,
                       {"token": TOKEN, "ss_steps": {"-000001": "4", "": "8"}.get(suffix, "6")})
    assert main(["infer", "--model", str(tiny_sd15), "--compare", str(run), "--prompt", PROMPT, *FAST,
                 "--out", str(tmp_path / "grid")]) == 0
    names, pixels, hashes = _cells(tmp_path / "grid")
    files = [run / "embeddings" / f"{TOKEN}{s}.safetensors" for s in ("-000001", "-step00000006", "")]
    assert [p.name for p in names] == ["00-00-geoshape-000001.png", "00-01-geoshape-step00000006.png",
                                       "00-02-geoshape.png"]
    assert hashes == [[(TOKEN, _ti_hash(f))] for f in files]
    assert main(["infer", "--model", str(tiny_sd15), "--embedding", f"{files[2]}:{TOKEN}", "--prompt", PROMPT,
                 *FAST, "--out", str(tmp_path / "plain")]) == 0
    assert np.array_equal(np.asarray(Image.open(next((tmp_path / "plain").glob("*.png")))), pixels[2])
    assert not np.array_equal(pixels[0], pixels[2])


def test_merging_a_pivotal_runs_adapter_warns_that_its_embedding_stays_a_file(pivotal_run, random_adapters, tmp_path):
    from lora_trainer.inference.merge import _warn_run_embeddings

    final = pivotal_run / "run.safetensors"
    said = _warn_run_embeddings([AdapterSpec(final), AdapterSpec(random_adapters["a"])])
    own = pivotal_run / "embeddings" / f"{TOKEN}.safetensors"
    assert said == [f"--lora: {final} was trained with the embedding {own}, which a merged model cannot hold; use it "
                    f"with the model: --embedding {own}:{TOKEN} (A1111/ComfyUI: its embeddings folder, "
                    f"as {TOKEN}.safetensors)"]
    # a file that bundles it has it written beside the merged model instead: nothing to warn about
    from safetensors.torch import load_file, save_file

    save_file({**load_file(str(final)), f"bundle_emb.{TOKEN}.string_to_param.*": _vectors(5)["clip"]},
              str(tmp_path / "run.safetensors"))
    save_embedding(tmp_path, TOKEN, _vectors(5), torch.float32)
    assert _warn_run_embeddings([AdapterSpec(tmp_path / "run.safetensors")]) == []


def test_an_epochs_embedding_given_by_its_file_name_says_the_word_it_was_trained_as(tiny_sd15, pivotal_run,
                                                                                      tmp_path, caplog):
    epoch1 = pivotal_run / "embeddings" / f"{TOKEN}-000001.safetensors"  # its prompt word is the stem
    with caplog.at_level(logging.WARNING, logger="lora_trainer.inference.command"):
        assert main(["infer", "--model", str(tiny_sd15), "--embedding", str(epoch1), "--prompt", PROMPT, *FAST,
                     "--out", str(tmp_path)]) == 0
    said = [r.getMessage() for r in caplog.records if "no prompt uses" in r.getMessage()]
    assert said == [f"--embedding: {epoch1}: no prompt uses its token '{TOKEN}-000001', so it changes nothing; write "
                    f"{TOKEN}-000001 in --prompt or --negative-prompt (case does not matter); it was trained as "
                    f"'{TOKEN}': --embedding {epoch1}:{TOKEN} makes that the word"]


def test_lora_init_from_a_pivotal_runs_adapter_names_its_embedding_to_continue(pivotal_run, caplog):
    from lora_trainer.config import load_config
    from lora_trainer.training.embedding_init import initial_vectors

    final = pivotal_run / "run.safetensors"
    own = pivotal_run / "embeddings" / f"{TOKEN}.safetensors"
    cfg = load_config(None, ["model.base=x", "data.path=d", "train.max_steps=1", f"embedding.token={TOKEN}",
                             f"lora.init_from={final}"])
    with caplog.at_level(logging.WARNING, logger="lora_trainer.training.embedding_init"):
        assert initial_vectors(cfg, "sd15") is None  # the vectors start afresh, as before: said, not changed
    assert [r.getMessage() for r in caplog.records] == [
        f"lora.init_from: {final} was trained with the embedding {own}, but the vectors start afresh (from "
        f"embedding.init_words or the token's own words); set embedding.init_from={own} to continue them too"]
