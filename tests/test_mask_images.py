"""data.mask_dir: loss masks from mask images (kohya's --masked_loss with a conditioning_data_dir), one per
training image with its file stem; the same weights as the alpha-mask path, taken with the image through
resize, crop, flip and buckets, cached with the latent under the mask file's content."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import safetensors
import torch
from conftest import run_config
from PIL import Image

from lora_trainer.config import load_config
from lora_trainer.data.dataset import Example, ImageCaptionDataset
from lora_trainer.data.masks import attach_masks, find_mask
from lora_trainer.errors import ConfigError, DataError
from lora_trainer.training.masks import latent_mask


def _rgba(path, width=96, height=64, seed=0):
    """An RGBA image of random colours and a random alpha with a transparent left half."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    pixels[:, :width // 2, 3] = 0
    Image.fromarray(pixels, "RGBA").save(path)
    return path


def _alpha_as_mask(image, mask_path):
    """The image's alpha channel saved as a grayscale mask image."""
    Image.open(image).getchannel("A").save(mask_path)
    return mask_path


def test_mask_image_gives_the_alpha_path_weights_through_random_crop_flip_and_buckets(tmp_path):
    image = _rgba(tmp_path / "a.png")
    (tmp_path / "masks").mkdir()
    _alpha_as_mask(image, tmp_path / "masks" / "a.png")
    [with_mask] = attach_masks([Example(image, "x")], tmp_path, tmp_path / "masks")
    for sizes in (None, [(64, 96)], [(32, 64)]):
        options = dict(center_crop=False, random_flip=True, repeats=8, sizes=sizes)
        alpha = ImageCaptionDataset([Example(image, "x")], 64, alpha_mask=True, **options)
        masked = ImageCaptionDataset([with_mask], 64, **options)
        items = [(alpha[i], masked[i]) for i in range(len(alpha))]
        assert {bool(a["flipped"]) for a, _ in items} == {True, False}
        assert len({tuple(a["crop_top_left"].tolist()) for a, _ in items}) > 1 or sizes  # random crops (squares)
        for a, m in items:
            assert "alpha_mask" not in m and torch.equal(a["pixel_values"], m["pixel_values"])
            assert torch.equal(a["alpha_mask"], m["loss_mask"])  # bit for bit: the same resize, crop and flip
            assert m["mask_id"] == m["mask_id"].lower() and len(m["mask_id"]) == 64


def test_half_black_mask_masks_the_left_latent_columns_after_flip(tmp_path):
    Image.new("RGB", (64, 64), (10, 200, 30)).save(tmp_path / "a.jpg")
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[:, 32:] = 255
    (tmp_path / "m").mkdir()
    Image.fromarray(mask, "L").save(tmp_path / "m" / "a.png")
    examples = attach_masks([Example(tmp_path / "a.jpg", "x")], tmp_path, tmp_path / "m")
    dataset = ImageCaptionDataset(examples, 64, random_flip=True, repeats=8)
    seen = set()
    for i in range(len(dataset)):
        item = dataset[i]
        grid = latent_mask(item["loss_mask"][None], 8)[0, 0]
        ignored, trained = (grid[:, 4:], grid[:, :4]) if item["flipped"] else (grid[:, :4], grid[:, 4:])
        assert torch.all(ignored == 0) and torch.all(trained == 1)
        seen.add(bool(item["flipped"]))
    assert seen == {True, False}


def test_colour_and_16_bit_masks_read_as_kohya_reads_them(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "b.png")
    (tmp_path / "m").mkdir()
    # RGBA mask: red channel, alpha ignored (kohya converts to RGB and reads channel 0)
    Image.new("RGBA", (8, 8), (51, 255, 0, 0)).save(tmp_path / "m" / "a.png")
    Image.fromarray(np.full((8, 8), 65535 // 5, dtype=np.uint16)).save(tmp_path / "m" / "b.png")  # 16-bit gray
    examples = attach_masks([Example(tmp_path / n, "") for n in ("a.png", "b.png")], tmp_path, tmp_path / "m")
    dataset = ImageCaptionDataset(examples, 8)
    torch.testing.assert_close(dataset[0]["loss_mask"], torch.full((1, 8, 8), 0.2), rtol=0, atol=1e-6)
    torch.testing.assert_close(dataset[1]["loss_mask"], torch.full((1, 8, 8), 0.2), rtol=0, atol=1e-6)


def test_masks_are_found_beside_the_image_folder_or_at_the_top(tmp_path):
    data, masks = tmp_path / "img", tmp_path / "masks"
    for rel in ("10_dog/a.jpg", "10_dog/b.png", "3_cat/a.png"):
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 8)).save(data / rel)
    (masks / "10_dog").mkdir(parents=True)
    for rel in ("10_dog/a.PNG", "a.webp", "b.png"):
        Image.new("L", (16, 8)).save(masks / rel, format="PNG" if rel.endswith(("png", "PNG")) else "WEBP")
    found = {rel: find_mask(data / rel, data, masks) for rel in ("10_dog/a.jpg", "10_dog/b.png", "3_cat/a.png")}
    assert found == {"10_dog/a.jpg": masks / "10_dog" / "a.PNG", "10_dog/b.png": masks / "b.png",
                     "3_cat/a.png": masks / "a.webp"}
    assert find_mask(data / "10_dog/a.jpg", data, tmp_path / "nowhere") is None


def test_missing_or_mis_sized_masks_and_bad_settings_are_one_line_errors(tmp_path):
    for name in ("a", "b", "c"):
        Image.new("RGB", (16, 8)).save(tmp_path / f"{name}.png")
    examples = [Example(tmp_path / f"{n}.png", "") for n in ("a", "b", "c")]
    masks = tmp_path / "masks"
    with pytest.raises(DataError, match=r"data.mask_dir: .*masks is not a folder") as err:
        attach_masks(examples, tmp_path, masks)
    masks.mkdir()
    Image.new("L", (16, 8)).save(masks / "a.png")
    Image.new("L", (8, 16)).save(masks / "b.png")
    with pytest.raises(DataError, match=r"no mask in .* for 1 of 3 image\(s\) \(c.png\); add a mask") as err:
        attach_masks(examples, tmp_path, masks)
    assert "\n" not in str(err.value)
    Image.new("L", (16, 8)).save(masks / "c.png")
    with pytest.raises(DataError, match=r"1 mask\(s\) .* differ in size from their image \(b.png is 8x16, its image "
                                        r"b.png 16x8\); resize") as err:
        attach_masks(examples, tmp_path, masks)
    (masks / "b.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"b.png: cannot read mask image"):
        attach_masks(examples, tmp_path, masks)
    with pytest.raises(ConfigError, match=r"data.mask_dir: got 'm' with data.alpha_mask true; .* set only one"):
        load_config(None, ["model.base=b", "data.path=d", "data.mask_dir=m", "data.alpha_mask=true"])
    with pytest.raises(ConfigError, match=r"data.mask_dir: got 'd/masks', inside data.path 'd', so the masks would "
                                          r"train as images; use a folder outside data.path"):
        load_config(None, ["model.base=b", "data.path=d", "data.mask_dir=d/masks"])


def _masked_copy(example_data, folder):
    """The example images, one of them RGBA with a transparent left half, and a mask folder with each
    image's alpha (all white for the opaque ones)."""
    data, masks = folder / "data", folder / "masks"
    shutil.copytree(example_data, data)
    _rgba(data / "01_red_circle.png", 64, 64)
    masks.mkdir()
    for image in sorted(data.glob("*.png")):
        Image.open(image).convert("RGBA").getchannel("A").save(masks / image.name)
    return data, masks


def test_mask_images_train_as_the_alpha_mask_and_the_cache_follows_the_mask_file(tiny_sd15, example_data, tmp_path):
    from lora_trainer.training.loop import train

    data, masks = _masked_copy(example_data, tmp_path)
    common = ("train.max_steps=3", "sample.prompts=[]", "data.validation_split=0.2")

    def run(name, *extra):
        return train(run_config(tiny_sd15, data, tmp_path / name, *common, *extra), show_progress=False)

    alpha = run("alpha", "data.alpha_mask=true")
    disk = ("train.cache_latents_to_disk=true", f"train.cache_dir={tmp_path / 'cache'}")
    masked = run("masked", f"data.mask_dir={masks}", *disk)
    assert masked.losses == alpha.losses and masked.val_losses == alpha.val_losses
    with safetensors.safe_open(str(masked.adapter_paths[0]), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_masked_loss"], meta["ss_alpha_mask"]) == ("True", "False")
    # Edit one mask: the disk cache, keyed by the image file, must not hand back the old mask.
    Image.new("L", (64, 64), 255).save(masks / "01_red_circle.png")
    edited = run("edited", f"data.mask_dir={masks}", *disk)
    fresh = run("fresh", f"data.mask_dir={masks}")
    assert edited.losses == fresh.losses and edited.val_losses == fresh.val_losses
    assert edited.losses != masked.losses


def test_a_run_without_a_mask_for_every_image_stops_before_loading_the_model(tiny_sd15, example_data, tmp_path):
    from lora_trainer.training.loop import train

    data, masks = _masked_copy(example_data, tmp_path)
    (masks / "05_purple_square.png").unlink()
    cfg = run_config(tiny_sd15, data, tmp_path / "out", f"data.mask_dir={masks}", "train.max_steps=1")
    with pytest.raises(DataError, match=r"no mask in .* for 1 of 8 image\(s\) \(05_purple_square.png\)"):
        train(cfg, show_progress=False)


def _kohya(extra: str, dataset: dict | None = None):
    from lora_trainer.kohya.mapping import config_from_kohya
    from lora_trainer.kohya.setup import parse_command_line

    line = ("python train_network.py --pretrained_model_name_or_path m --train_data_dir d --network_dim 4 "
            "--network_alpha 4 --learning_rate 1e-4 --max_train_steps 10 --caption_extension .txt ")
    return config_from_kohya(parse_command_line(line + extra), dataset)


def test_from_kohya_maps_masked_loss_with_conditioning_data_dir():
    cfg, notes = _kohya("--masked_loss --conditioning_data_dir masks")
    assert cfg["data"]["mask_dir"] == "masks" and "alpha_mask" not in cfg["data"] and notes == []
    cfg, notes = _kohya("--masked_loss --alpha_mask --conditioning_data_dir masks")  # kohya reads the images first
    assert cfg["data"]["mask_dir"] == "masks" and "alpha_mask" not in cfg["data"]
    assert notes == ["--alpha_mask: with --masked_loss kohya weights the loss by the mask images in "
                     "--conditioning_data_dir (data.mask_dir), not by the alpha channel; left out"]
    cfg, notes = _kohya("--conditioning_data_dir masks")
    assert "mask_dir" not in cfg.get("data", {})
    assert notes == ["--conditioning_data_dir masks: kohya reads the mask images only with --masked_loss, which is "
                     "off; left out (data.mask_dir would read them)"]


def test_from_kohya_dataset_subsets_with_mask_folders(tmp_path):
    def dataset(*subsets):
        return {"datasets": [{"subsets": [{"image_dir": str(tmp_path / "img" / image), "num_repeats": int(image[0]),
                                           "conditioning_data_dir": str(tmp_path / masks)} for image, masks in subsets]}]}

    # one folder per subset, named as the subsets' image folders: their parent is data.mask_dir
    cfg, notes = _kohya("--masked_loss", dataset(("5_dog", "masks/5_dog"), ("2_cat", "masks/2_cat")))
    assert cfg["data"]["mask_dir"] == str(tmp_path / "masks")
    assert not any("conditioning_data_dir" in n for n in notes)
    cfg, notes = _kohya("--masked_loss", dataset(("5_dog", "m"), ("2_cat", "m")))  # one shared folder
    assert cfg["data"]["mask_dir"] == str(tmp_path / "m") and not any("conditioning_data_dir" in n for n in notes)
    cfg, notes = _kohya("--masked_loss", dataset(("5_dog", "dog-masks"), ("2_cat", "cat-masks")))
    assert cfg["data"]["mask_dir"] == str(tmp_path / "dog-masks")
    assert [n for n in notes if "conditioning_data_dir" in n] == [
        f"dataset config conditioning_data_dir: the subsets keep their masks in 2 folders; data.mask_dir is one folder "
        f"({tmp_path / 'dog-masks'}), where a mask is looked for under its image's folder name, then at the top: "
        "gather the masks as <mask_dir>/<image folder>/<name>"]


def test_a_runs_mask_is_hashed_once_and_a_new_run_hashes_it_again(tmp_path):
    from lora_trainer.data.masks import read_mask

    path = tmp_path / "a.png"
    Image.new("L", (8, 8), 255).save(path)
    digests: dict = {}
    first = read_mask(path, digests)[1]
    assert digests == {path: first}
    Image.new("L", (8, 8), 0).save(path)  # edited between runs: this run keeps its key, a new run sees the edit
    assert read_mask(path, digests)[1] == first
    assert read_mask(path)[1] != first and read_mask(path, {})[1] != first
