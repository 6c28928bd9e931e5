"""Merging LyCORIS modules fast changes no number: ΔW built in buffers reused from layer to layer
gives the bits of ΔW built in new tensors and of the formula written out, W + m·(alpha/r·ΔW); a
layer on the CPU keeps its own weight tensor as the original (no copy, never written) and gets that
very tensor back when the adapter goes; a half-precision layer is merged in float32 and rounded once."""

from __future__ import annotations

import pytest
import torch
from lycoris_helpers import get_layer, kohya_name, write_lycoris
from test_lycoris import SD15_LAYERS

from lora_trainer.export.lycoris import LycorisModule, read_lycoris
from lora_trainer.export.scratch import Scratch
from lora_trainer.inference.adapters import AdapterSpec
from lora_trainer.inference.generate import Generator
from lora_trainer.inference.pipelines import load_base

F32 = torch.float32


def _modules(path) -> dict[tuple[str, str], LycorisModule]:
    """{(component, layer path as in SD15_LAYERS): module} of the file."""
    by_name = {m.name: m for _, _, m in read_lycoris(path).items()}
    return {(c, p): by_name[kohya_name("sd15", c, p)] for c, p, _ in SD15_LAYERS}


@pytest.fixture(scope="module")
def every_type(tiny_sd15, tmp_path_factory):
    pipe, _ = load_base(str(tiny_sd15), "cpu", F32)
    path = tmp_path_factory.mktemp("lycoris-buffers") / "every-type.safetensors"
    write_lycoris(pipe, "sd15", path, SD15_LAYERS, seed=5)
    return pipe, path


def _by_formula(module: LycorisModule, weight: torch.Tensor, m: float) -> torch.Tensor | None:
    """W + m·(ΔW·alpha/r) in float32, each product written out as the factors say (plain LoRA, LoHa,
    LoKr and full modules without CP cores or DoRA); None for the others."""
    p = {k: v.float() for k, v in module.parts.items()}
    if module.dora_scale is not None or {"lora_mid.weight", "hada_t1", "lokr_t2"} & set(p):
        return None
    if module.kind == "LoRA":
        product = p["lora_up.weight"].flatten(1) @ p["lora_down.weight"].flatten(1)
    elif module.kind == "LoHa":
        product = (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"])
    elif module.kind == "LoKr":
        w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
        w2 = p["lokr_w2"] if "lokr_w2" in p else p["lokr_w2_a"] @ p["lokr_w2_b"]
        product = torch.kron(w1[:, :, None, None] if w2.ndim == 4 else w1, w2)
    elif module.kind == "full":
        product = p["diff"]
    else:
        return None
    return (product.reshape(weight.shape) * module.scale) * m + weight


def test_reused_buffers_give_the_bits_of_new_tensors_and_of_the_formula(every_type):
    pipe, path = every_type
    items = list(_modules(path).items())
    scratch = Scratch()  # grows with the layers; the reversed pass then finds bigger layers' leftovers
    checked = 0
    for key, module in items + items[::-1]:
        weight = get_layer(pipe, *key).weight.detach()
        want = module.merged(weight, 0.7, F32)
        out = torch.full_like(weight, float("nan"))
        got = module.merged(weight, 0.7, F32, out=out, scratch=scratch)
        assert got is out and torch.equal(got, want), module.name
        formula = _by_formula(module, weight, 0.7)
        if formula is not None:
            assert torch.equal(got, formula), module.name
            at_one = module.merged(weight, 1.0, F32, out=torch.empty_like(weight), scratch=scratch)
            assert torch.equal(at_one, _by_formula(module, weight, 1.0)), module.name
            checked += 1
        # a second adapter on the same layer is merged in the same tensor
        assert torch.equal(module.merged(out, -0.3, F32, out=out, scratch=scratch), module.merged(want, -0.3, F32))
        assert not torch.equal(want, weight)
    assert checked == 2 * 11  # the LoRA, 3 LoHa, 5 LoKr (whole and low-rank factors) and 2 full modules


def test_a_cpu_layer_keeps_its_own_tensor_as_the_original_and_gets_it_back(every_type, tiny_sd15):
    _, path = every_type
    gen = Generator(tiny_sd15, device="cpu")
    layers = [get_layer(gen.pipe, c, p) for c, p, _ in SD15_LAYERS]
    originals = [layer.weight.detach() for layer in layers]  # the tensors themselves
    values = [w.clone() for w in originals]

    name = gen.adapters.load(AdapterSpec(path, 0.7))
    for layer, original, value in zip(layers, originals, values):
        assert layer.weight.data_ptr() != original.data_ptr()  # merged into a tensor of its own...
        assert torch.equal(original, value)  # ...so the original is never written
        assert not torch.equal(layer.weight, value)
    gen.set_weight(name, 0.0)
    assert all(torch.equal(layer.weight, value) for layer, value in zip(layers, values))
    gen.set_weight(name, 0.7)
    gen.adapters.unload(name)
    for layer, original, value in zip(layers, originals, values):
        assert layer.weight.data_ptr() == original.data_ptr() and torch.equal(layer.weight, value)


def test_a_half_precision_layer_is_merged_in_float32_and_rounded_once(every_type, tiny_sd15):
    _, path = every_type
    gen = Generator(tiny_sd15, device="cpu", dtype=torch.float16)
    modules = _modules(path)
    base = {key: get_layer(gen.pipe, *key).weight.detach().clone() for key in modules}
    assert all(w.dtype == torch.float16 for w in base.values())

    name = gen.adapters.load(AdapterSpec(path, 0.7))
    for key, module in modules.items():
        want = module.merged(base[key].float(), 0.7, F32).half()
        assert torch.equal(get_layer(gen.pipe, *key).weight, want), key
    gen.set_enabled(name, False)
    assert all(torch.equal(get_layer(gen.pipe, *key).weight, w) for key, w in base.items())
