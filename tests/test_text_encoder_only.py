"""Text-encoder-only training (lora.train_unet false, kohya's --network_train_text_encoder_only) on the
tiny SD1.5 and SDXL models: the UNet stays the base's bit for bit, the text-encoder adapters learn
through it, the files hold only text-encoder keys and load in diffusers and infer.py to the trained
text-encoder outputs, and a resumed run (LoRA+, max-norm, dropout, checkpointing, validation) ends
exactly where an uninterrupted one does."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import safetensors
import torch
from conftest import run_config

from lora_trainer.errors import ConfigError

TE_ONLY = ["lora.train_unet=false", "lora.train_text_encoder=true", "train.text_encoder_lr=5e-3",
           "output.dtype=fp32", "output.format=both"]
# the options whose code assumed the UNet comes first: optimizer groups, LoRA+, max-norm, dropout,
# gradient checkpointing (through the frozen UNet), validation, samples and the sweep grid
EXTRAS = ["train.loraplus_lr_ratio=4", "train.scale_weight_norms=0.02", "lora.dropout=0.1",
          "train.gradient_checkpointing=true", "data.validation_split=0.25", "train.max_steps=4",
          "output.save_every_n_steps=2", "sample.steps=2", "sample.grid_weights=[0,1]"]


def _train(cfg):
    from lora_trainer.training.loop import train

    return train(cfg, show_progress=False)


@pytest.fixture(scope="module")
def sd15_run(tiny_sd15, example_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("te-only") / "out"
    return _train(run_config(tiny_sd15, example_data, out, *TE_ONLY, *EXTRAS))


@pytest.fixture(scope="module")
def sdxl_run(tiny_sdxl, example_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("te-only-xl") / "out"
    return _train(run_config(tiny_sdxl, example_data, out, *TE_ONLY, "train.max_steps=4", "sample.prompts=[]",
                             "output.save_every_n_steps=2"))


def _pipeline(model_dir, sdxl: bool):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    pipe = (StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline).from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _encoder_outputs(*encoders):
    ids = torch.randint(0, 400, (2, 77), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return [e(ids, output_hidden_states=True).hidden_states[-1] for e in encoders if e is not None]


def _assert_unet_is_the_base(result, model_dir, sdxl):
    from lora_trainer.models.lora import lora_layers

    assert not lora_layers(result.unet)  # no adapter was injected
    base = _pipeline(model_dir, sdxl).unet.state_dict()
    own = result.unet.state_dict()
    assert own.keys() == base.keys()
    assert all(torch.equal(own[k], base[k]) for k in base)


def _assert_adapters_learned(*encoders):
    """B starts at 0: every adapter moved, except in the layer after the one SDXL's first encoder is
    read from (penultimate hidden states), which gets no gradient, as in any SDXL run."""
    from lora_trainer.models.lora import lora_layers

    for encoder in encoders:
        last = f"layers.{encoder.config.num_hidden_layers - 1}."
        moved = {name: float(layer.lora_B["default"].weight.detach().abs().max()) > 0
                 for name, layer in lora_layers(encoder).items()}
        assert moved and all(on for name, on in moved.items() if last not in name)


@pytest.mark.parametrize("variant", ["sd15", "sdxl"])
def test_only_the_text_encoders_learn(variant, request):
    result = request.getfixturevalue(f"{variant}_run")
    model = request.getfixturevalue(f"tiny_{variant}")
    assert len(result.losses) == 4 and all(math.isfinite(v) for v in result.losses)
    _assert_unet_is_the_base(result, model, variant == "sdxl")
    _assert_adapters_learned(*[e for e in (result.text_encoder, result.text_encoder_2) if e is not None])


@pytest.mark.parametrize("variant", ["sd15", "sdxl"])
def test_files_hold_only_text_encoder_keys_and_record_it(variant, request):
    result = request.getfixturevalue(f"{variant}_run")
    kohya, diffusers = result.adapter_paths
    with safetensors.safe_open(str(kohya), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    prefixes = {"lora_te_"} if variant == "sd15" else {"lora_te1_", "lora_te2_"}
    assert {k.split("text_model")[0] for k in keys} == prefixes
    with safetensors.safe_open(str(diffusers), "pt") as f:
        components = {k.split(".")[0] for k in f.keys()}
        config = json.loads(f.metadata()["lora_adapter_metadata"])
    assert components == ({"text_encoder"} if variant == "sd15" else {"text_encoder", "text_encoder_2"})
    assert not any(k.startswith("unet.") for k in config)
    assert meta["ss_network_train_text_encoder_only"] == "True" and meta["ss_network_train_unet_only"] == "False"
    assert "ss_unet_lr" not in meta and meta["ss_text_encoder_lr"] == "0.005"


@pytest.mark.parametrize("variant", ["sd15", "sdxl"])
def test_files_load_in_diffusers_to_the_trained_text_encoders(variant, request):
    result = request.getfixturevalue(f"{variant}_run")
    model, sdxl = request.getfixturevalue(f"tiny_{variant}"), variant == "sdxl"
    encoders = [e for e in (result.text_encoder, result.text_encoder_2) if e is not None]
    for e in encoders:
        e.eval()
    reference = _encoder_outputs(*encoders)
    plain = _pipeline(model, sdxl)
    base_out = _encoder_outputs(plain.text_encoder, getattr(plain, "text_encoder_2", None))
    assert all((r - b).abs().max() > 1e-4 for r, b in zip(reference, base_out))
    for path in result.adapter_paths:
        pipe = _pipeline(model, sdxl)
        pipe.load_lora_weights(str(path), adapter_name="mine")
        loaded = _encoder_outputs(pipe.text_encoder, getattr(pipe, "text_encoder_2", None))
        for got, ref in zip(loaded, reference):
            assert (got - ref).abs().max() < 1e-4, path.name


def test_file_loads_in_infer_to_the_trained_text_encoder(sd15_run, tiny_sd15):
    from lora_trainer.inference.generate import Generator

    sd15_run.text_encoder.eval()
    reference = _encoder_outputs(sd15_run.text_encoder)[0]
    gen = Generator(tiny_sd15, loras=[f"{sd15_run.adapter_paths[0]}:1.0"], device="cpu", dtype=torch.float32)
    assert (_encoder_outputs(gen.pipe.text_encoder)[0] - reference).abs().max() < 1e-4
    images = gen.txt2img("geoshape, a red circle", seed=1, steps=2, width=64, height=64)
    assert images[0].image.size == (64, 64)


def test_the_run_logs_text_encoder_groups_validates_and_draws_samples(sd15_run):
    out = sd15_run.output_dir
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert {k for k in steps[0] if k.startswith("lr/")} == {"lr/text_encoder", "lr/text_encoder_plus"}
    assert steps[0]["lr/text_encoder_plus"] == pytest.approx(4 * steps[0]["lr/text_encoder"])
    assert all("max_norm/keys_scaled" in r for r in steps)
    assert sorted(sd15_run.val_losses) == [0, 1, 2, 3, 4]  # every ceil(4 / 10) steps
    assert sd15_run.val_losses[4] != sd15_run.val_losses[0]  # the text-encoder adapter changes it
    assert (out / "samples" / "step_00004" / "00.png").is_file() and (out / "samples" / "sweep.png").is_file()
    checkpoint = out / "checkpoints" / "step-000002"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [checkpoint.name]
    states = torch.load(checkpoint / "adapter_state.pt", weights_only=True)  # one trained module: the encoder
    assert len(states) == 1 and all(k.startswith("encoder.layers.") and ".lora_" in k for k in states[0])
    with safetensors.safe_open(str(checkpoint / "example-lora-step00000002.safetensors"), "pt") as f:
        assert all(k.startswith("lora_te_") for k in f.keys())


def test_text_encoder_only_resumes_exactly(sd15_run, tiny_sd15, example_data, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(sd15_run.output_dir / "checkpoints" / "step-000002", out / "checkpoints" / "step-000002")
    resumed = _train(run_config(tiny_sd15, example_data, out, *TE_ONLY, *EXTRAS, "train.resume=latest"))
    assert resumed.losses == sd15_run.losses[2:]
    assert resumed.val_losses[4] == sd15_run.val_losses[4]
    straight = dict(sd15_run.text_encoder.named_parameters())
    trained = [(n, p) for n, p in resumed.text_encoder.named_parameters() if p.requires_grad]
    assert trained and all(torch.equal(p, straight[n]) for n, p in trained)
    with safetensors.safe_open(str(resumed.adapter_paths[0]), "pt") as a, \
            safetensors.safe_open(str(sd15_run.adapter_paths[0]), "pt") as b:
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in b.keys())


@pytest.mark.parametrize("overrides, key", [
    (["lora.train_unet=false"], "lora.train_unet"),
    (["lora.train_unet=false", "lora.train_text_encoder=true", "lora.block_lr_weights.down=cosine"],
     "lora.block_lr_weights.down"),
    (["lora.train_unet=false", "lora.train_text_encoder=true", "lora.block_ranks=[4]"], "lora.block_ranks"),
    (["lora.train_unet=false", "lora.train_text_encoder=true", "lora.conv_rank=4"], "lora.conv_rank"),
    (["lora.train_unet=false", "lora.train_text_encoder=true", "train.loraplus_unet_lr_ratio=4"],
     "train.loraplus_unet_lr_ratio"),
])
def test_combinations_without_meaning_are_one_line_errors(overrides, key, tiny_sd15, example_data, tmp_path):
    with pytest.raises(ConfigError) as err:
        run_config(tiny_sd15, example_data, tmp_path, *overrides)
    lines = str(err.value).splitlines()
    assert any(f"{key}: got" in line and "lora.train_unet" in line for line in lines), lines


def test_an_initial_adapter_with_unet_layers_is_refused(random_adapters, tiny_sd15, example_data, tmp_path):
    cfg = run_config(tiny_sd15, example_data, tmp_path / "out", *TE_ONLY, f"lora.init_from={random_adapters['a']}")
    with pytest.raises(ConfigError, match=r"^lora.init_from: .* adapts the UNet but lora.train_unet is false"):
        _train(cfg)


def test_model_card_names_the_text_encoder_only(tiny_sd15, example_data, tmp_path):
    from lora_trainer.publish.card import _adapted_modules

    row = _adapted_modules(run_config(tiny_sd15, example_data, tmp_path, *TE_ONLY))
    assert row == "text encoder q_proj, k_proj, v_proj, out_proj (text encoder only; the UNet is the base's)"
    assert _adapted_modules(run_config(tiny_sd15, example_data, tmp_path)).startswith("UNet to_q")


def test_two_processes_train_the_one_process_adapter(two_process_runs, tiny_sd15, example_data, tmp_path):
    """DDP wraps only the text encoder (the frozen UNet is left unprepared), and the random noise
    strengths come from each item's generator: 2 processes × batch 1 = 1 process × batch 2."""
    from rank_helpers import TWO_PROCESS_RUNS

    options, script = TWO_PROCESS_RUNS["text_encoder_only"]  # run through train.py
    assert script == "train.py" and set(TE_ONLY) <= set(options) and "train.adaptive_noise_scale=0.2" in options
    one = _train(run_config(tiny_sd15, example_data, tmp_path / "one", *options, "train.batch_size=2"))
    out = two_process_runs["text_encoder_only"]
    with safetensors.safe_open(str(out / "example-lora.safetensors"), "pt") as a, \
            safetensors.safe_open(str(one.adapter_paths[0]), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for key in b.keys():
            torch.testing.assert_close(a.get_tensor(key), b.get_tensor(key), rtol=1e-4, atol=1e-6)
