"""LyCORIS files under LyCORIS' own `lycoris_` prefix (its network wrapper, as SimpleTuner writes
them: UNet layers in diffusers spelling) load as the same layers as `lora_unet_` names do, and
`merge-loras` takes LyCORIS inputs: their ΔW joins the merged LoRA exactly (or by SVD with --rank)."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
from lycoris_helpers import get_layer, merge_by_hand, module_tensors, write_lycoris

from lora_trainer.cli import main
from lora_trainer.errors import ModelError
from lora_trainer.export.adapter import read_adapter
from lora_trainer.export.lycoris import read_lycoris
from lora_trainer.inference.generate import Generator
from lora_trainer.inference.pipelines import load_base

B = "down_blocks.1"
T = f"{B}.attentions.0.transformer_blocks.0"
UNET_LAYERS = [(f"{T}.attn1.to_q", "loha"), (f"{B}.resnets.0.conv1", "lokr"), (f"{T}.attn1.to_out.0", "full_nobias"),
               (f"{T}.attn2.to_k", "lora"), ("mid_block.resnets.1.conv1", "locon_cp")]


@torch.no_grad()
def _outputs(pipe) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    latents, hidden = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 8, pipe.unet.config.cross_attention_dim,
                                                                         generator=g)
    ids = torch.randint(0, 400, (1, 8), generator=g)
    return {"unet": pipe.unet(latents, torch.tensor([10]), hidden).sample,
            "text_encoder": pipe.text_encoder(ids).last_hidden_state}


def _close(got, want, atol=2e-5):
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=atol, msg=lambda m: f"{k}: {m}")


@pytest.fixture(scope="module")
def base(tiny_sd15):
    pipe, _ = load_base(str(tiny_sd15), "cpu", torch.float32)
    return pipe


def _write_lycoris_prefixed(pipe, out, layers, seed=0):
    """`lycoris_<diffusers path>` keys, as LyCORIS' wrapper names the layers of the UNet it wraps;
    returns the hand-computed reference merge_by_hand takes."""
    g = torch.Generator().manual_seed(seed)
    tensors, reference = {}, {}
    for path, kind in layers:
        parts, delta, bias = module_tensors(kind, get_layer(pipe, "unet", path).weight.detach(), g)
        for part, tensor in parts.items():
            tensors[f"lycoris_{path.replace('.', '_')}.{part}"] = tensor.float() if tensor.is_floating_point() else tensor
        reference[("unet", path)] = (delta, bias, None)
    safetensors.torch.save_file(tensors, str(out))
    return reference


def test_lycoris_prefix_names_the_unet_layers_in_diffusers_spelling(base, tiny_sd15, tmp_path, capsys):
    path = tmp_path / "simpletuner.safetensors"
    reference = _write_lycoris_prefixed(base, path, UNET_LAYERS, seed=1)
    adapter = read_lycoris(path, base="sd15")  # the tiny UNet's layout does not tell SD 1.x from SDXL
    assert set(adapter.modules) == {"unet"}
    assert sorted(adapter.modules["unet"]) == sorted(p for p, _ in UNET_LAYERS)

    by_hand = Generator(tiny_sd15, device="cpu")
    before = _outputs(by_hand.pipe)
    merge_by_hand(by_hand.pipe, reference, 0.7)
    want = _outputs(by_hand.pipe)
    assert (want["unet"] - before["unet"]).abs().max() > 1e-3
    gen = Generator(tiny_sd15, [f"{path}:0.7"], device="cpu")
    _close(_outputs(gen.pipe), want)

    assert main(["inspect", str(path), "--variant", "sd15"]) == 0
    assert "LyCORIS" in capsys.readouterr().out


def test_a_plain_lora_under_the_lycoris_prefix_loads_too(base, tiny_sd15, tmp_path):
    path = tmp_path / "locon.safetensors"
    reference = _write_lycoris_prefixed(base, path, [(f"{T}.attn1.to_v", "lora"), (f"{B}.resnets.0.conv2", "lora")],
                                        seed=2)
    by_hand = Generator(tiny_sd15, device="cpu")
    merge_by_hand(by_hand.pipe, reference, 1.0)
    _close(_outputs(Generator(tiny_sd15, [str(path)], device="cpu").pipe), _outputs(by_hand.pipe))


def test_text_encoder_names_under_the_lycoris_prefix_load_on_sd15_and_are_refused_on_sdxl(base, tiny_sd15, tmp_path):
    # LyCORIS' wrapper around a CLIP text encoder names its layers lycoris_text_model_...
    g = torch.Generator().manual_seed(5)
    layers = [("encoder.layers.0.self_attn.q_proj", "loha"), ("encoder.layers.1.mlp.fc1", "lora")]
    tensors, reference = {}, {}
    for layer, kind in layers:
        parts, delta, bias = module_tensors(kind, get_layer(base, "text_encoder", layer).weight.detach(), g)
        tensors.update({f"lycoris_text_model_{layer.replace('.', '_')}.{k}": v.float() for k, v in parts.items()})
        reference[("text_encoder", layer)] = (delta, bias, None)
    path = tmp_path / "te.safetensors"
    safetensors.torch.save_file(tensors, str(path))
    adapter = read_lycoris(path, base="sd15")
    assert sorted(adapter.modules["text_encoder"]) == [f"text_model.{p}" for p, _ in layers]

    by_hand = Generator(tiny_sd15, device="cpu")
    merge_by_hand(by_hand.pipe, reference, 0.5)
    want = _outputs(by_hand.pipe)
    gen = Generator(tiny_sd15, [f"{path}:0.5"], device="cpu")
    _close(_outputs(gen.pipe), want)
    assert (want["text_encoder"] - _outputs(Generator(tiny_sd15, device="cpu").pipe)["text_encoder"]).abs().max() > 1e-3

    with pytest.raises(ModelError, match=r"cannot tell SDXL's two text encoders apart; rename its keys to lora_te1_") as err:
        read_lycoris(path, base="sdxl")
    assert str(path) in str(err.value) and "lycoris_text_model_encoder_layers_0" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def loha_file(base, tmp_path_factory):
    path = tmp_path_factory.mktemp("lyco") / "loha.safetensors"
    layers = [("unet", p, kind) for p, kind in UNET_LAYERS] + [("text_encoder", "encoder.layers.1.mlp.fc1", "lokr"),
                                                               ("text_encoder", "encoder.layers.0.self_attn.q_proj", "loha")]
    write_lycoris(base, "sd15", path, layers, seed=3)
    return path


def test_merge_loras_takes_a_lycoris_input_exactly(loha_file, tiny_sd15, random_adapters, tmp_path, capsys):
    merged = tmp_path / "merged.safetensors"
    assert main(["merge-loras", f"{loha_file}:0.6", f"{random_adapters['a']}:-0.5", "--out", str(merged),
                 "--dtype", "fp32"]) == 0
    assert "wrote" in capsys.readouterr().out
    lora = read_adapter(merged)  # a plain LoRA file
    assert lora.layout == "kohya" and lora.base == "sd15"
    stacked = Generator(tiny_sd15, [f"{loha_file}:0.6", f"{random_adapters['a']}:-0.5"], device="cpu")
    base_out = _outputs(Generator(tiny_sd15, device="cpu").pipe)
    want = _outputs(stacked.pipe)
    got = _outputs(Generator(tiny_sd15, [str(merged)], device="cpu").pipe)
    assert all((want[k] - base_out[k]).abs().max() > 1e-3 for k in want)
    _close(got, want, atol=1e-4)

    # with --rank: the best rank-2 LoRA, its kept norm reported
    low = tmp_path / "low.safetensors"
    assert main(["merge-loras", f"{loha_file}:0.6", f"{random_adapters['a']}:-0.5", "--out", str(low),
                 "--rank", "2", "--dtype", "fp32"]) == 0
    kept = float(capsys.readouterr().out.split("retained Frobenius norm ")[1].split("%")[0])
    assert 10 < kept < 99.9
    assert {m.rank for _, _, m in read_adapter(low).items()} == {2}


def test_merge_loras_refuses_lycoris_modules_that_depend_on_the_base(base, tmp_path, capsys):
    path = tmp_path / "ia3.safetensors"
    write_lycoris(base, "sd15", path, [("unet", f"{T}.attn1.to_q", "loha"), ("unet", f"{B}.attentions.0.proj_in", "ia3")])
    out = tmp_path / "out.safetensors"
    assert main(["merge-loras", f"{path}:0.5", "--out", str(out), "--variant", "sd15"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and str(path) in err[0] and "is (IA)^3" in err[0]
    assert not out.exists()


def test_convert_refuses_a_lycoris_file_and_names_resize(loha_file, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    assert main(["convert", str(loha_file), str(out), "--to", "diffusers"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert err.startswith(f"error: {loha_file}: a LyCORIS file (") and "LoHa" in err
    assert f"`lora-trainer resize {loha_file} OUT.safetensors --rank R --to diffusers`" in err
    assert not out.exists()


@pytest.mark.parametrize("kind, shown", [("boft", "BOFT"), ("kohya_oft", "OFT"), ("glora", "GLoRA"), ("norm", "norm")])
def test_convert_refuses_a_base_dependent_lycoris_file_naming_it_and_merge(base, tmp_path, capsys,
                                                                             kind, shown):
    # kohya's own OFT file (oft_unet_ names) was refused as "keys of neither layout", a BOFT one as
    # "OFT", and neither named the file nor pointed to resize's alternative that does not apply to them
    from lycoris_ortho_helpers import write_ortho

    src = tmp_path / f"{kind}.safetensors"
    layer = "down_blocks.0.attentions.0.transformer_blocks.0." + ("norm1" if kind == "norm" else "attn1.to_q")
    write_ortho(base, "sd15", src, [("unet", layer, kind)], kohya_oft=kind == "kohya_oft")
    out = tmp_path / "out.safetensors"
    assert main(["convert", str(src), str(out), "--to", "kohya"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {src}: a LyCORIS file ({shown} 1) and convert rewrites LoRA files only")
    assert "\n" not in err
    assert err.endswith("load it with infer.py --lora, or bake it into the base with `lora-trainer merge`")
    assert not out.exists()
