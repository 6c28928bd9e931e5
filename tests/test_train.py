"""Training end to end on the tiny SD1.5 model: the loss falls, the adapter file holds exactly the
targeted layers, and diffusers loads it back to the same outputs as the trained model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import safetensors
import torch
from conftest import REPO, run_config

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def _targeted_linears(unet):
    return {name: m for name, m in unet.named_modules()
            if isinstance(m, torch.nn.Linear) and name.endswith(TARGETS) and "lora_" not in name}


def _fresh_pipeline(model_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _unet_inputs():
    g = torch.Generator().manual_seed(7)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([100, 700]), torch.randn(2, 77, 32, generator=g)


@pytest.fixture(scope="module", autouse=True)
def cli_run(tiny_sd15, example_data, tmp_path_factory):
    """`python train.py` on the example config, started before this module's in-process runs: the
    process spends most of its time importing, on a core those runs leave idle. The last test reads it."""
    folder = tmp_path_factory.mktemp("cli")
    out = folder / "run"
    # files, not pipes: nobody reads a pipe until the last test, and a full one would stall the run
    with open(folder / "stdout.txt", "w") as stdout, open(folder / "stderr.txt", "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "train.py", "configs/example.yaml", f"model.base={tiny_sd15}",
             f"data.path={example_data}", f"output.dir={out}", "train.max_steps=4", "--quiet"],
            cwd=REPO, stdout=stdout, stderr=stderr, text=True,
        )
    yield proc, folder
    if proc.poll() is None:  # its test did not run
        proc.kill()
        proc.wait()


def test_example_config_loss_falls(trained):
    losses = trained.losses
    assert len(losses) == 40
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10


def test_trainable_parameter_count_is_sum_of_r_times_din_plus_dout(trained, tiny_sd15):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet")
    rank = 4
    expected = sum(rank * (m.in_features + m.out_features) for m in _targeted_linears(unet).values())
    assert expected > 0
    assert trained.trainable_parameters == expected


def test_adapter_keys_and_shapes_match_targets(trained, tiny_sd15):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet")
    expected = {}
    for name, m in _targeted_linears(unet).items():
        stem = "lora_unet_" + name.replace(".", "_")
        expected[f"{stem}.lora_down.weight"] = (4, m.in_features)
        expected[f"{stem}.lora_up.weight"] = (m.out_features, 4)
        expected[f"{stem}.alpha"] = ()
    with safetensors.safe_open(str(trained.output_dir / "example-lora.safetensors"), "pt") as f:
        got = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        meta = f.metadata()
        alpha = f.get_tensor(next(k for k in f.keys() if k.endswith(".alpha")))
    assert got == expected
    assert float(alpha) == 4.0
    assert meta["ss_network_dim"] == "4" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_steps"] == "40" and meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["ss_sd_model_name"] == tiny_sd15.name  # a local base by name, not its path
    assert json.loads(meta["ss_tag_frequency"])["example"]["geoshape"] == 8


def test_kohya_file_loads_in_diffusers_with_trained_outputs(trained, tiny_sd15):
    latents, t, hidden = _unet_inputs()
    trained.unet.eval()
    with torch.no_grad():
        reference = trained.unet(latents, t, hidden).sample
    base = _fresh_pipeline(tiny_sd15)
    with torch.no_grad():
        base_out = base.unet(latents, t, hidden).sample
    assert (reference - base_out).abs().max() > 1e-3  # the adapter really changes the output

    for name in ("example-lora.safetensors", "example-lora.diffusers.safetensors"):
        pipe = _fresh_pipeline(tiny_sd15)
        pipe.load_lora_weights(str(trained.output_dir / name), adapter_name="mine")
        with torch.no_grad():
            loaded = pipe.unet(latents, t, hidden).sample
        assert (loaded - reference).abs().max() < 1e-4, name
        pipe.set_adapters(["mine"], [0.0])
        with torch.no_grad():
            zero = pipe.unet(latents, t, hidden).sample
        assert torch.equal(zero, base_out), name


def test_text_encoder_adapter_round_trips(tiny_sd15, example_data, tmp_path):
    from lora_trainer.training.loop import train

    cfg = run_config(tiny_sd15, example_data, tmp_path / "te", "lora.train_text_encoder=true", "train.max_steps=6",
                     "train.text_encoder_lr=5e-3", "output.dtype=fp32", "sample.prompts=[]")
    result = train(cfg, show_progress=False)
    with safetensors.safe_open(str(result.adapter_paths[0]), "pt") as f:
        te_keys = [k for k in f.keys() if k.startswith("lora_te_")]
    assert len(te_keys) == 2 * 3 * 4  # 2 layers × 4 projections × (down, up, alpha)
    ids = torch.randint(0, 400, (1, 77), generator=torch.Generator().manual_seed(3))
    result.text_encoder.eval()
    with torch.no_grad():
        reference = result.text_encoder(ids)[0]
    pipe = _fresh_pipeline(tiny_sd15)
    with torch.no_grad():
        base = pipe.text_encoder(ids)[0]
    pipe.load_lora_weights(str(result.adapter_paths[0]))
    with torch.no_grad():
        loaded = pipe.text_encoder(ids)[0]
    assert (reference - base).abs().max() > 1e-4
    assert (loaded - reference).abs().max() < 1e-4


def test_bf16_mixed_precision_trains_with_frozen_weights_in_bf16(tiny_sd15, example_data, tmp_path):
    from lora_trainer.training.loop import train

    cfg = run_config(tiny_sd15, example_data, tmp_path / "bf16", "train.mixed_precision=bf16", "train.max_steps=4",
                     "sample.prompts=[]")
    result = train(cfg, show_progress=False)
    frozen = {p.dtype for n, p in result.unet.named_parameters() if "lora_" not in n}
    adapter = {p.dtype for n, p in result.unet.named_parameters() if "lora_" in n}
    assert frozen == {torch.bfloat16} and adapter == {torch.float32}
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert result.adapter_paths[0].is_file()


def test_latents_are_encoded_once_per_image(tiny_sd15, example_data, tmp_path, caplog):
    from lora_trainer.training.loop import train

    cfg = run_config(tiny_sd15, example_data, tmp_path / "cache", "train.max_steps=8", "data.random_flip=false",
                     "sample.prompts=[]")
    with caplog.at_level("INFO", logger="lora_trainer"):
        train(cfg, show_progress=False)
    # 8 steps × batch 2 = 16 items over 8 images: each encoded once, then reused.
    assert "latent cache: 8 entries, 8 hits, 8 misses" in caplog.text


def test_tensorboard_log_is_written(tiny_sd15, example_data, tmp_path):
    from lora_trainer.training.loop import train

    cfg = run_config(tiny_sd15, example_data, tmp_path / "tb", "train.max_steps=3", "sample.prompts=[]",
                     "log.tensorboard=true")
    train(cfg, show_progress=False)
    events = list((tmp_path / "tb" / "logs").rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_resolution_null_trains_at_the_bases_native_size(tiny_sd15, example_data, tmp_path):
    from lora_trainer.config import load_config
    from lora_trainer.training.loop import train

    cfg = run_config(tiny_sd15, example_data, tmp_path / "native", "data.resolution=null", "train.max_steps=1",
                     "sample.prompts=[]", "train.batch_size=1")
    result = train(cfg, show_progress=False)
    assert load_config(tmp_path / "native" / "config.yaml").data.resolution == 512
    assert result.steps == 1


def test_cli_trains_example_config(cli_run, tiny_sd15):
    # A few steps: the loss falling over the example config's run is test_example_config_loss_falls.
    proc, folder = cli_run
    proc.wait(timeout=600)
    out, stdout = folder / "run", (folder / "stdout.txt").read_text()
    assert proc.returncode == 0, (folder / "stderr.txt").read_text()[-3000:]
    adapter = out / "example-lora.safetensors"
    assert adapter.is_file()
    assert f"adapter: {adapter}" in stdout
    losses = [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(losses) == 4
    assert (out / "config.yaml").is_file()
    assert sorted(p.name for p in (out / "samples" / "step_00004").iterdir()) == ["00.png"]
    # The resolved config is complete: loading it again gives the same run.
    from lora_trainer.config import load_config

    resolved = load_config(out / "config.yaml")
    assert resolved.train.max_steps == 4 and resolved.model.base == str(tiny_sd15)
