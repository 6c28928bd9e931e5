"""`lora-trainer from-kohya` for kohya's textual-inversion scripts: their embedding arguments become
`embedding.*` with no LoRA, the rest maps as for the network scripts, and what differs is noted."""

from __future__ import annotations

import json
import shutil

import pytest

from lora_trainer.cli import main
from lora_trainer.config import config_from_dict, load_config
from lora_trainer.errors import ConfigError
from lora_trainer.kohya.setup import config_from_kohya, convert_kohya, parse_command_line, read_kohya_setup

TI = ("accelerate launch train_textual_inversion.py --pretrained_model_name_or_path m --train_data_dir d "
      "--caption_extension .txt --max_train_steps 100 ")


def _convert(command: str):
    return config_from_kohya(parse_command_line(command))


def test_textual_inversion_arguments_map_to_the_embedding_keys():
    cfg, notes = _convert(
        TI + "--token_string mychar --init_word 'cute girl' --num_vectors_per_token 4 --learning_rate 5e-3 "
        "--resolution 512 --enable_bucket --mixed_precision bf16 --optimizer_type AdamW8bit --lr_scheduler cosine "
        "--save_every_n_epochs 2 --output_dir out --output_name mine --save_model_as safetensors --clip_skip 2")
    assert cfg["lora"] == {"train_unet": False, "train_text_encoder": False}  # no LoRA: the embedding alone
    assert cfg["embedding"] == {"token": "mychar", "vectors": 4, "init_words": "cute girl", "lr": 5e-3}
    t = cfg["train"]
    assert (t["lr"], t["max_steps"], t["mixed_precision"], t["optimizer"], t["scheduler"]) == (
        5e-3, 100, "bf16", "adamw8bit", "cosine")
    assert cfg["model"] == {"base": "m", "variant": "sd15", "clip_skip": 2}
    assert (cfg["data"]["resolution"], cfg["data"]["buckets"]) == (512, True)
    assert cfg["output"] == {"dir": "out", "name": "mine", "save_every_n_epochs": 2}
    assert notes == ["embedding file: out/embeddings/mychar.safetensors in A1111's layout (its file name is the "
                     "prompt word, 'mychar'), where kohya writes out/mine.safetensors; epoch and step files go "
                     "beside it"]
    loaded = config_from_dict(cfg)
    assert loaded.embedding.vectors == 4 and not loaded.lora.train_unet and loaded.train.lr == 5e-3


def test_kohya_defaults_of_the_textual_inversion_scripts_are_kept_or_noted():
    cfg, notes = _convert(TI + "--token_string mychar")
    assert cfg["embedding"] == {"token": "mychar", "vectors": 1, "lr": 2e-6}  # kohya's --learning_rate default
    assert cfg["train"]["lr"] == 2e-6 and cfg["output"] == {"name": "mychar"}  # kohya's --output_name: the token
    text = "\n".join(notes)
    assert "--learning_rate not given: kohya's default 2e-06 is used (an embedding alone usually trains at 5e-3)" \
        in text
    assert "--init_word not given: kohya starts the vectors at random" in text
    assert "where kohya writes OUT/mychar.pt" in text  # kohya's --save_model_as default for embeddings
    assert len(notes) == 3


def test_weights_continue_an_embedding_and_the_init_word_is_left_out():
    cfg, notes = _convert(TI + "--token_string mychar --weights old/mychar.safetensors --init_word girl "
                               "--num_vectors_per_token 2 --learning_rate 1e-3")
    assert cfg["embedding"] == {"token": "mychar", "vectors": 2, "init_from": "old/mychar.safetensors", "lr": 1e-3}
    assert any(n.startswith("--init_word girl: the --weights vectors replace") for n in notes)
    config_from_dict(cfg)  # init_words with init_from would be refused
    cfg, notes = _convert(TI + "--token_string mychar --weights old.pt --learning_rate 1e-3")
    assert cfg["embedding"]["init_from"] == "old.pt"
    assert any(n.startswith("--weights old.pt: a pickle is not read here") for n in notes)


@pytest.mark.parametrize("flags, kind", [("--use_object_template", "object"), ("--use_style_template", "style"),
                                         ("--use_object_template --use_style_template", "object")])
def test_template_flags_caption_every_image_with_random_templates(flags, kind):
    cfg, notes = _convert(TI + f"--token_string mychar --learning_rate 1e-3 {flags}")
    assert cfg["embedding"]["templates"] == kind and "dreambooth" not in cfg  # kohya ignores the captions too
    note = next(n for n in notes if "templates at random" in n)
    example = "a photo of a mychar" if kind == "object" else "a painting in the style of mychar"
    assert f"embedding.templates {kind}:" in note and repr(example) in note
    assert "the captions are not trained on" in note
    assert "data.caption_prefix 'mychar, '" in note  # how to train on the captions instead
    assert ("--use_style_template: --use_object_template wins, as in kohya" in notes) == (" " in flags)
    assert not [n for n in notes if n.startswith("--caption_extension not given")]  # no caption is read
    assert config_from_dict(cfg).embedding.templates == kind
    _, plain = _convert(TI.replace("--caption_extension .txt ", "") + "--token_string mychar --learning_rate 1e-3")
    assert [n for n in plain if n.startswith("--caption_extension not given")]  # captions are read: noted
    _, templated = _convert(TI.replace("--caption_extension .txt ", "") + f"--token_string mychar {flags}")
    assert not [n for n in templated if n.startswith("--caption_extension not given")]  # none are read
    cfg, notes = _convert(TI + f"--token_string mychar {flags} --caption_prefix 'by me,' --caption_suffix art")
    assert "caption_prefix" not in cfg["data"] and "caption_suffix" not in cfg["data"]  # kohya replaces them too
    assert f"--caption_prefix by me,: left out, as kohya's TI templates replace it with the caption " \
        f"(embedding.templates {kind} refuses data.caption_prefix)" in notes
    assert any(n.startswith("--caption_suffix art: left out") for n in notes)
    config_from_dict(cfg)


def test_sdxl_script_network_arguments_and_the_toml_form(tmp_path):
    cfg, notes = _convert(TI.replace("train_textual", "sdxl_train_textual") + "--token_string mychar "
                          "--learning_rate 1e-3 --network_dim 16 --network_train_unet_only --unet_lr 1e-4")
    assert cfg["model"]["variant"] == "sdxl" and cfg["lora"] == {"train_unet": False, "train_text_encoder": False}
    for flag in ("--network_dim 16", "--network_train_unet_only", "--unet_lr 1e-4"):
        assert any(n.startswith(f"{flag}: an argument of train_network.py") for n in notes), flag
    assert cfg["train"]["lr"] == 1e-3 and "text_encoder_lr" not in cfg["train"]
    # a --config_file TOML names no script: its textual-inversion arguments say what it is
    (tmp_path / "ti.toml").write_text(
        '[model]\npretrained_model_name_or_path = "m"\nsdxl = true\n[ti]\ntoken_string = "mychar"\ninit_word = "dog"\n'
        'num_vectors_per_token = 3\nlearning_rate = 5e-3\n[data]\ntrain_data_dir = "d"\nmax_train_steps = 10\n',
        encoding="utf-8")
    out = tmp_path / "ti.yaml"
    convert_kohya(tmp_path / "ti.toml", out)
    loaded = load_config(out)
    assert (loaded.embedding.token, loaded.embedding.vectors, loaded.embedding.init_words) == ("mychar", 3, "dog")
    assert loaded.model.variant == "sdxl" and not loaded.lora.train_unet and not loaded.lora.train_text_encoder
    args, _, _ = read_kohya_setup(tmp_path / "ti.toml")
    del args["token_string"]
    with pytest.raises(ConfigError, match="--token_string: missing"):
        config_from_kohya(args)


def test_missing_token_string_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "ti.sh").write_text(TI + "--init_word girl", encoding="utf-8")
    assert main(["from-kohya", str(tmp_path / "ti.sh"), "-o", str(tmp_path / "out.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--token_string: missing" in err and "e.g. --token_string" in err
    assert not (tmp_path / "out.yaml").exists()


def test_converted_textual_inversion_trains_the_embedding(tiny_sd15, example_data, tmp_path):
    """The example captions do not hold the token: the object templates caption every image with it."""
    from lora_trainer.training.loop import train

    shutil.copytree(example_data, tmp_path / "img" / "1_shapes")
    (tmp_path / "ti.sh").write_text(
        f"accelerate launch train_textual_inversion.py --pretrained_model_name_or_path={tiny_sd15} "
        f"--train_data_dir={tmp_path / 'img'} --token_string=geoshape --init_word=shape --num_vectors_per_token=2 "
        f"--use_object_template --max_train_steps=2 --learning_rate=1e-2 --resolution=64 "
        f"--output_dir={tmp_path / 'out'} --output_name=geo", encoding="utf-8")
    convert_kohya(tmp_path / "ti.sh", tmp_path / "ti.yaml")
    result = train(load_config(tmp_path / "ti.yaml"), show_progress=False)
    assert result.adapter_paths == [] and result.embedding["clip"].shape == (2, 32)
    assert [p.name for p in (tmp_path / "out" / "embeddings").iterdir()] == ["geoshape.safetensors"]
    captions = (tmp_path / "out" / "captions.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(captions) == 8 and not any("geoshape" in json.loads(line)["caption"] for line in captions)  # their own
