"""kohya's extra noise and loss options: random noise-offset and input-perturbation strengths, the
adaptive noise scale, the v-prediction-like loss and the v loss scaled like a noise loss. Each
against a reference computed by hand on fixed tensors, in a tiny run (losses and validation losses
change; a resumed run is exact), recorded in the metadata, and refused in one line where it means
nothing."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import safetensors
import torch
import torch.nn.functional as F
from conftest import run_config

from lora_trainer.errors import ConfigError
from lora_trainer.training import loss as L
from lora_trainer.training.draws import draw_step, item_seed

FAST = ["sample.prompts=[]", "output.dtype=fp32", "train.max_steps=2", "data.validation_split=0.25"]
NOISY = ["train.noise_offset=0.1", "train.input_perturbation=0.1"]


def _scheduler(prediction_type: str = "epsilon"):
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000, prediction_type=prediction_type)


def test_random_offset_strength_is_drawn_before_the_offset():
    got = L.sample_noise(torch.zeros(2, 4, 8, 8), 0.1, torch.Generator().manual_seed(11), random_strength=True)
    g = torch.Generator().manual_seed(11)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    strength = 0.1 * torch.rand((), generator=g).item()
    offset = torch.randn(2, 4, 1, 1, generator=g)
    assert 0 <= strength < 0.1
    torch.testing.assert_close(got, noise + strength * offset, rtol=0, atol=0)


def test_adaptive_offset_grows_with_each_channels_absolute_mean():
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    latents += torch.tensor([-2.0, -0.5, 0.0, 1.5]).view(1, 4, 1, 1)
    got = L.sample_noise(latents, 0.1, torch.Generator().manual_seed(12), adaptive_scale=0.3)
    g = torch.Generator().manual_seed(12)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    offset = torch.randn(2, 4, 1, 1, generator=g)
    strength = torch.zeros(2, 4, 1, 1)
    for b in range(2):
        for c in range(4):
            strength[b, c] = max(0.0, 0.1 + 0.3 * abs(float(latents[b, c].mean())))
    torch.testing.assert_close(got, noise + strength * offset)
    # a negative scale lowers the offset, never below 0 (no offset at all for a channel far from 0)
    clamped = L.sample_noise(latents, 0.1, torch.Generator().manual_seed(12), adaptive_scale=-10.0)
    far = latents.mean(dim=(2, 3)).abs() > 0.01
    torch.testing.assert_close((clamped - noise)[far], torch.zeros_like(clamped[far]))
    # with a random strength too: strength drawn first, then the latent's part added
    both = L.sample_noise(latents, 0.1, torch.Generator().manual_seed(12), random_strength=True, adaptive_scale=0.3)
    g = torch.Generator().manual_seed(12)
    noise, u = torch.randn(2, 4, 8, 8, generator=g), torch.rand((), generator=g).item()
    offset = torch.randn(2, 4, 1, 1, generator=g)
    torch.testing.assert_close(both, noise + (0.1 * u + (strength - 0.1)) * offset)


def test_random_perturbation_strength():
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    got = L.perturb(noise, 0.1, torch.Generator().manual_seed(13), random_strength=True)
    g = torch.Generator().manual_seed(13)
    amount = 0.1 * torch.rand((), generator=g).item()
    torch.testing.assert_close(got, noise + amount * torch.randn(2, 4, 8, 8, generator=g), rtol=0, atol=0)
    assert L.perturb(noise, 0.0, None, random_strength=True) is noise  # off: nothing drawn


def test_draws_with_the_options_off_are_the_default_draws():
    shape, items = (3, 4, 8, 8), [3, 17, 250]
    args = (shape, items, 7, 2, "instance", 0.1, 0.1, 1000, torch.float32, torch.float32, torch.device("cpu"))
    plain = draw_step(*args)
    off = draw_step(*args, offset_random_strength=False, adaptive_noise_scale=None, perturbation_random_strength=False)
    for name in ("eps", "noise", "model_noise", "timesteps"):
        assert torch.equal(getattr(plain, name), getattr(off, name))
    on = draw_step(*args, offset_random_strength=True, perturbation_random_strength=True)
    assert torch.equal(on.eps, plain.eps) and not torch.equal(on.noise, plain.noise)


def test_adaptive_draws_read_each_items_own_latent():
    mean = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4)) + 1.0
    std = torch.full((2, 4, 8, 8), 0.5)
    d = draw_step((2, 4, 8, 8), [5, 9], 1, 0, "instance", 0.1, 0.0, 1000, torch.float32, torch.float32,
                  torch.device("cpu"), adaptive_noise_scale=0.2, latent_parts=(mean, std, 0.18215))
    for k, item in enumerate([5, 9]):
        g = torch.Generator().manual_seed(item_seed(1, 0, item, "instance"))
        eps = torch.randn(1, 4, 8, 8, generator=g)
        latent = (mean[k:k + 1] + std[k:k + 1] * eps) * 0.18215
        want = L.sample_noise(latent, 0.1, g, adaptive_scale=0.2)
        assert torch.equal(d.eps[k:k + 1], eps) and torch.equal(d.noise[k:k + 1], want)
    # one item alone draws what it drew in the batch
    alone = draw_step((1, 4, 8, 8), [9], 1, 0, "instance", 0.1, 0.0, 1000, torch.float32, torch.float32,
                      torch.device("cpu"), adaptive_noise_scale=0.2, latent_parts=(mean[1:], std[1:], 0.18215))
    assert torch.equal(alone.noise[0], d.noise[1])


def _per_sample(pred, target):
    return F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))


def _snr(scheduler, t):
    acp = [float(scheduler.alphas_cumprod[i]) for i in t]
    return [min(max(a / (1 - a), 1e-3), 1000.0) for a in acp]  # kohya's cap 1000, and our floor


def test_v_pred_like_loss_follows_kohyas_formula():
    scheduler, t = _scheduler(), torch.tensor([0, 10, 400, 999])
    pred, target = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    per_sample, snrs = _per_sample(pred, target), _snr(scheduler, t)
    scale = torch.tensor([s / (s + 1) for s in snrs])
    got = L.diffusion_loss(pred, target, scheduler, t, None, v_pred_like=0.2)
    torch.testing.assert_close(got, (per_sample + per_sample / scale * 0.2).mean())
    # kohya's order: min-SNR weight, then the v-like term, then the debiased weight
    gamma = torch.tensor([min(s, 5.0) / s for s in snrs])
    debiased = torch.tensor([1 / math.sqrt(s) for s in snrs])
    weighted = per_sample * gamma
    both = L.diffusion_loss(pred, target, scheduler, t, 5.0, debiased=True, v_pred_like=0.2)
    torch.testing.assert_close(both, ((weighted + weighted / scale * 0.2) * debiased).mean())


def test_v_loss_scaled_like_a_noise_loss():
    scheduler, t = _scheduler("v_prediction"), torch.tensor([0, 10, 400, 999])
    pred, target = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    scale = torch.tensor([s / (s + 1) for s in _snr(scheduler, t)])
    got = L.diffusion_loss(pred, target, scheduler, t, None, scale_v_like_noise=True)
    torch.testing.assert_close(got, (_per_sample(pred, target) * scale).mean())
    assert scale[0] > 0.99 and scale[-1] < 0.01  # clean latents weigh fully, pure noise hardly


def test_both_stay_finite_where_the_snr_is_zero():
    t = torch.tensor([998, 999])
    pred, target = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for prediction, options in (("epsilon", {"v_pred_like": 0.1}), ("v_prediction", {"scale_v_like_noise": True})):
        scheduler = L.training_scheduler(_scheduler(prediction), True)
        assert L.snr(scheduler, t)[-1].item() == 0.0
        assert torch.isfinite(L.diffusion_loss(pred, target, scheduler, t, None, **options))


def _train(cfg):
    from lora_trainer.training.loop import train

    return train(cfg, show_progress=False)


@pytest.fixture(scope="module")
def baseline(tiny_sd15, example_data, tmp_path_factory):
    return _train(run_config(tiny_sd15, example_data, tmp_path_factory.mktemp("plain") / "out", *FAST, *NOISY))


@pytest.mark.parametrize("option", ["train.noise_offset_random_strength=true", "train.adaptive_noise_scale=0.5",
                                    "train.input_perturbation_random_strength=true", "train.v_pred_like_loss=0.2"])
def test_each_option_changes_the_training_and_validation_losses(option, baseline, tiny_sd15, example_data, tmp_path):
    result = _train(run_config(tiny_sd15, example_data, tmp_path / "out", *FAST, *NOISY, option))
    assert all(math.isfinite(v) for v in result.losses)
    assert result.losses != baseline.losses
    # the validation loss reads the same options (with its own fixed draws); at step 0 too
    assert result.val_losses[0] != baseline.val_losses[0]


@pytest.fixture(scope="module")
def tiny_v_model(tiny_sd15, tmp_path_factory):
    model = tmp_path_factory.mktemp("v-model") / "model"
    shutil.copytree(tiny_sd15, model)
    config = model / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "prediction_type": "v_prediction"}))
    return model


def test_scaled_v_loss_on_a_v_prediction_base(tiny_v_model, example_data, tmp_path):
    plain = _train(run_config(tiny_v_model, example_data, tmp_path / "plain", *FAST))
    scaled = _train(run_config(tiny_v_model, example_data, tmp_path / "scaled", *FAST,
                               "train.scale_v_pred_loss_like_noise_pred=true"))
    assert all(math.isfinite(v) for v in scaled.losses) and scaled.losses != plain.losses
    assert scaled.val_losses[0] < plain.val_losses[0]  # every weight SNR/(SNR + 1) is below 1
    meta = safetensors.safe_open(str(scaled.adapter_paths[0]), "pt").metadata()
    assert meta["ss_scale_v_pred_loss_like_noise_pred"] == "True" and "ss_v_pred_like_loss" not in meta


@pytest.mark.parametrize("model, option, key", [
    ("tiny_sd15", "train.scale_v_pred_loss_like_noise_pred=true", "train.scale_v_pred_loss_like_noise_pred"),
    ("tiny_v_model", "train.v_pred_like_loss=0.1", "train.v_pred_like_loss"),
])
def test_options_for_the_other_prediction_type_are_refused(model, option, key, example_data, tmp_path, request):
    cfg = run_config(request.getfixturevalue(model), example_data, tmp_path / "out", *FAST, option)
    with pytest.raises(ConfigError) as err:
        _train(cfg)
    assert "\n" not in str(err.value) and str(err.value).startswith(f"{key}: got")


RANDOM = [*NOISY, "train.noise_offset_random_strength=true", "train.input_perturbation_random_strength=true",
          "train.adaptive_noise_scale=0.3", "train.v_pred_like_loss=0.1", "train.max_steps=4",
          "output.save_every_n_steps=2"]


def test_random_strengths_resume_exactly_and_are_recorded(tiny_sd15, example_data, tmp_path):
    straight = _train(run_config(tiny_sd15, example_data, tmp_path / "straight", *FAST, *RANDOM))
    out = tmp_path / "resumed"
    shutil.copytree(straight.output_dir / "checkpoints" / "step-000002", out / "checkpoints" / "step-000002")
    resumed = _train(run_config(tiny_sd15, example_data, out, *FAST, *RANDOM, "train.resume=latest"))
    assert resumed.losses == straight.losses[2:] and resumed.val_losses[4] == straight.val_losses[4]
    with safetensors.safe_open(str(resumed.adapter_paths[0]), "pt") as a, \
            safetensors.safe_open(str(straight.adapter_paths[0]), "pt") as b:
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in b.keys())
        meta = b.metadata()
    assert {k: meta.get(k) for k in RECORDED} == RECORDED


RECORDED = {"ss_noise_offset": "0.1", "ss_noise_offset_random_strength": "True", "ss_adaptive_noise_scale": "0.3",
            "ss_ip_noise_gamma": "0.1", "ss_ip_noise_gamma_random_strength": "True", "ss_v_pred_like_loss": "0.1",
            "ss_scale_v_pred_loss_like_noise_pred": None}


def test_defaults_record_kohyas_switches_off(baseline):
    meta = safetensors.safe_open(str(baseline.adapter_paths[0]), "pt").metadata()
    assert meta["ss_noise_offset_random_strength"] == "False" and meta["ss_ip_noise_gamma_random_strength"] == "False"
    assert not {"ss_adaptive_noise_scale", "ss_v_pred_like_loss", "ss_scale_v_pred_loss_like_noise_pred"} & set(meta)


@pytest.mark.parametrize("overrides, key", [
    (["train.noise_offset_random_strength=true"], "train.noise_offset_random_strength"),
    (["train.adaptive_noise_scale=0.5"], "train.adaptive_noise_scale"),
    (["train.noise_offset=0.1", "train.adaptive_noise_scale=0"], "train.adaptive_noise_scale"),
    (["train.adaptive_noise_scale=0"], "train.adaptive_noise_scale"),
    (["train.input_perturbation_random_strength=true"], "train.input_perturbation_random_strength"),
    (["train.v_pred_like_loss=0"], "train.v_pred_like_loss"),
    (["train.v_pred_like_loss=-1"], "train.v_pred_like_loss"),
    (["train.v_pred_like_loss=0.1", "train.scale_v_pred_loss_like_noise_pred=true"], "train.v_pred_like_loss"),
])
def test_bad_values_and_combinations_are_one_line_errors(overrides, key, tiny_sd15, example_data, tmp_path):
    with pytest.raises(ConfigError) as err:
        run_config(tiny_sd15, example_data, tmp_path, *overrides)
    assert "\n" not in str(err.value) and f"{key}: got" in str(err.value)
