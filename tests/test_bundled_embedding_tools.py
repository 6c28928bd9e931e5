"""The adapter-file tools with a LoRA file that bundles embeddings (`bundle_emb.<TOKEN>.*`): inspect
lists them; convert, resize and merge-loras keep them in kohya outputs (hashes recomputed over them)
and write them beside diffusers outputs as embeddings/<TOKEN>.safetensors, saying so; a bad bundle
key is a one-line error."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from infer_helpers import one_line_error
from lora_trainer.cli import main
from lora_trainer.export.adapter import read_adapter
from lora_trainer.export.inspect import _tensor_hash

SD1 = {"pivtok.string_to_param.*": (3, 32, 1)}
SDXL = {"xltok.clip_l": (2, 768, 2), "xltok.clip_g": (2, 1280, 3)}


def _bundle(spec) -> dict[str, torch.Tensor]:
    return {f"bundle_emb.{k}": torch.randn(n, w, generator=torch.Generator().manual_seed(s))
            for k, (n, w, s) in spec.items()}


def add_bundle(src, dst, bundle):
    tensors = load_file(str(src))
    with safe_open(str(src), "pt") as f:
        metadata = f.metadata()
    save_file({**tensors, **bundle}, str(dst), metadata=metadata)
    return dst


@pytest.fixture(scope="module")
def bundled(random_adapters, tmp_path_factory):
    root = tmp_path_factory.mktemp("tools")
    return {"sd1": add_bundle(random_adapters["a"], root / "pivotal.safetensors", _bundle(SD1)),
            "sdxl": add_bundle(random_adapters["a"], root / "xl-bundle.safetensors", _bundle(SDXL))}


def _bundle_keys(path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(path)).items() if k.startswith("bundle_emb.")}


def test_inspect_lists_bundled_embeddings(bundled, capsys):
    assert main(["inspect", str(bundled["sd1"])]) == 0
    text = capsys.readouterr().out
    assert "embeddings  1 bundled (A1111 uses them by token): pivtok (3 vectors, a text encoder of width 32)" in text
    assert "diffusers' load_lora_weights refuses the bundled embeddings' keys" in text
    assert main(["inspect", str(bundled["sdxl"]), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["embeddings"] == [{"token": "xltok", "vectors": 2, "widths": {"clip_l": 768, "clip_g": 1280},
                                     "fits": "SDXL (clip_l 768-wide + clip_g 1280-wide)"}]
    assert report["modules"] and report["layout"] == "kohya"


def test_convert_keeps_them_in_kohya_and_writes_them_beside_diffusers(bundled, random_adapters, tmp_path, capsys):
    src = bundled["sd1"]
    out = tmp_path / "d" / "pivotal.diffusers.safetensors"
    out.parent.mkdir()
    assert main(["convert", str(src), str(out), "--to", "diffusers"]) == 0
    said = capsys.readouterr().out
    beside = out.parent / "embeddings" / "pivtok.safetensors"
    assert f"bundled embeddings (pivtok) written beside it: {beside}" in said
    assert torch.equal(load_file(str(beside))["emb_params"], _bundle_keys(src)["bundle_emb.pivtok.string_to_param.*"])
    assert not _bundle_keys(out)
    # the LoRA part is the file's without its bundle, exactly
    want, got = read_adapter(random_adapters["a"]), read_adapter(out)
    for (c, p, m), (c2, p2, m2) in zip(want.items(), got.items()):
        assert (c, p) == (c2, p2) and torch.equal(m.down, m2.down) and torch.equal(m.up, m2.up) and m.alpha == m2.alpha
    back = tmp_path / "back.safetensors"
    assert main(["convert", str(src), str(back), "--to", "kohya"]) == 0
    assert "bundled embeddings kept in the file: pivtok" in capsys.readouterr().out
    kept = _bundle_keys(back)
    original = _bundle_keys(src)
    assert kept.keys() == original.keys() and all(torch.equal(kept[k], v) for k, v in original.items())
    with safe_open(str(back), "pt") as f:
        assert f.metadata()["sshs_model_hash"] == _tensor_hash(back)  # the hash covers the embeddings too
    assert main(["convert", str(src), str(tmp_path / "d" / "again.safetensors"), "--to", "diffusers"]) == 2
    assert f"{beside} already exists" in one_line_error(capsys)


def test_resize_and_merge_loras_keep_them(bundled, random_adapters, tmp_path, capsys):
    resized = tmp_path / "r2.safetensors"
    assert main(["resize", str(bundled["sd1"]), str(resized), "--rank", "2"]) == 0
    assert "bundled embeddings kept in the file: pivtok" in capsys.readouterr().out
    assert read_adapter(resized).common_rank() == 2
    assert torch.equal(_bundle_keys(resized)["bundle_emb.pivtok.string_to_param.*"],
                       _bundle_keys(bundled["sd1"])["bundle_emb.pivtok.string_to_param.*"])
    merged = tmp_path / "merged.safetensors"
    other = add_bundle(random_adapters["a"], tmp_path / "other.safetensors",
                       {"bundle_emb.neg.emb_params": torch.ones(1, 32)})
    assert main(["merge-loras", f"{bundled['sd1']}:0.5", f"{other}:0.2", str(random_adapters["a"]),
                 "--out", str(merged)]) == 0
    assert "bundled embeddings kept in the file: pivtok, neg" in capsys.readouterr().out
    # the embeddings are words, not weights: kept as they were (A1111 writes one vector set as string_to_param.*)
    kept = _bundle_keys(merged)
    assert set(kept) == {"bundle_emb.pivtok.string_to_param.*", "bundle_emb.neg.string_to_param.*"}
    assert torch.equal(kept["bundle_emb.neg.string_to_param.*"], torch.ones(1, 32))
    clash = add_bundle(random_adapters["a"], tmp_path / "clash.safetensors",
                       {"bundle_emb.PIVTOK.emb_params": torch.zeros(3, 32)})
    assert main(["merge-loras", str(bundled["sd1"]), str(clash), "--out", str(tmp_path / "no.safetensors")]) == 2
    err = one_line_error(capsys)
    assert str(bundled["sd1"]) in err and str(clash) in err and not (tmp_path / "no.safetensors").exists()


@pytest.mark.parametrize("key, says", [
    ("bundle_emb.my.tok.clip_l", "is not a bundled embedding part"),
    ("bundle_emb.half.clip_l", "has no bundle_emb.half.clip_g"),
])
def test_a_bad_bundle_key_is_one_line(random_adapters, tmp_path, capsys, key, says):
    bad = add_bundle(random_adapters["a"], tmp_path / "bad.safetensors", {key: torch.zeros(2, 32)})
    assert main(["convert", str(bad), str(tmp_path / "out.safetensors"), "--to", "kohya"]) == 2
    assert says in one_line_error(capsys)


@pytest.fixture(scope="module")
def pivotal_run(trained, tmp_path_factory):
    """The example run, its kohya adapter bundling 'geotok' (3 vectors) and its folder holding a
    standalone embeddings/other.safetensors, as a pivotal-tuning run leaves them."""
    from publish_helpers import copy_run

    run = copy_run(trained, tmp_path_factory.mktemp("pivotal") / "run")
    adapter = run / trained.adapter_paths[0].name
    vectors = _bundle({"geotok.string_to_param.*": (3, 32, 4)})
    add_bundle(adapter, adapter, vectors)
    (run / "embeddings").mkdir()
    save_file({"emb_params": torch.ones(1, 32)}, str(run / "embeddings" / "other.safetensors"))
    return {"dir": run, "name": adapter.name, "vectors": vectors["bundle_emb.geotok.string_to_param.*"]}


def test_publish_lists_the_tokens_and_ships_the_embeddings(pivotal_run, tmp_path):
    from diffusers import StableDiffusionPipeline

    from publish_helpers import front_matter, publish_dry

    out = tmp_path / "repo"
    assert publish_dry(pivotal_run["dir"], out) == 0
    kohya = out / pivotal_run["name"]
    assert torch.equal(_bundle_keys(kohya)["bundle_emb.geotok.string_to_param.*"], pivotal_run["vectors"])
    with safe_open(str(kohya), "pt") as f:
        assert f.metadata()["sshs_model_hash"] == _tensor_hash(kohya)
    assert not _bundle_keys(out / "pytorch_lora_weights.safetensors")
    assert sorted(p.name for p in (out / "embeddings").iterdir()) == ["geotok.safetensors", "other.safetensors"]
    card = (out / "README.md").read_text()
    assert front_matter(card)["instance_prompt"] == "geoshape, geotok, other"
    assert "## Embeddings (pivotal tuning)" in card and "| `embeddings/geotok.safetensors` |" in card
    # the card's diffusers line works as written (the repo id being this folder here)
    line = next(ln for ln in card.splitlines() if ln.startswith("pipe.load_textual_inversion("))
    assert line == ('pipe.load_textual_inversion("alice/geoshape", weight_name="embeddings/geotok.safetensors", '
                    'token="geotok")')
    pipe = StableDiffusionPipeline.from_pretrained(_base(pivotal_run["dir"]))
    pipe.load_textual_inversion(str(out), weight_name="embeddings/geotok.safetensors", token="geotok")
    ids = pipe.tokenizer.convert_tokens_to_ids(["geotok", "geotok_1", "geotok_2"])
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids].detach(), pivotal_run["vectors"])


def _base(run_dir):
    import yaml

    return yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["base"]


def test_civitai_package_lists_the_tokens_and_holds_the_embeddings(pivotal_run, tmp_path):
    import zipfile

    out = tmp_path / "pivotal.zip"
    assert main(["package", str(pivotal_run["dir"]), "--civitai", str(out)]) == 0
    with zipfile.ZipFile(out) as z:
        names = set(z.namelist())
        fields = json.loads(z.read("civitai.json"))
        readme = z.read("README.txt").decode()
        z.extractall(tmp_path / "unzipped")
    assert {"embeddings/geotok.safetensors", "embeddings/other.safetensors", pivotal_run["name"]} <= names
    assert fields["trainedWords"] == ["geoshape", "geotok", "other"]
    assert "Embeddings (pivotal tuning): embeddings/geotok.safetensors, embeddings/other.safetensors" in readme
    kept = _bundle_keys(tmp_path / "unzipped" / pivotal_run["name"])
    assert torch.equal(kept["bundle_emb.geotok.string_to_param.*"], pivotal_run["vectors"])  # not rounded to fp16


def test_the_tools_say_where_a_runs_own_embedding_file_is(random_adapters, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    (run / "embeddings").mkdir(parents=True)
    (run / "config.yaml").write_text("output:\n  name: run\nembedding:\n  token: ohwx\n")
    shutil.copy(random_adapters["a"], run / "run-000002.safetensors")
    save_file({"emb_params": torch.zeros(2, 32)}, str(run / "embeddings" / "ohwx-000002.safetensors"))
    own = run / "embeddings" / "ohwx-000002.safetensors"
    for argv, out in ((["resize", str(run / "run-000002.safetensors"), str(tmp_path / "r.safetensors"), "--rank", "2"],
                       tmp_path / "r.safetensors"),
                      (["merge-loras", str(run / "run-000002.safetensors"), str(random_adapters["b"]), "--out",
                        str(tmp_path / "m.safetensors")], tmp_path / "m.safetensors"),
                      (["convert", str(run / "run-000002.safetensors"), str(tmp_path / "c.safetensors"), "--to",
                        "diffusers"], tmp_path / "c.safetensors")):
        assert main(argv) == 0
        notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note:")]
        assert notes == [f"note: {run / 'run-000002.safetensors'} was trained with the embedding {own} (a file of its "
                         f"own), which {out} does not hold; draw it with --embedding {own}:ohwx"]
