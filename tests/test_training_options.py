"""Training options: aspect buckets, the latent cache (memory and disk), optimizers, v-prediction,
input perturbation and caption tag shuffling, each on the tiny models."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import safetensors
import torch
from conftest import REPO, run_config
from rank_helpers import write_mixed_aspect_images
from PIL import Image

from lora_trainer.cli import main

FAST = ["sample.prompts=[]", "output.dtype=fp32"]


def _losses(out):
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def mixed_aspect_data(tmp_path_factory):
    sizes = [(160, 90), (150, 80), (90, 160), (80, 150), (120, 120), (100, 100), (170, 95)]
    return write_mixed_aspect_images(tmp_path_factory.mktemp("mixed"), sizes)


def test_buckets_keep_aspect_and_every_batch_has_one_shape(mixed_aspect_data, tiny_sd15):
    from lora_trainer.data import scan_dataset
    from lora_trainer.data.buckets import assign_buckets, bucket_sizes
    from lora_trainer.training.loaders import make_dataset, make_loader

    assert bucket_sizes(1024) == [(1344, 768), (1216, 832), (1152, 896), (1088, 960), (1024, 1024),
                                  (960, 1088), (896, 1152), (832, 1216), (768, 1344)]
    assert all(h * w <= 1024 * 1024 and h % 64 == 0 and w % 64 == 0 for h, w in bucket_sizes(1024))
    examples = scan_dataset(mixed_aspect_data)
    assert assign_buckets([e.path for e in examples], 96, 32) == [
        (64, 128), (64, 128), (128, 64), (128, 64), (96, 96), (96, 96), (64, 128)]
    cfg = run_config(tiny_sd15, mixed_aspect_data, "unused", "data.resolution=96", "data.buckets=true",
                     "data.bucket_step=32", "train.batch_size=2", "data.center_crop=false")
    dataset = make_dataset(cfg, examples, seed=0)
    loader = make_loader(cfg, dataset, seed=0)
    shapes, seen = set(), []
    for batch in loader:
        assert len({tuple(p.shape) for p in batch["pixel_values"]}) == 1
        shapes.add(tuple(batch["pixel_values"].shape[-2:]))
        seen += batch["index"].tolist()
        for original, crop in zip(batch["original_size"].tolist(), batch["crop_top_left"].tolist()):
            assert original[0] in (90, 80, 160, 150, 120, 100, 95) and min(crop) >= 0
    assert shapes == {(64, 128), (128, 64), (96, 96)}
    assert sorted(seen) == list(range(7))  # every image, none dropped for an incomplete batch


def test_bucket_batches_go_whole_to_each_process_in_turn():
    # accelerate's shard of the sampler for 2 processes: 5 batches (3 short), dealt out in turn, the
    # last round padded with the epoch's first batch; never regrouped, so never two shapes in one
    from accelerate.data_loader import BatchSamplerShard

    from lora_trainer.data.buckets import BucketBatchSampler

    sampler = BucketBatchSampler([(64, 128)] * 3 + [(128, 64)] * 3 + [(96, 96)], batch_size=2, seed=0)
    shards = [BatchSamplerShard(sampler, num_processes=2, process_index=rank) for rank in (0, 1)]
    for epoch in range(4):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert sorted(len(b) for b in batches) == [1, 1, 1, 2, 2]
        assert list(shards[0]) == batches[0::2]
        assert list(shards[1]) == batches[1::2] + batches[:1]
        assert len(shards[0]) == len(shards[1]) == 3


def test_sdxl_trains_on_mixed_aspect_buckets(mixed_aspect_data, tiny_sdxl, tmp_path):
    from lora_trainer.training.loop import train

    out = tmp_path / "b"
    cfg = run_config(tiny_sdxl, mixed_aspect_data, out, *FAST, "data.resolution=96", "data.buckets=true",
                     "data.bucket_step=32", "train.batch_size=2", "train.max_steps=4", "data.caption_prefix=")
    result = train(cfg, show_progress=False)
    assert len(result.losses) == 4 and all(torch.isfinite(torch.tensor(result.losses)))
    meta = safetensors.safe_open(str(result.adapter_paths[0]), "pt").metadata()
    assert meta["ss_enable_bucket"] == "True"


def test_latent_cache_memory_disk_and_none_give_the_same_losses(tiny_sd15, example_data, tmp_path, caplog):
    from lora_trainer.training.loop import train

    runs = {"memory": [], "none": ["train.cache_latents=false"],
            "disk": ["train.cache_latents_to_disk=true", f"train.cache_dir={tmp_path / 'cache'}"]}
    losses = {}
    for name, extra in runs.items():
        train(run_config(tiny_sd15, example_data, tmp_path / name, *FAST, "train.max_steps=4", *extra),
              show_progress=False)
        losses[name] = _losses(tmp_path / name)
    torch.testing.assert_close(losses["memory"], losses["none"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses["disk"], losses["memory"], rtol=1e-5, atol=1e-6)
    entries = list((tmp_path / "cache" / "latents").rglob("*.safetensors"))
    assert len(entries) == 8  # 4 steps × batch 2 over 8 images, each its own crop/flip
    with caplog.at_level("INFO", logger="lora_trainer"):
        train(run_config(tiny_sd15, example_data, tmp_path / "again", *FAST, "train.max_steps=4", *runs["disk"]),
              show_progress=False)
    assert "8 entries read from disk" in caplog.text
    assert _losses(tmp_path / "again") == losses["disk"]


def _one_image_cache_case(tmp_path):
    """An 8x8 image, the list of batch sizes a stand-in encoder is called with, that encoder (mean
    and std over channels), pixels, and the image's cache key."""
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(image)
    calls = []

    def encode(pixels):
        calls.append(len(pixels))
        return pixels.mean(dim=1, keepdim=True), pixels.std(dim=1, keepdim=True)

    return image, calls, encode, torch.randn(1, 3, 8, 8), [(str(image), (8, 8), False, (0, 0))]


def test_disk_cache_key_changes_with_the_image_content(tmp_path):
    from lora_trainer.training.caches import LatentCache

    image, calls, encode, pixels, key = _one_image_cache_case(tmp_path)
    LatentCache(directory=tmp_path / "c").distributions(key, pixels, encode)
    LatentCache(directory=tmp_path / "c").distributions(key, pixels, encode)  # a new run reads the file
    Image.new("RGB", (8, 8), (9, 9, 9)).save(image)  # the user edits the image
    LatentCache(directory=tmp_path / "c").distributions(key, pixels, encode)
    assert calls == [1, 1]


def test_disk_cache_is_read_on_an_indexed_cpu_device(tmp_path, caplog):
    """A process of a multi-process CPU run holds its tensors on "cpu:0"; its disk cache entries
    were refused there ("device cpu:0 is invalid") and every image was encoded again."""
    from lora_trainer.training.caches import LatentCache

    image, calls, encode, pixels, key = _one_image_cache_case(tmp_path)
    first = LatentCache(directory=tmp_path / "c", device="cpu:0").distributions(key, pixels, encode)
    again = LatentCache(directory=tmp_path / "c", device="cpu:0")
    second = again.distributions(key, pixels, encode)
    assert calls == [1] and again.disk_hits == 1 and "unreadable" not in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("optimizer, lr", [("adafactor", "1e-3"), ("prodigy", "1.0")])
def test_optional_optimizers_train(optimizer, lr, tiny_sd15, example_data, tmp_path):
    if optimizer == "prodigy":
        pytest.importorskip("prodigyopt")
    from lora_trainer.training.loop import train

    result = train(run_config(tiny_sd15, example_data, tmp_path / optimizer, *FAST, "train.max_steps=3",
                              f"train.optimizer={optimizer}", f"train.lr={lr}"), show_progress=False)
    tensors = safetensors.torch.load_file(str(result.adapter_paths[0]))
    ups = [v for k, v in tensors.items() if k.endswith("lora_up.weight")]
    assert ups and all(u.abs().max() > 0 for u in ups)  # B starts at 0: the optimizer moved it
    meta = safetensors.safe_open(str(result.adapter_paths[0]), "pt").metadata()
    assert optimizer in meta["ss_optimizer"].lower()


def test_adamw8bit_without_cuda_is_one_line_error_before_loading(example_data, tmp_path, capsys):
    rc = main(["train", str(REPO / "configs" / "example.yaml"), "model.base=/nonexistent/model",
               f"data.path={example_data}", f"output.dir={tmp_path / 'out'}", "train.optimizer=adamw8bit"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "train.optimizer" in err and "adamw8bit" in err and "\n" not in err
    assert ("bitsandbytes" in err) and ("CUDA" in err or "pip install" in err)
    assert not (tmp_path / "out").exists()


def test_adamw8bit_names_the_missing_gpu_when_bitsandbytes_is_there(monkeypatch):
    import importlib.util

    from lora_trainer.config import TrainConfig
    from lora_trainer.errors import ConfigError
    from lora_trainer.training.optimizers import check_optimizer

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name == "bitsandbytes" else real(name))
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        check_optimizer(TrainConfig(optimizer="adamw8bit"), cuda_available=False)
    check_optimizer(TrainConfig(optimizer="adamw8bit"), cuda_available=True)


@pytest.fixture(scope="module")
def tiny_vpred(tiny_sd15, tmp_path_factory):
    model = tmp_path_factory.mktemp("vpred") / "model"
    shutil.copytree(tiny_sd15, model)
    config = model / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "prediction_type": "v_prediction"}))
    return model


def test_v_prediction_base_trains_on_v_targets(tiny_vpred, example_data, tmp_path):
    from diffusers import DDPMScheduler

    from lora_trainer.training.loop import train
    from lora_trainer.training.loss import training_target

    scheduler = DDPMScheduler.from_pretrained(tiny_vpred, subfolder="scheduler")
    x0, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    ab = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(training_target(scheduler, x0, noise, t), ab.sqrt() * noise - (1 - ab).sqrt() * x0)

    result = train(run_config(tiny_vpred, example_data, tmp_path / "v", *FAST, "train.max_steps=3",
                              "train.snr_gamma=5"), show_progress=False)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    meta = safetensors.safe_open(str(result.adapter_paths[0]), "pt").metadata()
    assert meta["modelspec.prediction_type"] == "v"


def test_input_perturbation_noises_only_the_input():
    from lora_trainer.training.loss import perturb

    noise = torch.randn(2, 4, 8, 8)
    state = torch.get_rng_state()
    assert perturb(noise, 0.0) is noise and torch.equal(torch.get_rng_state(), state)  # off: nothing drawn
    g = torch.Generator().manual_seed(1)
    expected = noise + 0.1 * torch.randn(noise.shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(perturb(noise, 0.1, g), expected)


def test_tag_shuffling_keeps_leading_tokens_and_turns_off_the_embedding_cache(
        tiny_sd15, example_data, tmp_path, caplog):
    from lora_trainer.data import Example, ImageCaptionDataset
    from lora_trainer.data.tags import shuffle_tags
    from lora_trainer.training.loop import train

    caption = "sks, red, circle, blue background, flat"
    orders = {shuffle_tags(caption, 1, random.Random(k)) for k in range(30)}
    assert len(orders) > 5
    assert all(o.startswith("sks, ") and sorted(o.split(", ")) == sorted(caption.split(", ")) for o in orders)
    example = next(iter(sorted(example_data.glob("*.png"))))
    dataset = ImageCaptionDataset([Example(example, "red, circle, blue")], 64, caption_prefix="geoshape, ",
                                  shuffle_tags=True, keep_tokens=1)
    captions = set()
    for epoch in range(8):
        dataset.set_epoch(epoch)
        captions.add(dataset[0]["caption"])
    assert len(captions) > 1 and all(c.startswith("geoshape, ") for c in captions)

    with caplog.at_level("INFO", logger="lora_trainer"):
        train(run_config(tiny_sd15, example_data, tmp_path / "s", *FAST, "train.max_steps=2",
                         "data.shuffle_tags=true", "data.keep_tokens=1", "train.input_perturbation=0.1"),
              show_progress=False)
    assert "text embeddings are not cached: data.shuffle_tags" in caplog.text
