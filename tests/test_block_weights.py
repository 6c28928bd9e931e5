"""Per-block weights at inference (A1111's LoRA Block Weight, `--lora FILE:WEIGHT:lbw=SPEC`): a block
at 1 is the plain adapter, a block at 0 is the file without that block's keys, exactly; presets
expand to the extension's lists; counts that fit no form are refused before any model loads."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
from PIL import Image

from infer_helpers import one_line_error, run_infer
from lora_trainer.cli import main
from lora_trainer.inference.adapters import AdapterSpec
from lora_trainer.inference.block_weights import PRESETS, block_values
from lora_trainer.inference.generate import Generator
from lora_trainer.pnginfo import parse_a1111_parameters

ONES17, ONES26 = ",".join(["1"] * 17), ",".join(["1"] * 26)
FULL_SD15 = ["BASE", *(f"IN{i:02d}" for i in range(12)), "M00", *(f"OUT{i:02d}" for i in range(12))]
FULL_SDXL = ["BASE", *(f"IN{i:02d}" for i in range(9)), "M00", *(f"OUT{i:02d}" for i in range(9))]


def _full(names, **zero) -> str:
    """A full-form spec: 1 for every block, 0 for those named."""
    return ",".join("0" if name in zero else "1" for name in names)


@torch.no_grad()
def _outputs(gen) -> dict[str, torch.Tensor]:
    """The UNet's and every text encoder's outputs on fixed inputs. Every weight is first copied to
    memory of its own: a file's tensors are read in place, at the offsets the file puts them, and the
    CPU's matrix products round differently with the alignment of their operands (1e-7), which
    differs between a file and the same file without some keys."""
    pipe = gen.pipe
    for name in ("unet", "text_encoder", "text_encoder_2"):
        for param in getattr(getattr(pipe, name, None), "parameters", list)():
            param.data = param.data.clone()
    g = torch.Generator().manual_seed(3)
    extra = {}
    if gen.variant == "sdxl":
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(1, 32, generator=g),
                                       "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}}
    hidden = torch.randn(1, 8, pipe.unet.config.cross_attention_dim, generator=g)
    out = {"unet": pipe.unet(torch.randn(1, 4, 8, 8, generator=g), torch.tensor([10]), hidden, **extra).sample}
    ids = torch.randint(0, 400, (1, 8), generator=g)
    for name in ("text_encoder", "text_encoder_2"):
        if getattr(pipe, name, None) is not None:
            out[name] = getattr(pipe, name)(ids).last_hidden_state
    return out


def _outs(model, *loras) -> dict[str, torch.Tensor]:
    return _outputs(Generator(model, list(loras), device="cpu"))


def _equal(got, want) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), f"{name} differs by {(got[name] - want[name]).abs().max()}"


def _without(path, out, *prefixes):
    """A copy of the kohya file at `path` without the keys that start with any of `prefixes`."""
    tensors = safetensors.torch.load_file(str(path))
    with safetensors.safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    kept = {k: v for k, v in tensors.items() if not k.startswith(prefixes)}
    assert len(kept) < len(tensors) and kept
    safetensors.torch.save_file(kept, str(out), metadata=metadata)
    return out


@pytest.fixture(scope="module")
def locon(tiny_sd15, tmp_path_factory):
    """A kohya LoCon file for the tiny SD1.5: attention, resnet convs, samplers, conv_in, text encoder."""
    from locon_helpers import ALPHA, RANK, add_locon, load_pipeline
    from lora_trainer.export.files import save_adapter

    states = add_locon(load_pipeline(tiny_sd15, "sd15"))
    return save_adapter(tmp_path_factory.mktemp("lbw") / "locon.safetensors", states, RANK, ALPHA, layout="kohya",
                        dtype=torch.float32, base="sd15")


def test_all_ones_and_a_uniform_half_are_exactly_the_plain_weights(tiny_sd15, random_adapters):
    a, b = random_adapters["a"], random_adapters["b"]  # kohya with text encoder; diffusers layout, UNet only
    plain = _outs(tiny_sd15, f"{a}:0.7", f"{b}:-0.4")
    for spec in (ONES17, ONES26, "ALL"):
        _equal(_outs(tiny_sd15, f"{a}:0.7:lbw={spec}", f"{b}:-0.4:lbw={spec}"), plain)
    # each layer at WEIGHT × value: 0.8 × 0.5 is the plain adapter at 0.4, bit for bit
    _equal(_outs(tiny_sd15, f"{a}:0.8:lbw=ALL0.5", AdapterSpec(b, -0.8, lbw=[0.5] * 17)),
           _outs(tiny_sd15, f"{a}:0.4", f"{b}:-0.4"))


def test_base_alone_is_the_text_encoder_part_alone(tiny_sd15, random_adapters, tmp_path):
    a = random_adapters["a"]
    te_only = _without(a, tmp_path / "te.safetensors", "lora_unet_")
    got = _outs(tiny_sd15, f"{a}:0.7:lbw=1,{','.join(['0'] * 16)}")
    _equal(got, _outs(tiny_sd15, f"{te_only}:0.7"))
    assert not torch.equal(got["text_encoder"], _outs(tiny_sd15)["text_encoder"])


def test_a_block_at_zero_is_the_file_without_its_keys_with_locon_convs_and_merge(tiny_sd15, locon, tmp_path):
    # SD 1.x: up_blocks.1's first layers are OUT03, down_blocks.0's downsampler IN03, the middle block M00
    spec = _full(FULL_SD15, OUT03=0, IN03=0, M00=0)
    dropped = _without(locon, tmp_path / "dropped.safetensors", "lora_unet_up_blocks_1_attentions_0_",
                       "lora_unet_up_blocks_1_resnets_0_", "lora_unet_down_blocks_0_downsamplers_",
                       "lora_unet_mid_block_")
    gen = Generator(tiny_sd15, [f"{locon}:0.9:lbw={spec}"], device="cpu")
    unmerged = _outputs(gen)
    _equal(unmerged, _outs(tiny_sd15, f"{dropped}:0.9"))
    # --merge fuses each layer at its block's scale
    gen.merge()
    merged = _outputs(gen)
    for name in unmerged:
        torch.testing.assert_close(merged[name], unmerged[name], rtol=1e-5, atol=1e-5)
    assert (merged["unet"] - _outs(tiny_sd15, f"{locon}:0.9")["unet"]).abs().max() > 1e-3


def test_the_short_form_leaves_the_blocks_it_does_not_name_at_zero(tiny_sd15, locon, tmp_path):
    # as the extension: conv_in (IN00), the downsamplers (IN03, IN06) and up_blocks.0 (OUT00-OUT02)
    dropped = _without(locon, tmp_path / "short.safetensors", "lora_unet_conv_in", "lora_unet_down_blocks_0_downsamplers_",
                       "lora_unet_down_blocks_1_downsamplers_", "lora_unet_up_blocks_0_")
    _equal(_outs(tiny_sd15, f"{locon}:1:lbw={ONES17}"), _outs(tiny_sd15, str(dropped)))


def test_loha_and_lokr_blocks_scale_as_lora_blocks_do(tiny_sd15, tmp_path):
    from lycoris_helpers import write_lycoris
    from lora_trainer.inference.pipelines import load_base

    pipe, _ = load_base(str(tiny_sd15), "cpu", torch.float32)
    block = "transformer_blocks.0.attn1"
    layers = [("unet", f"mid_block.attentions.0.{block}.to_q", "loha"),
              ("unet", f"up_blocks.1.attentions.0.{block}.to_v", "lokr"),
              ("text_encoder", "encoder.layers.0.self_attn.v_proj", "loha")]
    path, without = tmp_path / "ly.safetensors", tmp_path / "ly-no-mid.safetensors"
    write_lycoris(pipe, "sd15", path, layers, seed=2)
    _without(path, without, "lora_unet_mid_block_")
    _equal(_outs(tiny_sd15, f"{path}:0.8:lbw={_full(FULL_SD15, M00=0)}"), _outs(tiny_sd15, f"{without}:0.8"))
    _equal(_outs(tiny_sd15, f"{path}:0.8:lbw=ALL0.5"), _outs(tiny_sd15, f"{path}:0.4"))


def test_presets_expand_to_the_extensions_lists(tiny_sd15, random_adapters):
    short = ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", *(f"OUT{i:02d}" for i in range(3, 12))]
    assert block_values("OUTALL", "sd15", "x") == block_values("1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1", "sd15", "x")
    for name, values in PRESETS.items():
        expanded = block_values(name.lower(), "sd15", "x")
        assert [expanded[b] for b in short] == [float(v) for v in values.split(",")]
        assert all(expanded[b] == 0 for b in FULL_SD15 if b not in short)
    # on SDXL a preset applies by block name, as the extension applies it: OUTALL is BASE and OUT03-OUT08
    sdxl = block_values("OUTALL", "sdxl", "x")
    assert [b for b in FULL_SDXL if sdxl[b] == 1] == ["BASE", *(f"OUT{i:02d}" for i in range(3, 9))]
    a = random_adapters["a"]
    _equal(_outs(tiny_sd15, f"{a}:0.7:lbw=IND"), _outs(tiny_sd15, f"{a}:0.7:lbw={PRESETS['IND']}"))


def test_a_spec_built_in_python_takes_its_path_as_a_string(tiny_sd15, random_adapters):
    # AdapterSpec("style.safetensors", 0.8, lbw=...) as the README writes it stopped on 'str' has no 'is_dir'
    a = random_adapters["a"]
    spec = AdapterSpec(str(a), 0.7, lbw="OUTALL")
    assert spec.path == a and spec.name == "a"
    _equal(_outs(tiny_sd15, spec), _outs(tiny_sd15, f"{a}:0.7:lbw=OUTALL"))


@pytest.mark.parametrize("spec, needle", [
    ("1,1,1", "lbw= has 3 values; an SD 1.x adapter takes 17 (BASE,IN01,"),
    (",".join(["1"] * 12), "lbw= has 12 values; an SD 1.x adapter takes 17"),
    ("OUTSIDE", "lbw=OUTSIDE is no preset; give one of NONE, ALL, INS, IND, INALL, MIDD, OUTD, OUTS, OUTALL, ALL0.5"),
    ("1,R,1", "lbw=1,R,1: 'R' is not a number"),
    ("1,nan,1", "'nan' is not a number"),
])
def test_bad_block_weights_are_refused_in_one_line_before_the_base_loads(random_adapters, tmp_path, capsys, spec,
                                                                           needle):
    lora = f"{random_adapters['a']}:0.7:lbw={spec}"
    # a base that does not exist: had it been loaded first, the error would be about the base
    assert run_infer(tmp_path, tmp_path / "no-model-needed", "--lora", lora) == 2
    assert needle in one_line_error(capsys)
    assert main(["merge", "--model", str(tmp_path / "no-model-needed"), "--lora", lora,
                 "--out", str(tmp_path / "merged")]) == 2
    assert needle in one_line_error(capsys)
    assert not (tmp_path / "out").exists() and not (tmp_path / "merged").exists()


@pytest.fixture(scope="module")
def sdxl_adapter(tiny_sdxl, tmp_path_factory):
    from lora_trainer.testing.inference_models import make_random_adapter

    return make_random_adapter(tiny_sdxl, tmp_path_factory.mktemp("lbw-xl") / "xl.safetensors", variant="sdxl",
                               rank=4, alpha=2.0, seed=3)


def test_sdxl_takes_twelve_or_twenty_values(tiny_sdxl, sdxl_adapter, tmp_path, capsys):
    plain = _outs(tiny_sdxl, f"{sdxl_adapter}:0.6")
    _equal(_outs(tiny_sdxl, f"{sdxl_adapter}:0.6:lbw={','.join(['1'] * 12)}"), plain)
    _equal(_outs(tiny_sdxl, f"{sdxl_adapter}:0.6:lbw={_full(FULL_SDXL)}"), plain)
    # 12 values: BASE, IN04, IN05, IN07, IN08, M00, OUT00-OUT05; OUT01 is output_blocks.1 (kohya's LDM name)
    dropped = _without(sdxl_adapter, tmp_path / "xl-no-out01.safetensors", "lora_unet_output_blocks_1_")
    _equal(_outs(tiny_sdxl, f"{sdxl_adapter}:0.6:lbw=1,1,1,1,1,1,1,0,1,1,1,1"), _outs(tiny_sdxl, f"{dropped}:0.6"))
    assert run_infer(tmp_path, tmp_path / "no-model-needed", "--lora", f"{sdxl_adapter}:1:lbw={ONES17}") == 2
    assert "lbw= has 17 values; an SDXL adapter takes 12 (BASE,IN04,IN05,IN07,IN08,M00,OUT00," in one_line_error(capsys)


def test_png_records_the_block_weights_as_a1111_writes_them(tiny_sd15, random_adapters, tmp_path):
    a = random_adapters["a"]
    assert run_infer(tmp_path, tiny_sd15, "--lora", f"{a}:0.7:lbw=OUTALL", "--lora", f"{random_adapters['b']}:0.5",
                     "--seed", "4") == 0
    text = Image.open(tmp_path / "out" / "00000-4.png").text["parameters"]
    assert text.split("\n")[0] == "x <lora:a:0.7:lbw=OUTALL> <lora:b:0.5>"
    info = parse_a1111_parameters(text)
    assert info.prompt == "x" and [n for n, _, _ in info.adapters] == ["a", "b"]
    assert info.block_weights == {"a": "OUTALL"}
