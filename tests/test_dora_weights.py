"""What an adapter weight w does to a DoRA module, pinned by numbers. Two rules are in use:

- peft (a DoRA file infer.py hands to diffusers/peft: diffusers layout, or kohya with an output-axis
  `dora_scale`): w scales ΔW inside the normalisation, W' = m · (W + w·ΔW) / ‖W + w·ΔW‖, so w = 0
  gives m · W / ‖W‖, not the base;
- LyCORIS/ComfyUI (a LyCORIS file, or a LoRA file with an input-axis `dora_scale`, merged by
  `inference/lycoris.py`): W' = W + w · (W_d − W) with W_d the weight at 1, so w = 0 is the base.

They agree at w = 1 only. Example: W = I (2×2), ΔW = [[0, 1], [0, 0]], magnitudes m = (2, 1) per
output row; row 1 stays (0, 1) under both rules, row 0 is:

| w   | peft                 | LyCORIS              |
| 0   | (2, 0)               | (1, 0)  (the base)   |
| 0.5 | (1.788854, 0.894427) | (1.207107, 0.707107) |
| 1   | (1.414214, 1.414214) | (1.414214, 1.414214) |
| 1.5 | (1.109400, 1.664101) | (1.621320, 2.121320) |
"""

from __future__ import annotations

import pytest
import safetensors.torch
import torch
from peft import LoraConfig, inject_adapter_in_model

from lora_trainer.export.lycoris import LycorisModule

W = torch.eye(2, dtype=torch.float64)
UP = torch.tensor([[1.0], [0.0]], dtype=torch.float64)  # B (d_out × r), alpha = r = 1: ΔW = B·A
DOWN = torch.tensor([[0.0, 1.0]], dtype=torch.float64)  # A (r × d_in)
MAGNITUDE = torch.tensor([2.0, 1.0], dtype=torch.float64)
ROW0 = {  # w: (peft, LyCORIS)
    0.0: ((2.0, 0.0), (1.0, 0.0)),
    0.5: ((1.7888544, 0.8944272), (1.2071068, 0.7071068)),
    1.0: ((1.4142136, 1.4142136), (1.4142136, 1.4142136)),
    1.5: ((1.1094004, 1.6641006), (1.6213203, 2.1213203)),
}


def _pinned(row0) -> torch.Tensor:
    return torch.tensor([row0, (0.0, 1.0)], dtype=torch.float64)


@pytest.mark.parametrize("w", sorted(ROW0))
def test_peft_dora_layer_scales_delta_w_inside_the_norm(w):
    """A real peft DoRA layer, its scale set as diffusers' set_adapters sets it (set_scale)."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 2, bias=False)).double()
    with torch.no_grad():
        model[0].weight.copy_(W)
    model = inject_adapter_in_model(LoraConfig(r=1, lora_alpha=1, use_dora=True, target_modules=["0"]), model)
    layer = model[0]
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(DOWN)
        layer.lora_B["default"].weight.copy_(UP)
        layer.lora_magnitude_vector["default"].weight.copy_(MAGNITUDE)
    layer.set_scale("default", w)
    with torch.no_grad():
        effective = layer(torch.eye(2, dtype=torch.float64)).T  # rows of x @ W'^T for x = I: W'^T
    torch.testing.assert_close(effective, _pinned(ROW0[w][0]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("w", sorted(ROW0))
def test_lycoris_dora_module_interpolates_between_base_and_the_dora_weight(w):
    module = LycorisModule("lora_unet_x", "LoRA", {"lora_down.weight": DOWN, "lora_up.weight": UP}, alpha=1.0,
                           dora_scale=MAGNITUDE.reshape(2, 1))
    torch.testing.assert_close(module.merged(W, w), _pinned(ROW0[w][1]), rtol=0, atol=1e-6)


def test_infer_applies_the_peft_rule_to_a_kohya_dora_file(tiny_sd15, tmp_path):
    """Through the inference stack (a kohya file with output-axis dora_scale goes to peft): the layer's
    weight at w is m·(W + w·ΔW)/‖W + w·ΔW‖ per output row, and w = 0 is not the base."""
    from lora_trainer.inference.adapters import AdapterSpec, AdapterStack
    from lora_trainer.inference.pipelines import load_base

    pipe, _ = load_base(str(tiny_sd15), "cpu", torch.float32)
    path = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    name = "lora_unet_" + path.replace(".", "_")
    base = pipe.unet.get_submodule(path).weight.detach().double().clone()
    g = torch.Generator().manual_seed(0)
    d_out, d_in = base.shape
    down, up = torch.randn(2, d_in, generator=g) * 0.3, torch.randn(d_out, 2, generator=g) * 0.3
    magnitude = base.norm(dim=1).float() * (1 + 0.2 * torch.randn(d_out, generator=g))
    file = tmp_path / "dora.safetensors"
    safetensors.torch.save_file({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                                 f"{name}.alpha": torch.tensor(1.0), f"{name}.dora_scale": magnitude[:, None]},
                                str(file), metadata={"ss_network_args": '{"dora_wd": "True", "wd_on_out": "True"}'})
    delta = up.double() @ down.double() * 0.5  # alpha / r = 1 / 2
    stack = AdapterStack(pipe)
    stack.load(AdapterSpec(file))
    layer = pipe.unet.get_submodule(path)
    # loaded by peft as DoRA, with the file's magnitudes (the file does not tell SD 1.x from SDXL: it
    # was once left to diffusers, which dropped its dora_scale and loaded a plain LoRA)
    torch.testing.assert_close(layer.lora_magnitude_vector["dora"].weight.detach(), magnitude, rtol=0, atol=0)
    for w in (0.0, 0.5, 1.0, 1.5):
        stack.set_weight("dora", w)
        with torch.no_grad():
            effective = layer(torch.eye(d_in)).double().T
        adapted = base + w * delta
        peft_rule = magnitude.double()[:, None] * adapted / adapted.norm(dim=1, keepdim=True)
        torch.testing.assert_close(effective, peft_rule, rtol=1e-5, atol=1e-5)
        if w != 1.0:  # the LyCORIS rule would give something else
            decomposed = magnitude.double()[:, None] * (base + delta) / (base + delta).norm(dim=1, keepdim=True)
            assert (effective - (base + w * (decomposed - base))).abs().max() > 1e-3
    stack.set_enabled("dora", False)  # off (not weight 0) is the base
    with torch.no_grad():
        torch.testing.assert_close(layer(torch.eye(d_in)).double().T, base, rtol=0, atol=1e-6)
