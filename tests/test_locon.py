"""LoCon (`lora.conv_rank`, kohya's `--network_args conv_dim=R conv_alpha=A`): a run adapts kohya's
module set (transformer linears and 1x1 proj_in/proj_out at the rank, ResNet and sampler 3x3 convs at
the conv rank), its files carry 4-D conv factors with their own alpha, load in diffusers and in our
inference with the trained effect, and go through convert/resize/init_from unchanged in meaning."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch
from conftest import run_config
from locon_helpers import assert_outputs_close, inputs, load_pipeline, outputs

from lora_trainer.cli import main
from lora_trainer.errors import ConfigError
from lora_trainer.export.adapter import read_adapter, write_adapter
from lora_trainer.export.files import load_adapter
from lora_trainer.export.inspect import inspect_adapter
from lora_trainer.export.resize import resize_adapter
from lora_trainer.kohya.mapping import KOHYA_UNET_TARGETS, config_from_kohya
from lora_trainer.models.lora import expected_lora_parameters, lora_layers
from lora_trainer.training.loop import train

RANK, ALPHA, CONV_RANK, CONV_ALPHA = 4, 8.0, 2, 1.0  # different scales (2 and 0.5): a swapped alpha shows
RUN = [f"lora.rank={RANK}", f"lora.alpha={ALPHA}", f"lora.conv_rank={CONV_RANK}", f"lora.conv_alpha={CONV_ALPHA}",
       f"lora.unet_targets=[{','.join(KOHYA_UNET_TARGETS)}]", "train.max_steps=2", "train.lr=1e-2",
       "output.dtype=fp32", "output.format=both", "sample.prompts=[]", "sample.grid_weights=[]"]
KOHYA_BLOCKS = {"Transformer2DModel": False, "ResnetBlock2D": True, "Downsample2D": True, "Upsample2D": True}


def _run(model_dir, data, out, *extra):
    result = train(run_config(model_dir, data, out, *RUN, *extra), show_progress=False)
    for module in (result.unet, result.text_encoder, result.text_encoder_2):
        if module is not None:
            module.eval()
    return result


def _trained_outputs(result, variant):
    """The in-memory trained model's outputs on the fixed inputs of locon_helpers."""
    x = inputs(variant)
    parts = SimpleNamespace(unet=result.unet, text_encoder=result.text_encoder, text_encoder_2=result.text_encoder_2)
    return x, outputs(parts, x)


@pytest.fixture(scope="module")
def sd15_run(tiny_sd15, example_data, tmp_path_factory):
    result = _run(tiny_sd15, example_data, tmp_path_factory.mktemp("locon") / "sd15", "lora.train_text_encoder=true")
    return result, *_trained_outputs(result, "sd15")


@pytest.fixture(scope="module")
def sdxl_run(tiny_sdxl, example_data, tmp_path_factory):
    result = _run(tiny_sdxl, example_data, tmp_path_factory.mktemp("locon") / "sdxl")
    return result, *_trained_outputs(result, "sdxl")


def _kohya_selection(unet) -> dict[str, int]:
    """The layers kohya's networks.lora adapts with conv_dim, by its own rule: every Linear and Conv2d
    inside a Transformer2DModel, ResnetBlock2D, Downsample2D or Upsample2D, 3x3 convs at conv_dim."""
    wanted = {}
    for name, block in unet.named_modules():
        if type(block).__name__ not in KOHYA_BLOCKS:
            continue
        for child, layer in block.named_modules():
            layer = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
            if ".base_layer" in child or "lora_" in child or not isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            kxk = isinstance(layer, torch.nn.Conv2d) and layer.kernel_size != (1, 1)
            wanted[f"{name}.{child}"] = CONV_RANK if kxk else RANK
    return wanted


@pytest.mark.parametrize("variant", ["sd15", "sdxl"])
def test_run_adapts_kohyas_locon_module_set_at_two_ranks(variant, request):
    result = request.getfixturevalue(f"{variant}_run")[0]
    layers = lora_layers(result.unet)
    assert {name: layer.r["default"] for name, layer in layers.items()} == _kohya_selection(result.unet)
    assert {name: layer.scaling["default"] for name, layer in layers.items() if layer.r["default"] == CONV_RANK} \
        == {name: CONV_ALPHA / CONV_RANK for name, r in _kohya_selection(result.unet).items() if r == CONV_RANK}
    convs = [layer for layer in layers.values() if isinstance(layer.get_base_layer(), torch.nn.Conv2d)]
    assert any(layer.get_base_layer().stride == (2, 2) for layer in convs)  # the downsamplers
    for layer in convs:  # A is a conv like the layer's own, B a 1x1 conv
        base, a, b = layer.get_base_layer(), layer.lora_A["default"], layer.lora_B["default"]
        assert (a.kernel_size, a.stride, a.padding) == (base.kernel_size, base.stride, base.padding)
        assert b.kernel_size == (1, 1)
    unet_params = sum(p.numel() for p in result.unet.parameters() if p.requires_grad)
    assert unet_params == expected_lora_parameters(result.unet, RANK, conv_rank=CONV_RANK)


def test_kohya_file_has_4d_conv_factors_their_alpha_and_network_args(sd15_run):
    result = sd15_run[0]
    tensors, metadata = load_adapter(result.adapter_paths[0])
    base = dict(result.unet.named_modules())
    for path, r, a in (("down_blocks.0.resnets.0.conv1", CONV_RANK, CONV_ALPHA),
                       ("down_blocks.0.downsamplers.0.conv", CONV_RANK, CONV_ALPHA),
                       ("up_blocks.0.upsamplers.0.conv", CONV_RANK, CONV_ALPHA),
                       ("down_blocks.2.resnets.0.conv_shortcut", RANK, ALPHA),
                       ("down_blocks.0.attentions.0.proj_in", RANK, ALPHA)):
        weight = base[path].get_base_layer().weight
        name = "lora_unet_" + path.replace(".", "_")
        assert tensors[f"{name}.lora_down.weight"].shape == (r, weight.shape[1], *weight.shape[2:])
        assert tensors[f"{name}.lora_up.weight"].shape == (weight.shape[0], r, 1, 1)
        assert tensors[f"{name}.alpha"].item() == a
    time_emb = base["mid_block.resnets.0.time_emb_proj"].get_base_layer().weight  # linear: 2-D factors
    assert tensors["lora_unet_mid_block_resnets_0_time_emb_proj.lora_down.weight"].shape == (RANK, time_emb.shape[1])
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1"}
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("4", "8.0")


def test_inspect_shows_the_conv_rank_and_warns_only_about_misread_alphas(sd15_run, tmp_path, capsys):
    path = sd15_run[0].adapter_paths[0]
    report = inspect_adapter(path)
    assert (report["conv_ranks"], report["conv_alphas"]) == ({"2": 26}, {"1.0": 26})
    assert report["warnings"] == []  # convs with their own alpha load right everywhere
    assert main(["inspect", str(path)]) == 0
    assert "conv rank   2 (all 26 modules), alpha 1.0 (LoCon" in capsys.readouterr().out
    # Attention layers whose alpha is not the most common one are what diffusers misreads.
    adapter = read_adapter(path)
    for _, module_path, module in adapter.items():
        if not any(module_path.endswith(t) for t in ("to_q", "to_k", "to_v", "to_out.0")):
            module.alpha = 3.0
    odd = inspect_adapter(write_adapter(tmp_path / "odd.safetensors", adapter, dtype=None))["warnings"]
    assert len(odd) == 1 and odd[0].startswith("unet: 56 attention module(s) have an alpha other than")


@pytest.mark.parametrize("variant,index", [("sd15", 0), ("sd15", 1), ("sdxl", 0)],
                         ids=["sd15-kohya", "sd15-diffusers", "sdxl-kohya"])
def test_locon_file_loads_in_diffusers_with_the_trained_outputs(variant, index, request):
    result, x, trained = request.getfixturevalue(f"{variant}_run")
    path = result.adapter_paths[index]
    if variant == "sdxl":  # kohya's LDM names for a resnet conv, a downsampler and an upsampler
        keys = set(load_adapter(path)[0])
        assert {"lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight", "lora_unet_input_blocks_3_0_op.alpha",
                "lora_unet_output_blocks_2_2_conv.lora_up.weight"} <= keys
    pipe = load_pipeline(request.getfixturevalue(f"tiny_{variant}"), variant)
    base = outputs(pipe, x)
    assert (base["unet"] - trained["unet"]).abs().max() > 1e-3  # the adapter does something
    pipe.load_lora_weights(str(path), adapter_name="locon")
    assert_outputs_close(outputs(pipe, x), trained, atol=1e-5)


def test_our_inference_stacks_and_merges_a_locon_file(sd15_run, tiny_sd15):
    from lora_trainer.inference.adapters import AdapterSpec, AdapterStack

    result, x, trained = sd15_run
    pipe = load_pipeline(tiny_sd15, "sd15")
    base = outputs(pipe, x)
    stack = AdapterStack(pipe)
    kohya = stack.load(AdapterSpec(result.adapter_paths[0]), name="kohya")
    assert_outputs_close(outputs(pipe, x), trained, atol=1e-5)
    # The same adapter in the other layout at weight -1 cancels it: stacking adds ΔWs.
    stack.load(AdapterSpec(result.adapter_paths[1], -1.0), name="minus")
    assert_outputs_close(outputs(pipe, x), base, atol=1e-5)
    stack.set_enabled("minus", False)
    stack.set_weight(kohya, 0.5)
    half = outputs(pipe, x)
    assert (half["unet"] - trained["unet"]).abs().max() > 1e-4
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    stack.merge()
    assert_outputs_close(outputs(pipe, x), half, atol=1e-5)
    stack.unmerge()
    assert all(torch.equal(p, before[n]) for n, p in pipe.unet.named_parameters())


def test_convert_round_trip_is_exact_and_resize_keeps_the_output(sd15_run, tiny_sd15, tmp_path):
    result, x, trained = sd15_run
    kohya = result.adapter_paths[0]
    assert main(["convert", str(kohya), str(tmp_path / "d.safetensors"), "--to", "diffusers"]) == 0
    assert main(["convert", str(tmp_path / "d.safetensors"), str(tmp_path / "k.safetensors"), "--to", "kohya"]) == 0
    (a, meta_a), (b, meta_b) = load_adapter(kohya), load_adapter(tmp_path / "k.safetensors")
    assert safetensors.torch.save(a) == safetensors.torch.save(b) and meta_a == meta_b

    source = read_adapter(kohya)
    pipe = load_pipeline(tiny_sd15, "sd15")
    base = outputs(pipe, x)["unet"]
    errors = {}
    for rank, conv_rank in ((RANK, CONV_RANK), (2, 1)):
        resized, report = resize_adapter(source, rank, conv_rank=conv_rank)
        assert {m.rank for c, p, m in resized.items() if m.is_conv and m.down.shape[2:] == (3, 3)} == {conv_rank}
        path = write_adapter(tmp_path / f"r{rank}.safetensors", resized, dtype=torch.float32)
        pipe.load_lora_weights(str(path), adapter_name=f"r{rank}")
        pipe.set_adapters([f"r{rank}"])
        errors[rank] = (outputs(pipe, x)["unet"] - trained["unet"]).abs().max().item()
    effect = (trained["unet"] - base).abs().max().item()
    assert errors[RANK] < 1e-5  # same ranks: the SVD keeps everything
    assert 1e-6 < errors[2] < 0.5 * effect  # lower ranks: close, not equal


def test_init_from_a_locon_file_starts_where_it_ended(sd15_run, tiny_sd15):
    from lora_trainer.models.lora import inject_lora
    from lora_trainer.training.init_adapter import load_initial_adapter, read_initial_adapter

    result, x, trained = sd15_run
    path = str(result.adapter_paths[0])
    with pytest.raises(ConfigError, match="3x3 convs .*rank 2 but lora.conv_rank is 0; set lora.conv_rank=2"):
        read_initial_adapter(path, "sd15", True, RANK)
    adapter = read_initial_adapter(path, "sd15", True, RANK, conv_rank=CONV_RANK)
    pipe = load_pipeline(tiny_sd15, "sd15")
    # Other alphas than the file's: the factors are rescaled per layer to give the file's ΔW.
    inject_lora(pipe.unet, KOHYA_UNET_TARGETS, RANK, 1.0, 0.0, "lora.unet_targets", conv_rank=CONV_RANK, conv_alpha=4.0)
    inject_lora(pipe.text_encoder, ["q_proj", "k_proj", "v_proj", "out_proj"], RANK, 1.0, 0.0, "k")
    assert load_initial_adapter(adapter, {"unet": pipe.unet, "text_encoder": pipe.text_encoder}, path) == \
        sum(len(m) for m in adapter.modules.values())
    assert_outputs_close(outputs(pipe, x), trained, atol=1e-5)


def test_dora_locon_files_give_the_trained_outputs(tiny_sd15, example_data, tmp_path):
    from lora_trainer.inference.adapters import AdapterSpec, AdapterStack

    result = _run(tiny_sd15, example_data, tmp_path / "dora", "lora.use_dora=true")
    x, trained = _trained_outputs(result, "sd15")
    conv = "down_blocks.0.resnets.0.conv1"
    kohya, _ = load_adapter(result.adapter_paths[0])
    diffusers, _ = load_adapter(result.adapter_paths[1])
    assert kohya[f"lora_unet_{conv.replace('.', '_')}.dora_scale"].shape == (32, 1, 1, 1)  # LyCORIS wd_on_out
    assert diffusers[f"unet.{conv}.lora_magnitude_vector"].shape == (1, 32, 1, 1)  # peft's conv shape
    direct = load_pipeline(tiny_sd15, "sd15")
    direct.load_lora_weights(str(result.adapter_paths[1]))
    assert_outputs_close(outputs(direct, x), trained, atol=1e-5)
    for path in result.adapter_paths:
        pipe = load_pipeline(tiny_sd15, "sd15")
        AdapterStack(pipe).load(AdapterSpec(path), name="dora")
        assert_outputs_close(outputs(pipe, x), trained, atol=1e-5)


def test_conv_keys_are_checked(tiny_sd15, example_data, tmp_path):
    for bad, key in (("lora.conv_rank=-1", "lora.conv_rank"), ("lora.conv_alpha=4", "lora.conv_alpha: got 4.0 with")):
        with pytest.raises(ConfigError, match=key):
            run_config(tiny_sd15, example_data, tmp_path, bad)
    cfg = run_config(tiny_sd15, example_data, tmp_path, "lora.conv_rank=8")
    assert (cfg.lora.conv_rank, cfg.conv_alpha) == (8, 8.0) and run_config(tiny_sd15, example_data, tmp_path).lora.conv_rank == 0


def test_from_kohya_maps_conv_dim_with_kohyas_default_conv_alpha():
    args = {"pretrained_model_name_or_path": "base", "train_data_dir": "img", "network_dim": 16,
            "network_alpha": 8, "network_args": ["conv_dim=8", "dropout=0.1"], "_script": "train_network.py"}
    cfg, notes = config_from_kohya(args)
    assert (cfg["lora"]["conv_rank"], cfg["lora"]["conv_alpha"]) == (8, 1.0)
    assert any("conv_alpha not given: kohya's default 1" in n for n in notes)
    assert any(n.startswith("--network_args dropout=0.1") for n in notes) and not any(n.startswith("--network_args conv_dim") for n in notes)
    cfg, notes = config_from_kohya({**args, "network_args": ["conv_dim=8", "conv_alpha=0"]})
    assert cfg["lora"]["conv_alpha"] == 8.0  # kohya: alpha 0 means alpha = dim
    cfg, notes = config_from_kohya({**args, "network_args": ["conv_alpha=4"]})
    assert "conv_rank" not in cfg["lora"] and any("without conv_dim" in n for n in notes)


def test_network_args_hold_locon_and_loraplus_together():
    from lora_trainer.config import config_from_dict
    from lora_trainer.training.outputs import _network_args

    cfg = config_from_dict({"model": {"base": "m"}, "data": {"path": "d"}, "train": {"max_steps": 1,
                            "loraplus_lr_ratio": 16, "loraplus_text_encoder_lr_ratio": 4},
                            "lora": {"conv_rank": 2, "conv_alpha": 1}})
    assert _network_args(cfg) == {"conv_dim": "2", "conv_alpha": "1", "loraplus_lr_ratio": "16",
                                  "loraplus_text_encoder_lr_ratio": "4"}
    plain = config_from_dict({"model": {"base": "m"}, "data": {"path": "d"}, "train": {"max_steps": 1}})
    assert _network_args(plain) == {}
