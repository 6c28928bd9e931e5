"""Learning-rate schedule options (kohya's --lr_scheduler_num_cycles, --lr_scheduler_power,
--lr_scheduler_min_lr_ratio): the rates at each step equal the schedule computed by hand, a
checkpointed schedule resumes exactly, and from-kohya maps them."""

from __future__ import annotations

import math

import pytest
import torch

from lora_trainer.config import TrainConfig, config_from_dict
from lora_trainer.errors import ConfigError
from lora_trainer.kohya.setup import config_from_kohya
from lora_trainer.training.optimizers import build_optimizer
from lora_trainer.training.schedules import build_scheduler

LR, STEPS, WARMUP = 1e-4, 10, 2


def _rates(t: TrainConfig, processes: int = 1) -> tuple[list[float], torch.optim.Optimizer]:
    """The lr each of the STEPS updates uses, with the scheduler stepped once per process per update."""
    optimizer = build_optimizer(t, [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": t.lr}])
    scheduler = build_scheduler(t, optimizer, STEPS, processes)
    rates = []
    for _ in range(STEPS):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()  # no gradients: only keeps torch from warning about the order
        for _ in range(processes):
            scheduler.step()
    return rates, optimizer


def _warm(step: int) -> float | None:
    return step / WARMUP if step < WARMUP else None


def test_cosine_with_restarts_runs_the_given_number_of_cycles():
    rates, _ = _rates(TrainConfig(lr=LR, warmup=WARMUP, scheduler="cosine_with_restarts", scheduler_cycles=2))
    for step, rate in enumerate(rates):
        progress = (step - WARMUP) / (STEPS - WARMUP)
        expected = _warm(step) if step < WARMUP else 0.5 * (1 + math.cos(math.pi * ((2 * progress) % 1)))
        assert rate == pytest.approx(LR * expected, rel=1e-12, abs=1e-20), step
    assert rates[6] == pytest.approx(LR)  # the restart: halfway through the steps after warmup


def test_polynomial_decays_with_the_given_power():
    rates, optimizer = _rates(TrainConfig(lr=LR, warmup=WARMUP, scheduler="polynomial", scheduler_power=2.0))
    # diffusers' polynomial ends at 1e-7 relative to the optimizer's default lr
    start, end = optimizer.defaults["lr"], 1e-7
    for step, rate in enumerate(rates):
        remaining = 1 - (step - WARMUP) / (STEPS - WARMUP)
        expected = _warm(step) if step < WARMUP else ((start - end) * remaining ** 2 + end) / start
        assert rate == pytest.approx(LR * expected, rel=1e-12, abs=1e-20), step


def test_cosine_with_min_lr_ratio_never_goes_below_the_floor_after_warmup():
    rates, _ = _rates(TrainConfig(lr=LR, warmup=WARMUP, scheduler="cosine", min_lr_ratio=0.1))
    for step, rate in enumerate(rates):
        progress = (step - WARMUP) / (STEPS - WARMUP)
        expected = _warm(step) if step < WARMUP else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        assert rate == pytest.approx(LR * expected, rel=1e-12, abs=1e-20), step
    assert min(rates[WARMUP:]) > 0.1 * LR


def test_schedules_are_the_same_per_update_under_several_processes():
    for options in (dict(scheduler="cosine_with_restarts", scheduler_cycles=3), dict(scheduler="cosine", min_lr_ratio=0.2),
                    dict(scheduler="polynomial", scheduler_power=0.5)):
        t = TrainConfig(lr=LR, warmup=WARMUP, **options)
        assert _rates(t, processes=2)[0] == pytest.approx(_rates(t)[0], rel=1e-12), options


def test_a_checkpointed_schedule_resumes_at_the_same_rates():
    t = TrainConfig(lr=LR, warmup=WARMUP, scheduler="cosine", min_lr_ratio=0.1)
    straight, _ = _rates(t)
    optimizer = build_optimizer(t, [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": t.lr}])
    first = build_scheduler(t, optimizer, STEPS)
    for _ in range(4):
        optimizer.step()
        first.step()
    saved = first.state_dict()
    optimizer = build_optimizer(t, [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": t.lr}])
    resumed = build_scheduler(t, optimizer, STEPS)
    resumed.load_state_dict(saved)
    rates = []
    for _ in range(4, STEPS):
        rates.append(resumed.get_last_lr()[0])
        optimizer.step()
        resumed.step()
    assert rates == straight[4:]


@pytest.mark.parametrize("override, message", [
    ({"scheduler_cycles": 0}, "train.scheduler_cycles: got 0; expected an integer >= 1"),
    ({"scheduler_power": -1.0, "scheduler": "polynomial"}, "train.scheduler_power: got -1.0"),
    ({"min_lr_ratio": 1.0, "scheduler": "cosine"}, "train.min_lr_ratio: got 1.0; expected a number in [0, 1)"),
    ({"scheduler_cycles": 3}, "train.scheduler_cycles: got 3 with train.scheduler 'constant', which does not read it"),
    ({"min_lr_ratio": 0.1, "scheduler": "linear"}, "set train.scheduler=cosine"),
])
def test_schedule_options_are_checked_with_one_line_naming_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        config_from_dict({"model": {"base": "m"}, "data": {"path": "d"}, "train": {"max_steps": 10, **override}})
    assert message in str(info.value) and "\n" not in str(info.value)


def _kohya(**extra):
    return config_from_kohya({"pretrained_model_name_or_path": "m", "train_data_dir": "img", "caption_extension": ".txt", "network_dim": 4,
                              "network_alpha": 4, "learning_rate": 1e-4, "max_train_steps": 100, **extra})


def test_from_kohya_maps_the_schedule_options():
    cfg, notes = _kohya(lr_scheduler="cosine_with_restarts", lr_scheduler_num_cycles="3", lr_scheduler_power="2")
    assert (cfg["train"]["scheduler"], cfg["train"]["scheduler_cycles"]) == ("cosine_with_restarts", 3)
    assert "scheduler_power" not in cfg["train"]
    assert notes == ["--lr_scheduler_power 2: only --lr_scheduler polynomial reads it (here train.scheduler_power); "
                     "left out"]
    cfg, notes = _kohya(lr_scheduler="polynomial", lr_scheduler_power=0.5, lr_scheduler_num_cycles=1)
    assert (cfg["train"]["scheduler"], cfg["train"]["scheduler_power"], notes) == ("polynomial", 0.5, [])
    cfg, notes = _kohya(lr_scheduler="cosine_with_min_lr", lr_scheduler_min_lr_ratio="0.1")
    assert (cfg["train"]["scheduler"], cfg["train"]["min_lr_ratio"], notes) == ("cosine", 0.1, [])
    config_from_dict(cfg)  # loads
    cfg, notes = _kohya(lr_scheduler="cosine_with_min_lr")
    assert "min_lr_ratio" not in cfg["train"] and "without --lr_scheduler_min_lr_ratio" in notes[0]
