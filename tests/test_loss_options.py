"""kohya's loss and timestep options: huber / smooth_l1 losses and their schedules, the timestep range,
zero terminal SNR, debiased estimation and multi-resolution noise, each against numbers worked out
independently; a tiny run with them; and the defaults reproducing the earlier objective exactly."""

from __future__ import annotations

import json
import logging
import math

import pytest
import safetensors
import torch
import torch.nn.functional as F
from conftest import run_config

from lora_trainer.errors import ConfigError
from lora_trainer.training import loss as L
from lora_trainer.training.draws import draw_step, item_seed
from lora_trainer.training.validation import fixed_timesteps

FAST = ["sample.prompts=[]", "output.dtype=fp32"]


def _scheduler(prediction_type: str = "epsilon"):
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         num_train_timesteps=1000, prediction_type=prediction_type)


def test_huber_and_smooth_l1_follow_kohyas_formulas():
    pred = torch.tensor([[0.0, 0.05, -1.0, 3.0], [0.5, -0.5, 2.0, 0.01]])
    target = torch.tensor([[0.0, 0.0, 1.0, -1.0], [0.0, 0.0, 0.0, 0.0]])
    c = torch.tensor([0.1, 0.3])
    huber = L.elementwise_loss(pred, target, "huber", c)
    smooth = L.elementwise_loss(pred, target, "smooth_l1", c)
    for i in range(2):
        for j in range(4):
            d, ci = float(pred[i, j] - target[i, j]), float(c[i])
            assert huber[i, j].item() == pytest.approx(2 * ci * (math.sqrt(d * d + ci * ci) - ci), rel=1e-4, abs=1e-9)
            assert smooth[i, j].item() == pytest.approx(2 * (math.sqrt(d * d + ci * ci) - ci), rel=1e-4, abs=1e-9)
    # quadratic for small errors (about d²), linear for large ones (about 2c·|d|)
    assert huber[0, 1].item() == pytest.approx(0.05 ** 2, rel=0.15)
    assert huber[0, 3].item() == pytest.approx(2 * 0.1 * 4.0, rel=0.03)
    assert torch.equal(L.elementwise_loss(pred, target, "l1"), (pred - target).abs())
    # the batch loss: the per-sample mean of the element losses, constant c = huber_c · huber_scale
    got = L.diffusion_loss(pred[:, :, None, None], target[:, :, None, None], _scheduler(), torch.tensor([3, 700]),
                           None, loss_type="huber", huber_c=0.1, huber_schedule="constant", huber_scale=2.0)
    want = L.elementwise_loss(pred, target, "huber", torch.tensor([0.2, 0.2])).mean()
    torch.testing.assert_close(got, want)


def test_huber_threshold_schedules_at_both_ends():
    scheduler = _scheduler()
    ends = torch.tensor([0, 500, 999])
    acp = [float(scheduler.alphas_cumprod[t]) for t in ends]
    sigmas = [math.sqrt((1 - a) / a) for a in acp]
    snr_c = L.huber_threshold(scheduler, ends, "snr", 0.1)
    for got, sigma in zip(snr_c.tolist(), sigmas):
        assert got == pytest.approx(0.9 / (1 + sigma) ** 2 + 0.1, rel=1e-6)
    assert snr_c[0] > 0.9 and snr_c[2] == pytest.approx(0.1, abs=0.005)  # about 1 clean, about c pure noise
    expo = L.huber_threshold(scheduler, torch.tensor([0, 500, 1000]), "exponential", 0.1, scale=2.0)
    torch.testing.assert_close(expo, torch.tensor([2.0, 2.0 * math.sqrt(0.1), 0.2]))
    torch.testing.assert_close(L.huber_threshold(scheduler, ends, "constant", 0.1, 3.0), torch.full((3,), 0.3))


def test_zero_terminal_snr_rescales_the_training_schedule_only(caplog):
    base = _scheduler()
    before = base.alphas_cumprod.clone()
    with caplog.at_level(logging.WARNING, logger="lora_trainer"):
        rescaled = L.training_scheduler(base, True)
    assert caplog.text.count("train.zero_terminal_snr") == 1 and "epsilon" in caplog.text
    acp = rescaled.alphas_cumprod
    assert acp[-1].item() == 0.0 and acp[-2].item() > 0
    torch.testing.assert_close(acp[0], before[0], rtol=1e-6, atol=0)
    assert bool((acp[1:] < acp[:-1]).all())
    # Lin et al.: sqrt(alpha_bar) is shifted to 0 at the end and scaled to keep its start
    r, r0, rT = before.double().sqrt(), before[0].double().sqrt(), before[-1].double().sqrt()
    torch.testing.assert_close(acp.double().sqrt()[500], (r[500] - rT) * r0 / (r0 - rT), rtol=1e-5, atol=0)
    assert torch.equal(base.alphas_cumprod, before)  # the base's schedule (samples, class images) is untouched
    assert L.training_scheduler(base, False) is base
    with caplog.at_level(logging.WARNING, logger="lora_trainer"):
        caplog.clear()
        L.training_scheduler(_scheduler("v_prediction"), True)
    assert "zero_terminal_snr" not in caplog.text


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_weights_stay_finite_where_the_snr_is_zero(prediction):
    scheduler = L.training_scheduler(_scheduler(prediction), True)
    t = torch.tensor([0, 500, 998, 999])
    s = L.snr(scheduler, t)
    assert s[-1].item() == 0.0
    eps_weight = L.min_snr_weight(s, 5.0, False)
    assert eps_weight[-1].item() == 1.0 and eps_weight[0].item() == pytest.approx(5.0 / s[0].item())
    assert L.min_snr_weight(s, 5.0, True)[-1].item() == 0.0  # min(0, γ)/(0 + 1)
    torch.testing.assert_close(L.debiased_weight(s)[-1], torch.tensor(math.sqrt(1000.0)))  # SNR floored at 1e-3
    assert L.huber_threshold(scheduler, t, "snr", 0.1)[-1].item() == pytest.approx(0.1)
    pred, target = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    for options in ({"debiased": True}, {"loss_type": "huber"}, {"loss_type": "smooth_l1", "debiased": True}):
        assert torch.isfinite(L.diffusion_loss(pred, target, scheduler, t, 5.0, **options))


def test_debiased_weight_is_one_over_sqrt_snr_with_kohyas_cap():
    scheduler = _scheduler()
    t = torch.tensor([0, 10, 400, 999])
    acp = [float(scheduler.alphas_cumprod[i]) for i in t]
    snrs = [a / (1 - a) for a in acp]
    assert snrs[0] > 1000  # t = 0 is capped at SNR 1000, as kohya does
    want = [1 / math.sqrt(min(s, 1000.0)) for s in snrs]
    torch.testing.assert_close(L.debiased_weight(L.snr(scheduler, t)), torch.tensor(want), rtol=1e-5, atol=0)
    pred, target = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    got = L.diffusion_loss(pred, target, scheduler, t, None, debiased=True)
    torch.testing.assert_close(got, (per_sample * torch.tensor(want)).mean(), rtol=1e-5, atol=0)
    # with min-SNR-γ too, both weights multiply
    gamma = torch.tensor([min(s, 5.0) / s for s in snrs])
    both = L.diffusion_loss(pred, target, scheduler, t, 5.0, debiased=True)
    torch.testing.assert_close(both, (per_sample * torch.tensor(want) * gamma).mean(), rtol=1e-5, atol=0)


def _draws(items, **options):
    return draw_step((len(items), 4, 16, 16), items, 42, 0, "instance", 0.0, 0.0, options.pop("high", 1000),
                     torch.float32, torch.float32, torch.device("cpu"), **options)


def test_timesteps_are_drawn_in_the_range_and_validation_spreads_over_it():
    t = _draws(list(range(2000)), min_timestep=200, high=300).timesteps
    assert int(t.min()) == 200 and int(t.max()) == 299 and len(set(t.tolist())) == 100
    assert fixed_timesteps(4, 900, 100).tolist() == [200, 400, 600, 800]
    assert fixed_timesteps(8, 1000).tolist() == [62, 187, 312, 437, 562, 687, 812, 937]


def test_default_draws_are_the_earlier_draws_bit_for_bit():
    """What draw_step drew before the timestep range and multi-resolution noise existed."""
    items = [3, 17, 250]
    for offset in (0.0, 0.1):
        d = draw_step((3, 4, 8, 8), items, 7, 2, "instance", offset, 0.0, 1000, torch.float32, torch.float32,
                      torch.device("cpu"))
        for k, item in enumerate(items):
            g = torch.Generator().manual_seed(item_seed(7, 2, item, "instance"))
            eps, noise = torch.randn((1, 4, 8, 8), generator=g), torch.randn((1, 4, 8, 8), generator=g)
            if offset:
                noise = noise + offset * torch.randn((1, 4, 1, 1), generator=g)
            t = torch.randint(0, 1000, (1,), generator=g)
            assert torch.equal(d.eps[k:k + 1], eps) and torch.equal(d.noise[k:k + 1], noise)
            assert torch.equal(d.timesteps[k:k + 1], t)


def test_multires_noise_is_unit_std_per_item_and_differs_from_plain_noise():
    plain = _draws([1, 2])
    multi = _draws([1, 2], multires_iterations=6, multires_discount=0.3)
    assert multi.noise.shape == plain.noise.shape == (2, 4, 16, 16)
    for k in range(2):
        assert multi.noise[k].std().item() == pytest.approx(1.0, abs=1e-5)
    assert not torch.allclose(multi.noise, plain.noise)
    assert torch.equal(multi.eps, plain.eps)  # drawn before the noise: unchanged
    # An item's noise does not depend on its batch, and the draw is repeatable.
    assert torch.equal(_draws([2], multires_iterations=6).noise[0], multi.noise[1])
    assert torch.equal(_draws([1, 2], multires_iterations=6).noise, multi.noise)
    # Low frequencies gain power: each channel's mean varies more than plain noise's (1/256 of unit
    # variance for 16x16), the more so the larger the discount.
    means = [_draws(list(range(40)), **o).noise.mean(dim=(2, 3)).var().item()
             for o in ({}, {"multires_iterations": 6}, {"multires_iterations": 6, "multires_discount": 0.8})]
    assert means[0] == pytest.approx(1 / 256, rel=0.2) and means[1] > 2 * means[0] and means[2] > 10 * means[1]


def test_pyramid_levels_by_hand():
    noise = torch.randn(1, 2, 12, 12, generator=torch.Generator().manual_seed(0))
    got = L.pyramid_noise(noise, 2, 0.5, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    full = torch.randn(1, 2, 12, 12, generator=g)  # level 0: full size, weight 0.5^0
    ratio = 2 + 2 * torch.rand((), generator=g).item()
    side = int(12 / ratio)
    low = F.interpolate(torch.randn(1, 2, side, side, generator=g), size=(12, 12), mode="bilinear",
                        align_corners=False)
    total = noise + full + 0.5 * low
    torch.testing.assert_close(got, total / total.std())


@pytest.mark.parametrize("overrides, key", [
    (["train.loss_type=mse"], "train.loss_type"),
    (["train.huber_schedule=linear"], "train.huber_schedule"),
    (["train.huber_c=0"], "train.huber_c"),
    (["train.huber_scale=-1"], "train.huber_scale"),
    (["train.min_timestep=-1"], "train.min_timestep"),
    (["train.max_timestep=1001"], "train.max_timestep"),
    (["train.max_timestep=0"], "train.max_timestep"),
    (["train.min_timestep=500", "train.max_timestep=500"], "train.min_timestep"),
    (["train.min_timestep=1000"], "train.min_timestep"),
    (["train.multires_noise_iterations=-1"], "train.multires_noise_iterations"),
    (["train.multires_noise_discount=1.5"], "train.multires_noise_discount"),
])
def test_bad_values_are_one_line_errors_naming_the_key(overrides, key, tiny_sd15, example_data, tmp_path):
    with pytest.raises(ConfigError) as err:
        run_config(tiny_sd15, example_data, tmp_path, *overrides)
    message = str(err.value)
    assert "\n" not in message and f"{key}: got" in message


def test_a_run_with_kohyas_options_trains_validates_and_records_them(tiny_sd15, example_data, tmp_path):
    from lora_trainer.training.loop import train

    options = ["train.loss_type=huber", "train.huber_schedule=snr", "train.huber_c=0.2", "train.min_timestep=100",
               "train.max_timestep=900", "train.multires_noise_iterations=6", "train.multires_noise_discount=0.4",
               "train.debiased_estimation=true", "train.zero_terminal_snr=true", "train.snr_gamma=5"]
    result = train(run_config(tiny_sd15, example_data, tmp_path / "k", *FAST, "train.max_steps=3",
                              "data.validation_split=0.2", *options), show_progress=False)
    assert len(result.losses) == 3 and all(math.isfinite(v) for v in result.losses)
    assert sorted(result.val_losses) == [0, 1, 2, 3] and all(math.isfinite(v) for v in result.val_losses.values())
    meta = safetensors.safe_open(str(result.adapter_paths[0]), "pt").metadata()
    assert {k: meta[k] for k in meta if k in EXPECTED} == EXPECTED


EXPECTED = {"ss_loss_type": "huber", "ss_huber_schedule": "snr", "ss_huber_c": "0.2", "ss_huber_scale": "1.0",
            "ss_min_timestep": "100", "ss_max_timestep": "900", "ss_multires_noise_iterations": "6",
            "ss_multires_noise_discount": "0.4", "ss_debiased_estimation": "True", "ss_zero_terminal_snr": "True",
            "ss_min_snr_gamma": "5.0", "ss_ip_noise_gamma": "0.0"}


def _earlier_draw_step(latent_shape, items, seed, epoch, stream, noise_offset, input_perturbation, num_timesteps,
                       eps_dtype, dtype, device, **new_options):
    """draw_step as it was before these options (they must be at their defaults)."""
    from lora_trainer.training.draws import StepDraws

    assert new_options == {"min_timestep": 0, "multires_iterations": 0, "multires_discount": 0.3}
    parts = []
    for item in items:
        g = torch.Generator(device=device).manual_seed(item_seed(seed, epoch, item, stream))
        eps = torch.randn((1, *latent_shape[1:]), generator=g, dtype=eps_dtype, device=device)
        noise = torch.randn((1, *latent_shape[1:]), generator=g, dtype=dtype, device=device)
        if noise_offset:
            noise = noise + noise_offset * torch.randn((1, latent_shape[1], 1, 1), generator=g, dtype=dtype)
        t = torch.randint(0, num_timesteps, (1,), device=device, generator=g)
        extra = torch.randn(noise.shape, generator=g, dtype=dtype) if input_perturbation else 0
        parts.append((eps, noise, noise + input_perturbation * extra, t))
    return StepDraws(*(torch.cat(column) for column in zip(*parts)))


def _earlier_loss(pred, target, scheduler, timesteps, snr_gamma, **new_options):
    """The min-SNR-γ weighted MSE as it was before these options."""
    assert new_options == {"loss_type": "l2", "huber_c": 0.1, "huber_schedule": "snr", "huber_scale": 1.0,
                           "debiased": False}
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=[1, 2, 3])
    acp = scheduler.alphas_cumprod[timesteps].float()
    s = acp / (1 - acp)
    weight = torch.clamp(s, max=snr_gamma) / s
    return (per_sample * weight).mean()


def test_defaults_reproduce_the_earlier_losses_exactly(tiny_sd15, example_data, tmp_path, monkeypatch):
    from lora_trainer.training import loop

    common = [*FAST, "train.max_steps=3", "train.snr_gamma=5", "train.noise_offset=0.1",
              "train.input_perturbation=0.1", "data.validation_split=0.2"]
    now = loop.train(run_config(tiny_sd15, example_data, tmp_path / "now", *common), show_progress=False)
    monkeypatch.setattr(loop, "draw_step", _earlier_draw_step)
    monkeypatch.setattr(loop, "diffusion_loss", _earlier_loss)
    before = loop.train(run_config(tiny_sd15, example_data, tmp_path / "before", *common), show_progress=False)
    assert now.losses == before.losses and now.val_losses == before.val_losses
    logged = [json.loads(line) for line in (tmp_path / "now" / "train_log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in logged if "loss" in r] == before.losses


def test_a_range_past_a_shorter_schedule_is_refused(tiny_sd15, example_data, tmp_path):
    import shutil

    from lora_trainer.training.loop import train

    model = tmp_path / "short"
    shutil.copytree(tiny_sd15, model)
    config = model / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "num_train_timesteps": 500}))
    with pytest.raises(ConfigError, match=r"^train.max_timestep: got 600; the base's schedule has 500 timesteps"):
        train(run_config(model, example_data, tmp_path / "out", *FAST, "train.max_timestep=600"), show_progress=False)
