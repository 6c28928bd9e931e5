"""The Lion optimizer (kohya's --optimizer_type Lion / Lion8bit): its update checked against Lion's
rule computed here, one real training step moving every up weight by exactly ±lr, the one-line
errors when it cannot run, and from-kohya's mapping."""

from __future__ import annotations

import importlib.util
import json
import logging

import pytest
import safetensors
import torch
from conftest import REPO, run_config

from lora_trainer.cli import main
from lora_trainer.config import TrainConfig
from lora_trainer.errors import ConfigError
from lora_trainer.kohya.setup import config_from_kohya
from lora_trainer.training.optimizers import build_optimizer, check_optimizer

pytest.importorskip("lion_pytorch")


def test_lion_update_is_the_sign_of_the_momentum_blend_times_lr():
    t = TrainConfig(optimizer="lion", lr=1e-2, weight_decay=0.5, adam_beta1=0.9, adam_beta2=0.99)
    start = torch.tensor([0.5, -1.0, 2.0, 0.0])
    p = torch.nn.Parameter(start.clone())
    optimizer = build_optimizer(t, [{"params": [p], "lr": t.lr}])
    grads = [torch.tensor([0.3, -0.2, 0.0, 1e-6]), torch.tensor([-2.0, -0.1, 0.4, -1e-6])]
    # Lion, step by step: c = b1·m + (1-b1)·g; w ← w·(1 - lr·wd) - lr·sign(c); m ← b2·m + (1-b2)·g
    w, m = start.double(), torch.zeros(4, dtype=torch.float64)
    for g in grads:
        p.grad = g.clone()
        optimizer.step()
        blend = 0.9 * m + 0.1 * g.double()
        w = w * (1 - 1e-2 * 0.5) - 1e-2 * torch.sign(blend)
        m = 0.99 * m + 0.01 * g.double()
        torch.testing.assert_close(p.detach().double(), w, rtol=0, atol=1e-7)
    # a gradient of 1e-6 moves its weight as far as one of 2.0 does (less the decay)
    assert float(p.detach()[3]) == pytest.approx(-1e-2 * (1 - 5e-3) + 1e-2, abs=1e-7)


def test_one_real_lion_step_moves_every_up_weight_by_exactly_lr(tiny_sd15, example_data, tmp_path, caplog):
    from lora_trainer.training.loop import train

    lr = 1e-3  # the tiny model's rate: at or above 3e-4, so the run warns
    cfg = run_config(tiny_sd15, example_data, tmp_path / "lion", "sample.prompts=[]", "output.dtype=fp32",
                     "train.optimizer=lion", f"train.lr={lr}", "train.max_steps=1", "train.warmup=0",
                     "train.scheduler=cosine", "train.min_lr_ratio=0.5")
    with caplog.at_level(logging.WARNING):
        result = train(cfg, show_progress=False)
    assert "Lion wants an lr 3-10x smaller" in caplog.text
    ups = [p.detach() for n, p in result.unet.named_parameters() if ".lora_B." in n]
    moved = torch.cat([u.flatten() for u in ups])
    # B starts at 0, so weight decay does nothing to it and the first update is -lr·sign(gradient)
    assert set(moved.abs().unique().tolist()) <= {0.0, torch.tensor(lr).item()}
    assert (moved != 0).float().mean() > 0.9
    meta = safetensors.safe_open(str(result.adapter_paths[0]), "pt").metadata()
    assert (meta["ss_optimizer"], meta["ss_lr_scheduler"]) == ("lion_pytorch.lion_pytorch.Lion", "cosine_with_min_lr")
    record = json.loads((tmp_path / "lion" / "train_log.jsonl").read_text().splitlines()[0])
    assert record["lr"] == pytest.approx(0.5 * lr)  # a one-step cosine ends at its floor


def _without(monkeypatch, *missing):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in missing else (object() if name == "bitsandbytes" else real(name, *a)))


def test_lion_without_its_package_is_one_line_before_any_model_loads(monkeypatch, example_data, tmp_path, capsys):
    _without(monkeypatch, "lion_pytorch")
    rc = main(["train", str(REPO / "configs" / "example.yaml"), "model.base=/nonexistent/model",
               f"data.path={example_data}", f"output.dir={tmp_path / 'out'}", "train.optimizer=lion"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and not (tmp_path / "out").exists()
    assert "train.optimizer: 'lion' needs the lion-pytorch package; pip install 'lora-trainer[lion]'" in err


def test_lion8bit_needs_bitsandbytes_and_a_gpu(monkeypatch):
    _without(monkeypatch)  # bitsandbytes "installed"
    with pytest.raises(ConfigError, match=r"'lion8bit' \(bitsandbytes\) needs a CUDA GPU.*train.optimizer=lion$"):
        check_optimizer(TrainConfig(optimizer="lion8bit"), cuda_available=False)
    check_optimizer(TrainConfig(optimizer="lion8bit"), cuda_available=True)
    _without(monkeypatch, "bitsandbytes")
    with pytest.raises(ConfigError, match=r"needs the bitsandbytes package; pip install 'lora-trainer\[bnb\]'"):
        check_optimizer(TrainConfig(optimizer="lion8bit"), cuda_available=True)


def _kohya(**extra):
    return config_from_kohya({"pretrained_model_name_or_path": "m", "train_data_dir": "img", "caption_extension": ".txt", "network_dim": 4,
                              "network_alpha": 4, "learning_rate": 3e-5, "max_train_steps": 100, **extra})


def test_from_kohya_maps_lion_with_the_betas_and_decay_kohya_runs_it_with():
    for extra, optimizer in (({"optimizer_type": "Lion"}, "lion"), ({"use_lion_optimizer": True}, "lion"),
                             ({"optimizer_type": "Lion8bit"}, "lion8bit")):
        cfg, notes = _kohya(**extra)
        t = cfg["train"]
        assert (t["optimizer"], t["adam_beta2"], t["weight_decay"], notes) == (optimizer, 0.99, 0.0, []), extra
    cfg, _ = _kohya(optimizer_type="Lion", optimizer_args=["weight_decay=0.1", "betas=0.95,0.98"])
    t = cfg["train"]
    assert (t["weight_decay"], t["adam_beta1"], t["adam_beta2"]) == (0.1, 0.95, 0.98)
