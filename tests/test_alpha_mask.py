"""data.alpha_mask: images with an alpha channel weight the loss of each latent pixel by their alpha
(kohya's --alpha_mask); images without one, and runs without the option, train as before."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import safetensors
import torch
from conftest import run_config
from PIL import Image

from lora_trainer.data.dataset import Example, ImageCaptionDataset
from lora_trainer.training.caches import LatentCache
from lora_trainer.training.loss import diffusion_loss
from lora_trainer.training.masks import latent_mask


def _left_transparent(path, width=96, height=64):
    """An RGBA image whose left half is fully transparent and right half opaque."""
    pixels = np.full((height, width, 4), 200, dtype=np.uint8)
    pixels[:, :width // 2, 3] = 0
    pixels[:, width // 2:, 3] = 255
    Image.fromarray(pixels, "RGBA").save(path)
    return path


def _latent_columns(item):
    return latent_mask(item["alpha_mask"][None], 8)[0, 0]


def test_transparent_left_half_masks_the_left_latent_columns_after_crop_and_flip(tmp_path):
    path = _left_transparent(tmp_path / "a.png")  # 96 x 64: the center crop keeps columns 16..79
    dataset = ImageCaptionDataset([Example(path, "x")], 64, random_flip=True, repeats=8, alpha_mask=True)
    items = [dataset[i] for i in range(len(dataset))]
    assert {bool(item["flipped"]) for item in items} == {True, False}
    for item in items:
        mask = _latent_columns(item)
        assert mask.shape == (8, 8)
        left, right = (mask[:, 4:], mask[:, :4]) if item["flipped"] else (mask[:, :4], mask[:, 4:])
        assert torch.all(left == 0) and torch.all(right == 1)


def test_buckets_crop_the_mask_with_the_image(tmp_path):
    path = _left_transparent(tmp_path / "a.png", width=128, height=64)
    item = ImageCaptionDataset([Example(path, "x")], 64, sizes=[(64, 128)], alpha_mask=True)[0]
    mask = _latent_columns(item)
    assert mask.shape == (8, 16) and torch.all(mask[:, :8] == 0) and torch.all(mask[:, 8:] == 1)


def test_pixels_are_the_same_with_the_option_and_images_without_alpha_weigh_one(tmp_path, example_data):
    rgba = _left_transparent(tmp_path / "a.png")
    rgb = next(example_data.glob("*.png"))
    examples = [Example(rgba, "x"), Example(rgb, "y")]
    on = ImageCaptionDataset(examples, 64, alpha_mask=True)
    off = ImageCaptionDataset(examples, 64)
    for i in range(2):
        assert torch.equal(on[i]["pixel_values"], off[i]["pixel_values"]) and "alpha_mask" not in off[i]
    assert torch.equal(on[1]["alpha_mask"], torch.ones(1, 64, 64))


def test_masked_loss_is_the_mean_of_loss_times_mask():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    mask = torch.rand(2, 1, 4, 4, generator=g)
    expected = (((pred - target) ** 2) * mask).mean(dim=(1, 2, 3)).mean()  # kohya: no division by the mask's area
    got = diffusion_loss(pred, target, None, torch.zeros(2, dtype=torch.long), None, mask=mask)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-7)
    ones = diffusion_loss(pred, target, None, torch.zeros(2, dtype=torch.long), None, mask=torch.ones(2, 1, 4, 4))
    assert torch.equal(ones, diffusion_loss(pred, target, None, torch.zeros(2, dtype=torch.long), None))


def test_latent_cache_keeps_the_mask_with_the_latent_on_disk(tmp_path, example_data):
    image = next(example_data.glob("*.png"))
    pixels, mask = torch.zeros(1, 3, 8, 8), torch.rand(1, 1, 1, 1)
    encode = lambda p: (torch.ones(len(p), 4, 1, 1), torch.full((len(p), 4, 1, 1), 0.5))  # noqa: E731
    key = [(str(image), (8, 8), False, (0, 0), "alpha_mask")]
    LatentCache(directory=tmp_path).distributions(key, pixels, encode, mask)
    fresh = LatentCache(directory=tmp_path)
    mean, std, cached = fresh.distributions(key, pixels, lambda p: pytest.fail("encoded again"), mask * 0)
    assert fresh.disk_hits == 1 and torch.equal(cached, mask)


def test_alpha_mask_trains_and_leaves_unmasked_images_bit_identical(tiny_sd15, example_data, tmp_path):
    from lora_trainer.training.loop import train

    common = ("train.max_steps=3", "sample.prompts=[]")
    off = train(run_config(tiny_sd15, example_data, tmp_path / "off", *common), show_progress=False)
    on = train(run_config(tiny_sd15, example_data, tmp_path / "on", *common, "data.alpha_mask=true"),
               show_progress=False)
    assert on.losses == off.losses  # no image has alpha: every weight is exactly 1
    data = tmp_path / "data"
    shutil.copytree(example_data, data)
    _left_transparent(data / "01_red_circle.png", 64, 64)
    masked = train(run_config(tiny_sd15, data, tmp_path / "masked", *common, "data.alpha_mask=true",
                              "data.validation_split=0.2", "train.cache_latents_to_disk=true"), show_progress=False)
    assert len(masked.losses) == 3 and all(np.isfinite(masked.losses)) and masked.val_losses
    with safetensors.safe_open(str(masked.adapter_paths[0]), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_alpha_mask"], meta["ss_masked_loss"]) == ("True", "True")


def test_kohya_alpha_mask_maps_and_masked_loss_without_masks_gets_a_note():
    from lora_trainer.kohya.mapping import config_from_kohya
    from lora_trainer.kohya.setup import parse_command_line

    line = ("python train_network.py --pretrained_model_name_or_path m --train_data_dir d --network_dim 4 "
            "--network_alpha 4 --learning_rate 1e-4 --max_train_steps 10 --caption_extension .txt ")
    cfg, notes = config_from_kohya(parse_command_line(line + "--alpha_mask --masked_loss"))
    assert cfg["data"]["alpha_mask"] is True and notes == []
    cfg, notes = config_from_kohya(parse_command_line(line + "--masked_loss"))
    assert "alpha_mask" not in cfg.get("data", {})
    assert len(notes) == 1 and notes[0].startswith("--masked_loss: no conditioning_data_dir (mask images) and no "
                                                   "--alpha_mask, so there is no mask to read; left out")
