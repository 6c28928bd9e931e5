"""lora.init_from with lora.type loha/lokr: a run starts from a LyCORIS file's ΔW exactly, whatever
alpha it uses (LoHa; LoKr of whole factors and of low-rank pairs, LoCon's convs); files that do not
fit are refused by key and file; from-kohya maps --network_weights with algo=loha/lokr to it."""

from __future__ import annotations

import logging

import pytest
import safetensors.torch
import torch
from conftest import run_config

from lora_trainer.errors import ConfigError
from lora_trainer.export.layouts import canonical_path
from lora_trainer.export.lycoris import read_lycoris
from lora_trainer.training.loop import train

QUIET = ["output.dtype=fp32", "sample.prompts=[]", "output.save_every_n_steps=0", "train.warmup=0"]
# case: (the source run's overrides, the continuing run's: another alpha each time)
CASES = {
    "loha": (["lora.type=loha", "lora.alpha=2", "lora.train_text_encoder=true"],
             ["lora.type=loha", "lora.alpha=8", "lora.train_text_encoder=true", "train.text_encoder_lr=0"]),
    # rank 4 on the tiny layers: both factors whole, scale 1 whatever alpha
    "lokr": (["lora.type=lokr", "lora.alpha=2"], ["lora.type=lokr", "lora.alpha=16"]),
    "lokr-low-rank": (["lora.type=lokr", "lora.rank=2", "lora.alpha=1", "lora.lokr_factor=2"],
                      ["lora.type=lokr", "lora.rank=2", "lora.alpha=4", "lora.lokr_factor=2"]),
    # 3x3 convs at their own rank and alpha: whole attention factors and rank-2 conv pairs in one file
    "lokr-locon": (["lora.type=lokr", "lora.conv_rank=2", "lora.conv_alpha=1"],
                   ["lora.type=lokr", "lora.conv_rank=2", "lora.conv_alpha=2", "lora.alpha=1"]),
}


@pytest.fixture(scope="module")
def sources(tiny_sd15, example_data, tmp_path_factory) -> dict:
    """{case: the file of a 2-step run}, trained enough that ΔW is far from 0."""
    out = {}
    for case, (overrides, _) in CASES.items():
        folder = tmp_path_factory.mktemp(case) / "out"
        cfg = run_config(tiny_sd15, example_data, folder, "train.max_steps=2", "train.lr=1e-2", *QUIET, *overrides)
        out[case] = train(cfg, show_progress=False).adapter_paths[0]
    return out


def _deltas(path, tiny_sd15) -> dict[str, torch.Tensor]:
    """{component.path: ΔW} of a LyCORIS file through our reader, against the tiny model's weights."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15)
    models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    layers = {c: {canonical_path(c, name): layer for name, layer in m.named_modules()} for c, m in models.items()}
    out = {}
    for component, path_, module in read_lycoris(path).items():
        out[f"{component}.{path_}"] = module.delta(layers[component][path_].weight, torch.float64)
    return out


def _frozen_start(tiny_sd15, example_data, out, *overrides):
    """One step at a learning rate too small to move anything: the file and model are the start."""
    cfg = run_config(tiny_sd15, example_data, out, "train.max_steps=1", "train.lr=1e-12", *QUIET, *overrides)
    return train(cfg, show_progress=False)


def _unet_output(unet):
    g = torch.Generator().manual_seed(7)
    unet.eval()
    with torch.no_grad():
        return unet(torch.randn(2, 4, 8, 8, generator=g), torch.tensor([100, 700]),
                    torch.randn(2, 77, 32, generator=g)).sample


@pytest.mark.parametrize("case", list(CASES))
def test_a_run_starts_from_the_files_delta_w_with_another_alpha(sources, tiny_sd15, example_data, tmp_path, case):
    from diffusers import StableDiffusionPipeline

    from lora_trainer.inference.adapters import AdapterSpec, AdapterStack

    source = sources[case]
    result = _frozen_start(tiny_sd15, example_data, tmp_path / "run", f"lora.init_from={source}", *CASES[case][1])
    want, got = _deltas(source, tiny_sd15), _deltas(result.adapter_paths[0], tiny_sd15)
    assert set(got) == set(want) and (case != "loha" or any(k.startswith("text_encoder.") for k in got))
    for key, delta in want.items():
        assert delta.abs().max() > 1e-4, key
        torch.testing.assert_close(got[key], delta, rtol=0, atol=1e-6, msg=key)
    # the run's model gives what the base with the source file gives
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15)
    AdapterStack(pipe).load(AdapterSpec(source), name=case)
    torch.testing.assert_close(_unet_output(result.unet), _unet_output(pipe.unet), rtol=1e-5, atol=1e-5)


def test_layers_the_file_lacks_start_at_zero_with_a_warning(sources, tiny_sd15, example_data, tmp_path, caplog):
    tensors = safetensors.torch.load_file(str(sources["loha"]))
    gone = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    partial = tmp_path / "partial.safetensors"
    safetensors.torch.save_file({k: v for k, v in tensors.items() if not k.startswith(gone + ".")}, str(partial))
    with caplog.at_level(logging.WARNING, logger="lora_trainer.training.init_lycoris"):
        result = _frozen_start(tiny_sd15, example_data, tmp_path / "run", f"lora.init_from={partial}",
                               *CASES["loha"][1])
    assert any("start from zero" in r.message and "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
               in r.message for r in caplog.records)
    got = _deltas(result.adapter_paths[0], tiny_sd15)
    assert got["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"].abs().max() < 1e-9


def _refused(tiny_sd15, example_data, out, source, *overrides) -> str:
    cfg = run_config(tiny_sd15, example_data, out, "train.max_steps=1", *QUIET, f"lora.init_from={source}",
                     *overrides)
    with pytest.raises(ConfigError) as err:
        train(cfg, show_progress=False)
    message = str(err.value)
    assert message.startswith("lora.init_from:") and str(source) in message and "\n" not in message, message
    assert not (out / "lora.safetensors").exists()
    return message


def test_files_of_another_type_are_refused_naming_both(sources, random_adapters, tiny_sd15, example_data, tmp_path):
    loha = sources["loha"]
    assert "is a LoRA adapter but lora.type is 'loha' (LoHa); set lora.type=lora" in _refused(
        tiny_sd15, example_data, tmp_path / "a", random_adapters["a"], "lora.type=loha")
    assert "is a LoHa adapter but lora.type is 'lokr' (LoKr); set lora.type=loha" in _refused(
        tiny_sd15, example_data, tmp_path / "b", loha, "lora.type=lokr", "lora.train_text_encoder=true")
    assert "is a LoHa adapter but lora.type is 'lora'; set lora.type=loha" in _refused(
        tiny_sd15, example_data, tmp_path / "c", loha, "lora.train_text_encoder=true")


@pytest.mark.parametrize("case, overrides, message", [
    ("loha", ["lora.type=loha", "lora.rank=8", "lora.train_text_encoder=true"], "has rank 4 but lora.rank is 8"),
    ("loha", ["lora.type=loha"], "also adapts text_encoder; set lora.train_text_encoder=true"),
    ("loha", ["lora.type=loha", "lora.train_text_encoder=true", "lora.unet_targets=[to_q]"],
     "adapts unet layers this run does not: .*; add their names to lora.unet_targets"),
    ("lokr-locon", ["lora.type=lokr", "lora.conv_rank=4"], "3x3 convs at rank 2 but lora.conv_rank is 4"),
    # the file's w1 is 2 × 2 (lokr_factor 2); the run's -1 splits near the square root: found in the
    # parts' shapes before the model loads, the file's factor named
    ("lokr-low-rank", ["lora.type=lokr", "lora.rank=2"],
     r"lora_unet_\w+ splits its 32 outputs 2 × 16 \(lokr_w1 \(2, 2\)\), not as lora.lokr_factor -1 does; "
     r"set lora.lokr_factor=2$"),
])
def test_files_that_do_not_fit_are_refused_by_key_and_file(sources, tiny_sd15, example_data, tmp_path,
                                                           case, overrides, message):
    import re

    assert re.search(message, _refused(tiny_sd15, example_data, tmp_path / "run", sources[case], *overrides))


@pytest.mark.parametrize("parts, message", [
    ({"hada_t1": torch.zeros(4, 4, 1, 1), "hada_t2": torch.zeros(4, 4, 1, 1)}, "hada_t1 is a Tucker/CP core"),
    ({"dora_scale": torch.ones(32, 1)}, "dora_scale is a DoRA magnitude"),
])
def test_parts_peft_cannot_hold_are_refused_before_the_model_loads(sources, tiny_sd15, example_data, tmp_path,
                                                                   parts, message):
    tensors = safetensors.torch.load_file(str(sources["loha"]))
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    extra = tmp_path / "extra.safetensors"
    safetensors.torch.save_file({**tensors, **{f"{name}.{k}": v for k, v in parts.items()}}, str(extra))
    assert message in _refused(tiny_sd15, example_data, tmp_path / "run", extra, *CASES["loha"][1])


def test_from_kohya_maps_network_weights_with_loha_to_init_from():
    from lora_trainer.kohya.setup import config_from_kohya, parse_command_line

    command = ("python train_network.py --pretrained_model_name_or_path m --train_data_dir d --network_dim 8 "
               "--network_module lycoris.kohya --network_weights old.safetensors --network_args algo=")
    for algo in ("loha", "lokr"):
        cfg, _ = config_from_kohya(parse_command_line(command + algo))
        assert cfg["lora"]["type"] == algo and cfg["lora"]["init_from"] == "old.safetensors"
