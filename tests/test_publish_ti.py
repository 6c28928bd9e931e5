"""Publishing a run that trained an embedding alone (textual inversion): the Hub repo holds the
embedding as <TOKEN>.safetensors with a textual_inversion card, the CivitAI zip is a
TextualInversion, and there is no LoRA weight to give."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest
import safetensors.torch
import torch
from PIL import Image

from conftest import run_config
from lora_trainer.cli import main
from publish_helpers import FAKE_TOKEN, all_bytes, fake_token, front_matter, publish_dry  # noqa: F401

TOKEN = "geoshape"
FILE = f"{TOKEN}.safetensors"
TI = [f"embedding.token={TOKEN}", "lora.train_unet=false", "embedding.lr=1e-2", "train.warmup=0",
      "sample.steps=2", "sample.negative_prompt=blurry"]


def _train(model: Path, data: Path, out: Path, *extra: str) -> Path:
    from lora_trainer.training.loop import train

    train(run_config(model, data, out, *TI, *extra), show_progress=False)
    return out


@pytest.fixture(scope="module")
def ti_run(tiny_sd15, example_data, tmp_path_factory) -> Path:
    """SD1.5, 4 steps, fp32 file (so the zip's fp16 is a conversion), a step save of the embedding at 2."""
    return _train(tiny_sd15, example_data, tmp_path_factory.mktemp("ti") / "run", "train.max_steps=4",
                  "output.dtype=fp32", "output.save_every_n_steps=2", "output.save_step_adapters=true")


@pytest.fixture(scope="module")
def ti_run_xl(tiny_sdxl, example_data, tmp_path_factory) -> Path:
    return _train(tiny_sdxl, example_data, tmp_path_factory.mktemp("ti-xl") / "run", "train.max_steps=2")


def _embedding(run: Path) -> Path:
    return run / "embeddings" / FILE


def test_the_run_folder_is_an_embedding_alone(ti_run):
    from lora_trainer.publish.run import read_run

    assert not list(ti_run.glob("*.safetensors"))  # no LoRA file
    assert (ti_run / "embeddings" / f"{TOKEN}-step00000002.safetensors").is_file()
    run = read_run(ti_run)
    assert run.embedding_only and run.adapter == _embedding(ti_run) and run.variant == "sd15"
    assert run.embedding_files == [_embedding(ti_run)]  # the step save is not a word of its own


def test_hub_repo_holds_the_embedding_once_a_textual_inversion_card_and_prompts(ti_run, tiny_sd15, tmp_path,
                                                                              fake_token, capsys):
    out = tmp_path / "repo"
    assert publish_dry(ti_run, out) == 0
    printed = capsys.readouterr().out
    listing = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert listing == [".lora-trainer-publish.json", "README.md", "config.yaml", FILE, "images/00.png",
                       "images/loss.png", "prompts.json"]
    assert f"  {FILE}  (" in printed
    assert (out / FILE).read_bytes() == _embedding(ti_run).read_bytes()  # as trained (fp32 here)

    card = (out / "README.md").read_text(encoding="utf-8")
    meta = front_matter(card)
    assert meta["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert {"textual_inversion", "text-to-image", "stable-diffusion", "diffusers"} <= set(meta["tags"])
    assert not {"lora", "template:sd-lora", "sdxl"} & set(meta["tags"])
    assert meta["instance_prompt"] == TOKEN
    assert meta["widget"] == [{"text": "geoshape, a red circle on a light blue background",
                               "parameters": {"negative_prompt": "blurry"}, "output": {"url": "images/00.png"}}]
    assert Image.open(out / "images" / "00.png").info["parameters"].startswith(meta["widget"][0]["text"])
    for text in ("## Trigger word", "## Use it with diffusers", "## Use it in AUTOMATIC1111, Forge or ComfyUI",
                 "## Training details", "## Limitations", "![training loss](images/loss.png)",
                 "put it in the `embeddings` folder and write `geoshape` in the prompt",
                 "`ComfyUI/models/embeddings/` and write `embedding:geoshape`",
                 f'pipe.load_textual_inversion("alice/geoshape", weight_name="{FILE}", token="{TOKEN}")',
                 "| steps | 4 |", "| trained | the embedding `geoshape` only (1 vector); the UNet and text encoders",
                 "| learning rate | 0.01 (constant_with_warmup, 0 warmup steps) |", "| training images | 8 |"):
        assert text in card, text
    for lora_text in ("## Weight", "Recommended weight", "load_lora_weights", "<lora:", "LoRA rank", "models/Lora",
                      "pytorch_lora_weights"):
        assert lora_text not in card, lora_text

    guide = json.loads((out / "prompts.json").read_text())
    assert guide["trigger_words"] == [TOKEN] and "weight" not in guide
    assert guide["embedding"] == {"token": TOKEN, "file": FILE, "vectors": 1}
    assert guide["prompts"] == ["geoshape, a red circle on a light blue background"]
    for path, data in all_bytes(out):  # nothing local or secret leaves the machine
        assert str(tiny_sd15).encode() not in data and str(ti_run).encode() not in data, path
        assert FAKE_TOKEN.encode() not in data, path


def test_the_cards_diffusers_line_loads_the_trained_vectors(ti_run, tiny_sd15, tmp_path, fake_token):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "repo"
    assert publish_dry(ti_run, out) == 0
    line = next(ln for ln in (out / "README.md").read_text().splitlines() if ln.startswith("pipe.load_textual_inversion"))
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd15), safety_checker=None, requires_safety_checker=False)
    exec(line.replace('"alice/geoshape"', repr(str(out))), {"pipe": pipe})  # the repo, locally
    row = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids(TOKEN)]
    want = safetensors.torch.load_file(_embedding(ti_run))["emb_params"][0]
    torch.testing.assert_close(row.detach(), want, rtol=0, atol=0)


def test_civitai_zip_is_a_textual_inversion_with_the_embedding_in_fp16(ti_run, tmp_path, fake_token):
    out = tmp_path / "ti.zip"
    assert main(["package", str(ti_run), "--civitai", str(out)]) == 0
    with zipfile.ZipFile(out) as z:
        assert sorted(z.namelist()) == sorted([FILE, "images/00.png", "civitai.json", "prompts.json", "README.txt"])
        z.extractall(tmp_path / "unzipped")
    root = tmp_path / "unzipped"
    fields = json.loads((root / "civitai.json").read_text())
    assert fields["type"] == "TextualInversion" and fields["baseModel"] == "SD 1.5"
    assert fields["trainedWords"] == [TOKEN] and fields["file"] == FILE and fields["images"] == ["images/00.png"]
    assert "recommendedWeight" not in fields and fields["negativePrompt"] == "blurry"
    assert fields["training"]["vectors"] == 1 and fields["training"]["steps"] == 4
    assert fields["training"]["learningRate"] == 0.01 and "rank" not in fields["training"]
    assert "weight" not in json.loads((root / "prompts.json").read_text())

    got, want = safetensors.torch.load_file(root / FILE), safetensors.torch.load_file(_embedding(ti_run))
    assert want["emb_params"].dtype == torch.float32 and got["emb_params"].dtype == torch.float16
    assert torch.equal(got["emb_params"], want["emb_params"].half())
    with safetensors.safe_open(str(root / FILE), "pt") as f:
        assert f.metadata()["token"] == TOKEN and f.metadata()["ss_steps"] == "4"

    readme = (root / "README.txt").read_text()
    for text in ("Type: Textual Inversion", "Trigger word: geoshape", "copy it to the embeddings folder",
                 "write embedding:geoshape", "type Textual Inversion"):
        assert text in readme, text
    assert "<lora:" not in readme and "Recommended weight" not in readme


@pytest.mark.parametrize("flag", [["--weight", "0.8"], ["--weight-range", "0.5,1"]])
@pytest.mark.parametrize("command", ["publish", "package"])
def test_a_lora_weight_for_an_embedding_alone_is_a_one_line_error(ti_run, tmp_path, fake_token, capsys, command, flag):
    target = tmp_path / ("repo" if command == "publish" else "ti.zip")
    args = (["publish", str(ti_run), "--hub", "alice/geoshape", "--dry-run", "--out", str(target)]
            if command == "publish" else ["package", str(ti_run), "--civitai", str(target)])
    capsys.readouterr()
    assert main([*args, *flag]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {flag[0]}: ") and err.count("\n") == 1
    assert "embedding alone" in err and "no LoRA weight" in err and f"drop {flag[0]}" in err
    assert not target.exists() and [p.name for p in tmp_path.iterdir()] == []  # nothing half written


def test_a_run_missing_its_embedding_names_the_file(ti_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(ti_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    _embedding(run).unlink()
    assert main(["package", str(run), "--civitai", str(tmp_path / "x.zip")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{_embedding(run)}: embedding not found" in err
    assert "embedding.token='geoshape'" in err


def test_an_embedding_alone_trained_with_its_own_vae_names_it(ti_run, tmp_path, fake_token):
    # the embedding's file records no VAE (a LoRA's ss_vae_name does): it is read from config.yaml
    import yaml

    run = tmp_path / "run"
    shutil.copytree(ti_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    local = tmp_path / "private" / "VAE" / "vae-ft-mse.safetensors"
    config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    config["model"]["vae"] = str(local)
    (run / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    assert publish_dry(run, tmp_path / "repo") == 0
    card = (tmp_path / "repo" / "README.md").read_text(encoding="utf-8")
    assert "| VAE | `vae-ft-mse.safetensors`, not the base's: it encoded the training images" in card
    assert json.loads((tmp_path / "repo" / "prompts.json").read_text())["settings"]["vae"] == "vae-ft-mse.safetensors"
    assert main(["package", str(run), "--civitai", str(tmp_path / "c.zip")]) == 0
    with zipfile.ZipFile(tmp_path / "c.zip") as z:
        assert json.loads(z.read("prompts.json"))["settings"]["vae"] == "vae-ft-mse.safetensors"
        assert "VAE: vae-ft-mse.safetensors, not the base's: the previews were drawn with it" in z.read("README.txt").decode()
    for _, data in all_bytes(tmp_path / "repo"):
        assert str(local.parent).encode() not in data
    # a hub id is named as it is; the base's own VAE is not named
    config["model"]["vae"] = "stabilityai/sd-vae-ft-mse"
    (run / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    assert publish_dry(run, tmp_path / "hub-vae") == 0
    assert json.loads((tmp_path / "hub-vae" / "prompts.json").read_text())["settings"]["vae"] == config["model"]["vae"]
    assert publish_dry(ti_run, tmp_path / "plain") == 0
    assert "| VAE |" not in (tmp_path / "plain" / "README.md").read_text(encoding="utf-8")
    assert "vae" not in json.loads((tmp_path / "plain" / "prompts.json").read_text())["settings"]


def test_sdxl_embedding_alone_card_loads_clip_l_and_clip_g(ti_run_xl, tiny_sdxl, tmp_path, fake_token):
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "repo"
    assert publish_dry(ti_run_xl, out) == 0
    assert (out / FILE).read_bytes() == _embedding(ti_run_xl).read_bytes()
    assert not (out / "embeddings").exists() and not (out / "pytorch_lora_weights.safetensors").exists()
    card = (out / "README.md").read_text()
    meta = front_matter(card)
    assert meta["base_model"] == "stabilityai/stable-diffusion-xl-base-1.0" and meta["license"] == "openrail++"
    assert {"textual_inversion", "sdxl"} <= set(meta["tags"]) and "lora" not in meta["tags"]
    assert "StableDiffusionXLPipeline" in card and "`clip_l` and `clip_g`" in card
    assert f'state = load_file(hf_hub_download("alice/geoshape", "{FILE}"))' in card
    lines = [ln for ln in card.splitlines() if ln.startswith("pipe.load_textual_inversion(")]
    assert lines == [f'pipe.load_textual_inversion(state["clip_l"], token="{TOKEN}", text_encoder=pipe.text_encoder, '
                     "tokenizer=pipe.tokenizer)",
                     f'pipe.load_textual_inversion(state["clip_g"], token="{TOKEN}", text_encoder=pipe.text_encoder_2, '
                     "tokenizer=pipe.tokenizer_2)"]
    # the lines work as written, the downloaded file being the repo's
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl))
    state = safetensors.torch.load_file(out / FILE)
    exec("\n".join(lines), {"pipe": pipe, "state": state})
    for encoder, tokenizer, part in ((pipe.text_encoder, pipe.tokenizer, "clip_l"),
                                     (pipe.text_encoder_2, pipe.tokenizer_2, "clip_g")):
        row = encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(TOKEN)]
        torch.testing.assert_close(row.detach(), state[part][0].to(row.dtype), rtol=0, atol=0)

    assert main(["package", str(ti_run_xl), "--civitai", str(tmp_path / "xl.zip")]) == 0
    with zipfile.ZipFile(tmp_path / "xl.zip") as z:
        fields = json.loads(z.read("civitai.json"))
        packed = safetensors.torch.load(z.read(FILE))
    assert fields["type"] == "TextualInversion" and fields["baseModel"] == "SDXL 1.0"
    assert fields["trainedWords"] == [TOKEN]
    assert sorted(packed) == ["clip_g", "clip_l"] and {t.dtype for t in packed.values()} == {torch.float16}


def test_a_pivotal_runs_epoch_and_step_embeddings_are_not_published_as_tokens(trained, tmp_path):
    """The token's epoch and step saves (<TOKEN>-000001, <TOKEN>-step00000002) are earlier states of
    the same word; another file in embeddings/ is a word of its own."""
    import yaml

    from lora_trainer.publish.guidance import trigger_words
    from lora_trainer.publish.run import read_run
    from publish_helpers import copy_run

    run = copy_run(trained, tmp_path / "run")
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["embedding"]["token"] = "geotok"
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "embeddings").mkdir()
    for stem in ("geotok", "geotok-000001", "geotok-step00000002", "other"):
        safetensors.torch.save_file({"emb_params": torch.ones(1, 32)}, str(run / "embeddings" / f"{stem}.safetensors"))
    published = read_run(run)
    assert not published.embedding_only
    assert [p.stem for p in published.embedding_files] == ["geotok", "other"]
    assert trigger_words(published) == ["geoshape", "geotok", "other"]
