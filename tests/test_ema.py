"""The EMA of the adapter weights (train.ema_decay): the recurrence against diffusers' EMAModel and a
closed form, real runs whose every file holds the EMA of the trained weights the checkpoints keep,
samples and validation drawn with it, training untouched by it, exact resume, and config errors."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import run_config
from PIL import Image

from lora_trainer.config import TrainConfig, load_config
from lora_trainer.errors import ConfigError
from lora_trainer.export.layouts import peft_to_diffusers
from lora_trainer.training import loop
from lora_trainer.models.lora import inject_lora, trainable_parameters
from lora_trainer.training.ema import EMA_FILE, AdapterEMA, start_ema
from lora_trainer.training.loop import train
from lora_trainer.training.validation import Validation

DECAY = 0.3  # with the warm-up, (1 + t) / (10 + t) is below it up to t = 2 and capped by it from t = 3
# 2 of the 8 images held out; 6 batches of 1, 2 per update: 3 updates an epoch, epoch 1 ends at step 3.
# A checkpoint (raw weights + its EMA file) every step, all kept.
RUN = ["train.max_steps=6", "train.batch_size=1", "train.grad_accum=2", "lora.train_text_encoder=true",
       "data.validation_split=0.25", "train.validate_every_n_steps=3", "train.validation_timesteps=2",
       "output.save_every_n_steps=1", "output.keep_checkpoints=0", "output.save_every_n_epochs=1",
       "output.format=diffusers", "output.dtype=fp32", "sample.every_n_steps=3", "sample.steps=2",
       "sample.grid_weights=[]"]
EMA = [*RUN, f"train.ema_decay={DECAY}"]
COMPONENTS = ("unet", "text_encoder")


def _decays(count: int, start: int = 0) -> list[float]:
    """d_t of updates t = start .. start + count - 1, as diffusers' EMAModel computes its warm-up."""
    return [0.0 if t == 0 else min(DECAY, (1 + t) / (10 + t)) for t in range(start, start + count)]


def _reference(raw: list[dict[str, torch.Tensor]], decays: list[float]) -> dict[str, torch.Tensor]:
    """The recurrence in float64 over the trained weights after each update."""
    ema = {k: v.double() for k, v in raw[0].items()}  # any start: d_0 = 0, the first update copies
    for weights, d in zip(raw, decays):
        ema = {k: d * ema[k] + (1 - d) * weights[k].double() for k in ema}
    return ema


def _in_file_layout(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{"<component>.<peft parameter name>": tensor} as the diffusers-layout file holds it."""
    states: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in named.items():
        component, _, rest = name.partition(".")
        states.setdefault(component, {})[rest.replace(".default.", ".")] = value
    return peft_to_diffusers(states)


def _raw_at(run_dir, step: int) -> dict[str, torch.Tensor]:
    """The trained weights a checkpoint keeps (one state per trained module, UNet first)."""
    states = torch.load(run_dir / "checkpoints" / f"step-{step:06d}" / "adapter_state.pt", weights_only=True)
    return {f"{c}.{k}": v for c, state in zip(COMPONENTS, states) for k, v in state.items()}


def _raw_final(result) -> dict[str, torch.Tensor]:
    modules = {"unet": result.unet, "text_encoder": result.text_encoder}
    return {f"{c}.{k}": v.detach().clone() for c, m in modules.items() for k, v in m.named_parameters()
            if v.requires_grad}


def _file(path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(path))


def _step_file(run_dir, step: int):
    return run_dir / "checkpoints" / f"step-{step:06d}" / f"example-lora-step{step:08d}.safetensors"


def _close(file: dict, expected: dict) -> None:
    assert file.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(file[key].double(), value.double(), rtol=0, atol=2e-7, msg=key)


def _equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[0]}"


def _pixels(run_dir, step: int) -> np.ndarray:
    return np.asarray(Image.open(run_dir / "samples" / f"step_{step:05d}" / "00.png"))


# --- the recurrence ----------------------------------------------------------------------------

def test_warmup_follows_diffusers_ema_model_and_held_in_fp32():
    from diffusers.training_utils import EMAModel

    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3, generator=gen, dtype=torch.bfloat16)) for _ in range(3)]
    ours = AdapterEMA({f"p{i}": p for i, p in enumerate(params)}, DECAY, warmup=True)
    def as_trained():  # EMAModel averages only tensors that require grad (it copies the others)
        return [p.detach().float().requires_grad_() for p in params]

    theirs = EMAModel(as_trained(), decay=DECAY)
    assert all(w.dtype == torch.float32 for w in ours.weights)  # whatever the parameters' dtype
    for _ in range(7):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn(p.shape, generator=gen).to(p.dtype))
        ours.update()
        theirs.step(as_trained())
        for mine, reference in zip(ours.weights, theirs.shadow_params):
            torch.testing.assert_close(mine, reference, rtol=1e-6, atol=1e-6)
    assert ours.updates == 7 and ours.next_decay() == DECAY


def test_without_warmup_every_update_uses_the_decay_from_the_initial_weights():
    gen = torch.Generator().manual_seed(1)
    p = torch.nn.Parameter(torch.randn(4, 4, generator=gen))
    history = [p.detach().clone().double()]
    ema = AdapterEMA({"p": p}, 0.9, warmup=False)
    for _ in range(5):
        with torch.no_grad():
            p.add_(torch.randn(4, 4, generator=gen))
        history.append(p.detach().clone().double())
        ema.update()
    n = len(history) - 1  # closed form: d^n θ_0 + Σ_k (1 - d) d^(n-k) θ_k
    expected = 0.9 ** n * history[0] + sum((1 - 0.9) * 0.9 ** (n - k) * history[k] for k in range(1, n + 1))
    torch.testing.assert_close(ema.weights[0].double(), expected, rtol=0, atol=1e-6)


def test_applied_swaps_the_ema_in_and_puts_the_trained_weights_back_bit_for_bit():
    p = torch.nn.Parameter(torch.randn(3, 3))
    ema = AdapterEMA({"p": p}, 0.5, warmup=False)
    with torch.no_grad():
        p.mul_(3.3)
    ema.update()
    trained = p.detach().clone()
    with ema.applied():
        assert torch.equal(p, ema.weights[0])
    assert torch.equal(p, trained)
    with pytest.raises(RuntimeError), ema.applied():  # restored on an error too
        raise RuntimeError
    assert torch.equal(p, trained)


def test_the_ema_covers_exactly_the_trainable_adapter_tensors(tiny_sd15):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet")
    te = CLIPTextModel.from_pretrained(tiny_sd15, subfolder="text_encoder")
    inject_lora(unet, ["to_q", "to_v"], 4, 2.0, 0.0, "lora.unet_targets", True, conv_rank=2)  # DoRA + LoCon
    inject_lora(te, ["q_proj"], 4, 2.0, 0.0, "lora.text_encoder_targets", True)
    ema = start_ema(TrainConfig(ema_decay=0.9), {"unet": unet, "text_encoder": te}, torch.device("cpu"))
    assert [id(p) for p in ema.params] == [id(p) for p in trainable_parameters(unet) + trainable_parameters(te)]
    kinds = {n.split(".")[0] + ":" + next(part for part in n.split(".") if part.startswith("lora_")) for n in ema.names}
    assert kinds == {f"{c}:{k}" for c in COMPONENTS for k in ("lora_A", "lora_B", "lora_magnitude_vector")}
    assert any(w.dim() == 4 for w in ema.weights)  # LoCon's 3x3 convs


# --- runs --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def averaged(tiny_sd15, example_data, tmp_path_factory):
    """The EMA run, recording the adapter that samples and the validation loss are computed with."""
    seen: dict = {"samples": {}, "validation": []}

    def spy_samples(cfg, accelerator, base, trained, step, *rest):
        seen["samples"][step] = {f"{c}.{k}": v.detach().clone() for c, m in trained.unwrapped(accelerator).items()
                                 for k, v in m.named_parameters() if v.requires_grad}
        return draw_samples(cfg, accelerator, base, trained, step, *rest)

    def spy_image_loss(self, index):
        if index == 0:  # one record per evaluation: steps 0, 3, 6
            seen["validation"].append({f"{c}.{k}": v.detach().clone() for c, m in zip(COMPONENTS, self.modules)
                                       for k, v in m.named_parameters() if v.requires_grad})
        return image_loss(self, index)

    draw_samples, image_loss = loop.draw_samples, Validation._image_loss
    out = tmp_path_factory.mktemp("ema") / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "draw_samples", spy_samples)
        patch.setattr(Validation, "_image_loss", spy_image_loss)
        result = train(run_config(tiny_sd15, example_data, out, *EMA), show_progress=False)
    return result, seen


@pytest.fixture(scope="module")
def plain(tiny_sd15, example_data, tmp_path_factory):
    """The same run without an EMA."""
    return train(run_config(tiny_sd15, example_data, tmp_path_factory.mktemp("plain") / "out", *RUN),
                 show_progress=False)


def _references(result) -> dict[int, dict[str, torch.Tensor]]:
    """step -> the EMA computed from the trained weights after each update."""
    raw = [_raw_at(result.output_dir, k) for k in range(1, 6)] + [_raw_final(result)]
    return {k: _reference(raw[:k], _decays(k)) for k in range(1, 7)}


def test_every_file_holds_the_ema_of_the_trained_weights(averaged):
    result, _ = averaged
    out, expected = result.output_dir, _references(result)
    for step in range(1, 6):  # once per update: 2 micro-batches each
        _close(_file(_step_file(out, step)), _in_file_layout(expected[step]))
        assert torch.load(out / "checkpoints" / f"step-{step:06d}" / EMA_FILE, weights_only=True)["updates"] == step
    _close(_file(out / "example-lora-000001.safetensors"), _in_file_layout(expected[3]))  # the epoch file
    final = _file(out / "example-lora.safetensors")
    _close(final, _in_file_layout(expected[6]))
    _close(_in_file_layout(result.ema), _in_file_layout(expected[6]))
    raw = _in_file_layout(_raw_final(result))  # the EMA really is another adapter than the trained one
    assert max(float((final[k] - raw[k]).abs().max()) for k in raw) > 1e-4
    assert any(k.startswith("text_encoder.") for k in final)
    meta = safetensors.safe_open(str(out / "example-lora.safetensors"), "pt").metadata()
    assert (meta["ss_ema_decay"], meta["ss_ema_warmup"]) == (str(DECAY), "True")


def test_samples_and_validation_use_the_ema(averaged, plain):
    result, seen = averaged
    expected = _references(result)
    assert sorted(seen["samples"]) == [3, 6] and len(seen["validation"]) == 3
    for step, weights in seen["samples"].items():
        _close(_in_file_layout(weights), _in_file_layout(expected[step]))
    for step, weights in zip((3, 6), seen["validation"][1:]):
        _close(_in_file_layout(weights), _in_file_layout(expected[step]))
    # ... while training goes on from the trained weights, untouched by the swaps
    assert result.losses == plain.losses
    _equal(_raw_final(result), _raw_final(plain))
    assert result.val_losses[0] == plain.val_losses[0]  # nothing averaged yet
    assert result.val_losses[3] != plain.val_losses[3] and result.val_losses[6] != plain.val_losses[6]
    assert not np.array_equal(_pixels(result.output_dir, 3), _pixels(plain.output_dir, 3))
    meta = safetensors.safe_open(str(plain.adapter_paths[0]), "pt").metadata()
    assert "ss_ema_decay" not in meta and plain.ema is None


def test_decay_zero_gives_exactly_the_adapter_without_ema(plain, tiny_sd15, example_data, tmp_path):
    zero = train(run_config(tiny_sd15, example_data, tmp_path / "out", *RUN, "train.ema_decay=0",
                            "train.ema_device=cpu"), show_progress=False)
    for name in ("example-lora.safetensors", "example-lora-000001.safetensors"):
        _equal(_file(zero.output_dir / name), _file(plain.output_dir / name))
    assert zero.val_losses == plain.val_losses and zero.losses == plain.losses
    assert np.array_equal(_pixels(zero.output_dir, 6), _pixels(plain.output_dir, 6))


def test_resume_continues_the_ema_bit_for_bit(averaged, tiny_sd15, example_data, tmp_path):
    result, _ = averaged
    out = tmp_path / "out"
    shutil.copytree(result.output_dir / "checkpoints" / "step-000003", out / "checkpoints" / "step-000003")
    resumed = train(run_config(tiny_sd15, example_data, out, *EMA, "train.resume=latest"), show_progress=False)
    assert resumed.losses == result.losses[3:] and resumed.val_losses[6] == result.val_losses[6]
    for name in ("example-lora.safetensors", "example-lora-000001.safetensors"):  # the epoch file: caught up
        _equal(_file(out / name), _file(result.output_dir / name))
    _equal(resumed.ema, result.ema)
    assert np.array_equal(_pixels(out, 6), _pixels(result.output_dir, 6))


def test_ema_switched_on_at_resume_starts_from_the_trained_weights_with_a_warning(
        averaged, plain, tiny_sd15, example_data, tmp_path, caplog):
    result, _ = averaged
    out = tmp_path / "out"
    shutil.copytree(plain.output_dir / "checkpoints" / "step-000003", out / "checkpoints" / "step-000003")
    with caplog.at_level(logging.WARNING, logger="lora_trainer.training.ema"):
        train(run_config(tiny_sd15, example_data, out, *EMA, "train.resume=latest"), show_progress=False)
    warning = [r.getMessage() for r in caplog.records if r.name == "lora_trainer.training.ema"]
    assert len(warning) == 1 and "saved without an EMA" in warning[0] and "step-000003" in warning[0]
    raw = [_raw_at(result.output_dir, 4), _raw_at(result.output_dir, 5), _raw_final(result)]  # the same training
    _close(_file(out / "example-lora.safetensors"), _in_file_layout(_reference(raw, _decays(3))))


def test_ema_switched_off_at_resume_writes_the_trained_weights_with_a_warning(
        averaged, plain, tiny_sd15, example_data, tmp_path, caplog):
    result, _ = averaged
    out = tmp_path / "out"
    shutil.copytree(result.output_dir / "checkpoints" / "step-000003", out / "checkpoints" / "step-000003")
    with caplog.at_level(logging.WARNING, logger="lora_trainer.training.ema"):
        resumed = train(run_config(tiny_sd15, example_data, out, *RUN, "train.resume=latest"), show_progress=False)
    assert any("left unused" in r.getMessage() for r in caplog.records if r.name == "lora_trainer.training.ema")
    assert resumed.ema is None
    _equal(_file(out / "example-lora.safetensors"), _file(plain.output_dir / "example-lora.safetensors"))


@pytest.mark.parametrize("override, message", [
    ("train.ema_decay=1", "train.ema_decay: got 1.0; expected a number in [0, 1)"),
    ("train.ema_decay=-0.5", "train.ema_decay: got -0.5; expected a number in [0, 1)"),
    ("train.ema_warmup=false", "train.ema_warmup: got False with train.ema_decay null (no EMA)"),
    ("train.ema_device=cpu", "train.ema_device: got 'cpu' with train.ema_decay null (no EMA)"),
    ("train.ema_device=gpu", "train.ema_device: got 'gpu'; expected one of"),
    ("train.use_ema=true", "train.use_ema: unknown key; did you mean train.ema_decay (kohya/diffusers: use_ema)?"),
    ("train.ema_config=1", "train.ema_config: unknown key; did you mean train.ema_decay (ai-toolkit: ema_config)?"),
])
def test_bad_ema_values_are_one_line_errors(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.base=m", "data.path=d", "train.max_steps=1", override])
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


@pytest.mark.parametrize("decay, warmup, steps, warned", [
    (0.999, False, 40, True),    # 0.999^40: 96% of the zero-change start left in the files
    (0.9, False, 40, False),     # 0.9^40: 1.5%
    (0.999, True, 40, False),    # the warm-up lets the start fade at once
    (0.999, False, 5000, False),
])
def test_a_decay_too_close_to_1_for_the_run_without_warmup_warns(caplog, decay, warmup, steps, warned):
    layer = torch.nn.Linear(4, 4)
    with caplog.at_level(logging.WARNING, logger="lora_trainer.training.ema"):
        start_ema(TrainConfig(ema_decay=decay, ema_warmup=warmup), {"unet": layer}, torch.device("cpu"),
                  steps=steps)
    assert ("keeps 96% of the untrained adapter in the files after 40 steps" in caplog.text) == (warned and steps == 40)
    assert bool(caplog.records) == warned


def test_inspect_says_the_file_holds_an_ema(averaged, plain, capsys):
    from lora_trainer.cli import main

    assert main(["inspect", str(averaged[0].adapter_paths[0])]) == 0
    shown = capsys.readouterr().out
    assert f"\nema         the tensors are an EMA of the trained weights (decay {DECAY} with warm-up)\n" in shown
    assert main(["inspect", str(plain.adapter_paths[0])]) == 0
    assert "\nema " not in capsys.readouterr().out
