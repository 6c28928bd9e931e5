"""Adapters at inference: stacked weights add ΔW = Σ m·(alpha/r)·B·A, switch off without reloading,
merge/unmerge restores the base bit for bit, and `merge` saves a model equal to the fused one."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

from lora_trainer.cli import main
from lora_trainer.export.layouts import detect_layout, diffusers_to_peft, kohya_to_peft
from lora_trainer.inference.generate import Generator


def _unet_inputs(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(1, 4, 8, 8, generator=g)
    context = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    return sample, torch.tensor([500]), context


@torch.no_grad()
def _unet_out(unet):
    return unet(*_unet_inputs(unet)).sample


@torch.no_grad()
def _te_out(text_encoder):
    return text_encoder(torch.tensor([[1, 5, 9, 40, 2]])).last_hidden_state


def _delta_w(path) -> dict[str, dict[str, torch.Tensor]]:
    """{component: {module path: (alpha/r)·B·A}} read from the file itself."""
    tensors = safetensors.torch.load_file(str(path))
    if detect_layout(tensors) == "kohya":
        states, alphas = kohya_to_peft(tensors)
    else:
        import json

        with safetensors.safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["lora_adapter_metadata"])
        states = diffusers_to_peft(tensors)
        alphas = {c: {k.rsplit(".lora_A", 1)[0]: meta[f"{c}.lora_alpha"] for k in s if ".lora_A" in k}
                  for c, s in states.items()}
    out = {}
    for component, state in states.items():
        for module, alpha in alphas[component].items():
            a, b = state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"]
            out.setdefault(component, {})[module.removeprefix("text_model.")] = (alpha / a.shape[0]) * (b @ a)
    return out


def _add_by_hand(model, deltas, weight):
    params = dict(model.named_parameters())
    with torch.no_grad():
        for module, delta in deltas.items():
            params[f"{module}.weight"] += weight * delta


@pytest.fixture(scope="module")
def stacked(tiny_sd15, random_adapters):
    return Generator(tiny_sd15, [f"{random_adapters['a']}:0.7", f"{random_adapters['b']}:-0.4"], device="cpu")


@pytest.fixture(scope="module")
def base_parts(tiny_sd15):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    return (UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet"),
            CLIPTextModel.from_pretrained(tiny_sd15, subfolder="text_encoder"))


def test_stacked_adapters_equal_their_weighted_delta_w_added_by_hand(stacked, base_parts, random_adapters):
    unet, te = base_parts
    da, db = _delta_w(random_adapters["a"]), _delta_w(random_adapters["b"])
    assert set(da) == {"unet", "text_encoder"} and set(db) == {"unet"}
    by_hand_unet = type(unet).from_config(unet.config)
    by_hand_unet.load_state_dict(unet.state_dict())
    _add_by_hand(by_hand_unet, da["unet"], 0.7)
    _add_by_hand(by_hand_unet, db["unet"], -0.4)
    want = _unet_out(by_hand_unet)
    assert not torch.allclose(want, _unet_out(unet), atol=1e-3)  # the adapters do change the output
    torch.testing.assert_close(_unet_out(stacked.pipe.unet), want, rtol=1e-5, atol=1e-5)

    by_hand_te = type(te)(te.config)
    by_hand_te.load_state_dict(te.state_dict())
    _add_by_hand(by_hand_te, da["text_encoder"], 0.7)
    torch.testing.assert_close(_te_out(stacked.pipe.text_encoder), _te_out(by_hand_te), rtol=1e-5, atol=1e-5)


def test_switching_an_adapter_off_needs_no_reload(stacked, base_parts, random_adapters):
    unet, _ = base_parts
    both = _unet_out(stacked.pipe.unet)
    stacked.set_enabled("a", False)
    stacked.set_enabled("b", False)
    try:
        assert torch.equal(_unet_out(stacked.pipe.unet), _unet_out(unet))
        stacked.set_enabled("b", True)
        only_b = _unet_out(stacked.pipe.unet)
        assert not torch.allclose(only_b, both, atol=1e-4)
    finally:
        stacked.set_enabled("a", True)
        stacked.set_enabled("b", True)
    assert torch.equal(_unet_out(stacked.pipe.unet), both)


def test_merge_then_unmerge_restores_base_weights_bit_for_bit(stacked):
    before = {k: v.clone() for k, v in stacked.pipe.unet.state_dict().items() if "lora_" not in k}
    te_before = {k: v.clone() for k, v in stacked.pipe.text_encoder.state_dict().items() if "lora_" not in k}
    stacked_out = _unet_out(stacked.pipe.unet)
    stacked.merge()
    try:
        merged_out = _unet_out(stacked.pipe.unet)
        changed = [k for k, v in stacked.pipe.unet.state_dict().items() if k in before and not torch.equal(v, before[k])]
        assert changed  # the weights really hold the adapters now
        torch.testing.assert_close(merged_out, stacked_out, rtol=1e-5, atol=1e-5)
    finally:
        stacked.unmerge()
    after = stacked.pipe.unet.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    te_after = stacked.pipe.text_encoder.state_dict()
    assert all(torch.equal(te_after[k], v) for k, v in te_before.items())
    assert torch.equal(_unet_out(stacked.pipe.unet), stacked_out)


def test_merge_command_saves_a_model_equal_to_the_stacked_one(stacked, tiny_sd15, random_adapters, tmp_path):
    from diffusers import UNet2DConditionModel

    out = tmp_path / "merged"
    args = ["merge", "--model", str(tiny_sd15), "--lora", f"{random_adapters['a']}:0.7",
            "--lora", f"{random_adapters['b']}:-0.4", "--out", str(out)]
    assert main(args) == 0
    merged = UNet2DConditionModel.from_pretrained(out, subfolder="unet")
    assert not any("lora" in k for k in merged.state_dict())
    torch.testing.assert_close(_unet_out(merged), _unet_out(stacked.pipe.unet), rtol=1e-5, atol=1e-5)
    assert main(args) == 2  # never over a folder the user has, unless asked
    assert main([*args, "--overwrite"]) == 0 and not list(tmp_path.glob(".merged*"))


def test_sdxl_kohya_adapter_stacks_on_sdxl_base(tiny_sdxl, tmp_path):
    from lora_trainer.testing.inference_models import make_random_adapter

    path = make_random_adapter(tiny_sdxl, tmp_path / "xl.safetensors", variant="sdxl", layout="kohya",
                               text_encoder=False, seed=4)
    assert any("input_blocks" in k for k in safetensors.torch.load_file(str(path)))  # LDM block names
    gen = Generator(tiny_sdxl, [f"{path}:1.0"], device="cpu")
    unet = gen.pipe.unet
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500]),
              torch.randn(1, 77, unet.config.cross_attention_dim, generator=g))
    added = {"text_embeds": torch.randn(1, 32, generator=g), "time_ids": torch.tensor([[64., 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        on = unet(*inputs, added_cond_kwargs=added).sample
        gen.set_weight("xl", 0.0)
        off = unet(*inputs, added_cond_kwargs=added).sample
        gen.set_enabled("xl", False)
        disabled = unet(*inputs, added_cond_kwargs=added).sample
    assert not torch.allclose(on, off, atol=1e-4) and torch.equal(off, disabled)
    image = gen.txt2img("a (red:1.2) circle", steps=2, width=64, height=64)[0]
    assert image.image.size == (64, 64)


class _CountingOpen:
    """safetensors.safe_open that records, per file, each opening that reads a tensor."""

    def __init__(self, real):
        self.real, self.reads = real, []

    def __call__(self, filename, *args, **kwargs):
        outer, handle = self, self.real(filename, *args, **kwargs)

        class Handle:
            def __enter__(self):
                handle.__enter__()
                return self

            def __exit__(self, *exc):
                return handle.__exit__(*exc)

            def get_tensor(self, key):
                outer.reads.append((id(self), str(filename)))
                return handle.get_tensor(key)

            def get_tensors(self):
                outer.reads.append((id(self), str(filename)))
                return handle.get_tensors()

            def __getattr__(self, name):
                return getattr(handle, name)

        return Handle()

    def openings_that_read(self, path) -> int:
        return len({opening for opening, name in self.reads if name == str(path)})


def test_a_kohya_file_is_read_once_and_loads_as_its_delta_w(tiny_sd15, random_adapters, base_parts, monkeypatch):
    import safetensors

    counting = _CountingOpen(safetensors.safe_open)
    monkeypatch.setattr(safetensors, "safe_open", counting)  # ours
    monkeypatch.setattr(safetensors.torch, "safe_open", counting)  # safetensors.torch.load_file (diffusers)
    path = random_adapters["a"]  # kohya, one alpha (2) for rank 4: nothing diffusers would misread
    pipe = Generator(tiny_sd15, [f"{path}:1.0"], device="cpu").pipe
    assert counting.openings_that_read(path) == 1
    unet, _ = base_parts
    deltas = _delta_w(path)
    want_model = type(unet).from_config(unet.config)
    want_model.load_state_dict(unet.state_dict())
    _add_by_hand(want_model, deltas["unet"], 1.0)
    torch.testing.assert_close(_unet_out(pipe.unet), _unet_out(want_model), rtol=1e-4, atol=1e-5)
