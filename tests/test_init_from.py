"""lora.init_from: a run starts from an existing adapter file (kohya's --network_weights)."""

from __future__ import annotations

import pytest
import torch

from conftest import run_config
from lora_trainer.errors import ConfigError
from lora_trainer.export.adapter import read_adapter


def _deltas(path) -> dict[str, torch.Tensor]:
    return {f"{c}.{p}": m.delta(torch.float64) for c, p, m in read_adapter(path).items()}


def _one_frozen_step(tiny_sd15, example_data, out, *overrides):
    """One optimizer step at a learning rate too small to move anything: the exported file is the
    run's starting point."""
    from lora_trainer.training.loop import train

    cfg = run_config(tiny_sd15, example_data, out, "train.max_steps=1", "train.lr=1e-12", "train.warmup=0",
                     "output.dtype=fp32", "sample.prompts=[]", *overrides)
    return train(cfg, show_progress=False)


def test_run_starts_from_a_kohya_file_with_another_alpha(tiny_sd15, example_data, random_adapters, tmp_path):
    source = random_adapters["a"]  # kohya, UNet + text encoder, rank 4, alpha 2
    result = _one_frozen_step(tiny_sd15, example_data, tmp_path / "run", f"lora.init_from={source}",
                              "lora.rank=4", "lora.alpha=8", "lora.train_text_encoder=true",
                              "train.text_encoder_lr=0")
    want, got = _deltas(source), _deltas(result.adapter_paths[0])
    assert set(got) == set(want) and any(k.startswith("text_encoder.") for k in got)
    assert read_adapter(result.adapter_paths[0]).common_alpha() == 8.0
    for key, delta in want.items():
        assert delta.abs().max() > 1e-4
        torch.testing.assert_close(got[key], delta, rtol=0, atol=1e-6, msg=key)


def test_run_starts_from_a_diffusers_file(tiny_sd15, example_data, random_adapters, tmp_path):
    source = random_adapters["b"]  # diffusers layout, UNet only, rank 2, alpha 4
    result = _one_frozen_step(tiny_sd15, example_data, tmp_path / "run", f"lora.init_from={source}", "lora.rank=2")
    want, got = _deltas(source), _deltas(result.adapter_paths[0])
    assert set(got) == set(want)
    for key, delta in want.items():
        torch.testing.assert_close(got[key], delta, rtol=0, atol=1e-6, msg=key)


def test_training_moves_away_from_the_initial_adapter(tiny_sd15, example_data, random_adapters, tmp_path):
    from lora_trainer.training.loop import train

    source = random_adapters["b"]
    cfg = run_config(tiny_sd15, example_data, tmp_path / "run", f"lora.init_from={source}", "lora.rank=2",
                     "train.max_steps=3", "train.lr=1e-2", "output.dtype=fp32", "sample.prompts=[]")
    got = _deltas(train(cfg, show_progress=False).adapter_paths[0])
    moved = max((got[k] - d).abs().max().item() for k, d in _deltas(source).items())
    assert moved > 1e-4


@pytest.mark.parametrize("overrides, message", [
    (["lora.rank=8", "lora.train_text_encoder=true"], "has rank 4 but lora.rank is 8"),
    (["lora.rank=4"], "set lora.train_text_encoder=true"),
    (["lora.rank=4", "lora.train_text_encoder=true", "lora.unet_targets=[to_q]"], "add their names to lora.unet_targets"),
])
def test_mismatched_files_are_refused_with_the_key(tiny_sd15, example_data, random_adapters, tmp_path,
                                                   overrides, message):
    from lora_trainer.training.loop import train

    cfg = run_config(tiny_sd15, example_data, tmp_path / "run", f"lora.init_from={random_adapters['a']}",
                     "train.max_steps=1", *overrides)
    with pytest.raises(ConfigError, match=message) as err:
        train(cfg, show_progress=False)
    assert str(err.value).startswith("lora.init_from:") and "\n" not in str(err.value)
    assert not (tmp_path / "run" / "lora.safetensors").exists()


def test_missing_or_foreign_files_fail_before_any_model_loads(tiny_sd15, tiny_sdxl, example_data, tmp_path):
    from lora_trainer.testing.inference_models import make_random_adapter
    from lora_trainer.training.loop import train

    cfg = run_config(tiny_sd15, example_data, tmp_path / "a", f"lora.init_from={tmp_path / 'nope.safetensors'}")
    with pytest.raises(ConfigError, match="nope.safetensors not found"):
        train(cfg, show_progress=False)
    sdxl_file = make_random_adapter(tiny_sdxl, tmp_path / "xl.safetensors", variant="sdxl", text_encoder=False)
    cfg = run_config(tiny_sd15, example_data, tmp_path / "b", f"lora.init_from={sdxl_file}")
    with pytest.raises(ConfigError, match="is an SDXL adapter .* but model.base is SD 1.x"):
        train(cfg, show_progress=False)
