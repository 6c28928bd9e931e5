"""Adapter files with conv (LoCon) and text-encoder modules, SD1.5 and SDXL: they load in diffusers
with the same effect as the in-memory adapter, convert between layouts without changing a byte of
tensor data, and hand-written kohya files apply to the modules and with the scale the spec says."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from locon_helpers import ALPHA, RANK, adapted, assert_outputs_close, layer, load_pipeline, outputs, text_encoders

from lora_trainer.cli import main
from lora_trainer.errors import ModelError
from lora_trainer.export.adapter import read_adapter
from lora_trainer.export.files import load_adapter, save_adapter
from lora_trainer.export.metadata import kohya_metadata


@pytest.fixture(scope="module")
def sd15(tiny_sd15):
    return adapted(tiny_sd15, "sd15")


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl):
    return adapted(tiny_sdxl, "sdxl")


@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
@pytest.mark.parametrize("variant", ["sd15", "sdxl"])
def test_locon_file_loads_in_diffusers_like_the_adapter(variant, layout, request, tmp_path):
    trained = request.getfixturevalue(variant)
    path = save_adapter(tmp_path / "a.safetensors", trained.states, RANK, ALPHA, layout=layout,
                        dtype=torch.float32, base=variant)
    adapter = read_adapter(path)
    assert (adapter.layout, adapter.base) == (layout, variant)
    assert any(m.is_conv and m.down.shape[2:] == (3, 3) for m in adapter.modules["unet"].values())
    assert adapter.modules.keys() == trained.states.keys()
    if variant == "sdxl" and layout == "kohya":  # kohya's SDXL (LDM) names for resnets, samplers, conv_in
        tensors, _ = load_adapter(path)
        for name in ("input_blocks_1_0_in_layers_2", "input_blocks_7_0_skip_connection", "input_blocks_3_0_op",
                     "output_blocks_2_2_conv", "middle_block_2_emb_layers_1", "input_blocks_0_0"):
            assert f"lora_unet_{name}.lora_down.weight" in tensors
        assert any(k.startswith("lora_te2_text_model_encoder_layers_1_mlp_fc2") for k in tensors)

    pipe = load_pipeline(trained.model_dir, variant)
    pipe.load_lora_weights(str(path), adapter_name="file")
    assert_outputs_close(outputs(pipe, trained.x), trained.out)


@pytest.mark.parametrize("variant", ["sd15", "sdxl"])
def test_kohya_to_diffusers_to_kohya_is_byte_identical(variant, request, tmp_path, capsys):
    trained = request.getfixturevalue(variant)
    # Per-module alphas and fp16 tensors must both survive the trip.
    alphas = {c: {k.rsplit(".lora_", 1)[0]: (2.0 if i % 5 == 0 else ALPHA) for i, k in enumerate(sorted(s))}
              for c, s in trained.states.items()}
    version = "sdxl_base_v1-0" if variant == "sdxl" else "sd_v1"
    metadata = kohya_metadata(rank=RANK, alpha=ALPHA, base_model_version=version, trigger_phrase="sks style",
                              tag_frequency={"data": {"sks style": 3}})
    first = save_adapter(tmp_path / "k.safetensors", trained.states, RANK, alphas, metadata=metadata, base=variant)
    assert main(["convert", str(first), str(tmp_path / "d.safetensors"), "--to", "diffusers"]) == 0
    assert main(["convert", str(tmp_path / "d.safetensors"), str(tmp_path / "k2.safetensors"), "--to", "kohya"]) == 0
    assert "k2.safetensors (kohya layout)" in capsys.readouterr().out

    (a, meta_a), (b, meta_b) = load_adapter(first), load_adapter(tmp_path / "k2.safetensors")
    assert safetensors.torch.save(a) == safetensors.torch.save(b)
    assert {k: v for k, v in meta_a.items()} == meta_b  # same ss_*/modelspec keys, so the same hashes
    middle, meta_d = load_adapter(tmp_path / "d.safetensors")
    assert all(t.dtype == torch.float16 for t in middle.values())
    assert "sshs_model_hash" not in meta_d and meta_d["modelspec.trigger_phrase"] == "sks style"


# Hand-written from LORA_FORMATS.md: (kohya name, diffusers component, module path, rank). One alpha
# for the file with different ranks, so every module has its own scale alpha / r. Text encoders with
# attention modules include an out_proj: diffusers 0.42 recognises kohya text-encoder keys by it
# (see `inspect`'s warning).
HAND_ALPHA = 3.0
HAND = {
    "sd15": [
        ("lora_unet_down_blocks_0_resnets_0_conv1", "unet", "down_blocks.0.resnets.0.conv1", 2),
        ("lora_unet_down_blocks_0_downsamplers_0_conv", "unet", "down_blocks.0.downsamplers.0.conv", 3),
        ("lora_unet_up_blocks_0_upsamplers_0_conv", "unet", "up_blocks.0.upsamplers.0.conv", 1),
        ("lora_unet_up_blocks_1_resnets_0_conv_shortcut", "unet", "up_blocks.1.resnets.0.conv_shortcut", 4),
        ("lora_unet_mid_block_resnets_0_time_emb_proj", "unet", "mid_block.resnets.0.time_emb_proj", 2),
        ("lora_unet_down_blocks_0_attentions_0_proj_in", "unet", "down_blocks.0.attentions.0.proj_in", 3),
        ("lora_unet_up_blocks_2_attentions_1_transformer_blocks_0_attn1_to_v", "unet",
         "up_blocks.2.attentions.1.transformer_blocks.0.attn1.to_v", 2),
        ("lora_te_text_model_encoder_layers_0_mlp_fc1", "text_encoder", "text_model.encoder.layers.0.mlp.fc1", 2),
        ("lora_te_text_model_encoder_layers_1_self_attn_k_proj", "text_encoder",
         "text_model.encoder.layers.1.self_attn.k_proj", 1),
        ("lora_te_text_model_encoder_layers_1_self_attn_out_proj", "text_encoder",
         "text_model.encoder.layers.1.self_attn.out_proj", 3),
    ],
    "sdxl": [
        ("lora_unet_input_blocks_4_0_in_layers_2", "unet", "down_blocks.1.resnets.0.conv1", 2),
        ("lora_unet_input_blocks_7_0_skip_connection", "unet", "down_blocks.2.resnets.0.conv_shortcut", 3),
        ("lora_unet_input_blocks_3_0_op", "unet", "down_blocks.0.downsamplers.0.conv", 1),
        ("lora_unet_output_blocks_2_2_conv", "unet", "up_blocks.0.upsamplers.0.conv", 2),
        ("lora_unet_output_blocks_5_0_out_layers_3", "unet", "up_blocks.1.resnets.2.conv2", 4),
        ("lora_unet_middle_block_2_emb_layers_1", "unet", "mid_block.resnets.1.time_emb_proj", 2),
        ("lora_unet_output_blocks_4_1_transformer_blocks_0_attn2_to_k", "unet",
         "up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k", 3),
        ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "text_encoder",
         "text_model.encoder.layers.0.self_attn.q_proj", 2),
        ("lora_te1_text_model_encoder_layers_0_self_attn_out_proj", "text_encoder",
         "text_model.encoder.layers.0.self_attn.out_proj", 1),
        ("lora_te2_text_model_encoder_layers_1_mlp_fc2", "text_encoder_2", "text_model.encoder.layers.1.mlp.fc2", 1),
    ],
}


@pytest.mark.parametrize("variant", ["sd15", "sdxl"])
def test_hand_written_kohya_locon_file_applies_to_the_right_modules(variant, request, tmp_path):
    model_dir = request.getfixturevalue(f"tiny_{variant}")
    pipe = load_pipeline(model_dir, variant)
    g = torch.Generator().manual_seed(3)
    tensors, expected = {}, {}
    for name, component, path, rank in HAND[variant]:
        weight = layer(pipe, component, path).weight.detach().clone()
        d_out, d_in = weight.shape[:2]
        kernel = weight.shape[2:]  # () for linear layers; up is 1x1 for convs
        down = torch.randn(rank, d_in, *kernel, generator=g)
        up = torch.randn(d_out, rank, *([1, 1] if kernel else []), generator=g)
        tensors |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                    f"{name}.alpha": torch.tensor(HAND_ALPHA)}
        delta = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape) * HAND_ALPHA / rank
        expected[(component, path)] = (weight, delta)
    path = tmp_path / "hand.safetensors"
    safetensors.torch.save_file(tensors, str(path))

    adapter = read_adapter(path)  # our reader agrees with the spec ...
    assert adapter.base == variant
    assert {(c, p) for c, p, _ in adapter.items()} == set(expected)
    for component, p, module in adapter.items():
        torch.testing.assert_close(module.delta(), expected[(component, p)][1])

    untouched = layer(pipe, "unet", "down_blocks.1.resnets.0.conv2").weight.detach().clone()
    pipe.load_lora_weights(str(path), adapter_name="hand")  # ... and so does diffusers
    pipe.fuse_lora(components=["unet", *text_encoders(pipe)], lora_scale=0.5, adapter_names=["hand"])
    for (component, p), (weight, delta) in expected.items():
        torch.testing.assert_close(layer(pipe, component, p).weight.detach(), weight + 0.5 * delta,
                                   rtol=1e-5, atol=1e-5, msg=f"{component}.{p}")
    assert torch.equal(layer(pipe, "unet", "down_blocks.1.resnets.0.conv2").weight, untouched)


def _save_raw(path, tensors, metadata=None):
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def test_base_is_told_from_keys_metadata_or_unet_structure(tmp_path):
    pair = lambda prefix, d=8: {f"{prefix}.lora_A.weight": torch.ones(2, d), f"{prefix}.lora_B.weight": torch.ones(d, 2)}  # noqa: E731
    kpair = lambda name: {f"{name}.lora_down.weight": torch.ones(2, 8), f"{name}.lora_up.weight": torch.ones(8, 2)}  # noqa: E731
    attn = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    cases = [
        (kpair("lora_te1_text_model_encoder_layers_0_mlp_fc1"), None, "sdxl"),
        (kpair("lora_unet_" + attn.replace(".", "_")), {"ss_base_model_version": "sd_v1"}, "sd15"),
        (kpair("lora_unet_" + attn.replace(".", "_")), {"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}, "sdxl"),
        (pair("unet.up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"), None, "sdxl"),
        (pair("unet.down_blocks.0.attentions.0.proj_in"), None, "sd15"),
        (pair("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", 2048), None, "sdxl"),
    ]
    for i, (tensors, metadata, base) in enumerate(cases):
        assert read_adapter(_save_raw(tmp_path / f"{i}.safetensors", tensors, metadata)).base == base, i
    ambiguous = _save_raw(tmp_path / "x.safetensors", pair("unet." + attn))
    with pytest.raises(ModelError, match="--variant sdxl"):
        read_adapter(ambiguous)
    assert read_adapter(ambiguous, base="sdxl").base == "sdxl"


def test_unknown_keys_are_named_by_the_cli(tmp_path, capsys):
    good = {"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.ones(2, 8),
            "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.ones(8, 2)}
    odd = {**good, "lora_unet_mid_block_attentions_0_proj_out.hada_w1_a": torch.ones(2, 2)}
    assert main(["inspect", str(_save_raw(tmp_path / "loha.safetensors", odd))]) == 2
    err = capsys.readouterr().err
    # a LyCORIS part: the file is read as LyCORIS, and the half LoHa module is named
    assert "lora_unet_mid_block_attentions_0_proj_out is a LoHa module without hada_w1_b" in err and err.count("\n") == 1
    biased = {"unet.mid_block.attentions.0.proj_in.lora_A.weight": torch.ones(2, 8),
              "unet.mid_block.attentions.0.proj_in.lora_B.weight": torch.ones(8, 2),
              "unet.mid_block.attentions.0.proj_in.lora_B.bias": torch.ones(8)}
    assert main(["convert", str(_save_raw(tmp_path / "bias.safetensors", biased)), str(tmp_path / "o.safetensors"),
                 "--to", "kohya"]) == 2
    assert "unet.mid_block.attentions.0.proj_in.lora_B.bias" in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists()


def test_inspect_reports_modules_ranks_alphas_size_and_hash(sdxl, tmp_path, capsys):
    metadata = kohya_metadata(rank=RANK, alpha=ALPHA, base_model_version="sdxl_base_v1-0", trigger_phrase="sks")
    path = save_adapter(tmp_path / "x.safetensors", sdxl.states, RANK, ALPHA, metadata=metadata, base="sdxl")
    assert main(["inspect", "--json", str(path)]) == 0
    report = json.loads(capsys.readouterr().out)
    n = {c: len(s) // 2 for c, s in sdxl.states.items()}
    assert (report["layout"], report["base"]) == ("kohya", "sdxl")
    assert {c: v["modules"] for c, v in report["components"].items()} == n
    assert report["components"]["unet"]["kinds"]["conv 3x3"] > 0
    assert report["ranks"] == {str(RANK): sum(n.values())} and report["alphas"] == {str(ALPHA): sum(n.values())}
    assert report["parameters"] == sum(t.numel() for s in sdxl.states.values() for t in s.values())
    assert report["size_bytes"] == path.stat().st_size and report["dtypes"] == {"float16": 2 * sum(n.values())}
    assert report["hash_matches"] and report["metadata"]["modelspec.trigger_phrase"] == "sks"

    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "layout      kohya" in text and f"rank        {RANK} (all {sum(n.values())} modules)" in text
    assert "sshs_model_hash" in text and "matches the tensors" in text

    tensors, meta = load_adapter(path)  # a file edited after hashing is flagged
    tensors["lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] *= 2
    stale = _save_raw(tmp_path / "stale.safetensors", tensors, meta)
    assert main(["inspect", "--json", str(stale)]) == 0
    assert json.loads(capsys.readouterr().out)["hash_matches"] is False


def test_convert_casts_dtype_and_never_overwrites_without_asking(sd15, tmp_path, capsys):
    src = save_adapter(tmp_path / "k.safetensors", sd15.states, RANK, ALPHA, dtype=torch.float32)
    out = tmp_path / "d.safetensors"
    out.write_bytes(b"mine")
    assert main(["convert", str(src), str(out), "--to", "diffusers"]) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == b"mine"
    assert main(["convert", str(src), str(out), "--to", "diffusers", "--dtype", "bf16", "--overwrite"]) == 0
    tensors, _ = load_adapter(out)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert main(["convert", str(out), str(tmp_path / "k2.safetensors"), "--to", "kohya"]) == 0
    back, _ = load_adapter(tmp_path / "k2.safetensors")
    assert {t.dtype for k, t in back.items() if not k.endswith(".alpha")} == {torch.bfloat16}
    assert {t.dtype for k, t in back.items() if k.endswith(".alpha")} == {torch.float32}


def test_wrong_inputs_and_outputs_of_the_tools_are_one_line_and_write_nothing(tmp_path, capsys):
    good = {"lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.ones(2, 8),
            "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.ones(8, 2)}
    src = _save_raw(tmp_path / "in.safetensors", good)
    folder = tmp_path / "diffusers-folder"
    folder.mkdir()
    _save_raw(folder / "pytorch_lora_weights.safetensors", good)
    (tmp_path / "old.ckpt").write_bytes(b"\x80\x02}q\x00.")  # a pickle
    (tmp_path / "taken.safetensors").mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())

    cases = [
        (["inspect", str(folder)], "is a folder; give the adapter's .safetensors file (it holds pytorch_lora_weights"),
        (["convert", str(tmp_path / "old.ckpt"), str(tmp_path / "o.safetensors"), "--to", "kohya"], "is a pickle (.ckpt)"),
        (["convert", str(src), str(tmp_path / "o.ckpt"), "--to", "kohya"], "adapter files end in .safetensors"),
        (["convert", str(src), str(tmp_path / "taken.safetensors"), "--to", "diffusers", "--overwrite"], "is a folder"),
        (["resize", str(src), str(tmp_path / "o.safetensors"), "--rank", "0"], "--rank 0: expected an integer >= 1"),
        (["merge-loras", str(src), "--out", str(tmp_path / "o.safetensors"), "--conv-rank", "2"], "--conv-rank needs --rank"),
        (["inspect", str(_save_raw(tmp_path / "weights.safetensors", {"conv_in.weight": torch.ones(2, 2)}))],
         "weights.safetensors: keys of neither"),
        # --variant is for files whose base cannot be told; one that contradicts the file is refused
        (["convert", str(_save_raw(tmp_path / "v1.safetensors", good, {"ss_base_model_version": "sd_v1"})),
          str(tmp_path / "o.safetensors"), "--to", "diffusers", "--variant", "sdxl"],
         "--variant sdxl: " + str(tmp_path / "v1.safetensors") + " is an sd15 adapter (told by: metadata)"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert needle in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before + ["weights.safetensors", "v1.safetensors"])
    assert main(["convert", str(src), str(tmp_path / "o.safetensors"), "--to", "diffusers", "--variant", "sd15"]) == 0
