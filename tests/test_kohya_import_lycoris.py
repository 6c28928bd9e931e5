"""`lora-trainer from-kohya` with `--network_module lycoris.kohya`: algo=loha/lokr become lora.type
(factor=F lora.lokr_factor), algo=lora/locon our LoRA with LyCORIS' convs, other algorithms are
refused in one line, and what else LyCORIS reads is noted (--network_weights with LoHa/LoKr:
test_lycoris_init_from.py)."""

from __future__ import annotations

import json
import shutil

import pytest
import safetensors

from lora_trainer.cli import main
from lora_trainer.config import load_config
from lora_trainer.errors import ConfigError
from lora_trainer.kohya.mapping import KOHYA_TEXT_ENCODER_TARGETS, KOHYA_UNET_TARGETS
from lora_trainer.kohya.setup import config_from_kohya, convert_kohya, parse_command_line

COMMAND = ("python train_network.py --pretrained_model_name_or_path m --train_data_dir d --caption_extension .txt "
           "--network_dim 8 --network_alpha 4 --learning_rate 1e-4 --max_train_steps 10 "
           "--network_module lycoris.kohya ")


def _convert(extra: str) -> tuple[dict, list[str]]:
    return config_from_kohya(parse_command_line(COMMAND + extra))


def _lora(**keys) -> dict:
    return {"rank": 8, "alpha": 4.0, "unet_targets": KOHYA_UNET_TARGETS, "text_encoder_targets": KOHYA_TEXT_ENCODER_TARGETS,
            "train_text_encoder": True, **keys}


@pytest.mark.parametrize("args, expected", [
    ("algo=loha", {"type": "loha"}),
    ("algo=lokr factor=4", {"type": "lokr", "lokr_factor": 4}),
    ("algo=LoKr", {"type": "lokr"}),  # LyCORIS lower-cases the name; factor -1 (near √d) is the default
])
def test_loha_and_lokr_command_lines_become_lora_type_and_load(tmp_path, args, expected):
    (tmp_path / "train.sh").write_text(COMMAND + "--network_args " + args, encoding="utf-8")
    notes, _ = convert_kohya(tmp_path / "train.sh", tmp_path / "config.yaml")
    cfg = load_config(tmp_path / "config.yaml")
    assert (cfg.lora.type, cfg.lora.lokr_factor) == (expected["type"], expected.get("lokr_factor", -1))
    # LyCORIS adapts the convs at conv_dim = network_dim unless told otherwise, LoHa/LoKr too
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.conv_rank, cfg.lora.conv_alpha, cfg.output.format) == (
        8, 4.0, 8, 4.0, "kohya")
    converted, _ = _convert("--network_args " + args)
    assert converted["lora"] == _lora(**expected, conv_rank=8, conv_alpha=4.0)
    # LyCORIS' default preset (full) adapts every Linear/Conv of the UNet: the note says what is adapted here
    assert notes == [f"--network_module lycoris.kohya --network_args algo={expected['type']}: LyCORIS' default preset "
                     "full adapts every Linear and Conv of the UNet; here the transformer blocks' attention, feed-forward "
                     "and proj_in/proj_out (lora.unet_targets) and the text encoders' attention and MLP "
                     "(lora.text_encoder_targets) are adapted, and the ResNet blocks and samplers at lora.conv_rank "
                     "(LyCORIS' conv_dim); conv_in, conv_out and the time embedding are not adapted (preset=attn-mlp is "
                     "exactly that set without convs)"]


def test_lycoris_lora_and_locon_are_our_lora_with_convs_at_network_dim_unless_given():
    for algo in ("lora", "locon"):
        cfg, _ = _convert(f"--network_args algo={algo}")
        assert cfg["lora"] == _lora(type="lora", conv_rank=8, conv_alpha=4.0)  # LyCORIS: conv_dim = network_dim
    cfg, notes = _convert("--network_args algo=locon conv_dim=4 conv_alpha=0 rank_dropout=0.1 module_dropout=0.2")
    assert cfg["lora"] == _lora(type="lora", conv_rank=4, conv_alpha=4.0, rank_dropout=0.1, module_dropout=0.2)
    assert sum("draws per sample" in n for n in notes) == 2
    cfg, notes = _convert("--network_args preset=attn-mlp loraplus_lr_ratio=16 dora_wd=true")
    assert cfg["lora"] == _lora(type="lora", use_dora=True) and cfg["train"]["loraplus_lr_ratio"] == 16
    assert notes == []  # attn-mlp is exactly our layer set: no convs
    cfg, notes = _convert("--network_args conv_dim=0")
    assert "conv_rank" not in cfg["lora"] and any("conv_dim=0: no 3x3 convs are adapted" in n for n in notes)


@pytest.mark.parametrize("algo", ["ia3", "full", "dylora", "glora", "diag-oft", "boft", "mystery"])
def test_other_lycoris_algorithms_are_one_line_errors(tmp_path, capsys, algo):
    (tmp_path / "train.sh").write_text(COMMAND + f"--network_args algo={algo}", encoding="utf-8")
    assert main(["from-kohya", str(tmp_path / "train.sh"), "-o", str(tmp_path / "out.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--network_args algo={algo}:" in err and "loha and lokr" in err, err
    assert not (tmp_path / "out.yaml").exists()


def test_other_modules_are_refused():
    with pytest.raises(ConfigError, match="--network_module networks.dylora: not supported"):
        config_from_kohya(parse_command_line(COMMAND.replace("lycoris.kohya", "networks.dylora")))
    with pytest.raises(ConfigError, match="--network_args factor=0: expected -1"):
        _convert("--network_args algo=lokr factor=0")


@pytest.mark.parametrize("args, noted", [
    ("algo=loha use_tucker=true", "use_tucker=true: Tucker decomposition"),
    ("algo=lokr use_cp=true", "use_cp=true: Tucker decomposition"),  # LyCORIS' old name
    ("algo=loha use_scalar=true", "use_scalar=true: LyCORIS' trainable scalar"),
    ("algo=loha dora_wd=true", "dora_wd=true: not supported with lora.type loha"),
    ("algo=loha rank_dropout_scale=true", "rank_dropout_scale=true: LyCORIS' kohya entry point does not read it"),
    ("algo=lokr train_norm=true", "train_norm=true: training the norm layers"),
    ("algo=loha conv_dim=8", "conv_dim=8: preset=attn-mlp adapts no 3x3 convs"),
    ("algo=lokr dropout=0.1", "dropout=0.1: not supported with lora.type lokr"),
    ("algo=loha rank_dropout=0.1", "rank_dropout=0.1: not supported with lora.type loha"),
    ("algo=loha module_dropout=0.1", "module_dropout=0.1: not supported with lora.type loha"),
    ("algo=lokr loraplus_lr_ratio=16", "loraplus_lr_ratio=16: not supported with lora.type lokr"),
    ("algo=lokr decompose_both=true", "decompose_both=true: LoKr with w1 low-rank"),
    ("algo=lokr full_matrix=true", "full_matrix=true: left out: w2 is whole here"),
    ("algo=lokr unbalanced_factorization=true", "unbalanced_factorization=true: LoKr's unbalanced"),
    ("algo=loha bypass_mode=true", "bypass_mode=true: left out"),
    ("algo=loha rs_lora=true", "rs_lora=true: not supported (the scale here is alpha/rank)"),
    ("algo=loha factor=4", "factor=4: only algo=lokr reads it"),
    ("algo=loha down_lr_weight=1,1,1", "down_lr_weight=1,1,1: networks.lora's block argument"),
    ("algo=lora dropout=0.1", "dropout=0.1: LyCORIS drops elements of the adapter's output"),
])
def test_what_lycoris_reads_and_we_do_not_is_one_note_and_left_out(tmp_path, args, noted):
    preset = "" if "preset=" in args else " preset=attn-mlp"  # our layer set: no note of its own
    (tmp_path / "train.sh").write_text(COMMAND + "--network_args " + args + preset, encoding="utf-8")
    notes, _ = convert_kohya(tmp_path / "train.sh", tmp_path / "config.yaml")  # the config validates
    assert [n.split(": ", 1)[0] for n in notes] == [
        "--network_module lycoris.kohya --network_args algo=lokr" if noted.startswith("preset=") else
        "--network_args " + noted.split(":")[0]], notes
    assert noted in notes[0]
    algo = args.split()[0].split("=")[1]
    lora = load_config(tmp_path / "config.yaml").lora
    assert lora.type == {"lora": "lora", "loha": "loha", "lokr": "lokr"}[algo]
    assert (lora.conv_rank, lora.dropout, lora.rank_dropout, lora.module_dropout, lora.use_dora) == (0, 0, 0, 0, False)


def test_another_lycoris_preset_is_noted_with_what_is_adapted_here():
    cfg, notes = _convert("--network_args algo=lokr preset=unet-only")
    assert notes == ["--network_module lycoris.kohya --network_args algo=lokr: --network_args preset=unet-only: not "
                     "mapped; here the transformer blocks' attention, feed-forward and proj_in/proj_out "
                     "(lora.unet_targets) and the text encoders' attention and MLP (lora.text_encoder_targets) are "
                     "adapted, and the ResNet blocks and samplers at lora.conv_rank (LyCORIS' conv_dim); conv_in, "
                     "conv_out and the time embedding are not adapted (preset=attn-mlp is exactly that set without "
                     "convs)"]
    assert cfg["lora"] == _lora(type="lokr", conv_rank=8, conv_alpha=4.0)


def test_lycoris_defaults_and_unread_kohya_options_add_the_expected_notes_only():
    cfg, notes = _convert("--network_args algo=lokr preset=attn-mlp factor=-1 use_tucker=False dora_wd=false "
                          "dropout=0 rank_dropout=0.0 module_dropout=0 constraint=0 block_size=4 wd_on_output=True "
                          "--network_dropout 0.1 --scale_weight_norms 1")
    assert cfg["lora"] == _lora(type="lokr") and "scale_weight_norms" not in cfg["train"]
    assert notes == ["--network_dropout 0.1: lycoris.kohya does not read it (its dropouts are --network_args "
                     "dropout/rank_dropout/module_dropout); left out",
                     "--scale_weight_norms 1: max-norm is not supported with lora.type lokr yet; left out"]


def test_converted_lokr_config_trains_the_tiny_model(tiny_sd15, example_data, tmp_path):
    from lora_trainer.training.loop import train

    data = tmp_path / "img" / "2_geoshape"
    shutil.copytree(example_data, data)
    command = (f"python train_network.py --pretrained_model_name_or_path {tiny_sd15} --train_data_dir "
               f"{data.parent} --resolution 64 --network_module lycoris.kohya --network_args algo=lokr factor=4 "
               f"--network_dim 4 --network_alpha 2 --learning_rate 1e-3 --max_train_steps 2 "
               f"--output_dir {tmp_path / 'out'} --output_name lokr-import")
    (tmp_path / "train.txt").write_text(command, encoding="utf-8")
    convert_kohya(tmp_path / "train.txt", tmp_path / "config.yaml")
    result = train(load_config(tmp_path / "config.yaml", ["sample.grid_weights=[]"]), show_progress=False)
    [path] = result.adapter_paths
    with safetensors.safe_open(str(path), "pt") as f:
        header, keys = f.metadata(), list(f.keys())
    assert header["ss_network_module"] == "lycoris.kohya"
    # LyCORIS' convs at conv_dim = network_dim, conv_alpha = network_alpha
    assert json.loads(header["ss_network_args"]) == {"algo": "lokr", "factor": "4", "conv_dim": "4", "conv_alpha": "2"}
    assert any(k.startswith("lora_unet_") and "resnets_0_conv1" in k for k in keys)
    assert any(k.startswith("lora_te_") and k.endswith(".lokr_w1") for k in keys)  # text encoder trained, as kohya
    assert any(k.startswith("lora_unet_") and "ff_net_2" in k for k in keys)
