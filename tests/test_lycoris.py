"""LyCORIS files (LoHa, LoKr, full, (IA)^3, CP cores, DoRA) in the kohya layout: each module's ΔW
equals the one computed by hand, `infer` merges them at their weight (alone or stacked with a LoRA)
exactly as adding weight·ΔW by hand does, reweighting/switching off restores the base bit for bit,
`merge` saves the merged model, `inspect` names the types, and bad files fail in one line."""

from __future__ import annotations

import logging

import pytest
import safetensors.torch
import torch
from lycoris_helpers import dora_merged, get_layer, kohya_name, merge_by_hand, write_lycoris

from lora_trainer.cli import main
from lora_trainer.errors import ModelError
from lora_trainer.export.lycoris import LycorisModule, read_lycoris
from lora_trainer.inference.adapters import AdapterSpec
from lora_trainer.inference.generate import Generator, Request
from lora_trainer.inference.pipelines import load_base

B = "down_blocks.1"
T = f"{B}.attentions.0.transformer_blocks.0"
# Every type and shape: linear, 1x1 conv (SD1.5 proj_in), 3x3 convs, with and without CP cores.
SD15_LAYERS = [
    ("unet", f"{T}.attn1.to_q", "loha"), ("unet", f"{B}.resnets.0.conv1", "loha"),
    ("unet", f"{B}.resnets.0.conv2", "loha_cp"), ("unet", f"{T}.attn1.to_k", "lokr"),
    ("unet", f"{B}.downsamplers.0.conv", "lokr"), ("unet", "mid_block.resnets.0.conv1", "lokr_cp"),
    ("unet", "mid_block.resnets.0.conv2", "lokr_full"), ("unet", f"{T}.attn1.to_v", "lokr_full"),
    ("unet", f"{T}.attn1.to_out.0", "full"), ("unet", f"{B}.attentions.0.proj_in", "ia3"),
    ("unet", "mid_block.resnets.1.conv1", "locon_cp"), ("unet", f"{T}.ff.net.2", "loha_dora"),
    ("unet", f"{T}.attn2.to_q", "lora"),
    ("text_encoder", "encoder.layers.0.self_attn.q_proj", "loha"),
    ("text_encoder", "encoder.layers.1.mlp.fc1", "lokr"), ("text_encoder", "encoder.layers.1.self_attn.out_proj", "full"),
]
# SDXL: LDM block names in the file, both text encoders, a conv and a second transformer block.
SDXL_LAYERS = [
    ("unet", f"{T}.attn1.to_q", "loha"), ("unet", f"{B}.resnets.1.conv2", "lokr"),
    ("unet", "mid_block.attentions.0.transformer_blocks.1.attn2.to_out.0", "full"),
    ("unet", "up_blocks.0.attentions.2.proj_out", "lokr_full"), ("unet", "up_blocks.1.resnets.0.conv1", "loha_cp"),
    ("text_encoder", "encoder.layers.0.self_attn.v_proj", "loha"),
    ("text_encoder_2", "encoder.layers.1.mlp.fc2", "lokr"), ("text_encoder_2", "encoder.layers.0.self_attn.k_proj", "ia3"),
]


def _inputs(pipe, sdxl: bool):
    g = torch.Generator().manual_seed(3)
    width = pipe.unet.config.cross_attention_dim
    extra = {}
    if sdxl:
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(1, 32, generator=g),
                                       "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}}
    return (torch.randn(1, 4, 8, 8, generator=g), torch.tensor([10]), torch.randn(1, 8, width, generator=g),
            torch.randint(0, 400, (1, 8), generator=g), extra)


@torch.no_grad()
def _outputs(pipe, sdxl: bool = False) -> dict[str, torch.Tensor]:
    latents, t, hidden, ids, extra = _inputs(pipe, sdxl)
    out = {"unet": pipe.unet(latents, t, hidden, **extra).sample}
    for name in ("text_encoder", "text_encoder_2"):
        if getattr(pipe, name, None) is not None:
            out[name] = getattr(pipe, name)(ids).last_hidden_state
    return out


def _close(got, want, atol=2e-5):
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=atol, msg=lambda m: f"{k}: {m}")


def _state(pipe):
    return {c: {k: v.clone() for k, v in getattr(pipe, c).state_dict().items() if "lora_" not in k}
            for c in ("unet", "text_encoder", "text_encoder_2") if getattr(pipe, c, None) is not None}


def _equal_states(a, b) -> bool:
    return all(torch.equal(a[c][k], b[c][k]) for c in a for k in a[c])


@pytest.fixture(scope="module")
def sd15(tiny_sd15, tmp_path_factory):
    """A fresh base, a LyCORIS file of every type for it, and the hand-computed ΔW per layer."""
    pipe, _ = load_base(str(tiny_sd15), "cpu", torch.float32)
    path = tmp_path_factory.mktemp("lycoris") / "every-type.safetensors"
    reference = write_lycoris(pipe, "sd15", path, SD15_LAYERS, seed=1)
    return pipe, path, reference


def test_every_module_type_gives_the_delta_w_computed_by_hand(sd15):
    pipe, path, reference = sd15
    adapter = read_lycoris(path)
    assert adapter.base == "sd15"
    assert adapter.kinds == {"IA3": 1, "LoHa": 5, "LoKr": 6, "LoRA": 2, "full": 2}
    modules = {m.name: m for _, _, m in adapter.items()}
    for (component, layer_path), (delta, bias, dora_scale) in reference.items():
        module = modules[kohya_name("sd15", component, layer_path)]
        weight = get_layer(pipe, component, layer_path).weight.detach()
        assert delta.abs().max() > 1e-3
        if dora_scale is None:
            torch.testing.assert_close(module.delta(weight), delta, rtol=1e-10, atol=1e-12)
        else:
            torch.testing.assert_close(module.merged(weight, 0.6), dora_merged(weight, delta, dora_scale, 0.6),
                                       rtol=1e-10, atol=1e-12)
        if bias is not None:
            torch.testing.assert_close(module.bias_delta(), bias)
    lokr_full = modules[kohya_name("sd15", "unet", f"{T}.attn1.to_v")]
    assert lokr_full.alpha == 2.0 and lokr_full.rank is None and lokr_full.scale == 1.0  # two whole factors: no alpha/r


@pytest.mark.parametrize("shape", [(6, 4), (6, 4, 3, 3)])
def test_ia3_on_the_input_axis_and_dora_on_the_output_axis(shape):
    from lora_trainer.export.lycoris import LycorisModule

    g = torch.Generator().manual_seed(7)
    weight = torch.randn(*shape, generator=g, dtype=torch.float64)
    gain = torch.randn(shape[1], generator=g, dtype=torch.float64)
    ia3 = LycorisModule("lora_unet_x", "IA3", {"weight": gain, "on_input": torch.tensor(1)})
    by_hand = weight.clone()
    for i in range(shape[1]):
        by_hand[:, i] *= 1 + 0.5 * gain[i]
    torch.testing.assert_close(ia3.merged(weight, 0.5), by_hand)

    diff = torch.randn(*shape, generator=g, dtype=torch.float64) * 0.1
    magnitude = torch.rand(shape[0], generator=g, dtype=torch.float64) + 0.5
    full = LycorisModule("lora_unet_x", "full", {"diff": diff}, dora_scale=magnitude.reshape(-1, *[1] * (len(shape) - 1)))
    combined = weight + diff
    rows = torch.stack([magnitude[o] * combined[o] / combined[o].norm() for o in range(shape[0])])
    torch.testing.assert_close(full.merged(weight, 0.3), weight + 0.3 * (rows - weight), rtol=1e-6, atol=1e-9)
    assert torch.equal(full.merged(weight, 0.0), weight)


def test_generator_merges_lycoris_exactly_as_by_hand_and_restores_the_base(sd15, tiny_sd15, caplog):
    _, path, reference = sd15
    by_hand, _ = load_base(str(tiny_sd15), "cpu", torch.float32)
    base_out = _outputs(by_hand)
    merge_by_hand(by_hand, reference, 0.7)
    want = _outputs(by_hand)
    assert all((want[k] - base_out[k]).abs().max() > 1e-3 for k in want)

    with caplog.at_level(logging.INFO, logger="lora_trainer.inference.adapters"):
        gen = Generator(tiny_sd15, [f"{path}:0.7"], device="cpu")
    assert "merged into the base weights of 16 layers at weight 0.7" in caplog.text
    _close(_outputs(gen.pipe), want)

    # images: the same latents as a plain base whose weights were changed by hand
    plain = Generator(tiny_sd15, device="cpu")
    merge_by_hand(plain.pipe, reference, 0.7)
    req = Request("a red cube", steps=2, width=32, height=32, seed=4)
    torch.testing.assert_close(gen.generate(req, output_type="latent")[0].image,
                               plain.generate(req, output_type="latent")[0].image, rtol=1e-5, atol=1e-5)
    assert gen.generate(req)[0].info.adapters[0][:2] == ("every-type", 0.7)

    fresh = Generator(tiny_sd15, device="cpu")
    base = _state(fresh.pipe)
    gen.set_weight("every-type", 0.0)  # weight 0 and off are the base, bit for bit
    assert _equal_states(_state(gen.pipe), base)
    gen.set_weight("every-type", 0.7)
    _close(_outputs(gen.pipe), want)
    gen.set_enabled("every-type", False)
    assert _equal_states(_state(gen.pipe), base)


def test_infer_command_draws_with_a_lycoris_file(sd15, tiny_sd15, tmp_path):
    from PIL import Image

    _, path, _ = sd15
    out = tmp_path / "img"
    assert main(["infer", "--model", str(tiny_sd15), "--lora", f"{path}:0.6", "--prompt", "a cube", "--steps", "2",
                 "--width", "32", "--height", "32", "--device", "cpu", "--out", str(out)]) == 0
    (png,) = out.glob("*.png")
    assert "<lora:every-type:0.6>" in Image.open(png).info["parameters"]


def check_stacked_with_a_lora(base, lora, path, reference, weight: float, reweight: str | None = None):
    """A LyCORIS file at `weight` stacked on a LoRA at 0.5 gives what its ΔW merged by hand gives, merged
    and unmerged (re-weighted while merged when `reweight` names it); unmerging is exact. Returns the
    generator and its outputs."""
    by_hand = Generator(base, [f"{lora}:0.5"], device="cpu")
    merge_by_hand(by_hand.pipe, reference, weight)
    want = _outputs(by_hand.pipe)
    gen = Generator(base, [f"{lora}:0.5", f"{path}:{weight}"], device="cpu")
    _close(_outputs(gen.pipe), want)
    before = _state(gen.pipe)
    gen.merge()
    _close(_outputs(gen.pipe), want)
    if reweight:
        gen.set_weight(reweight, 1.0)  # reweighting while merged: unmerge, rebuild, merge
        gen.set_weight(reweight, weight)
        _close(_outputs(gen.pipe), want)
    gen.unmerge()
    assert _equal_states(_state(gen.pipe), before)
    _close(_outputs(gen.pipe), want)
    return gen, want


def test_lycoris_stacks_with_a_lora_and_merge_unmerge_is_exact(sd15, tiny_sd15, random_adapters):
    _, path, reference = sd15
    gen, want = check_stacked_with_a_lora(tiny_sd15, random_adapters["a"], path, reference, -0.4, "every-type")

    # loaded the other way round (peft then wraps layers whose weights already hold ΔW): the same
    _close(_outputs(Generator(tiny_sd15, [f"{path}:-0.4", f"{random_adapters['a']}:0.5"], device="cpu").pipe), want)

    # the LoRA switched off leaves the LyCORIS part alone
    lyco_only = Generator(tiny_sd15, device="cpu")
    merge_by_hand(lyco_only.pipe, reference, -0.4)
    gen.set_enabled("a", False)
    _close(_outputs(gen.pipe), _outputs(lyco_only.pipe))


def test_changing_only_a_lora_rebuilds_no_lycoris_layer(sd15, tiny_sd15, random_adapters, monkeypatch):
    _, path, reference = sd15
    gen = Generator(tiny_sd15, [f"{random_adapters['a']}:0.5", f"{path}:-0.4"], device="cpu")
    rebuilt = []
    real = LycorisModule.merged
    monkeypatch.setattr(LycorisModule, "merged", lambda self, *a, **k: rebuilt.append(self.name) or real(self, *a, **k))
    gen.set_weight("a", 0.9)
    gen.set_enabled("a", False)
    assert rebuilt == []  # the LyCORIS layers already hold -0.4
    lyco_only = Generator(tiny_sd15, device="cpu")
    merge_by_hand(lyco_only.pipe, reference, -0.4)
    _close(_outputs(gen.pipe), _outputs(lyco_only.pipe))
    gen.set_weight("every-type", 1.0)  # its own weight: every layer it changes is rebuilt
    assert len(rebuilt) == len(reference)


def test_sdxl_lycoris_with_ldm_names_and_both_text_encoders(tiny_sdxl, tmp_path):
    pipe, _ = load_base(str(tiny_sdxl), "cpu", torch.float32)
    path = tmp_path / "xl.safetensors"
    reference = write_lycoris(pipe, "sdxl", path, SDXL_LAYERS, seed=2)
    keys = safetensors.torch.load_file(str(path))
    assert any(k.startswith("lora_unet_output_blocks_") for k in keys)
    assert any(k.startswith("lora_te1_") for k in keys) and any(k.startswith("lora_te2_") for k in keys)
    base_out = _outputs(pipe, sdxl=True)
    merge_by_hand(pipe, reference, 0.8)
    want = _outputs(pipe, sdxl=True)
    assert all((want[k] - base_out[k]).abs().max() > 1e-3 for k in want)
    gen = Generator(tiny_sdxl, [f"{path}:0.8"], device="cpu")
    _close(_outputs(gen.pipe, sdxl=True), want)

    # the same file with the UNet in diffusers spelling (as some trainers write SDXL files)
    renamed = {}
    for component, layer_path, _ in SDXL_LAYERS:
        if component == "unet":
            renamed[kohya_name("sdxl", component, layer_path)] = "lora_unet_" + layer_path.replace(".", "_")
    spelled = {}
    for key, tensor in keys.items():
        name, _, part = key.partition(".")
        spelled[f"{renamed.get(name, name)}.{part}"] = tensor
    assert spelled.keys() != keys.keys()
    diffusers_names = tmp_path / "xl-diffusers-names.safetensors"
    safetensors.torch.save_file(spelled, str(diffusers_names))
    gen = Generator(tiny_sdxl, [f"{diffusers_names}:0.8"], device="cpu")
    _close(_outputs(gen.pipe, sdxl=True), want)


def test_a_lora_file_with_input_axis_dora_scales_is_merged_as_lycoris_does(tiny_sd15, tmp_path):
    pipe, _ = load_base(str(tiny_sd15), "cpu", torch.float32)
    path = tmp_path / "old-dora.safetensors"
    reference = write_lycoris(pipe, "sd15", path, [("unet", f"{T}.attn1.to_q", "lora_dora"),
                                                   ("unet", f"{B}.resnets.0.conv1", "lora_dora")], seed=5)
    assert not any(k.partition(".")[2] not in ("lora_down.weight", "lora_up.weight", "alpha", "dora_scale")
                   for k in safetensors.torch.load_file(str(path)))
    merge_by_hand(pipe, reference, 0.5)
    gen = Generator(tiny_sd15, [f"{path}:0.5"], device="cpu")
    _close(_outputs(gen.pipe), _outputs(pipe))


def test_merge_command_bakes_lycoris_into_the_saved_model(sd15, tiny_sd15, random_adapters, tmp_path):
    from diffusers import UNet2DConditionModel

    _, path, reference = sd15
    out = tmp_path / "merged"
    assert main(["merge", "--model", str(tiny_sd15), "--lora", f"{path}:0.5",
                 "--lora", f"{random_adapters['a']}:0.3", "--out", str(out)]) == 0
    stacked = Generator(tiny_sd15, [f"{path}:0.5", f"{random_adapters['a']}:0.3"], device="cpu")
    merged = UNet2DConditionModel.from_pretrained(out, subfolder="unet")
    assert not any("lora" in k for k in merged.state_dict())
    latents, t, hidden, _, _ = _inputs(stacked.pipe, False)
    with torch.no_grad():
        torch.testing.assert_close(merged(latents, t, hidden).sample, stacked.pipe.unet(latents, t, hidden).sample,
                                   rtol=1e-5, atol=2e-5)


def test_resize_turns_loha_and_lokr_into_a_lora_by_svd(sd15, tiny_sd15, tmp_path, capsys):
    pipe, _ = load_base(str(tiny_sd15), "cpu", torch.float32)
    layers = [("unet", f"{T}.attn1.to_q", "loha"), ("unet", f"{B}.resnets.0.conv1", "loha"),
              ("unet", f"{B}.attentions.0.proj_in", "loha"), ("unet", f"{B}.resnets.0.conv2", "loha_cp"),
              ("unet", f"{B}.downsamplers.0.conv", "lokr"), ("unet", f"{T}.attn1.to_v", "lokr_full"),
              ("unet", "mid_block.resnets.1.conv1", "locon_cp"), ("unet", f"{T}.attn1.to_out.0", "full_nobias"),
              ("text_encoder", "encoder.layers.1.mlp.fc1", "lokr")]
    path = tmp_path / "lyco.safetensors"
    write_lycoris(pipe, "sd15", path, layers, seed=6)
    exact, low = tmp_path / "exact.safetensors", tmp_path / "low.safetensors"
    assert main(["resize", str(path), str(exact), "--rank", "512", "--dtype", "fp32"]) == 0
    assert "retained Frobenius norm 100.00% overall" in capsys.readouterr().out
    want = _outputs(Generator(tiny_sd15, [f"{path}:0.9"], device="cpu").pipe)
    _close(_outputs(Generator(tiny_sd15, [f"{exact}:0.9"], device="cpu").pipe), want, atol=1e-4)

    assert main(["resize", str(path), str(low), "--rank", "2", "--dtype", "fp32"]) == 0
    line = capsys.readouterr().out
    kept = float(line.split("retained Frobenius norm ")[1].split("%")[0])
    assert 10 < kept < 99.9
    from lora_trainer.export.adapter import read_adapter

    lora = read_adapter(low)
    assert lora.base == "sd15" and {m.rank for _, _, m in lora.items()} == {2}
    assert lora.modules["unet"][f"{B}.resnets.0.conv1"].down.shape == (2, 32, 3, 3)
    assert lora.modules["unet"][f"{B}.attentions.0.proj_in"].down.shape == (2, 32, 1, 1)

    _, every_type, _ = sd15  # holds (IA)^3, DoRA and diff_b modules, which depend on the base or a bias
    assert main(["resize", str(every_type), str(tmp_path / "no.safetensors"), "--rank", "2"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "cannot become a LoRA without the base" in err[0] and str(every_type) in err[0]
    assert not (tmp_path / "no.safetensors").exists()


def test_inspect_names_types_ranks_and_counts(sd15, capsys):
    _, path, _ = sd15
    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "LyCORIS" in text and "IA3 1, LoHa 5, LoKr 6, LoRA 2, full 2" in text
    assert "unet 13" in text and "text_encoder 3" in text and "rank        4 (" in text
    assert main(["inspect", str(path), "--json"]) == 0
    import json

    report = json.loads(capsys.readouterr().out)
    assert report["layout"] == "lycoris" and report["types"]["LoKr"] == 6 and report["cp"] == 3


@pytest.mark.parametrize("key, shape, message", [
    ("lora_unet_mid_block_attentions_0_proj_in.lokr_t1", (2, 2, 3, 3), "a CP core for a LoKr's w1, which LyCORIS"),
    ("lora_unet_mid_block_attentions_0_proj_in.hada_w9", (2, 2), "no LoRA/LyCORIS part"),
    ("lora_unet_mid_block_attentions_0_proj_in.oft_blocks", (2, 32), r"holds \(2, 32\) OFT blocks; OFT stores n × b × b"),
])
def test_unsupported_parts_are_one_line_naming_file_and_key(sd15, tmp_path, capsys, key, shape, message):
    _, good, _ = sd15
    tensors = safetensors.torch.load_file(str(good))
    tensors[key] = torch.zeros(shape)
    bad = tmp_path / "bad.safetensors"
    safetensors.torch.save_file(tensors, str(bad))
    with pytest.raises(ModelError, match=message) as err:
        read_lycoris(bad)
    assert str(bad) in str(err.value) and key in str(err.value) and "\n" not in str(err.value)
    assert main(["inspect", str(bad)]) == 2
    err_text = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err_text) == 1 and key in err_text[0] and str(bad) in err_text[0]


def test_a_file_for_another_model_fails_in_one_line_and_leaves_the_base(sd15, tiny_sd15, tmp_path, capsys):
    _, good, _ = sd15
    tensors = safetensors.torch.load_file(str(good))
    name = kohya_name("sd15", "unet", f"{T}.attn1.to_k")
    tensors[f"{name}.lokr_w1"] = torch.ones(3, 2)  # kron makes a (48, 32) change for a (32, 32) layer
    bad = tmp_path / "other-model.safetensors"
    safetensors.torch.save_file(tensors, str(bad))
    gen = Generator(tiny_sd15, device="cpu")
    base = _state(gen.pipe)
    with pytest.raises(ModelError, match=f"{name} \\(LoKr\\) makes a \\(48, 32\\) change") as err:
        gen.adapters.load(AdapterSpec(bad))
    assert str(bad) in str(err.value)
    assert _equal_states(_state(gen.pipe), base) and not gen.adapters.specs

    unknown = tmp_path / "unknown-layer.safetensors"
    safetensors.torch.save_file({"lora_unet_down_blocks_9_attentions_0_proj_in.diff": torch.zeros(4, 4)}, str(unknown))
    rc = main(["infer", "--model", str(tiny_sd15), "--lora", str(unknown), "--prompt", "x", "--steps", "1",
               "--width", "32", "--height", "32", "--device", "cpu", "--out", str(tmp_path / "img")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(err) == 1 and "names no layer of this base's unet" in err[0] and str(unknown) in err[0]
