"""kohya's dataset layout: `<N>_<name>` folders repeat their images N times per epoch and caption the
uncaptioned ones `<name>`; `0_` folders are parked. Repeats reach the dataset, the buckets, the
number of steps per epoch, check-data and the adapter's per-folder metadata."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pytest
import safetensors
from conftest import run_config
from PIL import Image

from lora_trainer.cli import main
from lora_trainer.data import ImageCaptionDataset, scan_dataset
from lora_trainer.data.checks import check_dataset
from lora_trainer.data.folders import parse_folder_name
from lora_trainer.errors import DataError


def _image(path: Path, size=(40, 40), colour=None, caption: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if colour is None:  # distinct images, so check-data finds no duplicates
        colour = tuple(sum(map(ord, path.name)) * k % 256 for k in (3, 5, 7))
    image = Image.new("RGB", size, colour)
    image.paste((250, 250, 250), (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
    image.save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def _rel(examples, root) -> dict[str, tuple[int, str | None, str]]:
    return {ex.path.relative_to(root).as_posix(): (ex.repeats, ex.folder, ex.caption) for ex in examples}


@pytest.fixture
def kohya_tree(tmp_path):
    """10_a (two images, one nested deeper), 2_b (one, plus a 3_c folder inside), a plain folder,
    an abc_x folder (not a repeat count) and an image at the top."""
    root = tmp_path / "img"
    _image(root / "10_a" / "x.png", caption="x")
    _image(root / "10_a" / "sub" / "y.png", caption="y")
    _image(root / "2_b" / "z.png", caption="z")
    _image(root / "2_b" / "3_c" / "q.png", caption="q")
    _image(root / "plain" / "p.png", caption="p")
    _image(root / "abc_x" / "v.png", caption="v")
    _image(root / "top.png", caption="t")
    return root


def test_folder_names_parse_as_kohya_reads_them():
    assert parse_folder_name("10_sks dog") == (10, "sks dog")
    assert parse_folder_name("007_bond_girl") == (7, "bond_girl")
    assert parse_folder_name("10_") == (10, "")
    assert parse_folder_name("0_parked") == (0, "parked")
    for plain in ("abc_x", "10", "x_10", "_10", "1.5_x", "²_x"):
        assert parse_folder_name(plain) is None


def test_nearest_repeat_folder_sets_repeats_and_dataset_length(kohya_tree):
    examples = scan_dataset(kohya_tree)
    assert _rel(examples, kohya_tree) == {
        "10_a/sub/y.png": (10, "10_a", "y"),  # a plain folder inside 10_a: the nearest repeat folder wins
        "10_a/x.png": (10, "10_a", "x"),
        "2_b/3_c/q.png": (3, "2_b/3_c", "q"),
        "2_b/z.png": (2, "2_b", "z"),
        "abc_x/v.png": (1, None, "v"),
        "plain/p.png": (1, None, "p"),
        "top.png": (1, None, "t"),
    }
    dataset = ImageCaptionDataset(examples, 32, repeats=2)  # data.repeats multiplies the folder's N
    assert len(dataset) == 2 * (10 + 10 + 3 + 2 + 1 + 1 + 1)
    shown = Counter(dataset.example_index(i) for i in range(len(dataset)))
    assert [shown[j] for j in range(len(examples))] == [2 * ex.repeats for ex in examples]
    assert scan_dataset(kohya_tree, folder_repeats=False)[0].repeats == 1


def test_equal_repeats_keep_the_old_item_order(kohya_tree):
    examples = scan_dataset(kohya_tree, folder_repeats=False)
    dataset = ImageCaptionDataset(examples, 32, repeats=3)
    assert [dataset.example_index(i) for i in range(len(dataset))] == [i % len(examples) for i in range(3 * 7)]


def test_uncaptioned_images_take_the_folder_name_once_per_folder(tmp_path, caplog):
    root = tmp_path / "img"
    _image(root / "10_sks dog" / "a.png")
    _image(root / "10_sks dog" / "b.png")
    _image(root / "10_sks dog" / "own.png", caption="my own words")
    _image(root / "10_sks dog" / "blank.png", caption="   ")  # written blank on purpose: stays blank
    _image(root / "10_sks dog" / "listed.png")
    (root / "10_sks dog" / "metadata.jsonl").write_text(json.dumps({"file_name": "listed.png", "text": "from jsonl"}))
    _image(root / "5_" / "c.png")  # empty name: repeats, but no caption to give
    _image(root / "plain" / "d.png")
    with caplog.at_level(logging.INFO, logger="lora_trainer"):
        examples = scan_dataset(root)
    captions = {path: caption for path, (_, _, caption) in _rel(examples, root).items()}
    assert captions == {"10_sks dog/a.png": "sks dog", "10_sks dog/b.png": "sks dog", "10_sks dog/blank.png": "",
                        "10_sks dog/listed.png": "from jsonl", "10_sks dog/own.png": "my own words",
                        "5_/c.png": "", "plain/d.png": ""}
    named = [r.getMessage() for r in caplog.records if "the folder's name" in r.getMessage()]
    assert named == ["10_sks dog: 2 image(s) without a caption are captioned 'sks dog' (the folder's name)"]
    assert "folders (images × repeats): 10_sks dog: 5 images × 10, 5_: 1 image × 5, img: 1 image × 1" in caplog.text
    assert [ex.caption for ex in scan_dataset(root, folder_captions=False)][:2] == ["", ""]
    # the folder's name is the adapter's trigger (modelspec.trigger_phrase, CivitAI's trainedWords)
    from lora_trainer.training.outputs import folder_triggers

    assert folder_triggers(examples) == ["sks dog"]
    assert folder_triggers(scan_dataset(root, folder_captions=False)) == []


def test_zero_repeat_folders_are_left_out_and_bad_counts_name_the_folder(tmp_path, caplog):
    root = tmp_path / "img"
    _image(root / "3_keep" / "a.png", caption="a")
    _image(root / "0_parked" / "b.png", caption="b")
    _image(root / "0_parked" / "5_inner" / "c.png", caption="c")  # everything under a 0_ folder is out
    with caplog.at_level(logging.WARNING, logger="lora_trainer"):
        examples = scan_dataset(root)
    assert [ex.path.name for ex in examples] == ["a.png"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "0_parked" in warnings[0] and "\n" not in warnings[0]
    assert len(scan_dataset(root, folder_repeats=False)) == 3

    only_parked = tmp_path / "parked"
    _image(only_parked / "0_x" / "a.png")
    with pytest.raises(DataError, match=r"no images found .* outside 0_<name> folders"):
        scan_dataset(only_parked)

    dated = tmp_path / "dated"
    _image(dated / "2024_trip" / "a.png")
    with pytest.raises(DataError) as info:
        scan_dataset(dated)
    message = str(info.value)
    assert "2024_trip" in message and "data.folder_repeats=false" in message and "\n" not in message
    assert scan_dataset(dated, folder_repeats=False)[0].repeats == 1


def test_check_data_lists_folders_with_their_repeats(kohya_tree, capsys):
    _image(kohya_tree / "0_old" / "o.png", caption="o")
    _image(kohya_tree / "4_sks cat" / "n.png")  # no caption: the folder name counts as its caption
    report = check_dataset(kohya_tree, resolution=32)
    assert report.folders[:2] == [{"folder": "10_a", "img_count": 2, "n_repeats": 10},
                                  {"folder": "2_b", "img_count": 1, "n_repeats": 2}]
    kinds = {p.kind: p.files for p in report.problems}
    assert kinds == {"parked_folder": ["0_old"]}
    assert report.num_captioned == 8 and "sks cat" in report.tag_frequency
    assert main(["check-data", str(kohya_tree), "--resolution", "32"]) == 0
    out = capsys.readouterr().out
    assert ("folders (images × repeats): 10_a: 2 images × 10, 2_b: 1 image × 2, 2_b/3_c: 1 image × 3, "
            "4_sks cat: 1 image × 4, img: 3 images × 1 (32 per epoch)") in out
    assert main(["check-data", str(kohya_tree), "--no-folder-repeats", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["folders"] == []


def test_buckets_with_folder_repeats_give_one_shape_per_batch(tmp_path, tiny_sd15):
    from lora_trainer.training.loaders import make_dataset, make_loader

    root = tmp_path / "img"
    _image(root / "3_wide" / "w1.png", size=(64, 36))
    _image(root / "3_wide" / "w2.png", size=(60, 32))
    _image(root / "2_tall" / "t.png", size=(36, 64))
    _image(root / "sq.png", size=(48, 48), caption="square")
    cfg = run_config(tiny_sd15, root, "unused", "data.resolution=96", "data.buckets=true", "data.bucket_step=32",
                     "train.batch_size=2")
    examples = scan_dataset(root)
    loader = make_loader(cfg, make_dataset(cfg, examples, seed=0), seed=0)
    seen = Counter()
    for batch in loader:
        assert len({tuple(p.shape) for p in batch["pixel_values"]}) == 1
        seen.update(batch["index"].tolist())
    names = [ex.path.name for ex in examples]
    assert {names[i]: n for i, n in seen.items()} == {"w1.png": 3, "w2.png": 3, "t.png": 2, "sq.png": 1}
    assert len(loader) == 3 + 1 + 1  # 6 wide items in 3 batches, 2 tall in 1, 1 square in 1


def test_kohya_layout_trains_with_per_folder_metadata_and_resumes_exactly(tmp_path, tiny_sd15, caplog):
    import shutil

    import torch

    from lora_trainer.training.loop import train

    root = tmp_path / "img"
    _image(root / "3_sks dog" / "a.png", colour=(30, 90, 200))
    _image(root / "3_sks dog" / "b.png", colour=(40, 160, 60), caption="sks dog, grass")
    _image(root / "2_style" / "c.png", colour=(200, 200, 40), caption="flat colours")
    _image(root / "d.png", colour=(90, 20, 120), caption="purple")
    # 3 + 3 + 2 + 1 = 9 items per epoch: 4 full batches of 2, so 2 epochs are 8 optimizer steps.
    run = ["train.max_steps=null", "train.epochs=2", "sample.prompts=[]", "data.caption_prefix=",
           "data.random_flip=false", "output.dtype=fp32", "output.save_every_n_steps=3"]
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="lora_trainer"):
        result = train(run_config(tiny_sd15, root, out, *run), show_progress=False)
    assert result.steps == 8
    meta = safetensors.safe_open(str(result.adapter_paths[0]), "pt").metadata()
    assert json.loads(meta["ss_dataset_dirs"]) == {"3_sks dog": {"n_repeats": 3, "img_count": 2},
                                                   "2_style": {"n_repeats": 2, "img_count": 1},
                                                   "img": {"n_repeats": 1, "img_count": 1}}
    assert meta["ss_num_train_images"] == "9" and meta["ss_steps"] == "8"
    assert json.loads(meta["ss_tag_frequency"]) == {"3_sks dog": {"sks dog": 2, "grass": 1},
                                                    "2_style": {"flat colours": 1}, "img": {"purple": 1}}
    record = [json.loads(line) for line in (out / "captions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert record[0] == {"file": "2_style/c.png", "caption": "flat colours", "generated": False, "repeats": 2}
    assert record[1]["caption"] == "sks dog" and record[1]["repeats"] == 3
    # Repeats show an image again, they add no latent cache entries: one per image at most.
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("latent cache:"))
    entries, hits, misses = (int(w) for w in line.replace(",", "").split() if w.isdigit())
    assert entries <= 4 and entries == misses and hits + misses == 16

    # Resumed from step 3 (mid first epoch), the run ends with the same adapter, bit for bit.
    again = tmp_path / "again"
    shutil.copytree(out / "checkpoints" / "step-000003", again / "checkpoints" / "step-000003")
    resumed = train(run_config(tiny_sd15, root, again, *run, "train.resume=latest"), show_progress=False)
    assert resumed.steps == 8 and resumed.losses == result.losses[3:]
    trained = dict(result.unet.named_parameters())
    assert all(torch.equal(p, trained[n]) for n, p in resumed.unet.named_parameters() if p.requires_grad)


def test_blip2_captions_first_and_only_the_rest_take_the_folder_name(tmp_path, tiny_sd15, tiny_blip2):
    from lora_trainer.data.prepare import prepare_examples

    root = tmp_path / "img"
    _image(root / "3_sks dog" / "a.png")
    _image(root / "3_sks dog" / "b.png", caption="hand written")
    _image(root / "0_old" / "c.png")
    cfg = run_config(tiny_sd15, root, tmp_path / "out", "data.caption.method=blip2",
                     f"data.caption.model={tiny_blip2}", "data.caption.prefix=gen, ")
    examples = prepare_examples(cfg, show_progress=False)
    captions = {ex.path.name: ex.caption for ex in examples}
    assert captions["b.png"] == "hand written" and captions["a.png"].startswith("gen, ")
    assert (root / "3_sks dog" / "a.txt").read_text(encoding="utf-8").strip() == captions["a.png"]
    assert not (root / "0_old" / "c.txt").exists()  # parked: not captioned, not trained on
