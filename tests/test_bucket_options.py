"""kohya's bucket options (min/max bucket side, no upscaling) and a run with every kohya dataset
option on: what trains, what the log says, and the ss_* keys the adapter carries."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import safetensors
from conftest import REPO, run_config
from PIL import Image

from lora_trainer.config import config_from_dict, load_config
from lora_trainer.data.buckets import assign_buckets, bucket_sizes
from lora_trainer.errors import ConfigError
from lora_trainer.kohya.setup import config_from_kohya, parse_command_line


def test_bucket_side_limits_hold():
    assert bucket_sizes(1024, 64, min_side=None, max_side=None) == bucket_sizes(1024)  # defaults as before
    assert bucket_sizes(1024, 64, min_side=832, max_side=1216) == [
        (1216, 832), (1152, 896), (1088, 960), (1024, 1024), (960, 1088), (896, 1152), (832, 1216)]
    # A long side capped at 1024 (kohya's default maximum) keeps the tall buckets, shorter, down to 2:1.
    assert bucket_sizes(1024, 64, max_side=1024) == (
        [(1024, w) for w in range(512, 1025, 64)] + [(h, 1024) for h in range(960, 511, -64)])
    with pytest.raises(ValueError, match="leave out the square bucket"):
        bucket_sizes(512, 64, min_side=576)


def test_no_upscale_gives_small_images_a_bucket_of_their_own_size(tmp_path):
    sizes = {"tall.png": (60, 100), "big.png": (200, 150), "small.png": (90, 90), "strip.png": (300, 40)}
    for name, size in sizes.items():
        Image.new("RGB", size).save(tmp_path / name)
    paths = [tmp_path / name for name in sizes]
    # Buckets at 96 px, step 32: 128x64, 96x96, 64x128 (h, w).
    assert assign_buckets(paths, 96, 32) == [(128, 64), (96, 96), (96, 96), (64, 128)]
    buckets = assign_buckets(paths, 96, 32, no_upscale=True)
    # Each side rounded down to 32; the strip, over 96² pixels, first scaled to fit them (x0.876).
    assert buckets == [(96, 32), (96, 96), (64, 64), (32, 256)]
    assert assign_buckets(paths, 96, 32, max_side=128, no_upscale=True)[3] == (32, 128)  # scaled to 128 wide
    for (w, h), bucket in zip(sizes.values(), buckets):
        assert bucket[0] <= h and bucket[1] <= w  # never enlarged


@pytest.mark.parametrize("overrides, message", [
    (["data.min_bucket_side=100"], "data.min_bucket_side: got 100; expected a multiple of data.bucket_step (64)"),
    (["data.min_bucket_side=640", "data.max_bucket_side=576"],
     "data.min_bucket_side: got 640, above data.max_bucket_side 576"),
    (["data.resolution=512", "data.min_bucket_side=576"],
     "data.min_bucket_side: got 576, above the square bucket's side 512"),
    (["data.resolution=512", "data.max_bucket_side=448"],
     "data.max_bucket_side: got 448, below the square bucket's side 512"),
])
def test_bad_bucket_limits_are_one_line_config_errors(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs" / "example.yaml", ["data.buckets=true", "data.bucket_step=64", *overrides])
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("override, message", [
    ("data.bucket_no_upscale=true", "data.bucket_no_upscale: got True with data.buckets false, which does not read it; "
                                    "set data.buckets=true or leave data.bucket_no_upscale false"),
    ("data.max_bucket_side=128", "data.max_bucket_side: got 128 with data.buckets false"),
])
def test_bucket_options_without_buckets_are_refused(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs" / "example.yaml", ["data.buckets=false", override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_bucket_limits_are_checked_against_the_native_resolution_before_models_load(tiny_sd15, example_data,
                                                                                    tmp_path):
    from lora_trainer.training.loop import train

    cfg = run_config(tiny_sd15, example_data, tmp_path / "out", "data.resolution=null", "data.buckets=true",
                     "data.max_bucket_side=256")
    with pytest.raises(ConfigError, match=r"data.max_bucket_side: got 256, below the square bucket's side 512 "
                                          r"\(data.resolution 512\)"):
        train(cfg, show_progress=False)


def test_from_kohya_maps_bucket_limits_and_no_upscale():
    def convert(extra):
        return config_from_kohya(parse_command_line(
            "python train_network.py --pretrained_model_name_or_path m --train_data_dir img --network_dim 4 "
            "--network_alpha 4 --learning_rate 1e-4 --max_train_steps 10 --caption_extension .txt --resolution 512 "
            f"{extra}"))

    cfg, notes = convert("--enable_bucket --min_bucket_reso 320 --max_bucket_reso 1000 --bucket_no_upscale")
    d = cfg["data"]
    assert (d["buckets"], d["min_bucket_side"], d["max_bucket_side"], d["bucket_no_upscale"]) == (True, 320, 1024, True)
    assert notes == ["--max_bucket_reso 1000: not a multiple of the bucket step 64; data.max_bucket_side is 1024, "
                     "as kohya adjusts it"]
    cfg, notes = convert("--enable_bucket --bucket_reso_steps 32")
    # kohya's default limits
    assert (cfg["data"]["min_bucket_side"], cfg["data"]["max_bucket_side"], notes) == (256, 1024, [])
    cfg, notes = convert("--min_bucket_reso 320 --max_bucket_reso 1024 --bucket_no_upscale")
    assert "min_bucket_side" not in cfg["data"] and "buckets" not in cfg["data"]
    assert notes == ["--min_bucket_reso 320, --bucket_no_upscale: kohya uses them only with --enable_bucket, "
                     "which is off; left out"]
    assert config_from_dict(convert("--enable_bucket")[0]).data.max_bucket_side == 1024  # it validates
    # a small run: kohya's default minimum (256) is over the square side, so it is left out
    small = convert("--enable_bucket --resolution 64")[0]["data"]
    assert (small["resolution"], small["max_bucket_side"], "min_bucket_side" in small) == (64, 1024, False)
    assert config_from_dict(convert("--enable_bucket --resolution 64")[0]).data.min_bucket_side is None


def test_metadata_records_the_new_options_as_kohya_does(tiny_sd15, example_data, tmp_path):
    from lora_trainer.data import scan_dataset
    from lora_trainer.training.outputs import _metadata

    examples = scan_dataset(example_data)
    plain = _metadata(run_config(tiny_sd15, example_data, tmp_path), examples, 1, 1, 0.0, "epsilon", "sd15")
    assert plain["ss_caption_tag_dropout_rate"] == "0.0" and "ss_min_bucket_reso" not in plain
    bucketed = _metadata(run_config(tiny_sd15, example_data, tmp_path, "data.buckets=true", "data.bucket_step=32"),
                         examples, 1, 1, 0.0, "epsilon", "sd15")
    # No limits set: what the buckets at 64 px span (only the 64x64 square, 2:1 buckets being too small)
    assert (bucketed["ss_min_bucket_reso"], bucketed["ss_max_bucket_reso"], bucketed["ss_bucket_no_upscale"]) == (
        "64", "64", "False")


def test_a_run_with_the_kohya_dataset_options(tiny_sd15, example_data, tmp_path, caplog):
    """.caption files, a suffix, tag dropout and unenlarged buckets with limits, on the tiny model."""
    from lora_trainer.training.loop import train

    data = tmp_path / "data"
    data.mkdir()
    for png in sorted(example_data.glob("*.png"))[:3]:
        shutil.copy(png, data / png.name)
        shutil.copy(png.with_suffix(".txt"), data / f"{png.stem}.caption")
    Image.open(data / "01_red_circle.png").resize((40, 72)).save(data / "small.png")  # 64x32 bucket, not 64x64
    (data / "small.caption").write_text("a small red circle, geometric style", encoding="utf-8")
    out = tmp_path / "out"
    cfg = run_config(tiny_sd15, data, out, "sample.prompts=[]", "sample.grid_weights=[]", "train.max_steps=2",
                     "data.caption_extension=.caption", "data.caption_suffix=, flat", "data.caption_tag_dropout=0.25",
                     "data.buckets=true", "data.bucket_step=32", "data.min_bucket_side=32", "data.max_bucket_side=128",
                     "data.bucket_no_upscale=true")
    with caplog.at_level(logging.INFO, logger="lora_trainer"):
        train(cfg, show_progress=False)
    assert "text embeddings are not cached: data.caption_tag_dropout" in caplog.text
    assert "aspect buckets (w x h: images): 32x64: 1, 64x64: 3" in caplog.text
    record = [json.loads(line) for line in (out / "captions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["caption"] for r in record] == [
        "geoshape, " + (data / f"{r['file'][:-4]}.caption").read_text(encoding="utf-8").strip() + ", flat"
        for r in record]
    with safetensors.safe_open(str(out / "example-lora.safetensors"), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_caption_tag_dropout_rate"], meta["ss_min_bucket_reso"], meta["ss_max_bucket_reso"],
            meta["ss_bucket_no_upscale"]) == ("0.25", "32", "128", "True")
    assert json.loads(meta["ss_tag_frequency"])["data"]["flat"] == 4


def test_check_does_not_call_small_images_upscaled_with_no_upscale(tmp_path):
    from lora_trainer.data.checks import check_dataset

    Image.new("RGB", (48, 48), "red").save(tmp_path / "small.png")
    (tmp_path / "small.txt").write_text("a red square", encoding="utf-8")
    assert "too_small" in {p.kind for p in check_dataset(tmp_path, resolution=64).problems}
    assert "too_small" not in {p.kind for p in check_dataset(tmp_path, resolution=64, no_upscale=True).problems}


def test_from_kohya_reads_a_dataset_tomls_resolution_before_the_bucket_limits(tmp_path):
    images = tmp_path / "1_dog"
    images.mkdir()
    Image.new("RGB", (64, 64), "red").save(images / "a.png")
    (images / "a.txt").write_text("a dog", encoding="utf-8")
    args = {"pretrained_model_name_or_path": "m", "network_module": "networks.lora", "network_dim": 4,
            "network_alpha": 4, "learning_rate": 1e-4, "max_train_steps": 10, "caption_extension": ".txt"}
    dataset = {"general": {"enable_bucket": True},
               "datasets": [{"resolution": 64, "subsets": [{"image_dir": str(images), "num_repeats": 1}]}]}
    cfg, _ = config_from_kohya(args, dataset)
    assert (cfg["data"]["resolution"], "min_bucket_side" in cfg["data"]) == (64, False)
    assert config_from_dict(cfg).data.max_bucket_side == 1024  # it validates
