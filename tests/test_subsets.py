"""data.subsets: several image folders in one run, each with its own repeats, caption files, prefix and
suffix, tag shuffling, flips. The epoch, the captions, the caches, the held-out draw, the adapter's
per-folder metadata, check-data and the kohya import all see each subset; one subset equal to
data.path trains exactly as data.path does."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pytest
import safetensors
import yaml
from conftest import REPO, recorded_cache_keys, run_config
from PIL import Image

from lora_trainer.config import dump_config, load_config
from lora_trainer.errors import ConfigError, DataError

FAST = ["data.resolution=32", "sample.prompts=[]", "output.dtype=fp32", "data.caption_prefix=",
        "data.random_flip=false"]


def _image(path: Path, caption: str | None = None, ext: str = ".txt") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = tuple(sum(map(ord, str(path))) * k % 256 for k in (3, 5, 7))  # distinct images
    image = Image.new("RGB", (40, 40), colour)
    image.paste((250, 250, 250), (10, 10, 20, 20))
    image.save(path)
    if caption is not None:
        path.with_suffix(ext).write_text(caption, encoding="utf-8")
    return path


def _subsets_config(tiny_model: Path, out: Path, subsets: list[dict], *overrides: str):
    """The example config with data.subsets (as a command-line override) instead of data.path."""
    return load_config(REPO / "configs" / "example.yaml",
                       [f"model.base={tiny_model}", "data.path=", f"data.subsets={json.dumps(subsets)}",
                        f"output.dir={out}", *FAST, *overrides])


@pytest.fixture
def folders(tmp_path) -> tuple[Path, Path]:
    """close (2 images, .txt tags) and full (3 images, .caption tags, and a .txt that is not read)."""
    close, full = tmp_path / "close", tmp_path / "full"
    _image(close / "c1.png", "red, round, small")
    _image(close / "c2.png", "blue, square, big")
    for n, tags in enumerate(("standing, park", "sitting, chair", "walking, street")):
        _image(full / f"f{n}.png", tags, ext=".caption")
    (full / "f0.txt").write_text("not read", encoding="utf-8")
    return close, full


def test_two_subsets_get_their_repeats_captions_and_tag_shuffling(folders, tiny_sd15, tmp_path):
    from lora_trainer.data.prepare import prepare_examples
    from lora_trainer.training.loaders import make_dataset

    close, full = folders
    cfg = _subsets_config(tiny_sd15, tmp_path / "out", [
        {"path": str(close), "repeats": 3, "caption_prefix": "sks, ", "keep_tokens": 1, "shuffle_tags": True},
        {"path": str(full), "repeats": 2, "caption_extension": "caption", "caption_suffix": ", full body"}])
    examples = prepare_examples(cfg, show_progress=False)
    assert [(ex.path.name, ex.subset, ex.caption) for ex in examples] == [
        ("c1.png", 0, "red, round, small"), ("c2.png", 0, "blue, square, big"),
        ("f0.png", 1, "standing, park"), ("f1.png", 1, "sitting, chair"), ("f2.png", 1, "walking, street")]
    dataset = make_dataset(cfg, examples, seed=0)
    shown = Counter(examples[dataset.example_index(i)].subset for i in range(len(dataset)))
    assert shown == {0: 3 * 2, 1: 2 * 3} and len(dataset) == 12  # repeats × images, per subset

    orders = set()
    for epoch in range(3):
        dataset.set_epoch(epoch)
        for i in range(len(dataset)):
            example, caption = examples[dataset.example_index(i)], dataset[i]["caption"]
            if example.subset == 1:  # no shuffling: the .caption text with this subset's suffix only
                assert caption == example.caption + ", full body"
            else:  # the trigger stays first (keep_tokens 1), the other tags are shuffled
                tags = caption.split(", ")
                assert tags[0] == "sks" and sorted(tags[1:]) == sorted(example.caption.split(", "))
                orders.add((example.path.name, caption))
    assert len(orders) > 2  # the order changes between items and epochs
    dataset.set_epoch(1)
    assert [dataset[i]["caption"] for i in range(4)] == [dataset[i]["caption"] for i in range(4)]  # seeded

    record = [json.loads(line) for line in (tmp_path / "out" / "captions.jsonl").read_text().splitlines()]
    assert record[0] == {"subset": 0, "file": "c1.png", "caption": "sks, red, round, small", "generated": False,
                         "repeats": 3}
    assert record[2] == {"subset": 1, "file": "f0.png", "caption": "standing, park, full body", "generated": False,
                         "repeats": 2}


def test_one_subset_equal_to_data_path_trains_the_same_losses(tiny_sd15, example_data, tmp_path):
    from lora_trainer.training.loop import train

    steps = ["train.max_steps=3", "data.random_flip=true", "data.caption_prefix=geoshape, ", "data.repeats=2"]
    plain = train(run_config(tiny_sd15, example_data, tmp_path / "plain", *FAST, *steps), show_progress=False)
    subset = train(_subsets_config(tiny_sd15, tmp_path / "subset", [{"path": str(example_data)}], *steps),
                   show_progress=False)
    assert subset.losses == plain.losses and len(plain.losses) == 3
    metas = [safetensors.safe_open(str(r.adapter_paths[0]), "pt").metadata() for r in (plain, subset)]
    for key in ("ss_dataset_dirs", "ss_tag_frequency", "ss_num_train_images"):
        assert metas[0][key] == metas[1][key]
    assert json.loads(metas[1]["ss_dataset_dirs"]) == {"example": {"n_repeats": 2, "img_count": 8}}


def test_flip_subset_and_caches_metadata_and_config(folders, tiny_sd15, tmp_path, monkeypatch, caplog):
    from lora_trainer.training.loop import train

    keys = recorded_cache_keys(monkeypatch)
    close, full = folders
    # 2 × 4 + 3 × 1 = 11 items per epoch: 5 batches of 2, so 3 epochs are 15 steps
    cfg = _subsets_config(tiny_sd15, tmp_path / "out", [
        {"path": str(close), "repeats": 4, "random_flip": True, "caption_prefix": "sks, "},
        {"path": str(full), "caption_extension": ".caption", "shuffle_tags": True}],
        "train.max_steps=null", "train.epochs=3")
    with caplog.at_level(logging.INFO, logger="lora_trainer"):
        result = train(cfg, show_progress=False)
    assert result.steps == 15
    flips = {name: {k[2] for k in keys if Path(k[0]).parent.name == name} for name in ("close", "full")}
    assert flips == {"close": {False, True}, "full": {False}}  # the flip is in the key, per item
    entries = {(Path(k[0]).name, k[2]) for k in keys}
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("latent cache:"))
    assert f"latent cache: {len(entries)} entries" in line  # one entry per image and flip, reused after
    assert any(r.getMessage() == f"text embeddings are not cached: data.subsets[1] ({full}) shuffle_tags changes "
               "the captions every epoch" for r in caplog.records)

    meta = safetensors.safe_open(str(result.adapter_paths[0]), "pt").metadata()
    assert json.loads(meta["ss_dataset_dirs"]) == {"close": {"n_repeats": 4, "img_count": 2},
                                                   "full": {"n_repeats": 1, "img_count": 3}}
    assert meta["ss_num_train_images"] == "11"
    tags = json.loads(meta["ss_tag_frequency"])
    assert tags["close"]["sks"] == 2 and tags["close"]["red"] == 1 and tags["full"] == {
        "chair": 1, "park": 1, "sitting": 1, "standing": 1, "street": 1, "walking": 1}

    written = (tmp_path / "out" / "config.yaml").read_text()
    assert yaml.safe_load(written)["data"]["subsets"][1] == {"path": str(full), "caption_extension": ".caption",
                                                             "shuffle_tags": True}  # no null keys
    assert load_config(tmp_path / "out" / "config.yaml").data == cfg.data  # (model holds the detected variant)


def test_text_embeddings_are_cached_only_when_every_subset_fixes_its_captions(folders, tiny_sd15, tmp_path):
    from lora_trainer.training.caches import embedding_cache_reason

    close, full = folders
    fixed = [{"path": str(close), "caption_prefix": "sks, "}, {"path": str(full), "random_flip": True}]
    assert embedding_cache_reason(_subsets_config(tiny_sd15, tmp_path, fixed)) is None
    dropping = [fixed[0], {**fixed[1], "caption_tag_dropout": 0.2}]
    assert embedding_cache_reason(_subsets_config(tiny_sd15, tmp_path, dropping)) == (
        f"data.subsets[1] ({full}) caption_tag_dropout changes the captions every epoch")
    # a global data.shuffle_tags that one subset turns off still shuffles the other
    assert embedding_cache_reason(_subsets_config(tiny_sd15, tmp_path, [{**fixed[0], "shuffle_tags": False}, fixed[1]],
                                                  "data.shuffle_tags=true")).startswith("data.subsets[1]")


def test_validation_split_draws_from_all_subsets(folders, tiny_sd15, tmp_path):
    from lora_trainer.data.holdout import split_examples
    from lora_trainer.data.prepare import prepare_examples
    from lora_trainer.training.validation import Validation

    close, full = folders
    subsets = [{"path": str(close), "caption_prefix": "sks, ", "repeats": 5},
               {"path": str(full), "caption_extension": ".caption"}]
    drawn = set()
    for seed in range(8):
        cfg = _subsets_config(tiny_sd15, tmp_path / "out", subsets, "data.validation_split=0.4",
                              f"data.validation_seed={seed}")
        examples = prepare_examples(cfg, show_progress=False)
        training, held = split_examples(cfg, examples)
        assert len(held) == 2 and len(training) == 3 and all(ex.repeats == 1 for ex in held)
        assert split_examples(cfg, examples) == (training, held)  # seeded: the same draw every time
        drawn |= {ex.subset for ex in held}
        record = [json.loads(line) for line in (tmp_path / "out" / "captions.jsonl").read_text().splitlines()]
        assert {r["file"] for r in record if r.get("validation")} == {ex.path.name for ex in held}
    assert drawn == {0, 1}  # the 5 images are drawn from together, by index and name
    validation = Validation(cfg, examples, 1000, 10, None, [], None)
    assert [validation.dataset[i]["caption"] for i in range(5)] == [  # scored with its subset's caption, as trained
        "sks, red, round, small", "sks, blue, square, big", "standing, park", "sitting, chair", "walking, street"]


def test_buckets_mix_subsets_and_alpha_masks_follow_each_subset(tmp_path, tiny_sd15):
    from lora_trainer.data.prepare import prepare_examples
    from lora_trainer.training.loaders import make_dataset, make_loader

    for folder, sizes in (("a", ((64, 32), (32, 32))), ("b", ((60, 30), (30, 30)))):
        for n, size in enumerate(sizes):
            path = tmp_path / folder / f"{folder}{n}.png"
            path.parent.mkdir(exist_ok=True)
            Image.new("RGBA", size, (200, 30, 30, 0)).save(path)  # fully transparent: an alpha mask of zeros
            path.with_suffix(".txt").write_text(f"{folder} {n}")
    cfg = _subsets_config(tiny_sd15, tmp_path / "out", [{"path": str(tmp_path / "a"), "alpha_mask": True},
                                                        {"path": str(tmp_path / "b")}],
                          "data.buckets=true", "data.bucket_step=16", "train.batch_size=2", "data.resolution=64")
    examples = prepare_examples(cfg, show_progress=False)
    dataset = make_dataset(cfg, examples, seed=0)
    batches = [[examples[i].path.name for i in batch["index"].tolist()] for batch in make_loader(cfg, dataset, seed=0)]
    assert sorted(sorted(b) for b in batches) == [["a0.png", "b0.png"], ["a1.png", "b1.png"]]  # one shape a batch
    for i in range(len(dataset)):
        mask, subset = dataset[i]["alpha_mask"], examples[dataset.example_index(i)].subset
        assert mask.max().item() == (0.0 if subset == 0 else 1.0)  # its own alpha, or ones without alpha_mask


def test_mask_images_of_a_subset_are_found_under_its_folder_name(tmp_path, tiny_sd15):
    from lora_trainer.data.prepare import prepare_examples

    _image(tmp_path / "img" / "a" / "x.png", "x")
    _image(tmp_path / "img" / "b" / "y.png", "y")
    for mask in (tmp_path / "masks" / "a" / "x.png", tmp_path / "masks" / "y.png"):  # by subset name, or at the top
        mask.parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (40, 40), 255).save(mask)
    cfg = _subsets_config(tiny_sd15, tmp_path / "out", [{"path": str(tmp_path / "img" / "a")},
                                                        {"path": str(tmp_path / "img" / "b")}],
                          f"data.mask_dir={tmp_path / 'masks'}")
    examples = prepare_examples(cfg, show_progress=False)
    assert [ex.mask for ex in examples] == [tmp_path / "masks" / "a" / "x.png", tmp_path / "masks" / "y.png"]


def test_check_data_with_a_config_lists_each_subset(folders, tiny_sd15, tmp_path, capsys):
    from lora_trainer.cli import main

    close, full = folders
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": {"base": str(tiny_sd15)}, "train": {"max_steps": 1}, "data": {
        "resolution": 32, "subsets": [{"path": str(close), "repeats": 3},
                                      {"path": str(full), "repeats": 2}]}}))
    assert main(["check-data", "--config", str(config)]) == 0
    printed = capsys.readouterr().out
    assert f"data.subsets[0] ({close}): 2 image(s) × repeats 3, 0 without a caption" in printed
    # the second subset reads .txt (the data.* value): f0's file is its only caption
    assert f"data.subsets[1] ({full}): 3 image(s) × repeats 2, 2 without a caption" in printed
    assert main(["check-data", "--config", str(config), "--json"]) == 0
    reports = json.loads(capsys.readouterr().out)
    assert [(r["subset"], r["repeats"], r["num_captioned"]) for r in reports] == [
        (f"data.subsets[0] ({close})", 3, 2), (f"data.subsets[1] ({full})", 2, 1)]


def test_blip2_captions_each_subsets_missing_files_with_its_extension(tmp_path, tiny_sd15, tiny_blip2):
    from lora_trainer.data.prepare import prepare_examples

    _image(tmp_path / "a" / "x.png")
    _image(tmp_path / "a" / "y.png", "hand written")
    _image(tmp_path / "b" / "z.png", "a txt file, not read here")
    cfg = _subsets_config(tiny_sd15, tmp_path / "out", [
        {"path": str(tmp_path / "a")}, {"path": str(tmp_path / "b"), "caption_extension": ".caption"}],
        "data.caption.method=blip2", f"data.caption.model={tiny_blip2}", "data.caption.prefix=gen, ")
    captions = {ex.path.name: ex.caption for ex in prepare_examples(cfg, show_progress=False)}
    assert captions["y.png"] == "hand written" and captions["x.png"].startswith("gen, ")
    assert captions["z.png"].startswith("gen, ")
    assert (tmp_path / "a" / "x.txt").read_text(encoding="utf-8").strip() == captions["x.png"]
    assert (tmp_path / "b" / "z.caption").read_text(encoding="utf-8").strip() == captions["z.png"]
    assert (tmp_path / "b" / "z.txt").read_text(encoding="utf-8") == "a txt file, not read here"


@pytest.mark.parametrize("subsets, extra, message", [
    ([{"path": "a"}], ["data.path=b"], "data.path: got 'b' with data.subsets; list that folder as a subset "
                                       "(- path: b) and leave data.path empty"),
    ([{"path": "a"}, {"path": "b", "center_crop": False}], [],
     "data.subsets[1].center_crop: data.center_crop is global (one value for every subset); set it under data, "
     "not in a subset"),
    ([{"path": "a"}, {"path": "b", "repeat": 2}], [], "data.subsets[1].repeat: unknown key; did you mean "
                                                      "data.subsets[1].repeats?"),
    ([{"path": "a"}, {"path": "b", "repeats": 0}], [], "data.subsets[1].repeats: got 0; expected an integer >= 1"),
    ([{"path": "a", "caption_tag_dropout": 1.5}], [],
     "data.subsets[0].caption_tag_dropout: got 1.5; expected a number in [0, 1]"),
    ([{"path": "a", "caption_extension": ".png"}], [],
     "data.subsets[0].caption_extension: got '.png', an image extension"),
    ([{"repeats": 2}], [], "data.subsets[0].path: got ''; expected a folder of images"),
    ([{"path": "a", "alpha_mask": True}], ["data.mask_dir=m"],
     "data.subsets[0].alpha_mask: got true with data.mask_dir"),
    ([{"path": "a", "caption_prefix": "x"}], ["embedding.token=tok", "embedding.templates=object"],
     "data.subsets[0].caption_prefix: got 'x' with embedding.templates"),
    ("a", [], "data.subsets: got 'a'; expected a list of mappings"),
])
def test_bad_subsets_are_refused_in_one_line(subsets, extra, message, tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.base=m", "train.max_steps=1", f"data.subsets={json.dumps(subsets)}", *extra])
    assert message in str(err.value) and len(str(err.value).splitlines()) == 1, str(err.value)


def test_missing_or_empty_subset_folders_stop_before_the_model_loads(folders, tiny_sd15, tmp_path):
    from lora_trainer.data.prepare import prepare_examples

    close, _ = folders
    (tmp_path / "empty").mkdir()
    for folder, said in ((tmp_path / "nope", "dataset folder not found"), (tmp_path / "empty", "no images found")):
        cfg = _subsets_config(tiny_sd15, tmp_path / "out", [{"path": str(close)}, {"path": str(folder)}])
        with pytest.raises(DataError) as err:
            prepare_examples(cfg, show_progress=False)
        text = str(err.value)
        assert text.startswith(f"data.subsets[1]: {folder}") and said in text and "\n" not in text, text
        assert "data.path" not in text


def test_from_kohya_subsets_become_data_subsets(tmp_path):
    from lora_trainer.kohya.setup import config_from_kohya

    for name in ("close", "full", "style", "reg"):
        _image(tmp_path / name / "x.png")
    dataset = {"general": {"caption_extension": ".txt", "keep_tokens": 1},
               "datasets": [{"resolution": 512, "subsets": [
                   {"image_dir": str(tmp_path / "close"), "num_repeats": 10, "caption_prefix": "sks"},
                   {"image_dir": str(tmp_path / "full"), "num_repeats": 2, "shuffle_caption": True, "flip_aug": True,
                    "caption_dropout_rate": 0.1, "keep_tokens_separator": "|||"},
                   {"image_dir": str(tmp_path / "style"), "caption_extension": ".caption", "caption_suffix": "mystyle",
                    "random_crop": True, "class_tokens": "style"},
                   {"image_dir": str(tmp_path / "reg"), "is_reg": True, "class_tokens": "woman"}]}]}
    cfg, notes = config_from_kohya({"pretrained_model_name_or_path": "m", "network_dim": 4, "network_alpha": 4,
                                    "learning_rate": 1e-4, "max_train_steps": 10}, dataset)
    data = cfg["data"]
    assert "path" not in data and (data["keep_tokens"], data["caption_prefix"]) == (1, "sks ")
    assert data["subsets"] == [
        {"path": str(tmp_path / "close"), "repeats": 10},
        {"path": str(tmp_path / "full"), "repeats": 2, "shuffle_tags": True, "keep_tokens_separator": "|||",
         "caption_dropout": 0.1, "random_flip": True, "caption_prefix": ""},
        {"path": str(tmp_path / "style"), "caption_prefix": "", "caption_suffix": " mystyle",
         "caption_extension": ".caption", "default_caption": "style"}]
    assert cfg["dreambooth"]["class_data"] == str(tmp_path / "reg")  # is_reg: class images, as before
    text = "\n".join(notes)
    assert f"(subset {tmp_path / 'style'}) random_crop: True differs from the first subset's unset" in text
    assert "class_tokens" not in text and "flip_aug" not in text and "shuffle_caption" not in text
    cfg["output"] = {"dir": str(tmp_path / "out")}
    loaded = load_config(None, [f"{section}.{key}={json.dumps(value)}" for section, keys in cfg.items()
                                for key, value in keys.items()])
    assert [s.repeats for s in loaded.data.subsets] == [10, 2, None]
    assert "subsets:" in dump_config(loaded)


def test_default_caption_captions_only_the_images_without_one(tmp_path, tiny_sd15):
    """data.default_caption (kohya's class_tokens) and a subset's own: the caption of an image with no
    caption file and no <N>_<name> folder naming it; captioned images and folder names keep theirs."""
    from lora_trainer.data.prepare import prepare_examples

    dog, style = tmp_path / "dog", tmp_path / "style"
    _image(dog / "a.png", "a dog, running")
    _image(dog / "b.png")
    _image(dog / "3_sks dog" / "c.png")  # named by its folder, which wins
    _image(style / "d.png")
    cfg = _subsets_config(tiny_sd15, tmp_path / "out", [{"path": str(dog)}, {"path": str(style),
                                                         "default_caption": "mystyle"}],
                          "data.default_caption=sks dog")
    examples = prepare_examples(cfg, show_progress=False)
    assert [(ex.path.name, ex.caption, ex.repeats) for ex in examples] == [
        ("c.png", "sks dog", 3), ("a.png", "a dog, running", 1), ("b.png", "sks dog", 1), ("d.png", "mystyle", 1)]
    plain = load_config(REPO / "configs" / "example.yaml", [f"model.base={tiny_sd15}", f"data.path={style}",
                                                            f"output.dir={tmp_path / 'plain'}", *FAST])
    assert [ex.caption for ex in prepare_examples(plain, show_progress=False)] == [""]  # off by default
