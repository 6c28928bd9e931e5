"""model.vae: a separate VAE from a file (original layout), a VAE folder or a model folder, what
training encodes with, the latent cache keyed by it, and the refusals of VAEs that do not fit."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from PIL import Image

from conftest import run_config
from lora_trainer.errors import ModelError
from lora_trainer.testing.tiny_vae import make_vae

FAST = ["sample.prompts=[]", "output.dtype=fp32", "train.max_steps=3", "data.random_flip=false"]


@pytest.fixture(scope="module")
def vaes(tiny_sd15, tmp_path_factory) -> dict[str, Path]:
    """The base's own VAE in every form, and another one (other random weights) as a file."""
    out = tmp_path_factory.mktemp("vaes")
    return {
        "file": make_vae(tiny_sd15, out / "own.safetensors", single_file=True),
        "checkpoint": make_vae(tiny_sd15, out / "own-ckpt.safetensors", single_file=True, prefix="first_stage_model."),
        "folder": make_vae(tiny_sd15, out / "own-folder"),
        "other": make_vae(tiny_sd15, out / "other.safetensors", seed=5, single_file=True),
    }


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


def _base_vae(tiny_sd15):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(tiny_sd15, subfolder="vae")


def test_file_checkpoint_vae_folder_and_model_folder_load_the_same_weights(tiny_sd15, vaes):
    from diffusers import AutoencoderKL

    from lora_trainer.models.vae import load_vae

    base = _base_vae(tiny_sd15)
    want = base.state_dict()
    for source in (vaes["file"], vaes["checkpoint"], vaes["folder"], tiny_sd15):
        got = load_vae(str(source), base, torch.float32).state_dict()
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), source
    other = load_vae(str(vaes["other"]), base, torch.float32).state_dict()
    assert not torch.equal(other["decoder.conv_out.weight"], want["decoder.conv_out.weight"])
    # the file is read as diffusers' own single-file loading reads it
    theirs = AutoencoderKL.from_single_file(str(vaes["other"]), config=str(tiny_sd15), subfolder="vae",
                                            local_files_only=True).state_dict()
    assert theirs.keys() == other.keys() and all(torch.equal(theirs[k], other[k]) for k in theirs)


def test_load_base_uses_model_vae_and_encodes_with_it(tiny_sd15, vaes):
    from lora_trainer.config import ModelConfig
    from lora_trainer.models.loading import load_base
    from lora_trainer.models.vae import load_vae

    base = load_base(ModelConfig(base=str(tiny_sd15), vae=str(vaes["other"])), torch.float32)
    other = load_vae(str(vaes["other"]), _base_vae(tiny_sd15), torch.float32)
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert torch.equal(base.vae.encode(pixels).latent_dist.mean, other.encode(pixels).latent_dist.mean)
    assert not base.vae.training and not any(p.requires_grad for p in base.vae.parameters())


def test_a_copy_of_the_base_vae_trains_exactly_as_none_and_is_in_the_metadata(tiny_sd15, example_data, vaes, tmp_path):
    from lora_trainer.training.loop import train

    plain = train(run_config(tiny_sd15, example_data, tmp_path / "plain", *FAST), show_progress=False)
    copy = train(run_config(tiny_sd15, example_data, tmp_path / "copy", *FAST, f"model.vae={vaes['file']}",
                            "sample.prompts=[a red circle]", "sample.steps=2"), show_progress=False)
    assert copy.losses == plain.losses
    samples = list((tmp_path / "copy" / "samples").rglob("*.png"))  # drawn with it, and their PNGs say so
    assert samples and all("VAE: own.safetensors" in Image.open(p).text["parameters"] for p in samples)
    meta = safetensors.safe_open(str(copy.adapter_paths[0]), "pt").metadata()
    digest = hashlib.sha256(vaes["file"].read_bytes()).hexdigest()
    assert (meta["ss_vae_name"], meta["ss_new_vae_hash"]) == ("own.safetensors", digest)
    assert len(meta["ss_vae_hash"]) == 8  # kohya's (A1111's old) short hash
    assert "ss_vae_name" not in safetensors.safe_open(str(plain.adapter_paths[0]), "pt").metadata()
    assert f"vae: {vaes['file']}" in (tmp_path / "copy" / "config.yaml").read_text()


def _entries(folder: Path) -> dict[Path, torch.Tensor]:
    return {p: safetensors.torch.load_file(str(p))["mean"] for p in folder.rglob("*.safetensors")}


def test_another_vae_gives_its_own_latents_and_never_reuses_another_vaes_disk_cache(
        tiny_sd15, example_data, vaes, tmp_path, caplog):
    from lora_trainer.data.dataset import load_image, to_tensor
    from lora_trainer.models.vae import load_vae
    from lora_trainer.training.loop import train

    cache = tmp_path / "cache"
    disk = ["train.cache_latents_to_disk=true", f"train.cache_dir={cache}"]
    plain = train(run_config(tiny_sd15, example_data, tmp_path / "a", *FAST, *disk), show_progress=False)
    first = _entries(cache / "latents")
    assert len(first) == 6  # 3 steps × batch 2, each image once
    with caplog.at_level(logging.INFO, logger="lora_trainer"):
        other = train(run_config(tiny_sd15, example_data, tmp_path / "b", *FAST, *disk, f"model.vae={vaes['other']}"),
                      show_progress=False)
    assert "0 entries read from disk" in caplog.text  # a fresh encode, beside the first VAE's entries
    assert other.losses != plain.losses
    second = {p: mean for p, mean in _entries(cache / "latents").items() if p not in first}
    assert len(second) == 6
    # every latent trained on is the other VAE's encoding of an image
    vae = load_vae(str(vaes["other"]), _base_vae(tiny_sd15), torch.float32)
    with torch.no_grad():
        means = [vae.encode(to_tensor(load_image(p))[None]).latent_dist.mean[0]
                 for p in sorted(example_data.glob("*.png"))]
    for mean in second.values():
        assert any(torch.allclose(mean, m, atol=1e-6) for m in means)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lora_trainer"):
        again = train(run_config(tiny_sd15, example_data, tmp_path / "c", *FAST, *disk), show_progress=False)
    assert "6 entries read from disk" in caplog.text and again.losses == plain.losses


def _refusal(tiny_sd15, source) -> str:
    """The one-line error of loading the tiny base with model.vae=source."""
    from lora_trainer.config import ModelConfig
    from lora_trainer.models.loading import load_base

    with pytest.raises(ModelError) as err:
        load_base(ModelConfig(base=str(tiny_sd15), vae=str(source)), torch.float32)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_missing_and_pickle_vaes_are_refused_before_any_model_loads(tiny_sd15, example_data, tmp_path, monkeypatch):
    from lora_trainer.models import loading
    from lora_trainer.training.loop import train

    monkeypatch.setattr(loading, "_load_components", lambda *a: pytest.fail("the base loaded"))
    (tmp_path / "vae.ckpt").write_bytes(b"not really a pickle")
    (tmp_path / "empty").mkdir()
    cases = {"missing.safetensors": "does not exist", "vae.ckpt": "is a pickle (.ckpt)",
             "empty": "neither config.json", "not/a/hub/id": "is not a hub id"}
    for name, says in cases.items():
        source = tmp_path / name if not name.startswith("not/") else name
        with pytest.raises(ModelError) as err:
            train(run_config(tiny_sd15, example_data, tmp_path / "out", *FAST, f"model.vae={source}"),
                  show_progress=False)
        text = str(err.value)
        assert text.startswith("model.vae: ") and says in text and "\n" not in text, text
    assert not (tmp_path / "out" / "config.yaml").exists()


def test_vaes_that_do_not_fit_the_base_are_refused_naming_the_file(tiny_sd15, tmp_path):
    channels = make_vae(tiny_sd15, tmp_path / "ch8", seed=1, latent_channels=8)
    assert "latent channels 8, the base's VAE 4" in _refusal(tiny_sd15, channels)
    scaled = make_vae(tiny_sd15, tmp_path / "sdxl-scale", seed=1, scaling_factor=0.13025)
    assert "scaling factor 0.13025, the base's VAE 0.18215" in _refusal(tiny_sd15, scaled)
    deeper = make_vae(tiny_sd15, tmp_path / "deeper.safetensors", seed=1, single_file=True, layers_per_block=2)
    text = _refusal(tiny_sd15, deeper)
    assert str(deeper) in text and "has unexpected tensors" in text and "another architecture" in text
    # a folder whose weights are not those its config describes
    broken = make_vae(tiny_sd15, tmp_path / "broken", seed=1)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "layers_per_block": 2}))
    assert "do not fit its config" in _refusal(tiny_sd15, broken)
    lora = tmp_path / "lora.safetensors"
    safetensors.torch.save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(lora))
    assert "not a VAE" in _refusal(tiny_sd15, lora)


def test_a_whole_checkpoint_of_the_other_family_is_refused_as_the_vae(tiny_sd15, tmp_path):
    # an SDXL checkpoint's VAE has an SD1.x VAE's shapes: given to an SD1.x base it loaded, and its
    # latents were scaled by SD1.x's factor; a whole checkpoint says its family, so it is refused
    from lora_trainer.config import ModelConfig
    from lora_trainer.models.loading import load_base

    path = make_vae(tiny_sd15, tmp_path / "sd_xl_base.safetensors", seed=1, single_file=True,
                    prefix="first_stage_model.")
    vae = safetensors.torch.load_file(str(path))
    unet = {"model.diffusion_model.out.0.weight": torch.ones(2)}
    safetensors.torch.save_file({**vae, **unet, "conditioner.embedders.1.model.ln_final.weight": torch.ones(2)},
                                str(path))
    assert _refusal(tiny_sd15, path) == (
        f"model.vae: {path} is a whole SDXL checkpoint and the base is SD1.x: its VAE scales latents for SDXL; "
        "use a VAE made for this base")
    safetensors.torch.save_file({**vae, **unet, "cond_stage_model.transformer.x": torch.ones(2)}, str(path))
    assert load_base(ModelConfig(base=str(tiny_sd15), vae=str(path)), torch.float32).vae is not None


def test_sdxl_vae_dtype_follows_its_config_under_fp16(tiny_sdxl, tmp_path):
    """SDXL's VAE overflows in fp16 and stays fp32; one whose config says it does not (the fp16-fix
    VAE) is kept in fp16, as the base's own would be."""
    from lora_trainer.config import ModelConfig
    from lora_trainer.models.loading import load_base

    fixed = make_vae(tiny_sdxl, tmp_path / "fp16-fix", seed=2, force_upcast=False)
    for source, dtype in ((make_vae(tiny_sdxl, tmp_path / "own.safetensors", single_file=True), torch.float32),
                          (fixed, torch.float16)):
        base = load_base(ModelConfig(base=str(tiny_sdxl), vae=str(source), dtype="fp16"), torch.float16)
        assert base.vae.dtype == dtype and base.unet.dtype == torch.float16
