"""kohya's neuron, rank and module dropout (models/kohya_dropout.py): per-sample keyed masks on peft's
LoRA, DoRA and LoCon conv layers, checked against the layer math computed by hand; config, from-kohya
and metadata."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig as PeftLoraConfig
from peft import inject_adapter_in_model

from lora_trainer.models.dropout import DropoutKeys
from lora_trainer.models.kohya_dropout import KohyaDropout, rank_mask, skipped_samples, use_kohya_dropout

R, ALPHA = 4, 8.0
S = ALPHA / R


class Layers(torch.nn.Module):
    """A token linear (attention/text encoder), a per-sample linear (time_emb_proj) and a 3x3 conv (LoCon)."""

    def __init__(self):
        super().__init__()
        self.tokens, self.vector = torch.nn.Linear(8, 6), torch.nn.Linear(8, 6)
        self.conv = torch.nn.Conv2d(8, 6, 3, padding=1)

    def forward(self, x, v, img):
        return self.tokens(x), self.vector(v), self.conv(img)


def _model(rates: KohyaDropout | None, dora: bool = False):
    torch.manual_seed(0)
    model = inject_adapter_in_model(PeftLoraConfig(r=R, lora_alpha=ALPHA, target_modules=["tokens", "vector", "conv"],
                                                   use_dora=dora, init_lora_weights="gaussian"), Layers())
    for layer in model.modules():
        if hasattr(layer, "lora_B"):
            torch.nn.init.normal_(layer.lora_B["default"].weight)  # ΔW ≠ 0
    keys = DropoutKeys()
    if rates is not None:
        assert use_kohya_dropout(model, rates, keys, "unet") == 3
    return model, keys


def _inputs(n: int):
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, 5, 8, generator=g), torch.randn(n, 8, generator=g), torch.randn(n, 8, 4, 4, generator=g)


def _base(layer, x):
    return layer.base_layer(x)


def _down(layer, x):
    a = layer.lora_A["default"].weight
    return F.conv2d(x, a, padding=1) if x.dim() == 4 else x @ a.T


def _up(layer, lx):
    b = layer.lora_B["default"].weight
    return F.conv2d(lx, b) if lx.dim() == 4 else lx @ b.T


def _expected(layer, x, masked_down):
    """W·x + b + s·B·(masked A·x); with DoRA, peft's (m/‖W + s·B·A‖)·(W·x + s·B·(...)) − ... form."""
    if "default" not in getattr(layer, "lora_magnitude_vector", {}):
        return _base(layer, x) + S * _up(layer, masked_down)
    w = layer.base_layer.weight
    delta = (layer.lora_B["default"].weight.flatten(1) @ layer.lora_A["default"].weight.flatten(1)).view(w.shape)
    norm = (w + S * delta).flatten(1).norm(dim=1)  # ΔW unmasked: dropout acts on activations only
    scale = layer.lora_magnitude_vector["default"].weight.flatten() / norm
    shape = (1, -1, 1, 1) if x.dim() == 4 else (1, -1)
    plain = _base(layer, x) - layer.base_layer.bias.view(shape)
    return _base(layer, x) + (scale.view(shape) - 1) * plain + scale.view(shape) * S * _up(layer, masked_down)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_rank_dropout_zeroes_whole_rank_channels_and_scales_the_rest_by_1_over_1_minus_p(dora):
    p, n = 0.5, 8
    model, keys = _model(KohyaDropout(rank=p), dora)
    inputs, sample_keys = _inputs(n), tuple(range(100, 100 + n))
    with keys.batch(sample_keys):
        outputs = model(*inputs)
    masks = []
    for (name, layer), x, out in zip([("tokens", model.tokens), ("vector", model.vector), ("conv", model.conv)],
                                     inputs, outputs):
        mask = rank_mask(sample_keys, 1, f"unet.{name}", R, p).float()  # (sample, rank channel)
        shape = (n, R, 1, 1) if x.dim() == 4 else (n,) + (1,) * (x.dim() - 2) + (R,)  # every token/pixel alike
        expected = _expected(layer, x, _down(layer, x) * mask.view(shape) / (1 - p))
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5, msg=name)
        masks.append(mask)
    mask = torch.cat(masks)
    assert 0.3 < mask.mean().item() < 0.7 and (mask.sum(1) < R).any() and not torch.equal(masks[0], masks[1])
    undropped = model.eval()(*inputs)
    assert all(not torch.allclose(a, b) for a, b in zip(undropped, outputs))


def test_neuron_dropout_drops_single_elements_of_the_down_output():
    p = 0.5
    model, keys = _model(KohyaDropout(neuron=p))
    seen = []
    model.tokens.lora_B["default"].register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    x = _inputs(4)
    with keys.batch([1, 2, 3, 4]):
        out = model(*x)[0]
    ratio = seen[0] / _down(model.tokens, x[0])
    kept = torch.isclose(ratio, torch.tensor(1 / (1 - p)))
    assert torch.all(kept | (ratio == 0)) and 0.3 < kept.float().mean().item() < 0.7
    assert (kept.any(1) & ~kept.all(1)).any()  # not whole channels: tokens of one channel differ
    torch.testing.assert_close(out, _expected(model.tokens, x[0], seen[0]))


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_module_dropout_gives_the_base_layer_output_to_the_drawn_samples(dora):
    p, sample_keys = 0.5, tuple(range(10))
    model, keys = _model(KohyaDropout(module=p), dora)
    inputs = _inputs(len(sample_keys))
    reference = model(*inputs)  # training mode, no keyed batch: no dropout
    with keys.batch(sample_keys):
        outputs = model(*inputs)
    for name, x, out, full in zip(("tokens", "vector", "conv"), inputs, outputs, reference):
        layer = getattr(model, name)
        skipped = torch.tensor(skipped_samples(sample_keys, f"unet.{name}", p))
        assert 0 < skipped.sum() < len(sample_keys), name
        assert torch.equal(out[skipped], _base(layer, x)[skipped])  # W·x exactly, DoRA's rescaling too
        assert torch.equal(out[~skipped], full[~skipped])
        assert not torch.allclose(full[skipped], _base(layer, x)[skipped])
        model.zero_grad()
        out[skipped].square().sum().backward(retain_graph=True)
        assert all(q.grad is None or not q.grad.any() for q in layer.parameters() if q.requires_grad), name


def test_a_samples_masks_depend_on_its_key_only_and_checkpointing_recomputes_them():
    model, keys = _model(KohyaDropout(neuron=0.3, rank=0.5, module=0.3))
    inputs = _inputs(3)
    with keys.batch([7, 8, 9]):
        together = model(*inputs)
    with keys.batch([8]):
        alone = model(*(x[1:2] for x in inputs))
    for a, b in zip(together, alone):
        torch.testing.assert_close(a[1:2], b, rtol=1e-6, atol=1e-6)
    with keys.batch([8, 9]):  # 2 rows per sample (a text encoder's caption windows): row 0 as alone
        windows = model(inputs[0][[1, 1, 2, 2]], inputs[1][[1, 1, 2, 2]], inputs[2][[1, 1, 2, 2]])
    torch.testing.assert_close(windows[0][0:1], alone[0], rtol=1e-6, atol=1e-6)
    for name, out in zip(("tokens", "vector", "conv"), windows):  # own masks per row, but one module draw
        assert torch.equal(out[0], out[1]) == skipped_samples((8,), f"unet.{name}", 0.3)[0], name

    def grads(checkpointed: bool):
        model.zero_grad()
        with keys.batch([4, 5, 6]):
            out = keys.checkpoint(model, *inputs) if checkpointed else model(*inputs)
        sum(o.square().sum() for o in out).backward()  # outside the keyed batch, as in the training loop
        return [o.detach() for o in out], [q.grad.clone() for q in model.parameters() if q.requires_grad]

    (plain, plain_grads), (again, again_grads) = grads(False), grads(True)
    for a, b in zip(plain + plain_grads, again + again_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_zero_rates_eval_mode_and_unkeyed_calls_are_untouched_and_the_state_dict_too():
    inputs = _inputs(4)
    bare, _ = _model(None)
    with torch.no_grad():
        expected = bare(*inputs)
    assert not KohyaDropout(0.0, 0.0, 0.0)
    off, keys = _model(None)
    use_kohya_dropout(off, KohyaDropout(0.0, 0.0, 0.0), keys, "unet")
    on, on_keys = _model(KohyaDropout(0.5, 0.5, 0.5))
    with torch.no_grad(), keys.batch([1, 2, 3, 4]):
        assert all(torch.equal(a, b) for a, b in zip(off(*inputs), expected))  # p = 0: bit for bit
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(on(*inputs), expected))  # sampling: no keyed batch
        on.eval()
        with on_keys.batch([1, 2, 3, 4]):
            assert all(torch.equal(a, b) for a, b in zip(on(*inputs), expected))  # validation, inference
    assert list(on.state_dict()) == list(bare.state_dict())  # the exported adapter holds the same tensors


@pytest.mark.parametrize("key", ["neuron_dropout", "rank_dropout", "module_dropout"])
def test_rates_outside_0_to_1_are_one_line_errors(key):
    from lora_trainer.config import load_config
    from lora_trainer.errors import ConfigError

    base = ["model.base=m", "data.path=d", "train.max_steps=1"]
    assert getattr(load_config(None, [*base, f"lora.{key}=0.25"]).lora, key) == 0.25
    for bad in ("1", "-0.1"):
        with pytest.raises(ConfigError, match=rf"lora\.{key}: got {float(bad)!r}; expected a number in \[0, 1\)"):
            load_config(None, [*base, f"lora.{key}={bad}"])


def test_from_kohya_maps_network_dropout_and_the_network_args():
    from lora_trainer.kohya.mapping import config_from_kohya

    args = {"pretrained_model_name_or_path": "base", "train_data_dir": "img", "network_dim": 8, "network_alpha": 4,
            "network_dropout": 0.1, "network_args": ["rank_dropout=0.2", "module_dropout=0.05"],
            "_script": "train_network.py"}
    cfg, notes = config_from_kohya(args)
    lora = cfg["lora"]
    assert (lora["neuron_dropout"], lora["rank_dropout"], lora["module_dropout"]) == (0.1, 0.2, 0.05)
    assert "dropout" not in lora  # kohya's network dropout drops A·x, not the input x
    assert not any("dropout" in n for n in notes), notes
    with pytest.raises(Exception, match="--network_args rank_dropout: 'x' is not a number"):
        config_from_kohya({**args, "network_args": ["rank_dropout=x"]})


def test_kohya_records_them_in_ss_network_args_and_ss_network_dropout():
    from lora_trainer.config import config_from_dict
    from lora_trainer.export.metadata import kohya_metadata
    from lora_trainer.training.outputs import _network_args

    cfg = config_from_dict({"model": {"base": "m"}, "data": {"path": "d"}, "train": {"max_steps": 1},
                            "lora": {"rank_dropout": 0.25, "module_dropout": 0.1, "neuron_dropout": 0.05}})
    assert _network_args(cfg) == {"rank_dropout": "0.25", "module_dropout": "0.1"}
    meta = kohya_metadata(rank=4, alpha=4, base_model_version="sd_v1", network_dropout=0.05,
                          network_args=_network_args(cfg))
    assert meta["ss_network_dropout"] == "0.05"
    assert "ss_network_dropout" not in kohya_metadata(rank=4, alpha=4, base_model_version="sd_v1")
