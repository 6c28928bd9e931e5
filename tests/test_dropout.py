"""LoRA dropout with per-sample masks (models/dropout.py)."""

from __future__ import annotations

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import inject_adapter_in_model

from lora_trainer.models.dropout import DropoutKeys, SampleDropout, use_sample_dropout


def test_a_samples_mask_depends_on_its_key_and_layer_only():
    keys = DropoutKeys()
    layer, other = SampleDropout(0.5, "unet.a", keys), SampleDropout(0.5, "unet.b", keys)
    x = torch.ones(3, 5, 64)
    with keys.batch([7, 8, 9]):
        together = layer(x)
        elsewhere = other(x)
    with keys.batch([8]):
        alone = layer(x[:1])
    torch.testing.assert_close(together[1:2], alone, rtol=0, atol=0)
    assert not torch.equal(together[0], together[1])  # different samples, different masks
    assert not torch.equal(together, elsewhere)  # different layers, different masks
    with keys.batch([8, 9]):  # two rows (e.g. caption windows) per sample, sample-major
        windows = layer(torch.ones(4, 5, 64))
    torch.testing.assert_close(windows[0:1], together[1:2], rtol=0, atol=0)
    assert not torch.equal(windows[0], windows[1])
    kept = (together != 0).float().mean().item()
    assert 0.4 < kept < 0.6 and torch.allclose(together[together != 0], torch.tensor(2.0))


def test_outside_a_keyed_batch_or_in_eval_it_is_the_identity():
    keys = DropoutKeys()
    layer = SampleDropout(0.5, "x", keys)
    x = torch.randn(2, 4)
    assert torch.equal(layer(x), x)
    layer.eval()
    with keys.batch([1, 2]):
        assert torch.equal(layer(x), x)


def test_peft_layers_use_it_and_gradient_checkpointing_recomputes_the_same_masks():
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    config = PeftLoraConfig(r=2, lora_alpha=2, lora_dropout=0.5, target_modules=["0", "2"], init_lora_weights="gaussian")
    model = inject_adapter_in_model(config, model)
    for layer in model.modules():
        if hasattr(layer, "lora_B"):
            torch.nn.init.normal_(layer.lora_B["default"].weight)
    keys = DropoutKeys()
    assert use_sample_dropout(model, 0.5, keys, "unet") == 2
    x = torch.randn(3, 16)

    def grads(checkpointed: bool):
        model.zero_grad()
        with keys.batch([4, 5, 6]):
            out = keys.checkpoint(model, x) if checkpointed else model(x)
        out.square().sum().backward()  # outside the batch's keys, as in the training loop
        return out.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    plain, checkpointed = grads(False), grads(True)
    torch.testing.assert_close(plain[0], checkpointed[0], rtol=0, atol=0)
    for a, b in zip(plain[1], checkpointed[1]):
        torch.testing.assert_close(a, b)
    with torch.no_grad():
        undropped = model.eval()(x)
    assert not torch.allclose(undropped, plain[0])


def test_training_with_dropout_gives_the_same_adapter_with_or_without_gradient_checkpointing(
        tiny_sd15, example_data, tmp_path):
    """lora.dropout with kohya's neuron, rank and module dropouts (models/kohya_dropout.py) on."""
    import json

    import safetensors
    from conftest import run_config
    from lora_trainer.training.loop import train

    kohya = ["lora.neuron_dropout=0.1", "lora.rank_dropout=0.25", "lora.module_dropout=0.25"]

    def adapter(out, *extra):
        # two 77-token windows per caption: the text encoder's batch has 2 rows per sample
        cfg = run_config(tiny_sd15, example_data, tmp_path / out, "lora.dropout=0.3", "lora.train_text_encoder=true",
                         "model.max_token_length=150", "train.max_steps=3", "train.lr=1e-2", "sample.prompts=[]",
                         *kohya, *extra)
        result = train(cfg, show_progress=False)
        return {k: v.detach().clone() for m in (result.unet, result.text_encoder)
                for k, v in m.named_parameters() if v.requires_grad}

    plain = adapter("plain")
    checkpointed = adapter("gc", "train.gradient_checkpointing=true")
    kohya_off = [k.split("=")[0] + "=0" for k in kohya]
    undropped = adapter("nodrop", "lora.dropout=0", *kohya_off)
    input_only = adapter("input-only", *kohya_off)  # the kohya dropouts act in a run, too
    assert max((plain[k] - input_only[k]).abs().max().item() for k in plain) > 1e-4
    with safetensors.safe_open(str(tmp_path / "plain" / "example-lora.safetensors"), "pt") as f:
        meta = f.metadata()  # recorded as kohya does
    assert json.loads(meta["ss_network_args"]) == {"rank_dropout": "0.25", "module_dropout": "0.25"}
    assert meta["ss_network_dropout"] == "0.1"
    assert plain.keys() == checkpointed.keys()
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], rtol=1e-4, atol=1e-5, msg=key)
    assert max((plain[k] - undropped[k]).abs().max().item() for k in plain) > 1e-4
