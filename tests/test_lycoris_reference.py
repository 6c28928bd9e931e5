"""Files made by the LyCORIS package itself (its `create_network`, saved with its `save_weights`) load
into `infer` with the outputs of the package's own forward, for every type it writes: LoHa, LoKr,
LoCon, (IA)^3, full, DoRA, OFT, BOFT, GLoRA and norm modules, on SD1.5 and SDXL. Runs only where
`lycoris-lora` is installed (the `dev` extra, so CI, installs it); `test_lycoris.py` and
`test_lycoris_ortho.py` check the same types against the published formulas everywhere."""

from __future__ import annotations

import copy
import logging
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch
from test_lycoris import _close, _outputs

from lora_trainer.inference.adapters import AdapterSpec
from lora_trainer.inference.generate import Generator

lycoris_kohya = pytest.importorskip("lycoris.kohya")

# LyCORIS' "full" preset names time_embedding twice on diffusers UNets (4.1.3): pick the targets.
# The preset sets class attributes of LyCORIS' network, so every one names its module_algo_map.
PRESET = """enable_conv = true
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
unet_target_name = ["conv_in", "conv_out"]
text_encoder_target_module = ["CLIPAttention", "CLIPMLP"]
text_encoder_target_name = []
"""
NO_MAP = PRESET + "module_algo_map = {}\n"
# (IA)^3 on the input axis for the text encoders' MLPs and the UNet's feed-forwards (LyCORIS' own
# `ia3` preset trains their second linear, mlp.fc2 and ff.net.2, on the input axis)
IA3_ON_INPUT = PRESET + """[module_algo_map.CLIPMLP]
train_on_input = true
[module_algo_map.FeedForward]
train_on_input = true
"""


def _randomize(net, g: torch.Generator) -> None:
    """Every trained tensor away from LyCORIS' initialisation (which makes ΔW zero), at a size that
    changes the outputs clearly: gains and factors drawn anew, whole weights (full) and DoRA's norms
    moved from where they start."""
    with torch.no_grad():
        for lora in net.loras:
            kind = type(lora).__name__
            # a Hadamard or Kronecker product of small factors is smaller still
            size = 0.3 if kind in ("LohaModule", "LokrModule") else 0.1
            for name, p in lora.named_parameters():
                noise = torch.randn(p.shape, generator=g)
                if kind == "FullModule":
                    p.add_(noise * 0.02)
                elif name == "dora_scale":
                    p.mul_(1 + 0.2 * noise)
                else:
                    p.copy_(noise * (0.05 if "oft" in name else size) + name.endswith("rescale"))


def _model(path) -> SimpleNamespace:
    """One generator for the file (each case loads its file into it and unloads it again, which gives
    the base back bit for bit: loading a pipeline per case would cost most of the time), and a copy
    of its untouched models for LyCORIS' networks (an unloaded peft adapter leaves its wrappers)."""
    gen = Generator(path, device="cpu")
    names = ("unet", "text_encoder") + (("text_encoder_2",) if gen.variant == "sdxl" else ())
    return SimpleNamespace(gen=gen, sdxl=gen.variant == "sdxl",
                           models={n: copy.deepcopy(getattr(gen.pipe, n)) for n in names})


@pytest.fixture(scope="module")
def sd15(tiny_sd15):
    return _model(tiny_sd15)


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl):
    return _model(tiny_sdxl)


def _lycoris_file(model, tmp_path, algo, dim, options, preset=NO_MAP, weights=(1.0,)):
    """A LyCORIS network of `algo` built by the package on a copy of `model`'s base and saved by it,
    with the base's outputs and those of the package's own forward at each of `weights`."""
    logging.getLogger("LyCORIS").setLevel(logging.WARNING)
    (tmp_path / "preset.toml").write_text(preset)
    sdxl = model.sdxl
    pipe = SimpleNamespace(**{n: copy.deepcopy(m) for n, m in model.models.items()})
    base = _outputs(pipe, sdxl)
    encoders = [pipe.text_encoder, pipe.text_encoder_2] if sdxl else pipe.text_encoder
    alpha = options.pop("alpha", 1.0)
    net = lycoris_kohya.create_network(1.0, dim, alpha, None, encoders, pipe.unet, algo=algo,
                                       preset=str(tmp_path / "preset.toml"), **options)
    net.apply_to(encoders, pipe.unet, True, True)
    _randomize(net, torch.Generator().manual_seed(0))
    want = {}
    for m in weights:
        net.set_multiplier(m)
        want[m] = _outputs(pipe, sdxl)
    path = tmp_path / f"{algo}.safetensors"
    net.save_weights(str(path), torch.float32, {})
    change = {k: (want[1.0][k] - base[k]).abs().max().item() for k in base}
    assert min(change.values()) > 1e-2, change
    return path, want, base


def _check(model, path, want, base, atol=1e-5):
    """The outputs with the file loaded equal `want`'s at each weight; unloaded, the ones before."""
    gen, sdxl = model.gen, model.sdxl
    before = _outputs(gen.pipe, sdxl)
    _close(before, base)
    name = gen.adapters.load(AdapterSpec(path))
    try:
        for m, outputs in want.items():
            gen.set_weight(name, m)
            _close(_outputs(gen.pipe, sdxl), outputs, atol=atol)
    finally:
        gen.adapters.unload(name)
    _close(_outputs(gen.pipe, sdxl), before, atol=0)


@pytest.mark.parametrize("algo, dim, options", [
    ("diag-oft", 8, {"constraint": "1e-4", "rescaled": "true"}), ("boft", 4, {}),
    ("glora", 4, {}), ("lora", 4, {"train_norm": "true"}),
])
def test_files_written_by_lycoris_give_its_own_outputs(sd15, tmp_path, algo, dim, options):
    _check(sd15, *_lycoris_file(sd15, tmp_path, algo, dim, options))


# LyCORIS' multiplier means what ours does for these types (W + m·ΔW; (IA)^3: W ⊙ (1 + m·g)), so
# each is compared at a second weight too. `parts`: what the file must hold for the case to test it.
@pytest.mark.parametrize("algo, dim, options, preset, parts", [
    ("loha", 4, {"alpha": 2.0}, NO_MAP, {"hada_w1_a"}),
    ("loha", 4, {"use_tucker": True}, NO_MAP, {"hada_t1", "hada_t2"}),  # CP cores on 3x3 convs
    ("lokr", 2, {"alpha": 4.0}, NO_MAP, {"lokr_w1", "lokr_w2_a"}),  # low-rank w2
    ("lokr", 4, {"full_matrix": "true"}, NO_MAP, {"lokr_w1", "lokr_w2"}),  # two whole factors: scale 1
    # w1 and w2 both low-rank, with a CP core for w2 on 3x3 convs; LyCORIS writes none for w1 (lokr_t1)
    ("lokr", 1, {"decompose_both": True, "factor": 8, "use_tucker": True, "alpha": 2.0}, NO_MAP,
     {"lokr_w1_a", "lokr_w2_a", "lokr_t2"}),
    ("lora", 4, {"use_tucker": True, "alpha": 2.0}, NO_MAP, {"lora_mid.weight"}),  # LoCon with CP cores
    ("ia3", 4, {}, IA3_ON_INPUT, {"on_input"}),  # both axes: on_input 1 in the MLPs, 0 elsewhere
    ("full", 4, {}, NO_MAP, {"diff", "diff_b"}),
])
def test_lycoris_types_give_its_own_outputs_at_two_weights(sd15, tmp_path, algo, dim, options, preset, parts):
    path, want, base = _lycoris_file(sd15, tmp_path, algo, dim, dict(options), preset, weights=(1.0, 0.6))
    with safetensors.safe_open(str(path), "pt") as f:
        held = {key.partition(".")[2] for key in f.keys()}
    assert parts <= held and "lokr_t1" not in held
    _check(sd15, path, want, base)


# DoRA: LyCORIS re-weights the decomposed weight from W + ΔW, not from W (weight 0 keeps ΔW), so
# only weight 1, the file's own weight, means the same in both.
@pytest.mark.parametrize("algo, dim, on_output", [
    ("loha", 4, "true"), ("lokr", 2, "false"), ("lora", 4, "true"), ("lora", 4, "false"),
])
def test_dora_files_written_by_lycoris_give_its_own_outputs(sd15, tmp_path, algo, dim, on_output):
    options = {"dora_wd": "true", "wd_on_output": on_output}
    _check(sd15, *_lycoris_file(sd15, tmp_path, algo, dim, options))


@pytest.mark.parametrize("algo, dim, options", [
    ("lokr", 2, {"use_tucker": True}), ("loha", 4, {"dora_wd": "true", "wd_on_output": "false"}),
])
def test_sdxl_files_written_by_lycoris_give_its_own_outputs(sdxl, tmp_path, algo, dim, options):
    weights = (1.0,) if "dora_wd" in options else (1.0, 0.6)
    _check(sdxl, *_lycoris_file(sdxl, tmp_path, algo, dim, dict(options), weights=weights))


def test_a_pre_2_0_glora_file_gives_lycoris_outputs(sd15, tmp_path):
    """LyCORIS before 2.0 wrote GLoRA's a1/a2 and b1/b2 under each other's names (ΔW = W·a2·a1 + b2·b1):
    a 2.0+ file renamed so is that file (linear and 1×1 layers only, which is all the old one had)."""
    preset = NO_MAP.replace('"ResnetBlock2D", "Downsample2D", "Upsample2D"', "").replace('"conv_in", "conv_out"', "")
    path, want, base = _lycoris_file(sd15, tmp_path, "glora", 4, {"alpha": 2.0}, preset)
    swap = {"a1": "a2", "a2": "a1", "b1": "b2", "b2": "b1"}
    tensors = safetensors.torch.load_file(str(path))
    renamed = {}
    for key, tensor in tensors.items():
        name, _, part = key.partition(".")
        head, dot, tail = part.partition(".")
        renamed[f"{name}.{swap.get(head, head)}{dot}{tail}"] = tensor
    assert renamed.keys() == tensors.keys() and any(not torch.equal(renamed[k], tensors[k]) for k in tensors)
    old = tmp_path / "glora-before-2.safetensors"
    safetensors.torch.save_file(renamed, str(old))
    _check(sd15, old, want, base)


def test_files_of_lycoris_own_wrapper_give_its_own_outputs(sd15, tmp_path):
    """LyCORIS' `create_lycoris` wraps one model and names its layers `lycoris_<module path>`: for the
    UNet and for a CLIP text encoder (`lycoris_encoder_layers_...` with transformers 5, whose CLIP
    model has no `text_model`), both in one file."""
    from lycoris import create_lycoris

    logging.getLogger("LyCORIS").setLevel(logging.WARNING)
    targets = {"unet": '["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]',
               "text_encoder": '["CLIPAttention", "CLIPMLP"]'}
    pipe = SimpleNamespace(**{n: copy.deepcopy(m) for n, m in sd15.models.items()})
    base = _outputs(pipe)
    nets = []
    for component, modules in targets.items():
        preset = tmp_path / f"{component}.toml"
        preset.write_text(f"enable_conv = true\nunet_target_module = {modules}\nunet_target_name = []\n"
                          "module_algo_map = {}\n")  # the wrapper's targets are its `unet_` keys, whatever the model
        net = create_lycoris(getattr(pipe, component), 1.0, linear_dim=4, linear_alpha=2.0, algo="loha",
                             use_tucker=True, preset=str(preset))
        net.apply_to()
        _randomize(net, torch.Generator().manual_seed(len(nets)))
        nets.append(net)
    want = {}
    for m in (1.0, 0.6):
        for net in nets:
            net.set_multiplier(m)
        want[m] = _outputs(pipe)
    path = tmp_path / "wrapped.safetensors"
    safetensors.torch.save_file({k: v.detach().float().contiguous() for net in nets for k, v in net.state_dict().items()},
                                str(path))
    with safetensors.safe_open(str(path), "pt") as f:
        names = {key.partition(".")[0] for key in f.keys()}
    assert all(n.startswith("lycoris_") for n in names) and any("encoder_layers_0_self_attn" in n for n in names)
    assert min((want[1.0][k] - base[k]).abs().max() for k in base) > 1e-2
    _check(sd15, path, want, base)
