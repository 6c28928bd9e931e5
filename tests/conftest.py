"""Shared fixtures: each tiny model is built once per test session, through the real save/load path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
# The commands tests start (train.py, torch.distributed.run) run one OpenMP thread too: see below.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def _single_thread():
    # Tiny models gain nothing from threads, and on a busy 2-core machine OpenMP threads waiting
    # for each other make every op many times slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_sd15(tmp_path_factory) -> Path:
    from lora_trainer.testing.tiny import make_sd15

    return make_sd15(tmp_path_factory.mktemp("tiny-sd15") / "model")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    from lora_trainer.testing.tiny import make_sdxl

    return make_sdxl(tmp_path_factory.mktemp("tiny-sdxl") / "model")


@pytest.fixture(scope="session")
def tiny_blip2(tmp_path_factory) -> Path:
    from lora_trainer.testing.tiny_blip2 import make_blip2

    return make_blip2(tmp_path_factory.mktemp("tiny-blip2") / "model")


@pytest.fixture(scope="session")
def tiny_wd14(tmp_path_factory) -> Path:
    from lora_trainer.testing.tiny_wd14 import make_wd14

    return make_wd14(tmp_path_factory.mktemp("tiny-wd14") / "model")


@pytest.fixture(scope="session")
def example_data() -> Path:
    return REPO / "datasets" / "example"


def recorded_cache_keys(monkeypatch) -> list[tuple]:
    """The latent cache keys of every batch a run encodes or reads, in order (a list filled as it trains)."""
    from lora_trainer.training import caches

    keys: list[tuple] = []
    distributions = caches.LatentCache.distributions

    def recording(self, batch_keys, *args, **kwargs):
        keys.extend(batch_keys)
        return distributions(self, batch_keys, *args, **kwargs)

    monkeypatch.setattr(caches.LatentCache, "distributions", recording)
    return keys


def model_outputs(unet, text_encoder):
    """The tiny SD1.5 UNet's and text encoder's outputs on fixed seeded inputs (eval mode, no grad):
    what a file loaded elsewhere must reproduce."""
    import torch

    g = torch.Generator().manual_seed(7)
    latents, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([100, 700])
    hidden, ids = torch.randn(2, 77, 32, generator=g), torch.randint(0, 400, (1, 77), generator=g)
    unet.eval()
    text_encoder.eval()
    with torch.no_grad():
        return unet(latents, t, hidden).sample, text_encoder(ids)[0]


def run_config(tiny_model: Path, data: Path, out_dir: Path, *overrides: str):
    """The example config pointed at the session's tiny model, with overrides."""
    from lora_trainer.config import load_config

    return load_config(REPO / "configs" / "example.yaml",
                       [f"model.base={tiny_model}", f"data.path={data}", f"output.dir={out_dir}", *overrides])


@pytest.fixture(scope="session")
def trained(tiny_sd15, example_data, tmp_path_factory):
    """One in-process run of the example config (fp32 file, so outputs can be compared tightly)."""
    from lora_trainer.training.loop import train

    out = tmp_path_factory.mktemp("run") / "out"
    cfg = run_config(tiny_sd15, example_data, out, "output.dtype=fp32", "output.format=both")
    return train(cfg, show_progress=False)


# --- inference extras (adapters with ΔW ≠ 0, ControlNet, SDXL refiner), built once per session ---
@pytest.fixture(scope="session")
def random_adapters(tiny_sd15, tmp_path_factory) -> dict[str, Path]:
    """'a': kohya layout, UNet + text encoder, rank 4 alpha 2; 'b': diffusers layout, UNet only,
    rank 2 alpha 4. Different ranks/alphas so a wrong scale cannot hide."""
    from lora_trainer.testing.inference_models import make_random_adapter

    out = tmp_path_factory.mktemp("adapters")
    return {
        "a": make_random_adapter(tiny_sd15, out / "a.safetensors", layout="kohya", rank=4, alpha=2.0, seed=1),
        "b": make_random_adapter(tiny_sd15, out / "b.safetensors", layout="diffusers", rank=2, alpha=4.0, seed=2,
                                 text_encoder=False),
    }


@pytest.fixture(scope="session")
def tiny_controlnet(tiny_sd15, tmp_path_factory) -> Path:
    from lora_trainer.testing.inference_models import make_controlnet

    return make_controlnet(tiny_sd15, tmp_path_factory.mktemp("controlnet") / "model")


@pytest.fixture(scope="session")
def two_process_runs(tiny_sd15, example_data, tmp_path_factory) -> dict[str, Path]:
    """The multi-process tests' runs (rank_helpers.TWO_PROCESS_RUNS), all under one launch of 2 processes."""
    from rank_helpers import launch_two_process_runs

    return launch_two_process_runs(REPO, tiny_sd15, example_data, tmp_path_factory.mktemp("two-processes"))
