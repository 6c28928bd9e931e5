"""LyCORIS OFT, BOFT, GLoRA and norm-layer modules, and kohya's own OFT files: each module's ΔW
equals the one built by hand from the published formulas, `infer` merges them at their weight as
W + m·ΔW (alone or stacked with a LoRA), weight 0 / off / unload give the base back bit for bit,
`inspect` names them, and files for another model are refused in one line before anything loads."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
from lycoris_helpers import get_layer, kohya_name, merge_by_hand
from lycoris_ortho_helpers import write_ortho
from test_lycoris import _close, _equal_states, _outputs, _state, check_stacked_with_a_lora

from lora_trainer.cli import main
from lora_trainer.errors import ModelError
from lora_trainer.export.lycoris import needs_lycoris_reader, read_lycoris
from lora_trainer.export.lycoris_lowrank import why_not_lora
from lora_trainer.inference.adapter_fit import why_not_loadable
from lora_trainer.inference.adapters import AdapterSpec
from lora_trainer.inference.generate import Generator
from lora_trainer.inference.pipelines import load_base

B = "down_blocks.1"
T = f"{B}.attentions.0.transformer_blocks.0"
# linear, 1x1 conv, 3x3 convs, LayerNorm and GroupNorm, UNet and text encoder
SD15_LAYERS = [
    ("unet", f"{T}.attn1.to_q", "oft"), ("unet", f"{B}.resnets.0.conv1", "oft_rescaled"),
    ("unet", f"{B}.attentions.0.proj_in", "oft_diag"), ("unet", f"{T}.attn1.to_k", "boft"),
    ("unet", "mid_block.resnets.0.conv2", "boft_rescaled"), ("unet", f"{T}.attn1.to_v", "glora"),
    ("unet", f"{B}.resnets.0.conv2", "glora"), ("unet", "mid_block.resnets.1.conv1", "glora_cp"),
    ("unet", f"{B}.resnets.0.norm1", "norm"), ("unet", f"{T}.norm2", "norm"),
    ("text_encoder", "encoder.layers.0.self_attn.q_proj", "oft"), ("text_encoder", "encoder.layers.0.mlp.fc1", "glora"),
    ("text_encoder", "encoder.layers.0.layer_norm1", "norm"),
]
KINDS = {"BOFT": 2, "GLoRA": 4, "OFT": 4, "norm": 3}


@pytest.fixture(scope="module")
def sd15(tiny_sd15, tmp_path_factory):
    pipe, _ = load_base(str(tiny_sd15), "cpu", torch.float32)
    path = tmp_path_factory.mktemp("ortho") / "ortho.safetensors"
    return pipe, path, write_ortho(pipe, "sd15", path, SD15_LAYERS, seed=1)


def test_each_type_gives_the_delta_w_built_by_hand(sd15):
    pipe, path, reference = sd15
    adapter = read_lycoris(path)
    assert adapter.base == "sd15" and adapter.kinds == KINDS
    modules = {m.name: m for _, _, m in adapter.items()}
    for (component, layer_path), (delta, bias, _) in reference.items():
        module = modules[kohya_name("sd15", component, layer_path)]
        weight = get_layer(pipe, component, layer_path).weight.detach()
        assert delta.abs().max() > 1e-3, layer_path
        # the readers' 1e-8 guards on ‖Q‖ are the only difference
        torch.testing.assert_close(module.delta(weight), delta, rtol=1e-7, atol=1e-9, msg=lambda m: f"{layer_path}: {m}")
        if bias is not None:
            torch.testing.assert_close(module.bias_delta(), bias)
    # OFT's alpha is a constraint, not a scale; GLoRA's alpha / r is
    oft = modules[kohya_name("sd15", "unet", f"{B}.resnets.0.conv1")]
    assert oft.alpha == pytest.approx(2e-3) and oft.scale == 1.0 and oft.rank is None
    assert modules[kohya_name("sd15", "unet", f"{T}.attn1.to_v")].scale == 0.5


def test_generator_merges_them_as_by_hand_and_gives_the_base_back(sd15, tiny_sd15, random_adapters):
    _, path, reference = sd15
    by_hand, _ = load_base(str(tiny_sd15), "cpu", torch.float32)
    base_out = _outputs(by_hand)
    merge_by_hand(by_hand, reference, 0.7)
    want = _outputs(by_hand)
    assert all((want[k] - base_out[k]).abs().max() > 1e-3 for k in want)

    gen = Generator(tiny_sd15, [f"{path}:0.7"], device="cpu")
    _close(_outputs(gen.pipe), want)
    base = _state(Generator(tiny_sd15, device="cpu").pipe)
    gen.set_weight("ortho", 0.0)  # weight 0 is the base, bit for bit (norm biases included)
    assert _equal_states(_state(gen.pipe), base)
    gen.set_weight("ortho", 1.5)  # weight m: W + m·ΔW, for OFT/BOFT too
    again, _ = load_base(str(tiny_sd15), "cpu", torch.float32)
    merge_by_hand(again, reference, 1.5)
    _close(_outputs(gen.pipe), _outputs(again))
    gen.adapters.unload("ortho")
    assert _equal_states(_state(gen.pipe), base)

    # stacked with a LoRA, merged and unmerged
    check_stacked_with_a_lora(tiny_sd15, random_adapters["a"], path, reference, -0.4)


def test_a_kohya_oft_file_loads_on_sdxl(tiny_sdxl, tmp_path, capsys):
    pipe, _ = load_base(str(tiny_sdxl), "cpu", torch.float32)
    layers = [("unet", f"{T}.attn1.to_q", "kohya_oft"), ("unet", f"{T}.attn2.to_out.0", "kohya_oft"),
              ("unet", "mid_block.attentions.0.transformer_blocks.0.attn1.to_v", "kohya_oft"),
              ("unet", "up_blocks.0.attentions.0.proj_in", "kohya_oft")]
    path = tmp_path / "kohya-oft.safetensors"
    reference = write_ortho(pipe, "sdxl", path, layers, seed=2, kohya_oft=True)
    with safetensors.safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    assert all(k.startswith("oft_unet_") for k in keys) and any("input_blocks_4_1" in k for k in keys)
    assert needs_lycoris_reader(path)

    merge_by_hand(pipe, reference, 0.8)
    gen = Generator(tiny_sdxl, [f"{path}:0.8"], device="cpu")
    _close(_outputs(gen.pipe, sdxl=True), _outputs(pipe, sdxl=True))
    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "OFT 4" in text and "oft blocks" in text and "constraint (alpha) 0.002 (all 4 modules)" in text


@pytest.mark.parametrize("part, shape, message", [
    ("oft_blocks", (4, 16, 16), "rotates 64 output rows but the layer's weight is (32, 32)"),
    ("oft_blocks", (4, 4, 8, 8), "has butterfly blocks (4, 4, 8, 8) that no BOFT of 32 rows has"),
    ("a1.weight", (16, 4), "which do not make a change of the layer's (32, 32) weight"),
    ("w_norm", (64,), "changes 64 norm weights but the layer's weight is (32,)"),
])
def test_shapes_of_another_model_are_refused_before_loading(sd15, tiny_sd15, tmp_path, part, shape, message):
    _, good, _ = sd15
    tensors = safetensors.torch.load_file(str(good))
    layer = f"{T}.norm2" if part == "w_norm" else (f"{T}.attn1.to_k" if len(shape) == 4 else
                                                    f"{T}.attn1.to_v" if part == "a1.weight" else f"{T}.attn1.to_q")
    key = f"{kohya_name('sd15', 'unet', layer)}.{part}"
    assert key in tensors
    tensors[key] = torch.zeros(shape)
    bad = tmp_path / "other-model.safetensors"
    safetensors.torch.save_file(tensors, str(bad))
    gen = Generator(tiny_sd15, device="cpu")
    base = _state(gen.pipe)
    reason = why_not_loadable(bad, gen.pipe)  # the check `infer` and `--compare` make first: header only
    assert reason is not None and message in reason and key.partition(".")[0] in reason and "\n" not in reason
    with pytest.raises(ModelError, match="it was made for another model") as err:
        gen.adapters.load(AdapterSpec(bad))
    assert str(bad) in str(err.value) and _equal_states(_state(gen.pipe), base)


def test_inspect_names_them_and_resize_refuses_them(sd15, tmp_path, capsys):
    _, path, _ = sd15
    assert main(["inspect", str(path), "--modules"]) == 0
    text = capsys.readouterr().out
    assert "BOFT 2, GLoRA 4, OFT 4, norm 3" in text and "oft blocks" in text and "blocks 3×4×8" in text
    assert main(["inspect", str(path), "--json"]) == 0
    import json

    report = json.loads(capsys.readouterr().out)
    assert report["types"] == KINDS and report["cp"] == 1 and report["oft_blocks"] == {"3×4×8": 1, "4×8": 4, "5×16×4": 1}
    assert report["oft_constraints"] == {"0": 4, "0.002": 2}
    assert main(["resize", str(path), str(tmp_path / "no.safetensors"), "--rank", "2"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "changes a norm layer's 1-D weight (w_norm), which has no low-rank factors" in err[0]
    reasons = {m.kind: why_not_lora(m) for _, _, m in read_lycoris(path).items()}
    assert reasons["norm"] == "changes a norm layer's 1-D weight (w_norm), which has no low-rank factors"
    assert all(reasons[k] == f"is {k}, whose change is built from the base weights" for k in ("OFT", "BOFT", "GLoRA"))


def test_reused_buffers_give_the_bits_of_new_tensors(sd15):
    pipe, path, _ = sd15
    from lora_trainer.export.scratch import Scratch

    modules = {m.name: m for _, _, m in read_lycoris(path).items()}
    items = [(get_layer(pipe, c, p).weight.detach(), modules[kohya_name("sd15", c, p)]) for c, p, _ in SD15_LAYERS]
    scratch = Scratch()  # grows with the layers; the reversed pass then finds bigger layers' leftovers
    for weight, module in items + items[::-1]:
        want = module.merged(weight, 0.7, torch.float32)
        out = torch.full_like(weight, float("nan"))
        got = module.merged(weight, 0.7, torch.float32, out=out, scratch=scratch)
        assert got is out and torch.equal(got, want), module.name
        # a second adapter on the same layer is built from, and merged in, the same tensor
        again = module.merged(want, -0.3, torch.float32)
        assert torch.equal(module.merged(out, -0.3, torch.float32, out=out, scratch=scratch), again), module.name


def _glora_file(sd15, out, layouts: dict) -> dict:
    """The fixture's GLoRA modules of `layouts` ({layer path: "2.0+" or "pre-2.0"}) written under that
    LyCORIS version's names (before 2.0, a1/a2 and b1/b2 were each other's); returns their references."""
    _, good, reference = sd15
    swap = {"a1": "a2", "a2": "a1", "b1": "b2", "b2": "b1"}
    tensors = {}
    for key, tensor in safetensors.torch.load_file(str(good)).items():
        name, _, part = key.partition(".")
        layer = next((p for p in layouts if name == kohya_name("sd15", "text_encoder" if "mlp" in p else "unet", p)), None)
        if layer is not None:
            head, dot, tail = part.partition(".")
            tensors[f"{name}.{swap.get(head, head) if layouts[layer] == 'pre-2.0' else head}{dot}{tail}"] = tensor
    safetensors.torch.save_file(tensors, str(out), metadata={"ss_base_model_version": "sd_v1"})
    return {key: value for key, value in reference.items() if key[1] in layouts}


@pytest.mark.parametrize("layouts", [
    {f"{T}.attn1.to_v": "pre-2.0", "encoder.layers.0.mlp.fc1": "pre-2.0"},  # the 32 → 128 layer tells
    {f"{T}.attn1.to_v": "pre-2.0"},  # a square layer alone: the smaller side (4, not 32) is the rank
    {f"{T}.attn1.to_v": "2.0+"},
])
def test_pre_2_0_glora_files_load_with_the_same_change(sd15, tiny_sd15, tmp_path, layouts):
    pipe, _, _ = sd15
    path = tmp_path / "glora.safetensors"
    reference = _glora_file(sd15, path, layouts)
    modules = {m.name: m for _, _, m in read_lycoris(path).items()}
    assert len(modules) == len(layouts)
    for (component, layer), (delta, _, _) in reference.items():
        module = modules[kohya_name("sd15", component, layer)]
        assert module.scale == 0.5  # alpha 2 / rank 4, whichever names the file uses
        torch.testing.assert_close(module.delta(get_layer(pipe, component, layer).weight.detach()), delta,
                                   rtol=1e-7, atol=1e-9)
    assert why_not_loadable(path, pipe) is None  # the header-only check `infer` and `--compare` make
    by_hand, _ = load_base(str(tiny_sd15), "cpu", torch.float32)
    merge_by_hand(by_hand, reference, 0.7)
    _close(_outputs(Generator(tiny_sd15, [f"{path}:0.7"], device="cpu").pipe), _outputs(by_hand))


def test_glora_files_whose_layout_cannot_be_told_are_refused_naming_it(sd15, tmp_path):
    mixed = tmp_path / "mixed.safetensors"
    _glora_file(sd15, mixed, {"encoder.layers.0.mlp.fc1": "pre-2.0", f"{B}.resnets.0.conv2": "2.0+"})
    with pytest.raises(ModelError, match="mix LyCORIS' pre-2.0 layout .* and the 2.0\\+ one") as err:
        read_lycoris(mixed)
    assert str(mixed) in str(err.value) and "\n" not in str(err.value)
    # rank 32 on a 32×32 layer: both layouts' shapes are 32×32 four times, and ΔW differs between them
    name = kohya_name("sd15", "unet", f"{T}.attn1.to_v")
    square = tmp_path / "square.safetensors"
    safetensors.torch.save_file({f"{name}.{p}.weight": torch.randn(32, 32) for p in ("a1", "a2", "b1", "b2")},
                                str(square))
    with pytest.raises(ModelError, match=f"{name} is a GLoRA module of rank 32 on a 32×32 layer, whose shapes fit "
                                         "both LyCORIS' GLoRA layouts"):
        read_lycoris(square, base="sd15")
