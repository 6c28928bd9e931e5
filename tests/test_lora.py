"""The adapter math: a wrapped layer computes W·x + (alpha/r)·B·A·x, and only A and B train."""

from __future__ import annotations

import pytest
import torch

from lora_trainer.errors import ConfigError
from lora_trainer.models.lora import expected_lora_parameters, inject_lora, lora_layers, trainable_parameters


def _unet(tiny_sd15):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet").requires_grad_(False)


def test_wrapped_layer_adds_scaled_low_rank_product(tiny_sd15):
    unet = _unet(tiny_sd15)
    n = inject_lora(unet, ["to_q", "to_k", "to_v", "to_out.0"], rank=4, alpha=8.0, dropout=0.0, key="lora.unet_targets")
    layers = lora_layers(unet)
    assert n == len(layers) > 0
    name, layer = next(iter(layers.items()))
    a = layer.lora_A["default"].weight  # r × d_in
    b = layer.lora_B["default"].weight  # d_out × r
    assert a.shape[0] == 4 and b.shape[1] == 4
    assert torch.count_nonzero(b) == 0  # training starts from ΔW = 0
    with torch.no_grad():
        b.normal_(generator=torch.Generator().manual_seed(0))
    x = torch.randn(3, a.shape[1], generator=torch.Generator().manual_seed(1))
    w = layer.get_base_layer()
    with torch.no_grad():
        got = layer(x)
        want = w(x) + (8.0 / 4) * x @ a.T @ b.T
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_only_adapter_weights_train_and_in_fp32(tiny_sd15):
    unet = _unet(tiny_sd15).to(torch.bfloat16)
    inject_lora(unet, ["to_q", "to_v"], rank=2, alpha=2.0, dropout=0.0, key="lora.unet_targets")
    params = trainable_parameters(unet)
    names = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert all(".lora_A." in n or ".lora_B." in n for n in names)
    assert {p.dtype for p in params} == {torch.float32}
    assert sum(p.numel() for p in params) == expected_lora_parameters(unet, 2)
    assert all(n.endswith(("to_q", "to_v")) for n in lora_layers(unet))


def test_unknown_targets_are_a_config_error(tiny_sd15):
    with pytest.raises(ConfigError, match="lora.unet_targets"):
        inject_lora(_unet(tiny_sd15), ["query"], rank=2, alpha=2.0, dropout=0.0, key="lora.unet_targets")
