"""`lora-trainer from-kohya`, argument by argument: kohya's validation, loss, noise, text-encoder-only,
epoch-save, LoRA+ and max-norm arguments become the config keys that do the same, and the values
kohya ignores, refuses or reads otherwise are left out with a note; --sample_sampler's samplers become
ours or the nearest, noted."""

from __future__ import annotations

import pytest

from lora_trainer.config import load_config
from lora_trainer.errors import ConfigError
from lora_trainer.kohya.setup import config_from_kohya, parse_command_line


def test_validation_arguments_map_to_the_validation_keys():
    cfg, notes = config_from_kohya(parse_command_line(
        "python train_network.py --pretrained_model_name_or_path m --train_data_dir d --network_alpha 4 "
        "--learning_rate 1e-4 --validation_split 0.1 --validate_every_n_steps 50 --validation_seed 3"))
    assert cfg["data"]["validation_split"] == 0.1 and cfg["data"]["validation_seed"] == 3
    assert cfg["train"]["validate_every_n_steps"] == 50
    assert not any("validat" in note for note in notes)


def test_loss_and_noise_arguments_map_to_the_train_keys():
    cfg, notes = config_from_kohya(parse_command_line(
        "python train_network.py --pretrained_model_name_or_path m --train_data_dir d --caption_extension .txt "
        "--network_alpha 4 --network_dim 4 --max_train_steps 10 --learning_rate 1e-4 "
        "--loss_type huber --huber_schedule exponential --huber_c 0.2 --huber_scale 2 "
        "--min_timestep 100 --max_timestep 900 --zero_terminal_snr --debiased_estimation_loss "
        "--multires_noise_iterations 6 --multires_noise_discount 0.4 --ip_noise_gamma 0.05 --v_pred_like_loss 0.1"))
    t = cfg["train"]
    assert (t["loss_type"], t["huber_schedule"], t["huber_c"], t["huber_scale"]) == ("huber", "exponential", 0.2, 2.0)
    assert (t["min_timestep"], t["max_timestep"]) == (100, 900)
    assert t["zero_terminal_snr"] is True and t["debiased_estimation"] is True
    assert (t["multires_noise_iterations"], t["multires_noise_discount"], t["input_perturbation"]) == (6, 0.4, 0.05)
    assert t["v_pred_like_loss"] == 0.1 and notes == []
    from lora_trainer.config import config_from_dict

    loaded = config_from_dict(cfg).train
    assert (loaded.loss_type, loaded.min_timestep, loaded.multires_noise_iterations) == ("huber", 100, 6)


def test_noise_strength_options_map_with_what_they_modify():
    command = ("python train_network.py --pretrained_model_name_or_path m --train_data_dir d --caption_extension .txt "
               "--network_alpha 4 --network_dim 4 --max_train_steps 10 --learning_rate 1e-4 ")
    cfg, notes = config_from_kohya(parse_command_line(
        command + "--noise_offset 0.1 --noise_offset_random_strength --adaptive_noise_scale -0.05 "
        "--ip_noise_gamma 0.1 --ip_noise_gamma_random_strength --v_parameterization "
        "--scale_v_pred_loss_like_noise_pred"))
    t = cfg["train"]
    assert (t["noise_offset_random_strength"], t["adaptive_noise_scale"]) == (True, -0.05)
    assert t["input_perturbation_random_strength"] is True and t["scale_v_pred_loss_like_noise_pred"] is True
    assert [n for n in notes if "v_parameterization" not in n] == []
    from lora_trainer.config import config_from_dict

    loaded = config_from_dict(cfg).train
    assert loaded.adaptive_noise_scale == -0.05 and loaded.input_perturbation_random_strength
    # without the option they modify: kohya ignores the switches and refuses the scale; noted, left out
    cfg, notes = config_from_kohya(parse_command_line(
        command + "--noise_offset_random_strength --adaptive_noise_scale 0.1 --ip_noise_gamma_random_strength"))
    assert not {"noise_offset_random_strength", "adaptive_noise_scale", "input_perturbation_random_strength"} & set(
        cfg["train"])
    assert len(notes) == 3 and all("nothing to act on" in n and n.endswith("left out") for n in notes)
    assert "kohya refuses it" in notes[1]


def test_gui_zero_noise_modifiers_are_off_without_a_note():
    """kohya_ss GUI files write adaptive_noise_scale = 0 and the switches false beside noise_offset = 0:
    all off, nothing to say (the scale was noted as refused by kohya, or written as 0.0 with an offset)."""
    command = ("python train_network.py --pretrained_model_name_or_path m --train_data_dir d --caption_extension .txt "
               "--network_alpha 4 --network_dim 4 --max_train_steps 10 --learning_rate 1e-4 --adaptive_noise_scale 0 ")
    for offset in ("--noise_offset 0", "--noise_offset 0.05"):
        cfg, notes = config_from_kohya(parse_command_line(command + offset))
        assert "adaptive_noise_scale" not in cfg["train"] and notes == []
    cfg, notes = config_from_kohya(parse_command_line(command + "--noise_offset 0 --adaptive_noise_scale 0.1"))
    assert "adaptive_noise_scale" not in cfg["train"] and len(notes) == 1 and "kohya ignores it" in notes[0]


def test_text_encoder_only_maps_to_train_unet_false():
    command = ("python sdxl_train_network.py --pretrained_model_name_or_path m --train_data_dir d "
               "--caption_extension .txt --network_alpha 4 --network_dim 4 --max_train_steps 10 ")
    cfg, notes = config_from_kohya(parse_command_line(
        command + "--learning_rate 1e-4 --text_encoder_lr 5e-5 --network_train_text_encoder_only "
        '--network_args "conv_dim=4" "down_lr_weight=cosine" "loraplus_unet_lr_ratio=8" "loraplus_lr_ratio=4"'))
    lora, train = cfg["lora"], cfg["train"]
    assert lora["train_unet"] is False and lora["train_text_encoder"] is True
    assert train["text_encoder_lr"] == 5e-5 and train["loraplus_lr_ratio"] == 4
    assert not {"conv_rank", "conv_alpha", "block_lr_weights"} & set(lora) and "loraplus_unet_lr_ratio" not in train
    assert any(n.startswith("--network_train_text_encoder_only: the UNet gets no adapter") for n in notes)
    assert not any("not supported" in n for n in notes)
    from lora_trainer.config import config_from_dict

    assert config_from_dict(cfg).lora.train_unet is False
    with pytest.raises(ConfigError, match=r"^--network_train_text_encoder_only: with --network_train_unet_only"):
        config_from_kohya(parse_command_line(command + "--network_train_text_encoder_only --network_train_unet_only"))


def test_kohya_loss_defaults_add_nothing_and_odd_values_get_notes():
    gui = {"pretrained_model_name_or_path": "m", "train_data_dir": "d", "network_dim": 4, "network_alpha": 4,
           "learning_rate": 1e-4, "max_train_steps": 10, "caption_extension": ".txt",
           "loss_type": "l2", "huber_schedule": "snr", "huber_c": 0.1, "huber_scale": 1, "min_timestep": 0,
           "max_timestep": 1000, "multires_noise_iterations": 0, "multires_noise_discount": 0.3,
           "zero_terminal_snr": False, "debiased_estimation_loss": False}
    cfg, notes = config_from_kohya(gui)
    assert notes == [] and set(cfg["train"]) == {"lr", "max_steps"}
    cfg, notes = config_from_kohya({**gui, "loss_type": "pseudo_huber", "min_timestep": 500, "max_timestep": 500})
    assert "loss_type" not in cfg["train"]
    assert (cfg["train"]["min_timestep"], cfg["train"]["max_timestep"]) == (500, 501)
    assert any(n.startswith("--loss_type pseudo_huber: not supported") for n in notes)
    assert any("--min_timestep 500 --max_timestep 500: every step trains at timestep 500" in n for n in notes)


def test_epoch_saves_loraplus_and_max_norm_arguments_map():
    cfg, notes = config_from_kohya(parse_command_line(
        "python train_network.py --pretrained_model_name_or_path m --train_data_dir d --network_dim 8 "
        "--network_alpha 4 --learning_rate 1e-4 --max_train_epochs 10 --save_every_n_epochs 2 --save_last_n_epochs 3 "
        "--sample_every_n_epochs 5 --scale_weight_norms 1.5 --caption_extension .txt "
        "--network_args loraplus_lr_ratio=16 loraplus_text_encoder_lr_ratio=4"))
    assert cfg["output"] == {"save_every_n_epochs": 2, "save_last_n_epochs": 3}
    assert cfg["sample"] == {"every_n_epochs": 5}
    t = cfg["train"]
    assert (t["scale_weight_norms"], t["loraplus_lr_ratio"], t["loraplus_text_encoder_lr_ratio"]) == (1.5, 16.0, 4.0)
    assert "loraplus_unet_lr_ratio" not in t
    assert notes == ["--sample_every_n_epochs 5: no --sample_prompts, so nothing is drawn until sample.prompts is set"]
    # the result is a valid config
    load_config(None, [f"{section}.{k}={v}" for section in ("output", "sample", "train")
                       for k, v in cfg[section].items() if not isinstance(v, list)] + ["model.base=m", "data.path=d"])


def test_save_n_epoch_ratio_gives_that_many_epoch_files_when_the_epochs_are_known():
    base = "python train_network.py --pretrained_model_name_or_path m --train_data_dir d --network_dim 8 " \
           "--network_alpha 4 --learning_rate 1e-4 --save_every_n_epochs 1 --save_n_epoch_ratio 3 " \
           "--caption_extension .txt "
    cfg, notes = config_from_kohya(parse_command_line(base + "--max_train_epochs 10"))
    assert cfg["output"]["save_every_n_epochs"] == 3 and notes == []  # kohya: floor(10 / 3), wins over 1
    cfg, notes = config_from_kohya(parse_command_line(base + "--max_train_steps 500 --save_last_n_epochs 2"))
    assert cfg["output"] == {"save_every_n_epochs": 1, "save_last_n_epochs": 2}
    assert len(notes) == 1 and notes[0].startswith("--save_n_epoch_ratio 3: ")
    assert "output.save_every_n_epochs" in notes[0]
    no_every = base.replace("--save_every_n_epochs 1 --save_n_epoch_ratio 3 ", "")
    cfg, notes = config_from_kohya(parse_command_line(no_every + "--max_train_steps 500 --save_last_n_epochs 2"))
    assert "output" not in cfg and notes == ["--save_last_n_epochs 2: no epoch files are saved (no "
                                             "--save_every_n_epochs); left out"]


SAMPLING = ("python train_network.py --pretrained_model_name_or_path m --train_data_dir d --network_dim 4 "
            "--network_alpha 4 --learning_rate 1e-4 --max_train_steps 10 --caption_extension .txt ")


@pytest.mark.parametrize("kohya, ours, note", [
    ("euler_a", "euler_a", None), ("k_euler_a", "euler_a", None), ("ddim", "ddim", None), ("pndm", "pndm", None),
    ("k_euler", "euler", None), ("heun", "heun", None), ("dpmsolver++", "dpm++_2m", None),
    ("dpmsingle", "dpm++_2m", "--sample_sampler dpmsingle: sample.scheduler dpm++_2m: DPM-Solver++ 2M, the nearest"),
    ("k_dpm_2", "heun", "--sample_sampler k_dpm_2: sample.scheduler heun: Heun, the nearest"),
    ("dpm_2_a", "euler_a", "--sample_sampler dpm_2_a: sample.scheduler euler_a: Euler a, the nearest"),
    ("k_lms", None, "--sample_sampler k_lms: no LMS sampler here; samples use DPM++ 2M"),
])
def test_kohya_sample_sampler_maps_to_the_same_or_nearest_sampler(kohya, ours, note):
    from lora_trainer.config import config_from_dict

    cfg, notes = config_from_kohya(parse_command_line(SAMPLING + f"--sample_sampler {kohya} --sample_at_first"))
    assert cfg["sample"].get("scheduler") == ours and cfg["sample"]["at_start"] is True
    ours_notes = [n for n in notes if n.startswith("--sample")]
    assert (ours_notes == []) if note is None else (len(ours_notes) == 1 and ours_notes[0].startswith(note))
    loaded = config_from_dict(cfg).sample  # a config that validates
    assert (loaded.at_start, loaded.scheduler) == (True, ours)


def test_kohya_sampling_arguments_in_a_toml_and_an_unknown_sampler():
    cfg, notes = config_from_kohya({"_script": "train_network.py", "pretrained_model_name_or_path": "m",
                                    "train_data_dir": "d", "network_alpha": 4, "learning_rate": 1e-4,
                                    "caption_extension": ".txt", "sample_at_first": False, "sample_sampler": "ddim"})
    assert cfg["sample"] == {"scheduler": "ddim"} and not any("sample" in n for n in notes)
    with pytest.raises(ConfigError, match=r"^--sample_sampler: 'dpm\+\+_2m' is not one of kohya's samplers \(ddim, "):
        config_from_kohya(parse_command_line(SAMPLING + "--sample_sampler dpm++_2m"))


def test_vae_maps_to_model_vae_without_a_note():
    cfg, notes = config_from_kohya(parse_command_line(
        "python train_network.py --pretrained_model_name_or_path m --train_data_dir d --network_alpha 4 "
        "--vae vae-ft-mse-840000-ema-pruned.safetensors"))
    assert cfg["model"]["vae"] == "vae-ft-mse-840000-ema-pruned.safetensors"
    assert not any("vae" in note.lower() for note in notes)
