"""Several training sides (data.resolution a list, or a subset's own): every image is an item at each
side, batches keep one shape, the latent cache and SDXL's size conditioning follow each item's side,
and a single side (an int or a one-element list) trains exactly as before."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pytest
import safetensors
from conftest import REPO, recorded_cache_keys, run_config
from PIL import Image

from lora_trainer.config import load_config
from lora_trainer.errors import ConfigError

FAST = ["sample.prompts=[]", "output.dtype=fp32", "data.random_flip=false"]


def _examples(cfg):
    from lora_trainer.data.prepare import prepare_examples

    return prepare_examples(cfg, show_progress=False)


def test_two_sides_give_twice_the_items_each_at_its_side(tiny_sd15, example_data, tmp_path):
    from lora_trainer.training.loaders import make_dataset

    one = run_config(tiny_sd15, example_data, tmp_path / "one", *FAST, "data.resolution=32", "data.repeats=2")
    two = run_config(tiny_sd15, example_data, tmp_path / "two", *FAST, "data.resolution=[32, 64]", "data.repeats=2")
    examples = _examples(two)
    single, double = make_dataset(one, examples, seed=0), make_dataset(two, examples, seed=0)
    assert len(single) == 2 * 8 and len(double) == 2 * len(single)
    shown = Counter((double.example_index(i), double[i]["side"]) for i in range(len(double)))
    assert shown == {(j, side): 2 for j in range(8) for side in (32, 64)}  # every (image, side) once per repeat
    for i in range(len(double)):
        item = double[i]
        assert tuple(item["pixel_values"].shape) == (3, item["side"], item["side"])
    # the first pass is the single side's epoch, item for item
    first = range(len(single))
    assert [double.example_index(i) for i in first] == [single.example_index(i) for i in first]


def test_every_batch_holds_one_shape_and_sides_of_one_bucket_share_batches(tiny_sd15, tmp_path):
    from rank_helpers import write_mixed_aspect_images

    from lora_trainer.training.loaders import make_dataset, make_loader

    folder = write_mixed_aspect_images(tmp_path / "mixed")
    for buckets in ("false", "true"):
        cfg = run_config(tiny_sd15, folder, tmp_path / "out", *FAST, "data.resolution=[64, 96]",
                         "data.bucket_step=32", f"data.buckets={buckets}", "train.batch_size=3")
        dataset = make_dataset(cfg, _examples(cfg), seed=0)
        batches = list(make_loader(cfg, dataset, seed=0))
        assert sorted(i for b in batches for i in b["item"].tolist()) == list(range(len(dataset))) == list(range(18))
        for batch in batches:
            assert {dataset.item_size(i) for i in batch["item"].tolist()} == {tuple(batch["pixel_values"].shape[-2:])}
        assert {b["side"].unique().numel() for b in batches} == {1}  # no two sides share a shape here

    # a 40 px image kept at its own size (bucket_no_upscale) has the 32x32 bucket at both sides: one batch
    small = tmp_path / "small"
    small.mkdir()
    Image.new("RGB", (40, 40), (200, 30, 30)).save(small / "a.png")
    cfg = run_config(tiny_sd15, small, tmp_path / "out2", *FAST, "data.resolution=[32, 64]", "data.buckets=true",
                     "data.bucket_step=32", "data.bucket_no_upscale=true", "train.batch_size=2")
    dataset = make_dataset(cfg, _examples(cfg), seed=0)
    (batch,) = list(make_loader(cfg, dataset, seed=0))
    assert sorted(batch["side"].tolist()) == [32, 64] and tuple(batch["pixel_values"].shape) == (2, 3, 32, 32)


def test_an_int_and_a_one_element_list_train_the_same_losses(tiny_sd15, example_data, tmp_path):
    from lora_trainer.training.loop import train

    losses = [train(run_config(tiny_sd15, example_data, tmp_path / name, *FAST, f"data.resolution={value}",
                               "train.max_steps=3"), show_progress=False).losses
              for name, value in (("int", "32"), ("list", "[32]"))]
    assert losses[0] == losses[1] and len(losses[0]) == 3


def test_second_epoch_reads_both_sides_from_the_latent_cache(tiny_sd15, example_data, tmp_path, monkeypatch,
                                                             caplog):
    from lora_trainer.training.loop import train

    keys = recorded_cache_keys(monkeypatch)
    cfg = run_config(tiny_sd15, example_data, tmp_path / "out", *FAST, "data.resolution=[32, 64]",
                     "train.max_steps=null", "train.epochs=2")
    with caplog.at_level(logging.INFO, logger="lora_trainer"):
        result = train(cfg, show_progress=False)
    assert result.steps == 2 * 16 // 2  # 8 images × 2 sides per epoch, batches of 2
    sizes = {name: {k[1] for k in keys if Path(k[0]).name == name} for name in {Path(k[0]).name for k in keys}}
    assert len(sizes) == 8 and all(s == {(32, 32), (64, 64)} for s in sizes.values())  # size is in the key
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("latent cache:"))
    assert line == "latent cache: 16 entries, 16 hits, 16 misses"  # epoch 2 reads every (image, side)
    assert any("training sides (px: images): 32, 64: 8" in r.getMessage() for r in caplog.records)

    meta = safetensors.safe_open(str(result.adapter_paths[0]), "pt").metadata()
    assert meta["ss_resolution"] == "(64, 64)"  # kohya's one size: the largest side
    assert meta["ss_num_train_images"] == "16"  # items per epoch: 8 images × 2 sides
    assert load_config(tmp_path / "out" / "config.yaml").data.resolution == [32, 64]


def _close_at_its_own_sides(tiny_sd15, tmp_path, sides: list[int], *overrides: str):
    """Two folders of two square images as large as the largest side: "close" trains at `sides`,
    "full" at data.resolution 32."""
    for name in ("close", "full"):
        (tmp_path / name).mkdir()
        for k in range(2):
            Image.new("RGB", (max(sides), max(sides)), (90 * k, 40, 200)).save(tmp_path / name / f"{k}.png")
    subsets = [{"path": str(tmp_path / "close"), "resolution": sides}, {"path": str(tmp_path / "full")}]
    return load_config(REPO / "configs" / "example.yaml", [
        f"model.base={tiny_sd15}", "data.path=", f"data.subsets={json.dumps(subsets)}", "data.resolution=32",
        f"output.dir={tmp_path / 'out'}", *overrides, *FAST])


def test_a_subset_trains_at_its_own_sides(tiny_sd15, tmp_path):
    from lora_trainer.training.loaders import make_dataset

    cfg = _close_at_its_own_sides(tiny_sd15, tmp_path, [32, 64])
    examples = _examples(cfg)
    dataset = make_dataset(cfg, examples, seed=0)
    sides = Counter((examples[dataset.example_index(i)].path.parent.name, dataset[i]["side"])
                    for i in range(len(dataset)))
    assert sides == {("close", 32): 2, ("close", 64): 2, ("full", 32): 2}


def test_sdxl_time_ids_carry_each_items_side(tiny_sdxl, example_data, tmp_path, monkeypatch):
    from lora_trainer.training import conditioning
    from lora_trainer.training.loop import train

    seen: list[tuple] = []
    time_ids = conditioning.time_ids

    def recording(original_size, crop_top_left, target_size):
        ids = time_ids(original_size, crop_top_left, target_size)
        seen.extend(tuple(row.tolist()) for row in ids)
        return ids

    monkeypatch.setattr(conditioning, "time_ids", recording)
    cfg = run_config(tiny_sdxl, example_data, tmp_path / "out", *FAST, "data.resolution=[32, 64]",
                     "train.max_steps=null", "train.epochs=1", "data.caption_prefix=")
    train(cfg, show_progress=False)
    # (original h, w, crop top, left, target h, w): the 64 px images, center crops, each side's target
    assert Counter(seen) == {(64, 64, 0, 0, 32, 32): 8, (64, 64, 0, 0, 64, 64): 8}


def test_held_out_images_are_scored_at_the_largest_side(tiny_sd15, example_data, tmp_path):
    from lora_trainer.data.holdout import split_examples
    from lora_trainer.training.validation import Validation

    cfg = run_config(tiny_sd15, example_data, tmp_path / "out", *FAST, "data.resolution=[32, 64]",
                     "data.validation_split=0.25")
    _, held_out = split_examples(cfg, _examples(cfg))
    validation = Validation(cfg, held_out, 1000, 10, batch_loss=None, modules=[], accelerator=None)
    assert len(validation.dataset) == len(held_out) == 2
    assert [tuple(validation.dataset[i]["pixel_values"].shape) for i in range(2)] == [(3, 64, 64)] * 2


def test_check_data_names_the_sides(example_data, tiny_sd15, tmp_path, capsys):
    from lora_trainer.cli import main
    from lora_trainer.data.checks import check_dataset

    report = check_dataset(example_data, [32, 64])
    assert report.resolution == 64 and report.sides == [32, 64]
    assert "(training resolution 64; sides 32, 64, each image trained at each)" in report.format_text()
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({"model": {"base": str(tiny_sd15)}, "train": {"max_steps": 1},
                                  "data": {"path": str(example_data), "resolution": [32, 64]}}))
    assert main(["check-data", "--config", str(config)]) == 0
    assert "(training resolution 64; sides 32, 64, each image trained at each)" in capsys.readouterr().out


@pytest.mark.parametrize("overrides, message", [
    (["data.resolution=[]"], "data.resolution: got []; expected a positive multiple of 8 (e.g. 512), a list of them"),
    (["data.resolution=[32, 36]"], "data.resolution: got [32, 36], with 36; every side must be a positive multiple"),
    (["data.resolution=[32, 64, 32]"], "data.resolution: got [32, 64, 32], with 32 more than once; list each side"),
    (["data.resolution=[0, 32]"], "data.resolution: got [0, 32], with 0; every side must be"),
    (["data.resolution=[32, 64]", "data.buckets=true", "data.bucket_step=8", "data.min_bucket_side=48"],
     "data.min_bucket_side: got 48, above the square bucket's side 32 (data.resolution 32); set it to 32 or less"),
    (['data.path=', 'data.subsets=[{"path": "a", "resolution": [30]}]'],
     "data.subsets[0].resolution: got [30], with 30; every side must be a positive multiple of 8"),
    (['data.path=', 'data.subsets=[{"path": "a", "resolution": 32}]', "data.resolution=64", "data.buckets=true",
      "data.bucket_step=8", "data.min_bucket_side=48"],
     "data.subsets[0]: data.min_bucket_side: got 48, above the square bucket's side 32 (data.resolution 32)"),
])
def test_bad_sides_are_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.base=m", "data.path=d", "train.max_steps=1", *overrides])
    assert message in str(err.value) and len(str(err.value).splitlines()) == 1, str(err.value)


def test_from_kohya_datasets_of_other_resolutions_become_subsets_with_their_own(tmp_path):
    from lora_trainer.kohya.setup import config_from_kohya

    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (64, 64)).save(tmp_path / name / "x.png")
    dataset = {"datasets": [{"resolution": 1024, "subsets": [{"image_dir": str(tmp_path / "a")},
                                                              {"image_dir": str(tmp_path / "b")}]},
                            {"resolution": 512, "subsets": [{"image_dir": str(tmp_path / "c")}]}]}
    cfg, notes = config_from_kohya({"pretrained_model_name_or_path": "m", "network_dim": 4, "network_alpha": 4,
                                    "learning_rate": 1e-4, "max_train_steps": 10}, dataset)
    assert cfg["data"]["resolution"] == 1024
    assert cfg["data"]["subsets"] == [{"path": str(tmp_path / "a")}, {"path": str(tmp_path / "b")},
                                      {"path": str(tmp_path / "c"), "resolution": 512}]
    text = "\n".join(notes)
    assert "each keeps its resolution" in text and "resolution: 512 differs" not in text


def test_the_card_and_civitai_fields_name_the_sides_subsets_trained_at(tiny_sd15, tmp_path, monkeypatch):
    # data.resolution 32 with a subset at [32, 48]: the card said "32 px" and CivitAI's resolution 32
    import zipfile

    from lora_trainer.cli import main
    from lora_trainer.training.loop import train
    from publish_helpers import publish_dry

    monkeypatch.setenv("HF_TOKEN", "")
    cfg = _close_at_its_own_sides(tiny_sd15, tmp_path, [32, 48], "train.max_steps=1")
    train(cfg, show_progress=False)
    assert publish_dry(tmp_path / "out", tmp_path / "repo") == 0
    assert "| resolution | 32, 48 px |" in (tmp_path / "repo" / "README.md").read_text(encoding="utf-8")
    assert main(["package", str(tmp_path / "out"), "--civitai", str(tmp_path / "run.zip")]) == 0
    with zipfile.ZipFile(tmp_path / "run.zip") as z:
        assert json.loads(z.read("civitai.json"))["training"]["resolution"] == 48
