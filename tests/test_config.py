"""The config: YAML plus dotted overrides, typed, every bad key or value named before a model loads."""

from __future__ import annotations

import pytest
from conftest import REPO

from lora_trainer.cli import main
from lora_trainer.config import dump_config, load_config, parse_overrides
from lora_trainer.errors import ConfigError

BASE = ["model.base=some/model", "data.path=datasets/example"]


def test_overrides_are_typed_and_nested():
    cfg = load_config(REPO / "configs" / "example.yaml", ["train.max_steps=50", "lora.rank=8", "train.lr=3e-4",
                                                          "lora.unet_targets=[to_q,to_v]", "data.random_flip=false"])
    assert cfg.train.max_steps == 50 and cfg.lora.rank == 8
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.lora.unet_targets == ["to_q", "to_v"]
    assert cfg.data.random_flip is False
    assert cfg.lora_alpha == 4.0  # from the file: alpha 4
    assert parse_overrides(["a.b.c=1", "a.d=x y"]) == {"a": {"b": {"c": 1}, "d": "x y"}}


def test_alpha_defaults_to_rank():
    cfg = load_config(None, [*BASE, "train.max_steps=1", "lora.rank=16"])
    assert cfg.lora_alpha == 16.0


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(REPO / "configs" / "example.yaml", ["lora.rank=8"])
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize("override, key, shown", [
    ("lora.rnak=4", "lora.rnak", "unknown key"),
    ("lora.rank=-1", "lora.rank", "-1"),
    ("train.mixed_precision=fp8", "train.mixed_precision", "'no', 'fp16', 'bf16'"),
    ("train.lr=fast", "train.lr", "'fast'"),
    ("data.caption_dropout=1.5", "data.caption_dropout", "[0, 1]"),
    ("output.format=onnx", "output.format", "'kohya', 'diffusers', 'both'"),
    ("train.batch_size=0", "train.batch_size", ">= 1"),
])
def test_bad_key_or_value_names_key_value_and_allowed(override, key, shown):
    with pytest.raises(ConfigError) as err:
        load_config(None, [*BASE, "train.max_steps=1", override])
    message = str(err.value)
    assert key in message and shown in message
    assert len(message.splitlines()) == 1


def test_section_given_a_value_is_named_on_the_command_line_without_a_trailing_dot():
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs" / "example.yaml", ["lora.block_lr_weights=[1,2]", "lora.block_ranks=4"])
    lines = str(err.value).splitlines()
    assert lines[0].startswith("command line: lora.block_lr_weights: expected a mapping of keys")
    assert lines[1] == "command line: lora.block_ranks: got 4; expected a list of integers or null"


def test_all_problems_reported_together():
    with pytest.raises(ConfigError) as err:
        load_config(None, [*BASE, "train.max_steps=1", "lora.rnak=4", "train.lr=fast", "sample.stpes=3"])
    lines = str(err.value).splitlines()
    assert len(lines) == 3
    assert {line.split(":")[0] for line in lines} == {"lora.rnak", "train.lr", "sample.stpes"}


def test_missing_steps_and_base_are_errors():
    with pytest.raises(ConfigError, match="train.max_steps"):
        load_config(None, BASE)
    with pytest.raises(ConfigError, match="model.base"):
        load_config(None, ["data.path=x", "train.max_steps=1"])


def test_cli_reports_config_error_on_one_line_before_loading_any_model(tmp_path, capsys):
    # The base does not exist: if the model were loaded first, the error would be about it.
    rc = main(["train", str(REPO / "configs" / "example.yaml"), "model.base=/nonexistent/model",
               f"output.dir={tmp_path / 'out'}", "lora.rank=-1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.count("\n") == 0 and "lora.rank" in err and "-1" in err
    assert not (tmp_path / "out").exists()


def test_bad_yaml_and_missing_file_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: [1,\n")
    with pytest.raises(ConfigError, match="bad.yaml line"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_bare_yaml_no_means_no_mixed_precision(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {base: m}\ndata: {path: d}\ntrain: {max_steps: 1, mixed_precision: no}\n")
    assert load_config(path).train.mixed_precision == "no"


@pytest.mark.parametrize("name", ["sd15-style", "sd15-dreambooth", "sdxl-style", "sdxl-dreambooth"])
def test_ready_configs_are_valid(name):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    assert cfg.lora.rank in (8, 16, 32) and cfg.train.lr == pytest.approx(1e-4)
    if "dreambooth" in name:
        assert cfg.prior_preservation and cfg.dreambooth.class_prompt and cfg.train.text_encoder_lr == pytest.approx(5e-5)
    if name.startswith("sdxl"):
        assert cfg.data.resolution == 1024 and cfg.data.buckets


def test_error_names_the_command_line_when_the_bad_key_was_an_override(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  base: x\ndata:\n  path: d\ntrain:\n  max_stpes: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["trian.max_steps=3", "lora.rank=abc"])
    lines = str(err.value).splitlines()
    assert len(lines) == 3
    assert any(line.startswith(f"{path}: train.max_stpes: unknown key") for line in lines)
    assert any(line.startswith("command line: trian: unknown key") for line in lines)
    assert any(line.startswith("command line: lora.rank: got 'abc'") for line in lines)


def test_an_error_between_two_keys_names_the_override_that_caused_it(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  base: x\ndata:\n  path: d\ntrain:\n  max_steps: 3\n"
                    "  scheduler: constant_with_warmup\n  warmup: 4\n")
    assert load_config(path).train.warmup == 4  # the file alone is fine
    with pytest.raises(ConfigError) as err:
        load_config(path, ["train.scheduler=constant"])
    assert str(err.value) == (
        f"{path} with the command line override train.scheduler=constant: train.warmup: got 4 with "
        "train.scheduler 'constant', which has no warmup; set train.scheduler=constant_with_warmup or leave "
        "train.warmup at 0")
    with pytest.raises(ConfigError, match=r"^command line: train.warmup: got 4 with"):
        load_config(path, ["train.scheduler=constant", "train.warmup=4"])


def test_a_choice_in_kohyas_spelling_gets_a_hint():
    with pytest.raises(ConfigError, match=r"train.optimizer: got 'Lion'; expected one of .* \(did you mean 'lion'\?\)"):
        load_config(None, ["model.base=m", "data.path=d", "train.max_steps=1", "train.optimizer=Lion"])
    with pytest.raises(ConfigError, match=r"kohya's 'cosine_with_min_lr' is cosine, with train.min_lr_ratio set"):
        load_config(None, ["model.base=m", "data.path=d", "train.max_steps=1", "train.scheduler=cosine_with_min_lr"])


@pytest.mark.parametrize("override, message", [
    ("data.resolutoin=64", "data.resolutoin: unknown key; did you mean data.resolution?"),
    ("train.rank=8", "train.rank: unknown key; did you mean lora.rank?"),
    ("train.learning_rate=1e-4",
     "train.learning_rate: unknown key; did you mean train.lr (kohya/diffusers: learning_rate)?"),
    ("lora.network_dim=8", "lora.network_dim: unknown key; did you mean lora.rank (kohya/diffusers: network_dim)?"),
    ("trian.lr=1e-4", "trian: unknown key; did you mean train?"),
])
def test_a_mistyped_misplaced_or_kohya_key_gets_the_key_it_means(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [*BASE, "train.max_steps=1", override])
    assert str(err.value) == message


def test_an_unknown_key_like_no_other_lists_the_sections_keys():
    with pytest.raises(ConfigError, match=r"^lora.zzz: unknown key; allowed keys here: alpha, .*use_dora$"):
        load_config(None, [*BASE, "train.max_steps=1", "lora.zzz=1"])


def test_outputs_and_class_images_inside_the_dataset_are_refused(tmp_path):
    """A run folder or class images under data.path would be scanned as training images next time
    (the samples, loss.png, the class images captioned with the instance prompt)."""
    data = tmp_path / "data"
    db = ["dreambooth.instance_prompt=sks", "dreambooth.class_prompt=a dog", "dreambooth.num_class_images=2"]
    what = {"output.dir": "the run's samples and loss curve", "dreambooth.class_data": "the class images"}
    for key, inside in (("output.dir", data), ("output.dir", data / "out"), ("dreambooth.class_data", data / "class")):
        with pytest.raises(ConfigError) as err:
            load_config(None, ["model.base=some/model", f"data.path={data}", "train.max_steps=1",
                               f"output.dir={tmp_path / 'out'}", f"dreambooth.class_data={tmp_path / 'class'}",
                               *db, f"{key}={inside}"])
        assert str(err.value) == (f"{key}: got {str(inside)!r}, inside data.path {str(data)!r}, so {what[key]} "
                                  "would train as images; use a folder outside data.path")
    load_config(None, ["model.base=some/model", f"data.path={data}", "train.max_steps=1",
                       f"output.dir={tmp_path / 'data-out'}", f"dreambooth.class_data={tmp_path / 'class'}", *db])


def test_a_section_or_key_given_twice_in_the_yaml_is_refused(tmp_path):
    """YAML keeps the last of two equal keys: a second lora: section would silently drop rank 8."""
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  base: x\nlora:\n  rank: 8\ntrain:\n  max_steps: 3\nlora:\n  alpha: 4\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (f"{path} line 7: not valid YAML ('lora' is given twice (lines 3 and 7); "
                              "keep one and merge what is under them)")
    path.write_text("model:\n  base: x\ndata:\n  path: d\ntrain:\n  max_steps: 3\nlora:\n  rank: 8\n  alpha: 4\n")
    assert load_config(path).lora.rank == 8


def test_an_empty_yaml_value_of_a_text_key_that_defaults_to_empty_is_empty(tmp_path):
    """`caption_prefix:` with nothing after it is YAML's null: the empty text it defaults to, not an
    error; a text key with a real default (output.name) still refuses null."""
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  base: x\ndata:\n  path: d\n  caption_prefix:\ntrain:\n  max_steps: 3\n")
    assert load_config(path).data.caption_prefix == ""
    assert load_config(path, ["data.caption_suffix=null"]).data.caption_suffix == ""
    with pytest.raises(ConfigError, match="output.name: got None; expected a string"):
        load_config(path, ["output.name=null"])
