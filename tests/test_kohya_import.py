"""`lora-trainer from-kohya`: kohya-ss command lines and TOML configs become configs that load, and
every argument that does not carry over is named in a note."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from lora_trainer.cli import main
from lora_trainer.config import load_config
from lora_trainer.errors import ConfigError
from lora_trainer.kohya.setup import config_from_kohya, convert_kohya, parse_command_line, read_kohya_setup

SD15_COMMAND = r"""#!/bin/bash
source venv/bin/activate
accelerate launch --num_cpu_threads_per_process 2 train_network.py \
  --pretrained_model_name_or_path="runwayml/stable-diffusion-v1-5" \
  --train_data_dir=img --reg_data_dir reg --prior_loss_weight 0.8 \
  --resolution 512 --enable_bucket --bucket_reso_steps 64 \
  --output_dir=out --output_name "my dog" --save_model_as safetensors \
  --network_module=networks.lora --network_dim 16 --network_alpha 8 --network_dropout 0.1 \
  --network_args "conv_dim=4" "conv_alpha=1" \
  --learning_rate 1e-4 --unet_lr 2e-4 --lr_scheduler cosine --lr_warmup_steps 0.1 \
  --max_train_steps 1000 --train_batch_size 2 --gradient_accumulation_steps 2 \
  --mixed_precision fp16 --save_precision fp16 --gradient_checkpointing \
  --optimizer_type AdamW8bit --optimizer_args "weight_decay=0.1" "betas=0.9,0.99" \
  --xformers --cache_latents --cache_latents_to_disk --min_snr_gamma 5 --noise_offset 0.05 \
  --seed 1234 --max_grad_norm 0.5 --clip_skip 2 --max_token_length 225 \
  --shuffle_caption --keep_tokens 1 --caption_dropout_rate 0.05 --flip_aug --random_crop \
  --sample_prompts prompts.txt --sample_every_n_steps 100 --sample_sampler euler_a \
  --save_every_n_steps 200 --log_with tensorboard --logging_dir logs --resume out/state \
  --color_aug --wandb_api_key SECRET123 --frobnicate 3
"""


def _touch_images(folder: Path, count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (folder / f"{i:02d}.png").write_bytes(b"")


@pytest.fixture
def sd15_setup(tmp_path, monkeypatch):
    """A kohya SD1.5 job as users keep it: train.sh, prompts.txt, img/<N>_<name>, reg/<N>_<class>."""
    monkeypatch.chdir(tmp_path)
    _touch_images(tmp_path / "img" / "10_sks dog", 2)
    _touch_images(tmp_path / "reg" / "1_dog", 5)
    (tmp_path / "prompts.txt").write_text("# kohya prompts\nsks dog on a beach --n blurry --w 512 --h 768 --d 7 "
                                          "--l 6.5 --s 28 --ss euler_a\n\na photo of a dog\n", encoding="utf-8")
    (tmp_path / "train.sh").write_text(SD15_COMMAND, encoding="utf-8")
    return tmp_path


def test_sd15_command_line_with_continuations_maps_every_argument(sd15_setup):
    args, dataset, _ = read_kohya_setup(sd15_setup / "train.sh")
    assert args["_script"] == "train_network.py" and dataset is None
    assert args["network_args"] == ["conv_dim=4", "conv_alpha=1"] and args["xformers"] is True
    cfg, notes = config_from_kohya(args, dataset)
    assert cfg["model"] == {"base": "runwayml/stable-diffusion-v1-5", "variant": "sd15", "clip_skip": 2,
                            "max_token_length": 225}
    assert cfg["data"] == {"path": "img", "resolution": 512, "shuffle_tags": True, "keep_tokens": 1,
                           "caption_dropout": 0.05, "random_flip": True, "center_crop": False, "bucket_step": 64,
                           "buckets": True, "min_bucket_side": 256, "max_bucket_side": 1024}  # kohya's default limits
    assert cfg["dreambooth"] == {"class_data": str(Path("reg") / "1_dog"), "class_prompt": "dog",
                                 "num_class_images": 5, "prior_loss_weight": 0.8}
    lora = cfg["lora"]
    # --network_dropout drops the down projection's output (lora.neuron_dropout), not the input (lora.dropout)
    assert (lora["rank"], lora["alpha"], lora["neuron_dropout"], lora["train_text_encoder"]) == (16, 8.0, 0.1, True)
    assert "dropout" not in lora
    assert "ff.net.2" in lora["unet_targets"] and "fc1" in lora["text_encoder_targets"]  # kohya's module set
    assert {"proj_in", "proj_out"} <= set(lora["unet_targets"])
    assert (lora["conv_rank"], lora["conv_alpha"]) == (4, 1.0)  # --network_args conv_dim=4 conv_alpha=1 (LoCon)
    t = cfg["train"]
    assert (t["lr"], t["text_encoder_lr"], t["scheduler"], t["warmup"], t["max_steps"]) == (2e-4, 1e-4, "cosine", 100, 1000)
    assert (t["batch_size"], t["grad_accum"], t["mixed_precision"], t["optimizer"]) == (2, 2, "fp16", "adamw8bit")
    assert (t["weight_decay"], t["adam_beta1"], t["adam_beta2"], t["seed"], t["max_grad_norm"]) == (0.1, 0.9, 0.99, 1234, 0.5)
    assert (t["snr_gamma"], t["noise_offset"], t["cache_latents_to_disk"], t["gradient_checkpointing"]) == (5.0, 0.05, True, True)
    assert cfg["sample"] == {"prompts": ["sks dog on a beach --n blurry --w 512 --h 768 --d 7 --l 6.5 --s 28",
                                         "a photo of a dog"], "every_n_steps": 100, "scheduler": "euler_a"}
    assert cfg["output"] == {"dir": "out", "name": "my dog", "dtype": "fp16", "save_every_n_steps": 200,
                             "save_step_adapters": True}
    assert cfg["log"] == {"tensorboard": True}
    text = "\n".join(notes)
    assert "conv_dim" not in text and "conv_alpha" not in text
    assert "--sample_sampler" not in text  # euler_a is ours too
    for kohya in ("--xformers", "--resume out/state",
                  "--color_aug", "--frobnicate 3", "--logging_dir logs", "--ss left out", "--wandb_api_key"):
        assert kohya in text, kohya
    assert "SECRET123" not in text  # a key is never repeated


def test_written_yaml_has_the_notes_on_top_and_loads(sd15_setup):
    out = sd15_setup / "config.yaml"
    notes, command = convert_kohya(sd15_setup / "train.sh", out)
    assert command == f"accelerate launch --num_cpu_threads_per_process 2 train.py {out}"  # kohya's launcher kept
    text = out.read_text(encoding="utf-8")
    assert text.startswith("# Converted from kohya-ss") and "train.sh" in text.splitlines()[0]
    assert f"# Train with: {command}" in text
    assert all(f"#  - {line}" in text for line in notes)
    cfg = load_config(out)
    assert cfg.lora.rank == 16 and cfg.dreambooth.num_class_images == 5 and cfg.data.path == "img"
    assert not list(sd15_setup.glob(".config.yaml.*"))  # written atomically: no temp file left


def test_windows_batch_file_with_caret_continuations_keeps_backslash_paths(tmp_path):
    bat = ("@echo off\r\nREM my LoRA\r\naccelerate launch sdxl_train_network.py ^\r\n"
           "  --pretrained_model_name_or_path=\"C:\\models\\sd_xl_base_1.0.safetensors\" ^\r\n"
           "  --train_data_dir C:\\data\\img --network_dim 32 --network_alpha 16 --network_train_unet_only ^\r\n"
           "  --max_train_epochs 10 --max_train_steps 5000\r\n")
    args = parse_command_line(bat, "train.bat")
    assert args["pretrained_model_name_or_path"] == "C:\\models\\sd_xl_base_1.0.safetensors"
    assert args["train_data_dir"] == "C:\\data\\img"
    cfg, notes = config_from_kohya(args)
    assert cfg["model"]["variant"] == "sdxl" and cfg["lora"]["train_text_encoder"] is False
    assert cfg["train"]["epochs"] == 10 and "max_steps" not in cfg["train"]  # epochs win, as in kohya
    assert any("--max_train_steps 5000" in n for n in notes)
    assert any("--learning_rate not given" in n for n in notes)


SDXL_CONFIG = """
[model_arguments]
pretrained_model_name_or_path = "stabilityai/stable-diffusion-xl-base-1.0"
sdxl = true
[additional_network_arguments]
network_module = "networks.lora"
network_dim = 32
network_alpha = 16.0
network_train_unet_only = true
[optimizer_arguments]
optimizer_type = "Prodigy"
learning_rate = 1.0
lr_scheduler = "constant"
optimizer_args = ["d_coef=2"]
[training_arguments]
max_train_steps = 2000
train_batch_size = 4
mixed_precision = "bf16"
gradient_checkpointing = true
cache_text_encoder_outputs = true
clip_skip = 2
max_token_length = 225
no_half_vae = true
xformers = false
dataset_config = "dataset.toml"
output_dir = "out"
"""

DATASET = """
[general]
shuffle_caption = true
caption_extension = ".txt"
keep_tokens = 1

[[datasets]]
resolution = 1024
batch_size = 2
enable_bucket = true

  [[datasets.subsets]]
  image_dir = "{train}/{first}"
  num_repeats = 10
  class_tokens = "sks dog"

  [[datasets.subsets]]
  image_dir = "{train}/{second}"
  num_repeats = 3
  class_tokens = "style"
  flip_aug = true

  [[datasets.subsets]]
  image_dir = "{reg}"
  is_reg = true
  class_tokens = "dog"
"""


def _sdxl_setup(root: Path, first: str, second: str) -> Path:
    _touch_images(root / "train" / first, 2)
    _touch_images(root / "train" / second, 1)
    _touch_images(root / "reg-dog", 4)
    (root / "config.toml").write_text(SDXL_CONFIG, encoding="utf-8")
    (root / "dataset.toml").write_text(DATASET.format(train=(root / "train").as_posix(), first=first,
                                                      second=second, reg=(root / "reg-dog").as_posix()))
    return root / "config.toml"


def test_sdxl_toml_and_dataset_with_two_subsets_named_by_kohya_layout(tmp_path):
    out = tmp_path / "sdxl.yaml"
    notes, command = convert_kohya(_sdxl_setup(tmp_path, "10_sks dog", "3_style"), out)
    assert command == f"python train.py {out}"
    cfg = load_config(out)
    assert cfg.model.variant == "sdxl" and cfg.lora.rank == 32 and cfg.lora.alpha == 16
    assert cfg.lora.train_text_encoder is False and cfg.train.optimizer == "prodigy" and cfg.train.lr == 1.0
    # data.subsets: each subset's folder and num_repeats, and its own flip_aug
    assert cfg.data.path == "" and cfg.data.repeats == 1
    # and class_tokens: the caption of its images without one
    assert [(s.path, s.repeats, s.random_flip, s.default_caption) for s in cfg.data.subsets] == [
        (str(tmp_path / "train" / "10_sks dog"), 10, None, "sks dog"),
        (str(tmp_path / "train" / "3_style"), 3, True, "style")]
    assert (cfg.data.resolution, cfg.data.buckets, cfg.train.batch_size) == (1024, True, 2)  # the dataset's batch size
    assert cfg.data.shuffle_tags and cfg.data.keep_tokens == 1 and not cfg.data.random_flip
    assert cfg.dreambooth.class_data == str(tmp_path / "reg-dog") and cfg.dreambooth.num_class_images == 4
    assert cfg.dreambooth.class_prompt == "dog" and cfg.train.mixed_precision == "bf16"
    text = "\n".join(notes)
    assert "flip_aug" not in text and "differs" not in text  # carried by the subset, not noted
    assert "class_tokens" not in text  # carried as default_caption
    assert "--clip_skip 2: kohya's SDXL training ignores it" in text and cfg.model.clip_skip == 1
    assert cfg.model.max_token_length == 225
    assert "--optimizer_args d_coef=2" in text and "--cache_text_encoder_outputs" in text and "--no_half_vae" in text
    assert "rename" not in text and "--xformers" not in text  # a flag that is off means nothing


def test_subsets_in_folders_of_any_name_keep_their_own_repeats(tmp_path):
    out = tmp_path / "sdxl.yaml"
    source = _sdxl_setup(tmp_path, "dog", "5_style")
    _touch_images(tmp_path / "train" / "old" / "deep", 1)  # beside the subsets, listed by none: not read
    notes, _ = convert_kohya(source, out)
    cfg = load_config(out)
    assert [(s.path, s.repeats) for s in cfg.data.subsets] == [(str(tmp_path / "train" / "dog"), 10),
                                                               (str(tmp_path / "train" / "5_style"), 3)]
    assert not any("rename" in n or "no subset lists" in n for n in notes)


def test_one_subset_in_a_plain_folder_uses_data_repeats(tmp_path):
    _touch_images(tmp_path / "pics", 1)
    dataset = {"datasets": [{"subsets": [{"image_dir": str(tmp_path / "pics"), "num_repeats": 5,
                                          "class_tokens": "sks"}]}]}
    cfg, notes = config_from_kohya({"pretrained_model_name_or_path": "m", "network_dim": 4, "network_alpha": 4,
                                    "learning_rate": 1e-4, "max_train_steps": 10}, dataset)
    assert cfg["data"] == {"path": str(tmp_path / "pics"), "repeats": 5, "default_caption": "sks"}
    assert not any("class_tokens" in n for n in notes)


def test_missing_reg_folder_leaves_prior_preservation_off_with_a_note(tmp_path):
    args = {"pretrained_model_name_or_path": "m", "train_data_dir": "img", "reg_data_dir": str(tmp_path / "nope"),
            "network_dim": 8, "network_alpha": 8, "learning_rate": 1e-4, "max_train_steps": 10}
    cfg, notes = config_from_kohya(args)
    assert "dreambooth" not in cfg and any("not found here, so prior preservation is left off" in n for n in notes)


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "broken.toml").write_text("network_dim = = 4\n", encoding="utf-8")
    (tmp_path / "lycoris.txt").write_text("python train_network.py --pretrained_model_name_or_path m "
                                          "--train_data_dir d --network_module lycoris.kohya --network_args algo=ia3", encoding="utf-8")
    (tmp_path / "full.sh").write_text("accelerate launch sdxl_train.py --pretrained_model_name_or_path m")
    cases = {str(tmp_path / "missing.sh"): "not found", str(tmp_path / "broken.toml"): "not valid TOML",
             str(tmp_path / "lycoris.txt"): "--network_args algo=ia3: LyCORIS' ia3, not supported",
             str(tmp_path / "full.sh"): "sdxl_train.py: not a LoRA training script"}
    for source, message in cases.items():
        assert main(["from-kohya", source, "-o", str(tmp_path / "out.yaml")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out.yaml").exists()
    with pytest.raises(ConfigError, match="--network_dim: 'x' is not an integer"):
        config_from_kohya({"pretrained_model_name_or_path": "m", "train_data_dir": "d", "network_dim": "x"})


def test_cli_prints_notes_and_refuses_to_overwrite_without_force(sd15_setup, capsys):
    assert main(["from-kohya", "train.sh", "-o", "config.yaml"]) == 0
    printed = capsys.readouterr().out
    assert "note: --xformers" in printed and "train with: accelerate launch" in printed
    assert main(["from-kohya", "train.sh", "-o", "config.yaml"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["from-kohya", "train.sh", "-o", "config.yaml", "--force"]) == 0


def test_converted_config_trains_the_tiny_model(tiny_sd15, example_data, tmp_path):
    from lora_trainer.training.loop import train

    data = tmp_path / "img" / "2_geoshape"
    shutil.copytree(example_data, data)
    command = (f"python train_network.py --pretrained_model_name_or_path {tiny_sd15} --train_data_dir "
               f"{data.parent} --resolution 64 --network_dim 4 --network_alpha 2 --learning_rate 1e-3 "
               f"--max_train_steps 2 --output_dir {tmp_path / 'out'} --output_name kohya-import")
    (tmp_path / "train.txt").write_text(command, encoding="utf-8")
    convert_kohya(tmp_path / "train.txt", tmp_path / "config.yaml")
    with open(tmp_path / "config.yaml", encoding="utf-8") as f:
        assert yaml.safe_load(f)["lora"]["train_text_encoder"] is True
    result = train(load_config(tmp_path / "config.yaml", ["sample.grid_weights=[]"]), show_progress=False)
    assert [p.name for p in result.adapter_paths] == ["kohya-import.safetensors"]


def test_gui_files_zeros_and_kohya_defaults_mean_unset(tmp_path):
    """kohya_ss GUI configs write every field: 0 for "off" and kohya's own defaults add no notes."""
    args = {"pretrained_model_name_or_path": "m", "train_data_dir": "img", "network_dim": 8, "network_alpha": 0,
            "learning_rate": 1e-4, "text_encoder_lr": [5e-5, 1e-5], "max_train_epochs": 0, "max_train_steps": 300,
            "min_snr_gamma": 0, "lr_scheduler_num_cycles": 1, "lr_scheduler_power": 1, "clip_skip": 1,
            "caption_extension": ".txt", "save_model_as": "safetensors", "optimizer_args": [], "color_aug": False,
            "log_with": "", "lr_warmup_steps": 0}
    cfg, notes = config_from_kohya(args)
    assert cfg["lora"]["alpha"] == 8.0  # kohya: alpha 0 means alpha = dim
    assert cfg["train"]["max_steps"] == 300 and "epochs" not in cfg["train"] and "snr_gamma" not in cfg["train"]
    assert cfg["train"]["text_encoder_lr"] == 5e-5
    assert notes == ["--text_encoder_lr 5e-05 1e-05: one rate holds for both text encoders here, the first"]


def test_bare_arguments_and_powershell_backticks_parse():
    assert parse_command_line("--network_dim=8 --network_args conv_dim=4 --cache_latents\n") == {
        "network_dim": "8", "network_args": ["conv_dim=4"], "cache_latents": True}
    ps = "accelerate launch train_network.py `\n  --network_dim 8 `\n  --output_name 'my lora' && echo done\n"
    assert parse_command_line(ps) == {"_script": "train_network.py", "_launcher": "accelerate launch",
                                      "network_dim": "8", "output_name": "my lora"}
    cfg, notes = config_from_kohya(parse_command_line("python train_network.py --pretrained_model_name_or_path "
                                                      "$MODEL --train_data_dir %DATA% --network_dim 4"))
    assert cfg["model"]["base"] == "$MODEL" and sum("shell variable" in n for n in notes) == 2
    with pytest.raises(ConfigError, match="'oops' is not a --argument"):
        parse_command_line("python train_network.py oops --network_dim 8", "run.sh")


def test_no_half_vae_note_says_which_way_the_vae_goes(tiny_sdxl, tmp_path):
    # the note said the VAE "stays fp32" always; a model.vae whose config says fp16 does not overflow
    # it (the fp16-fix VAE) runs in fp16. Each note is checked against what loading does.
    import torch

    from lora_trainer.config import ModelConfig
    from lora_trainer.models.loading import load_base
    from lora_trainer.testing.tiny_vae import make_vae

    fixed = make_vae(tiny_sdxl, tmp_path / "fp16-fix", seed=2, force_upcast=False)
    own = make_vae(tiny_sdxl, tmp_path / "own.safetensors", single_file=True)
    upcast = make_vae(tiny_sdxl, tmp_path / "upcast", seed=3)

    def note(*extra: str, script: str = "sdxl_train_network.py") -> str:
        args = {"_script": script, "pretrained_model_name_or_path": str(tiny_sdxl), "network_dim": 4,
                "network_alpha": 4, "learning_rate": 1e-4, "max_train_steps": 10, "mixed_precision": "fp16",
                "train_data_dir": "img",
                "no_half_vae": True, **({"vae": extra[0]} if extra else {})}
        notes = [n for n in config_from_kohya(args)[1] if n.startswith("--no_half_vae")]
        assert len(notes) == 1, notes
        return notes[0]

    assert "an SDXL VAE whose config says fp16 overflows (force_upcast" in note()
    assert "the fp16-fix VAE as a folder or hub id) runs in fp16" in note()
    for source, says, dtype in (
            (fixed, "it runs in fp16 under fp16, not fp32 as --no_half_vae asked", torch.float16),
            (own, "read with the base's VAE config (force_upcast): on SDXL it stays fp32", torch.float32),
            (upcast, "a folder whose config says fp16 overflows (force_upcast): it stays fp32", torch.float32)):
        assert f"--vae {source} is " in note(str(source)) and says in note(str(source))
        assert load_base(ModelConfig(base=str(tiny_sdxl), vae=str(source)), torch.float16).vae.dtype == dtype
    hub = note("madebyollin/sdxl-vae-fp16-fix")  # its config is not read offline: both ways
    assert "one that says it does not (the fp16-fix VAE) runs in fp16" in hub and "stays fp32 under fp16" in hub
    assert note(script="train_network.py").endswith(
        "an SD1.x VAE runs in the compute precision (train.mixed_precision)")
