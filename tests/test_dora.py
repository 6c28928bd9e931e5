"""DoRA (`lora.use_dora`): the magnitudes train, checkpoint and resume like A and B; both file
layouts carry them (kohya `dora_scale` (d_out, 1), diffusers `lora_magnitude_vector` (d_out,)) and
give back the trained outputs; the file tools carry or refuse them, never drop them."""

from __future__ import annotations

import json
import shutil

import pytest
import safetensors
import safetensors.torch
import torch
from conftest import model_outputs as _outputs, run_config

from lora_trainer.errors import ConfigError, ModelError
from lora_trainer.training.loop import train

RUN = ["lora.use_dora=true", "lora.train_text_encoder=true", "train.text_encoder_lr=5e-3", "lora.dropout=0.1",
       "lora.rank_dropout=0.2", "lora.module_dropout=0.2", "train.gradient_checkpointing=true", "train.max_steps=4", "output.save_every_n_steps=2",
       "output.dtype=fp32", "output.format=both", "sample.prompts=[]"]
MODULE = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
KOHYA = "lora_unet_" + MODULE.replace(".", "_")


def _adapter(result) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in result.unet.named_parameters() if v.requires_grad}


def _fresh(model_dir, xl=False):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    pipe = (StableDiffusionXLPipeline if xl else StableDiffusionPipeline).from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def dora_run(tiny_sd15, example_data, tmp_path_factory):
    """4 steps of DoRA on UNet and text encoder, with per-sample dropout (lora.dropout, kohya's rank and
    module dropout) and gradient checkpointing."""
    out = tmp_path_factory.mktemp("dora") / "out"
    result = train(run_config(tiny_sd15, example_data, out, *RUN), show_progress=False)
    return result, _adapter(result), _outputs(result.unet, result.text_encoder)


def test_magnitudes_train_in_fp32_and_are_counted(dora_run):
    result, adapter, _ = dora_run
    magnitudes = {k: v for k, v in adapter.items() if "lora_magnitude_vector" in k}
    assert magnitudes and all(v.dtype == torch.float32 for v in magnitudes.values())
    layer = result.unet.get_submodule(MODULE)
    initial = torch.linalg.norm(layer.get_base_layer().weight, dim=1)  # peft starts m at ‖W‖ per row
    assert not torch.allclose(layer.lora_magnitude_vector["default"].weight, initial)
    # 4 attention projections of 32 channels, rank 4: r·(d_in + d_out) + d_out each
    per_layer = 4 * (32 + 32) + 32
    assert result.trainable_parameters == sum(v.numel() for v in adapter.values()) + 2 * 4 * per_layer


def test_files_carry_the_magnitudes_in_each_layout(dora_run):
    result, _, _ = dora_run
    kohya, diffusers = result.adapter_paths
    with safetensors.safe_open(str(kohya), "pt") as f:
        scale = f.get_tensor(f"{KOHYA}.dora_scale")
        meta = f.metadata()
    layer = result.unet.get_submodule(MODULE)
    assert scale.shape == (32, 1)  # output axis, as LyCORIS writes with wd_on_out
    assert torch.equal(scale[:, 0], layer.lora_magnitude_vector["default"].weight.detach())
    # LyCORIS's DoRA arguments beside the run's dropouts (LyCORIS reads rank/module_dropout by the same names)
    assert json.loads(meta["ss_network_args"]) == {"rank_dropout": "0.2", "module_dropout": "0.2",
                                                   "dora_wd": "True", "wd_on_out": "True"}
    with safetensors.safe_open(str(diffusers), "pt") as f:
        magnitude = f.get_tensor(f"unet.{MODULE}.lora_magnitude_vector")
        config = json.loads(f.metadata()["lora_adapter_metadata"])
    assert magnitude.shape == (32,) and torch.equal(magnitude, scale[:, 0])
    assert config["unet.use_dora"] is True and config["text_encoder.use_dora"] is True


def test_kohya_dora_scale_means_row_normalised_weight(dora_run):
    """The file's tensors, read as ComfyUI/LyCORIS output-axis DoRA (m · W' / ‖W'‖ per output row),
    give the layer the trained model computes."""
    result, _, _ = dora_run
    t = safetensors.torch.load_file(str(result.adapter_paths[0]))
    layer = result.unet.get_submodule(MODULE)
    weight = layer.get_base_layer().weight.detach().double()
    down, up = t[f"{KOHYA}.lora_down.weight"].double(), t[f"{KOHYA}.lora_up.weight"].double()
    adapted = weight + float(t[f"{KOHYA}.alpha"]) / down.shape[0] * up @ down
    merged = t[f"{KOHYA}.dora_scale"].double() * adapted / adapted.norm(dim=1, keepdim=True)
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))
    layer.eval()
    with torch.no_grad():
        expected = layer(x)
    got = x.double() @ merged.T  # to_q has no bias
    assert (got.float() - expected).abs().max() < 1e-5


def test_diffusers_file_loads_in_diffusers_with_trained_unet_outputs(dora_run, tiny_sd15):
    result, _, (unet_ref, _) = dora_run
    base = _fresh(tiny_sd15)
    pipe = _fresh(tiny_sd15)
    pipe.load_lora_weights(str(result.adapter_paths[1]), adapter_name="mine")
    loaded, _ = _outputs(pipe.unet, pipe.text_encoder)
    assert (unet_ref - _outputs(base.unet, base.text_encoder)[0]).abs().max() > 1e-3
    assert (loaded - unet_ref).abs().max() < 1e-4


@pytest.mark.parametrize("index", [0, 1], ids=["kohya", "diffusers"])
def test_both_files_give_trained_outputs_through_our_inference(dora_run, tiny_sd15, index):
    from lora_trainer.inference.adapters import AdapterSpec, AdapterStack

    result, _, (unet_ref, te_ref) = dora_run
    pipe = _fresh(tiny_sd15)
    _, te_base = _outputs(pipe.unet, pipe.text_encoder)
    stack = AdapterStack(pipe)
    name = stack.load(AdapterSpec(result.adapter_paths[index]), name="dora")
    unet_out, te_out = _outputs(pipe.unet, pipe.text_encoder)
    assert (te_ref - te_base).abs().max() > 1e-3
    assert (unet_out - unet_ref).abs().max() < 1e-4 and (te_out - te_ref).abs().max() < 1e-4
    stack.set_weight(name, 0.5)
    half, _ = _outputs(pipe.unet, pipe.text_encoder)
    assert (half - unet_ref).abs().max() > 1e-4
    stack.merge()
    merged, _ = _outputs(pipe.unet, pipe.text_encoder)
    assert (merged - half).abs().max() < 1e-4
    stack.unmerge()
    assert torch.equal(_outputs(pipe.unet, pipe.text_encoder)[0], half)


def test_resume_is_bit_identical_with_dora(dora_run, tiny_sd15, example_data, tmp_path):
    result, reference, _ = dora_run
    out = tmp_path / "out"
    shutil.copytree(result.output_dir / "checkpoints" / "step-000002", out / "checkpoints" / "step-000002")
    resumed = train(run_config(tiny_sd15, example_data, out, *RUN, "train.resume=latest"), show_progress=False)
    assert resumed.losses == result.losses[2:]
    assert reference.keys() == _adapter(resumed).keys()
    assert all(torch.equal(v, _adapter(resumed)[k]) for k, v in reference.items())


def test_convert_round_trip_inspect_and_refusals(dora_run, tmp_path, capsys):
    from lora_trainer.cli import main

    kohya = dora_run[0].adapter_paths[0]
    there, back = tmp_path / "d.safetensors", tmp_path / "k.safetensors"
    assert main(["convert", str(kohya), str(there), "--to", "diffusers"]) == 0
    assert main(["convert", str(there), str(back), "--to", "kohya"]) == 0
    first, second = safetensors.torch.load_file(str(kohya)), safetensors.torch.load_file(str(back))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    capsys.readouterr()
    assert main(["inspect", str(there)]) == 0
    assert "DoRA" in capsys.readouterr().out
    assert main(["resize", str(kohya), str(tmp_path / "r.safetensors"), "--rank", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "DoRA adapters cannot be resized linearly" in err
    assert main(["merge-loras", str(kohya), str(there), "--out", str(tmp_path / "m.safetensors")]) == 2
    assert "DoRA adapters cannot be merged linearly" in capsys.readouterr().err


def test_input_axis_dora_scales_are_refused_by_name(dora_run, tmp_path):
    from lora_trainer.export.adapter import read_adapter

    tensors = safetensors.torch.load_file(str(dora_run[0].adapter_paths[0]))
    tensors[f"{KOHYA}.dora_scale"] = torch.ones(1, 32)  # old LyCORIS: one scale per input column
    path = tmp_path / "in-axis.safetensors"
    safetensors.torch.save_file(tensors, str(path))
    with pytest.raises(ModelError, match=f"{KOHYA}.dora_scale.*input-axis"):
        read_adapter(path)


def test_init_from_a_dora_file_starts_where_it_ended(dora_run, tiny_sd15):
    from lora_trainer.models.lora import inject_lora
    from lora_trainer.training.init_adapter import load_initial_adapter, read_initial_adapter

    result, _, (unet_ref, te_ref) = dora_run
    for path in result.adapter_paths:
        with pytest.raises(ConfigError, match="is a DoRA adapter but lora.use_dora is false"):
            read_initial_adapter(str(path), "sd15", True, 4)
        adapter = read_initial_adapter(str(path), "sd15", True, 4, use_dora=True)
        pipe = _fresh(tiny_sd15)
        inject_lora(pipe.unet, ["to_q", "to_k", "to_v", "to_out.0"], 4, 2.0, 0.0, "lora.unet_targets", True)
        inject_lora(pipe.text_encoder, ["q_proj", "k_proj", "v_proj", "out_proj"], 4, 2.0, 0.0,
                    "lora.text_encoder_targets", True)
        load_initial_adapter(adapter, {"unet": pipe.unet, "text_encoder": pipe.text_encoder}, str(path))
        unet_out, te_out = _outputs(pipe.unet, pipe.text_encoder)
        assert (unet_out - unet_ref).abs().max() < 1e-4 and (te_out - te_ref).abs().max() < 1e-4


def test_plain_lora_file_is_refused_for_a_dora_run(trained):
    from lora_trainer.training.init_adapter import read_initial_adapter

    with pytest.raises(ConfigError, match="is a plain LoRA adapter but lora.use_dora is true"):
        read_initial_adapter(str(trained.adapter_paths[0]), "sd15", False, 4, use_dora=True)


def test_bf16_mixed_precision_trains_dora(tiny_sd15, example_data, tmp_path):
    cfg = run_config(tiny_sd15, example_data, tmp_path / "bf16", "lora.use_dora=true", "train.mixed_precision=bf16",
                     "train.max_steps=2", "sample.prompts=[]")
    result = train(cfg, show_progress=False)
    magnitudes = {p.dtype for n, p in result.unet.named_parameters() if "lora_magnitude_vector" in n}
    assert magnitudes == {torch.float32} and all(torch.isfinite(torch.tensor(result.losses)))


def test_sdxl_dora_files_give_trained_unet_outputs(tiny_sdxl, example_data, tmp_path):
    from lora_trainer.inference.adapters import AdapterSpec, AdapterStack

    cfg = run_config(tiny_sdxl, example_data, tmp_path / "xl", "lora.use_dora=true", "train.max_steps=2",
                     "train.lr=1e-2", "output.dtype=fp32", "output.format=both", "sample.prompts=[]")
    result = train(cfg, show_progress=False)
    g = torch.Generator().manual_seed(5)
    inputs = dict(sample=torch.randn(2, 4, 8, 8, generator=g), timestep=torch.tensor([50, 800]),
                  encoder_hidden_states=torch.randn(2, 77, 64, generator=g),
                  added_cond_kwargs={"text_embeds": torch.randn(2, 32, generator=g),
                                     "time_ids": torch.tensor([[64.0, 96, 0, 16, 64, 64]] * 2)})

    def unet_out(unet):
        unet.eval()
        with torch.no_grad():
            return unet(**inputs).sample

    reference = unet_out(result.unet)
    with safetensors.safe_open(str(result.adapter_paths[0]), "pt") as f:
        assert any(k.startswith("lora_unet_input_blocks_") and k.endswith(".dora_scale") for k in f.keys())
    direct = _fresh(tiny_sdxl, xl=True)
    direct.load_lora_weights(str(result.adapter_paths[1]))
    assert (unet_out(direct.unet) - reference).abs().max() < 1e-4
    for path in result.adapter_paths:
        pipe = _fresh(tiny_sdxl, xl=True)
        AdapterStack(pipe).load(AdapterSpec(path), name="dora")
        assert (unet_out(pipe.unet) - reference).abs().max() < 1e-4, path.name


def test_use_dora_must_be_a_boolean(tiny_sd15, example_data, tmp_path):
    with pytest.raises(ConfigError, match="lora.use_dora"):
        run_config(tiny_sd15, example_data, tmp_path, "lora.use_dora=maybe")


def test_sample_dropout_follows_peft_dora_dropout_path():
    """With dropout, peft's DoRA adds (m/‖W'‖ − 1)·W·x̃ + (m/‖W'‖)·s·B·A·x̃ to W·x, x̃ the dropped
    input; our per-sample masks take nn.Dropout's place in that path."""
    from peft import LoraConfig, inject_adapter_in_model

    from lora_trainer.models.dropout import DropoutKeys, use_sample_dropout

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5, bias=False))
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, lora_dropout=0.5, use_dora=True, target_modules=["0"],
                                       init_lora_weights="gaussian"), model)
    layer = model[0]
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    keys = DropoutKeys()
    assert use_sample_dropout(model, 0.5, keys, "m") == 1
    x = torch.randn(2, 6)
    model.train()
    with torch.no_grad(), keys.batch([11, 12]):
        out = model(x)
        dropped = layer.lora_dropout["default"](x)
    w = layer.get_base_layer().weight
    a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
    factor = layer.lora_magnitude_vector["default"].weight / (w + s * b @ a).norm(dim=1)
    expected = x @ w.T + (factor - 1) * (dropped @ w.T) + factor * s * (dropped @ a.T @ b.T)
    assert not torch.equal(dropped, x) and (out - expected).abs().max() < 1e-5
