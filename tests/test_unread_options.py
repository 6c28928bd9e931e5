"""Options that the rest of a config would not read: a one-line error naming the key and what it
needs, or (for keys a template or from-kohya may leave for later) a one-line warning; never silence."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from lora_trainer.config import config_from_dict, dump_config, load_config
from lora_trainer.errors import ConfigError
from lora_trainer.kohya.mapping import config_from_kohya

REPO = Path(__file__).resolve().parents[1]
BASE = {"model": {"base": "m"}, "data": {"path": "d"}}


def _load(**sections):
    return config_from_dict({**BASE, "train": {"max_steps": 10}, **sections})


@pytest.mark.parametrize("sections, message", [
    ({"train": {"max_steps": 10, "huber_c": 0.2}},
     "train.huber_c: got 0.2 with train.loss_type 'l2', which does not read it; set train.loss_type=huber"),
    ({"train": {"max_steps": 10, "loss_type": "l1", "huber_schedule": "constant"}},
     "train.huber_schedule: got 'constant' with train.loss_type 'l1', which does not read it"),
    ({"train": {"max_steps": 10, "huber_scale": 2.0}}, "leave train.huber_scale at 1.0"),
    ({"train": {"max_steps": 10, "multires_noise_discount": 0.5}},
     "train.multires_noise_discount: got 0.5 with train.multires_noise_iterations 0"),
    ({"train": {"max_steps": 10, "warmup": 10, "scheduler": "constant"}},
     "train.warmup: got 10 with train.scheduler 'constant', which has no warmup; set train.scheduler=constant_with_warmup"),
    ({"train": {"max_steps": 10, "cache_latents": False, "cache_latents_to_disk": True}},
     "train.cache_latents_to_disk: got True with train.cache_latents false"),
    ({"train": {"max_steps": 10, "cache_dir": "/tmp/c"}},
     "train.cache_dir: got '/tmp/c' with train.cache_latents_to_disk false"),
    ({"train": {"max_steps": 10, "optimizer": "adafactor", "adam_beta2": 0.99}},
     "train.adam_beta2: got 0.99 with train.optimizer 'adafactor', which does not read it"),
    ({"train": {"max_steps": 10, "optimizer": "lion", "adam_epsilon": 1e-6}},
     "train.adam_epsilon: got 1e-06 with train.optimizer 'lion'"),
    ({"data": {"path": "d", "validation_seed": 3}}, "data.validation_seed: got 3 with no held-out images"),
    ({"train": {"max_steps": 10, "validation_timesteps": 4}}, "train.validation_timesteps: got 4 with no held-out"),
    ({"lora": {"block_lr_zero_threshold": 0.1}},
     "lora.block_lr_zero_threshold: got 0.1 without lora.block_lr_weights"),
    ({"dreambooth": {"prior_loss_weight": 0.5}},
     "dreambooth.prior_loss_weight: got 0.5 with dreambooth.num_class_images 0 (no prior preservation)"),
    ({"dreambooth": {"class_steps": 50}}, "dreambooth.class_steps: got 50 with dreambooth.num_class_images 0"),
    ({"lora": {"conv_alpha": 4}}, "lora.conv_alpha: got 4.0 with lora.conv_rank 0"),  # already refused before
    ({"data": {"path": "d", "max_bucket_side": 1024}}, "data.max_bucket_side: got 1024 with data.buckets false"),
])
def test_an_option_nothing_reads_is_a_one_line_error_naming_it(sections, message):
    with pytest.raises(ConfigError) as info:
        _load(**sections)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("sections", [
    {"train": {"max_steps": 10, "loss_type": "huber", "huber_c": 0.2, "huber_schedule": "constant", "huber_scale": 2}},
    {"train": {"max_steps": 10, "loss_type": "smooth_l1", "huber_c": 0.3}},
    {"train": {"max_steps": 10, "multires_noise_iterations": 6, "multires_noise_discount": 0.5}},
    {"train": {"max_steps": 10, "warmup": 10, "scheduler": "constant_with_warmup"}},
    {"train": {"max_steps": 10, "cache_latents_to_disk": True, "cache_dir": "/tmp/c"}},
    {"train": {"max_steps": 10, "optimizer": "lion", "adam_beta2": 0.99}},
    {"train": {"max_steps": 10, "optimizer": "prodigy", "adam_epsilon": 1e-6}},
    {"data": {"path": "d", "validation_split": 0.2, "validation_seed": 3}, "train": {"validation_timesteps": 4,
                                                                                    "max_steps": 10}},
    {"lora": {"block_lr_zero_threshold": 0.1, "block_lr_weights": {"mid": [0.05]}}},
    {"dreambooth": {"num_class_images": 10, "class_prompt": "a dog", "class_data": "c", "prior_loss_weight": 0.5,
                    "class_steps": 50, "class_batch_size": 2}},
    # the default, written out (every resolved config.yaml holds all keys), means nothing to refuse
    {"train": {"max_steps": 10, "loss_type": "l2", "huber_c": 0.1, "huber_schedule": "snr", "huber_scale": 1.0,
               "multires_noise_discount": 0.3, "warmup": 0, "scheduler": "constant"}},
])
def test_the_same_options_where_they_are_read_are_accepted(sections):
    cfg = _load(**sections)
    assert config_from_dict(yaml.safe_load(dump_config(cfg))) == cfg  # and its config.yaml reloads


def test_sampling_cadence_without_prompts_and_a_text_encoder_ratio_without_one_warn(caplog):
    with caplog.at_level(logging.WARNING, logger="lora_trainer.config"):
        cfg = load_config(None, ["model.base=m", "data.path=d", "train.max_steps=10", "sample.every_n_steps=5",
                                 "sample.every_n_epochs=2", "train.loraplus_text_encoder_lr_ratio=4"])
    assert cfg.sample.every_n_steps == 5  # the run goes on
    assert caplog.messages == [
        "command line: sample.every_n_steps: got 5 with no sample.prompts, so no samples are drawn; "
        "set sample.prompts to see them",
        "command line: sample.every_n_epochs: got 2 with no sample.prompts, so no samples are drawn; "
        "set sample.prompts to see them",
        "command line: train.loraplus_text_encoder_lr_ratio: got 4.0 with lora.train_text_encoder false, so no "
        "text-encoder adapter uses it; set lora.train_text_encoder=true for that"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lora_trainer.config"):
        load_config(None, ["model.base=m", "data.path=d", "train.max_steps=10", "sample.every_n_steps=5",
                           "sample.prompts=[a cat]", "lora.train_text_encoder=true",
                           "train.loraplus_text_encoder_lr_ratio=4"])
    assert caplog.messages == []


def test_a_finished_runs_config_is_reread_without_its_warnings(tmp_path, caplog):
    cfg = load_config(None, ["model.base=m", "data.path=d", "train.max_steps=10", "sample.every_n_steps=5"])
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(cfg), encoding="utf-8")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lora_trainer.config"):
        assert load_config(path, warn=False) == cfg  # what publish does with a run's config.yaml
        assert caplog.messages == []
        load_config(path)
    assert caplog.messages == [f"{path}: sample.every_n_steps: got 5 with no sample.prompts, so no samples are "
                               "drawn; set sample.prompts to see them"]


@pytest.mark.parametrize("name", ["example", "sd15-style", "sd15-dreambooth", "sdxl-style", "sdxl-dreambooth"])
def test_shipped_configs_load_without_a_warning(name, caplog):
    with caplog.at_level(logging.WARNING, logger="lora_trainer.config"):
        load_config(REPO / "configs" / f"{name}.yaml", ["model.base=m", "data.path=d"])
    assert caplog.messages == []


def _kohya(*network_args: str, **extra):
    args = {"pretrained_model_name_or_path": "m", "train_data_dir": "img", "caption_extension": ".txt",
            "network_dim": 4, "network_alpha": 4, "learning_rate": 1e-4, "max_train_steps": 100,
            "network_args": list(network_args), **extra}
    cfg, notes = config_from_kohya(args)
    config_from_dict(cfg)  # what from-kohya writes always validates
    return cfg, notes


def test_from_kohya_leaves_out_what_kohya_would_not_read_with_a_note():
    cfg, notes = _kohya("block_lr_zero_threshold=0.2", "loraplus_text_encoder_lr_ratio=4", huber_c=0.2,
                        huber_schedule="constant", multires_noise_discount=0.5, network_train_unet_only=True)
    t = cfg["train"]
    assert not {"huber_c", "huber_schedule", "multires_noise_discount", "loraplus_text_encoder_lr_ratio"} & set(t)
    assert "block_lr_zero_threshold" not in cfg["lora"]
    assert sorted(notes) == sorted(["--huber_schedule constant: only read with --loss_type huber or smooth_l1; left out",
                     "--huber_c 0.2: only read with --loss_type huber or smooth_l1; left out",
                     "--multires_noise_discount 0.5: only read with --multires_noise_iterations; left out",
                     "--network_args block_lr_zero_threshold=0.2: kohya uses it only with down/mid/up_lr_weight; "
                     "left out",
                     "--network_args loraplus_text_encoder_lr_ratio=4: the text encoder is not trained; left out"])
    cfg, notes = _kohya("block_lr_zero_threshold=0.2", "up_lr_weight=" + ",".join(["1"] * 11 + ["0"]),
                        "loraplus_text_encoder_lr_ratio=4",
                        loss_type="smooth_l1", huber_c=0.2, multires_noise_iterations=6, multires_noise_discount=0.5)
    t = cfg["train"]
    assert (t["huber_c"], t["multires_noise_discount"], t["loraplus_text_encoder_lr_ratio"]) == (0.2, 0.5, 4.0)
    assert cfg["lora"]["block_lr_zero_threshold"] == 0.2 and notes == []
