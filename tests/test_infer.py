"""`infer.py`: base + adapters at weights → PNGs; weight 0 reproduces the base image exactly."""

from __future__ import annotations

import numpy as np
import torch
import pytest
from PIL import Image

from lora_trainer.cli import main
from lora_trainer.errors import ConfigError
from lora_trainer.inference.generate import parse_adapter_spec


def _run(tiny_sd15, out, *lora):
    args = ["infer", "--model", str(tiny_sd15), "--prompt", "geoshape, a red circle", "--negative-prompt", "blurry",
            "--steps", "4", "--seed", "5", "--width", "64", "--height", "64", "--out", str(out)]
    for spec in lora:
        args += ["--lora", spec]
    assert main(args) == 0
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == ["00000-5.png"]
    return np.asarray(Image.open(files[0]))


def test_weight_zero_is_base_and_weight_one_differs(trained, tiny_sd15, tmp_path):
    adapter = trained.output_dir / "example-lora.safetensors"
    base = _run(tiny_sd15, tmp_path / "base")
    zero = _run(tiny_sd15, tmp_path / "zero", f"{adapter}:0")
    full = _run(tiny_sd15, tmp_path / "full", f"{adapter}:1.0")
    assert base.shape == (64, 64, 3)
    assert np.array_equal(base, zero)
    assert not np.array_equal(base, full)


def test_missing_adapter_is_one_line_error(tiny_sd15, tmp_path, capsys):
    rc = main(["infer", "--model", str(tiny_sd15), "--prompt", "x", "--lora", str(tmp_path / "none.safetensors"),
               "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "none.safetensors" in err and "\n" not in err


def test_a_run_folder_as_lora_names_the_files_in_it(trained, tiny_sd15, tmp_path, capsys):
    rc = main(["infer", "--model", str(tiny_sd15), "--prompt", "x", "--lora", str(trained.output_dir),
               "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "is a folder; give the adapter's .safetensors file (it holds " in err and "\n" not in err
    assert trained.adapter_paths[0].name in err


def test_adapter_spec_parsing():
    assert parse_adapter_spec("a/b.safetensors:0.7").weight == 0.7
    spec = parse_adapter_spec("C:/x/b.safetensors")
    assert spec.weight == 1.0 and str(spec.path) == "C:/x/b.safetensors"


def test_adapter_weight_that_is_not_a_number_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"'abc' is not a weight.*b.safetensors:0.8"):
        parse_adapter_spec(f"{tmp_path}/b.safetensors:abc")


def test_an_upper_case_lbw_key_is_a_one_line_error_not_a_missing_file(trained, tiny_sd15, tmp_path, capsys):
    # A1111's LoRA Block Weight reads `lbw=` in lower case only; LBW= was taken as part of the file name
    adapter = trained.adapter_paths[0]
    with pytest.raises(ConfigError, match=r"write the key Lbw= in lower case.*:0\.8:lbw=INS$"):
        parse_adapter_spec(f"{adapter}:0.8:Lbw=INS")
    rc = main(["infer", "--model", str(tiny_sd15), "--lora", f"{adapter}:0.8:LBW=OUTALL", "--prompt", "x",
               "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "file not found" not in err
    assert err.endswith(f"write the key LBW= in lower case, as A1111's LoRA Block Weight reads it: {adapter}:0.8:lbw=OUTALL")
    assert not (tmp_path / "out").exists()
    assert parse_adapter_spec(f"{adapter}:0.8:lbw=OUTALL").lbw == "OUTALL"


def test_out_that_is_a_file_is_one_line_error(tiny_sd15, tmp_path, capsys):
    (tmp_path / "x.png").write_bytes(b"")
    rc = main(["infer", "--model", str(tiny_sd15), "--prompt", "x", "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--out" in err and "x.png" in err and "\n" not in err


def test_png_carries_a1111_parameters(trained, tiny_sd15, tmp_path):
    adapter = trained.output_dir / "example-lora.safetensors"
    _run(tiny_sd15, tmp_path / "p", f"{adapter}:0.7")
    text = Image.open(tmp_path / "p" / "00000-5.png").text["parameters"]
    prompt, negative, settings = text.split("\n")
    assert prompt == "geoshape, a red circle <lora:example-lora:0.7>"
    assert negative == "Negative prompt: blurry"
    assert settings.startswith("Steps: 4, Sampler: DPM++ 2M, CFG scale: 7.5, Seed: 5, Size: 64x64")
    sample = trained.output_dir / "samples" / "step_00040" / "00.png"
    assert "Seed: 0" in Image.open(sample).text["parameters"]


def test_sd15_adapter_on_sdxl_base_says_so_in_one_line(trained, tiny_sdxl, tmp_path, capsys):
    adapter = trained.output_dir / "example-lora.safetensors"
    rc = main(["infer", "--model", str(tiny_sdxl), "--prompt", "x", "--lora", str(adapter), "--steps", "1",
               "--width", "64", "--height", "64", "--out", str(tmp_path)])
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert rc == 2 and "\n" not in err
    assert "example-lora.safetensors: an SD 1.x adapter does not fit an SDXL base" in err


_ATTN = "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def _bad_adapter_files(tmp_path):
    from safetensors.torch import save_file

    def pair(prefix, d_out, d_in):
        return {f"{prefix}.lora_down.weight": torch.zeros(4, d_in), f"{prefix}.lora_up.weight": torch.zeros(d_out, 4)}

    files = {
        # SD 2.x-sized layers (1024 wide) on the tiny SD 1.5 base (32 wide)
        "sd2.safetensors": (pair(f"lora_unet_{_ATTN}", 1024, 1024),
                            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q is 1024->1024 but this "
                            "base's is 32->32"),
        "te.safetensors": (pair("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 1024, 1024),
                           "self_attn.q_proj is 1024->1024 but this base's is 32->32"),
        "absent.safetensors": (pair("lora_te_text_model_encoder_layers_40_self_attn_q_proj", 32, 32),
                               "text_encoder.text_model.encoder.layers.40.self_attn.q_proj is not in this base"),
        "loha.safetensors": ({f"lora_unet_{_ATTN}.hada_w1_a": torch.zeros(32, 4),
                              f"lora_unet_{_ATTN}.hada_w1_b": torch.zeros(4, 32)},
                             f"lora_unet_{_ATTN} is a LoHa module without hada_w2_a; the file is incomplete"),
    }
    for name, (tensors, _) in files.items():
        save_file(tensors, str(tmp_path / name))
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\"")
    return {**{name: why for name, (_, why) in files.items()}, "cut.safetensors": "not a readable .safetensors file"}


def test_an_adapter_that_does_not_fit_is_named_with_its_layer(tiny_sd15, tmp_path, capsys):
    for name, why in _bad_adapter_files(tmp_path).items():
        rc = main(["infer", "--model", str(tiny_sd15), "--prompt", "x", "--lora", str(tmp_path / name),
                   "--steps", "1", "--width", "64", "--height", "64", "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and f"--lora: {tmp_path / name}: " in err and why in err and "\n" not in err, (name, err)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_diffusers_layout_file_of_format_both_loads_by_its_dotted_name(trained, tiny_sd15, tmp_path):
    from lora_trainer.export.adapter import read_adapter, write_adapter

    dotted = tmp_path / "example-lora.diffusers.safetensors"  # what output.format: both writes
    write_adapter(dotted, read_adapter(trained.adapter_paths[0]), layout="diffusers")
    kohya = _run(tiny_sd15, tmp_path / "kohya", f"{trained.adapter_paths[0]}:1.0")
    diffusers = _run(tiny_sd15, tmp_path / "diffusers", f"{dotted}:1.0")
    assert np.abs(kohya.astype(int) - diffusers.astype(int)).max() <= 1
    assert parse_adapter_spec(f"{dotted}:0.5").name == "example-lora_diffusers"
