"""Publishing: the HF repo folder and card, the upload against a local Hub stand-in, the CivitAI zip."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest
import safetensors.torch
import torch
import yaml
from PIL import Image

from lora_trainer.cli import main
from publish_helpers import FAKE_TOKEN, all_bytes, copy_run, fake_token, front_matter, publish_dry  # noqa: F401

# ---- the repo folder and its card ---------------------------------------------------------------


def test_dry_run_writes_a_card_whose_front_matter_parses_and_points_at_real_images(
        trained, tiny_sd15, tmp_path, fake_token, capsys):
    out = tmp_path / "repo"
    assert publish_dry(trained.output_dir, out) == 0
    printed = capsys.readouterr()
    assert "would upload" in printed.out and "README.md" in printed.out

    from lora_trainer.fileio import new_dir_mode, new_file_mode

    assert out.stat().st_mode & 0o777 == new_dir_mode()  # not the temp folder's private 0o700
    assert (out / "README.md").stat().st_mode & 0o777 == new_file_mode()
    card = (out / "README.md").read_text(encoding="utf-8")
    meta = front_matter(card)
    assert meta["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"  # model.base was a local folder
    assert meta["license"] == "creativeml-openrail-m"
    assert {"lora", "text-to-image", "stable-diffusion", "diffusers"} <= set(meta["tags"])
    assert "sdxl" not in meta["tags"]
    assert meta["instance_prompt"] == "geoshape"
    assert [w["text"] for w in meta["widget"]] == ["geoshape, a red circle on a light blue background"]
    for entry in meta["widget"]:
        image = out / entry["output"]["url"]
        assert image.is_file()
        assert Image.open(image).info["parameters"].startswith(entry["text"])  # A1111 chunk kept
    for section in ("## Trigger words", "## Recommended prompts", "## Weight", "## Use it with diffusers",
                    "## Use it in ComfyUI", "## Training details", "## Limitations"):
        assert section in card
    # the range comes from the weight sweep training drew (samples/sweep.png, weights 0, 0.5, 1)
    assert "**0.5 – 1**" in card and "![weight sweep](images/sweep.png)" in card
    assert "| LoRA rank / alpha | 4 / 4 |" in card and "| steps | 40 |" in card

    guide = json.loads((out / "prompts.json").read_text())
    assert guide["trigger_words"] == ["geoshape"]
    assert guide["prompts"] == ["geoshape, a red circle on a light blue background"]
    assert guide["weight"] == {"default": 0.75, "min": 0.5, "max": 1.0, "source": "sweep"}

    # nothing secret or local leaves the machine: the token, the trainer's own folders
    for path, data in all_bytes(out):
        assert FAKE_TOKEN.encode() not in data, path
        assert str(tiny_sd15).encode() not in data, path
        assert str(trained.output_dir).encode() not in data, path
    assert FAKE_TOKEN not in printed.out + printed.err


def test_repo_has_both_layouts_with_the_runs_tensors(trained, tmp_path, fake_token):
    out = tmp_path / "repo"
    assert publish_dry(trained.output_dir, out) == 0
    name = trained.adapter_paths[0].stem
    for published, original in ((out / f"{name}.safetensors", trained.adapter_paths[0]),
                                (out / "pytorch_lora_weights.safetensors", trained.adapter_paths[1])):
        got, want = safetensors.torch.load_file(published), safetensors.torch.load_file(original)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_the_cards_diffusers_snippet_loads_the_repo(trained, tiny_sd15, tmp_path, fake_token):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "repo"
    assert publish_dry(trained.output_dir, out) == 0
    card = (out / "README.md").read_text()
    snippet = [ln for ln in card.splitlines() if ln.startswith(("pipe.load_lora_weights", "pipe.set_adapters"))]
    assert len(snippet) == 2
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd15), safety_checker=None, requires_safety_checker=False)
    exec("\n".join(snippet).replace('"alice/geoshape"', repr(str(out))), {"pipe": pipe})  # the repo, locally
    assert pipe.get_active_adapters() == ["example_lora"]
    want = safetensors.torch.load_file(trained.adapter_paths[1])
    key = next(k for k in want if k.endswith("to_q.lora_B.weight"))
    module = pipe.unet.get_submodule(key.removeprefix("unet.").removesuffix(".lora_B.weight"))
    torch.testing.assert_close(module.lora_B["example_lora"].weight, want[key], rtol=0, atol=0)
    assert module.scaling["example_lora"] == pytest.approx(0.75)  # alpha/rank = 1, times the swept range's middle


@pytest.mark.parametrize("only", ["kohya", "diffusers"])
def test_a_run_with_one_layout_gets_the_other_converted_exactly(trained, tmp_path, fake_token, only):
    kohya_file, diffusers_file = trained.adapter_paths
    run = copy_run(trained, tmp_path / "run", drop=(diffusers_file.name,))
    if only == "diffusers":  # a run trained with output.format=diffusers
        shutil.copyfile(diffusers_file, run / kohya_file.name)
    out = tmp_path / "repo"
    assert publish_dry(run, out) == 0
    for published, original in ((out / kohya_file.name, kohya_file),
                                (out / "pytorch_lora_weights.safetensors", diffusers_file)):
        got, want = safetensors.torch.load_file(published), safetensors.torch.load_file(original)
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), published.name
    with safetensors.safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
        config = json.loads(f.metadata()["lora_adapter_metadata"])
    assert config["unet.r"] == 4 and config["unet.lora_alpha"] == 4.0


def test_rebuilding_keeps_a_card_the_user_edited_unless_asked(trained, tmp_path, fake_token, capsys):
    out = tmp_path / "repo"
    assert publish_dry(trained.output_dir, out) == 0
    assert publish_dry(trained.output_dir, out) == 0  # unchanged since we wrote it: rebuilt freely
    (out / "README.md").write_text("my own words\n")
    capsys.readouterr()
    assert publish_dry(trained.output_dir, out) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "README.md" in err and "--overwrite" in err and err.count("\n") == 1
    assert (out / "README.md").read_text() == "my own words\n"
    assert publish_dry(trained.output_dir, out, "--overwrite") == 0
    assert (out / "README.md").read_text().startswith("---\n")


def test_a_repo_folder_or_zip_that_cannot_be_written_is_one_line(trained, tmp_path, fake_token, capsys):
    from infer_helpers import unwritable_folder

    folder = unwritable_folder(tmp_path)
    capsys.readouterr()
    for args in (["publish", str(trained.output_dir), "--hub", "alice/geoshape", "--dry-run", "--out", str(folder / "repo")],
                 ["package", str(trained.output_dir), "--civitai", str(folder / "my.zip")]):
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and f"{folder} cannot be written to (" in err and "you can write to" in err, err


def test_without_a_sweep_grid_the_card_gives_the_default_range(trained, tmp_path, fake_token):
    run = copy_run(trained, tmp_path / "run")
    (run / "samples" / "sweep.png").unlink()  # a run trained with sample.grid_weights=[]
    out = tmp_path / "repo"
    assert publish_dry(run, out) == 0
    assert json.loads((out / "prompts.json").read_text())["weight"] == {
        "default": 0.8, "min": 0.6, "max": 1.0, "source": "default"}
    assert "default range, not measured" in (out / "README.md").read_text()


def test_sweep_grid_sets_the_weight_range_and_the_loss_curve_is_shown(trained, tmp_path, fake_token):
    from lora_trainer.pnginfo import GenerationInfo, save_png

    run = copy_run(trained, tmp_path / "run")
    # The parameters text exactly as the inference sweep writes it.
    info = GenerationInfo(prompt="geoshape, a red circle", steps=10, extra={"Sweep": "example-lora: 0,0.25,0.5,0.75,1.25"})
    save_png(Image.new("RGB", (64, 32)), run / "samples" / "sweep.png", info)
    Image.new("RGB", (32, 32), "white").save(run / "loss.png")
    out = tmp_path / "repo"
    assert publish_dry(run, out) == 0
    assert json.loads((out / "prompts.json").read_text())["weight"] == {
        "default": 0.75, "min": 0.25, "max": 1.25, "source": "sweep"}
    card = (out / "README.md").read_text()
    assert "**0.25 – 1.25**" in card and "![weight sweep](images/sweep.png)" in card
    assert (out / "images" / "sweep.png").is_file()
    assert "![training loss](images/loss.png)" in card and (out / "images" / "loss.png").is_file()


# ---- CivitAI package ------------------------------------------------------------------------------


def test_civitai_zip_holds_the_listed_files_and_loads_with_our_inference(trained, tiny_sd15, tmp_path, fake_token):
    from lora_trainer.export.layouts import kohya_to_peft
    from lora_trainer.inference.adapters import AdapterSpec
    from lora_trainer.inference.generate import Generator

    out = tmp_path / "geoshape.zip"
    assert main(["package", str(trained.output_dir), "--civitai", str(out)]) == 0
    name = trained.adapter_paths[0].name
    with zipfile.ZipFile(out) as z:
        assert sorted(z.namelist()) == sorted([name, "images/00.png", "images/sweep.png", "civitai.json", "prompts.json", "README.txt"])
        # unpacked readable by everyone (rw-r--r--), not private like the temp files they came from
        assert {z.getinfo(n).external_attr >> 16 for n in z.namelist()} == {0o100644}
        z.extractall(tmp_path / "unzipped")
    root = tmp_path / "unzipped"
    fields = json.loads((root / "civitai.json").read_text())
    assert fields["type"] == "LORA" and fields["baseModel"] == "SD 1.5" and fields["name"] == "example-lora"
    assert fields["trainedWords"] == ["geoshape"]
    assert fields["recommendedWeight"] == {"default": 0.75, "min": 0.5, "max": 1.0, "source": "sweep"}
    assert fields["description"] and fields["file"] == name
    assert Image.open(root / "images" / "00.png").info["parameters"].startswith("geoshape, a red circle")
    assert "Trigger words: geoshape" in (root / "README.txt").read_text()
    for path, data in all_bytes(root):
        assert FAKE_TOKEN.encode() not in data, path

    tensors = safetensors.torch.load_file(root / name)
    assert {t.dtype for k, t in tensors.items() if not k.endswith(".alpha")} == {torch.float16}
    assert {t.dtype for k, t in tensors.items() if k.endswith(".alpha")} == {torch.float32}
    with safetensors.safe_open(str(root / name), "pt") as f:
        metadata = f.metadata()
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_network_dim"] == "4"
    assert metadata["ss_sd_model_name"] == Path(tiny_sd15).name  # the local path is not published

    # the file loads with our inference module, every module with the trained values (to fp16)
    generator = Generator(tiny_sd15, [AdapterSpec(root / name, 1.0)], device="cpu", dtype=torch.float32)
    pipe, [adapter] = generator.pipe, list(generator.adapters.specs)
    states, _ = kohya_to_peft(safetensors.torch.load_file(trained.adapter_paths[0]))
    for key, want in states["unet"].items():
        module, part = key.rsplit(".lora_", 1)
        layer = getattr(pipe.unet.get_submodule(module), f"lora_{part.split('.')[0]}")[adapter]
        torch.testing.assert_close(layer.weight, want.to(torch.float16).float(), rtol=0, atol=0)


# ---- SDXL -----------------------------------------------------------------------------------------


def _sdxl_run(root: Path) -> Path:
    """A run folder as an SDXL training writes it (config, kohya file, one sample), without training."""
    from lora_trainer.config import config_from_dict, dump_config
    from lora_trainer.export.files import save_adapter
    from lora_trainer.export.metadata import kohya_metadata
    from lora_trainer.pnginfo import GenerationInfo, save_png

    cfg = config_from_dict({
        "model": {"base": "stabilityai/stable-diffusion-xl-base-1.0", "variant": "sdxl"},
        "data": {"path": "/data/me/portraits", "resolution": 1024},
        "dreambooth": {"instance_prompt": "a photo of sks person"},
        "lora": {"rank": 2, "alpha": 1, "train_text_encoder": True},
        "train": {"max_steps": 500},
        "sample": {"prompts": ["a photo of sks person in a garden"], "negative_prompt": "blurry"},
        "output": {"dir": str(root), "name": "sks-person"},
    })
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(dump_config(cfg))
    gen = torch.Generator().manual_seed(0)

    def pair(d_in, d_out):
        return {"lora_A.weight": torch.randn(2, d_in, generator=gen), "lora_B.weight": torch.randn(d_out, 2, generator=gen)}

    states = {
        "unet": {f"{m}.{k}": v for m in ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
                                         "up_blocks.0.attentions.2.transformer_blocks.1.attn2.to_k")
                 for k, v in pair(8, 8).items()},
        "text_encoder": {f"text_model.encoder.layers.0.self_attn.q_proj.{k}": v for k, v in pair(8, 8).items()},
        "text_encoder_2": {f"text_model.encoder.layers.1.self_attn.v_proj.{k}": v for k, v in pair(16, 16).items()},
    }
    metadata = kohya_metadata(rank=2, alpha=1.0, base_model_version="sdxl_base_v1-0", resolution=1024, steps=500,
                              trigger_phrase="a photo of sks person", output_name="sks-person",
                              dataset_dirs={"portraits": {"n_repeats": 1, "img_count": 12}})
    save_adapter(root / "sks-person.safetensors", states, 2, 1.0, metadata=metadata, dtype=torch.float32, base="sdxl")
    save_png(Image.new("RGB", (64, 64), "gray"), root / "samples" / "step_00500" / "00.png",
             GenerationInfo(prompt="a photo of sks person in a garden", negative_prompt="blurry",
                            adapters=[("sks-person", 1.0, None)]))
    return root


def test_sdxl_run_is_tagged_sdxl_and_packaged_for_sdxl(tmp_path, fake_token):
    run = _sdxl_run(tmp_path / "run")
    out = tmp_path / "repo"
    assert publish_dry(run, out) == 0
    meta = front_matter((out / "README.md").read_text())
    assert meta["base_model"] == "stabilityai/stable-diffusion-xl-base-1.0" and meta["license"] == "openrail++"
    assert {"sdxl", "lora", "stable-diffusion", "diffusers", "text-to-image"} <= set(meta["tags"])
    assert meta["instance_prompt"] == "a photo of sks person"
    assert meta["widget"] == [{"text": "a photo of sks person in a garden",
                               "parameters": {"negative_prompt": "blurry"}, "output": {"url": "images/00.png"}}]
    assert "StableDiffusionXLPipeline" in (out / "README.md").read_text()
    diffusers = safetensors.torch.load_file(out / "pytorch_lora_weights.safetensors")
    assert "unet.up_blocks.0.attentions.2.transformer_blocks.1.attn2.to_k.lora_B.weight" in diffusers
    assert "text_encoder_2.text_model.encoder.layers.1.self_attn.v_proj.lora_A.weight" in diffusers
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["data"]["path"] == "portraits" and config["output"]["dir"] == "outputs/sks-person"
    assert not any(b"/data/me" in data or str(run).encode() in data for _, data in all_bytes(out))

    assert main(["package", str(run), "--civitai", str(tmp_path / "p.zip"), "--weight", "0.7"]) == 0
    with zipfile.ZipFile(tmp_path / "p.zip") as z:
        fields = json.loads(z.read("civitai.json"))
    assert fields["baseModel"] == "SDXL 1.0" and fields["trainedWords"] == ["a photo of sks person"]
    assert fields["recommendedWeight"] == {"default": 0.7, "min": 0.5, "max": 0.9, "source": "user"}
    assert fields["negativePrompt"] == "blurry"


def test_public_config_names_local_folders_and_files_by_name_only(trained, tmp_path):
    """The run's validation folder, init_from file, single-file config folder and latent cache
    folder were published with their full local paths (as class_data and mask_dir were not)."""
    import copy

    from lora_trainer.publish.hub import _public_config
    from lora_trainer.publish.run import read_run

    run = read_run(trained.output_dir)
    run.cfg = copy.deepcopy(run.cfg)
    local = tmp_path / "private" / "me"
    run.cfg.data.validation_path = str(local / "held-out")
    run.cfg.data.mask_dir = str(local / "masks")
    run.cfg.lora.init_from = str(local / "old.safetensors")
    run.cfg.model.config_dir = str(local / "sd15-config")
    run.cfg.train.cache_latents_to_disk, run.cfg.train.cache_dir = True, str(local / "cache")
    config = yaml.safe_load(_public_config(run, "stable-diffusion-v1-5/stable-diffusion-v1-5"))
    assert str(tmp_path) not in yaml.safe_dump(config)
    assert (config["data"]["validation_path"], config["data"]["mask_dir"]) == ("held-out", "masks")
    assert (config["lora"]["init_from"], config["model"]["config_dir"]) == ("old.safetensors", "sd15-config")
    assert config["train"]["cache_dir"] is None and config["train"]["cache_latents_to_disk"] is True



def test_a_run_trained_with_ema_says_so_in_the_card_and_the_civitai_fields(trained, tmp_path, fake_token):
    # the adapter's metadata is what training records with train.ema_decay; the card must not present
    # an averaged adapter as the last step's weights
    run = copy_run(trained, tmp_path / "run")
    adapter = run / trained.adapter_paths[0].name
    with safetensors.safe_open(adapter, "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    safetensors.torch.save_file(tensors, adapter, metadata={**meta, "ss_ema_decay": "0.995", "ss_ema_warmup": "False"})
    assert publish_dry(run, tmp_path / "repo") == 0
    card = (tmp_path / "repo" / "README.md").read_text(encoding="utf-8")
    assert "| EMA of the weights | decay 0.995: the files hold the averaged adapter" in card
    assert main(["package", str(run), "--civitai", str(tmp_path / "c.zip")]) == 0
    with zipfile.ZipFile(tmp_path / "c.zip") as z:
        assert json.loads(z.read("civitai.json"))["training"]["emaDecay"] == 0.995
        assert "an EMA of the training (decay 0.995)" in z.read("README.txt").decode()
    # a run without EMA gets no such row
    assert publish_dry(trained.output_dir, tmp_path / "plain") == 0
    assert "EMA" not in (tmp_path / "plain" / "README.md").read_text(encoding="utf-8")


def test_a_run_trained_with_its_own_vae_names_it_and_publishes_no_local_path(trained, tmp_path, fake_token):
    # model.vae draws the latents and every sample image: the card and prompts.json said nothing of
    # it, and the published config.yaml kept the VAE file's full local path
    run = copy_run(trained, tmp_path / "run")
    local = tmp_path / "private" / "VAE" / "vae-ft-mse.safetensors"
    config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    config["model"]["vae"] = str(local)
    (run / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    adapter = run / trained.adapter_paths[0].name
    with safetensors.safe_open(adapter, "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    safetensors.torch.save_file(tensors, adapter, metadata={**meta, "ss_vae_name": local.name})
    assert publish_dry(run, tmp_path / "repo") == 0
    repo = tmp_path / "repo"
    assert "| VAE | `vae-ft-mse.safetensors`" in (repo / "README.md").read_text(encoding="utf-8")
    assert json.loads((repo / "prompts.json").read_text())["settings"]["vae"] == "vae-ft-mse.safetensors"
    published = (repo / "config.yaml").read_text(encoding="utf-8")
    assert str(tmp_path) not in published and yaml.safe_load(published)["model"]["vae"] == "vae-ft-mse.safetensors"
    assert main(["package", str(run), "--civitai", str(tmp_path / "c.zip")]) == 0
    with zipfile.ZipFile(tmp_path / "c.zip") as z:
        assert json.loads(z.read("prompts.json"))["settings"]["vae"] == "vae-ft-mse.safetensors"
        readme = z.read("README.txt").decode()
        assert "VAE: vae-ft-mse.safetensors, not the base's: the previews were drawn with it" in readme
    config["model"]["vae"] = "madebyollin/sdxl-vae-fp16-fix"  # a hub id is published as it is
    (run / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    assert publish_dry(run, tmp_path / "hub-vae") == 0
    assert yaml.safe_load((tmp_path / "hub-vae" / "config.yaml").read_text())["model"]["vae"] == config["model"]["vae"]
    # a run with the base's VAE says nothing of one
    assert publish_dry(trained.output_dir, tmp_path / "plain") == 0
    assert "| VAE |" not in (tmp_path / "plain" / "README.md").read_text(encoding="utf-8")
    assert "vae" not in json.loads((tmp_path / "plain" / "prompts.json").read_text())["settings"]
