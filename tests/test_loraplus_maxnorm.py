"""LoRA+ (B at lr × ratio, kohya's loraplus_lr_ratio) and max-norm regularisation (kohya's
--scale_weight_norms): the optimizer groups and schedule, real runs against hand-computed
references, the step logs, exact resume, and two processes that stay identical."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import safetensors
import torch
from conftest import run_config

from lora_trainer.config import TrainConfig, load_config
from lora_trainer.errors import ConfigError
from lora_trainer.models.lora import inject_lora, lora_layers, trainable_parameters
from lora_trainer.training.loop import train
from lora_trainer.training.loraplus import loraplus_groups
from lora_trainer.training.maxnorm import apply_max_norm
from lora_trainer.training.optimizers import build_optimizer
from rank_helpers import TWO_PROCESS_RUNS

FAST = ["sample.prompts=[]", "output.dtype=fp32", "train.warmup=0", "train.scheduler=constant"]


def _models(tiny_sd15, dora: bool = False):
    """The tiny UNet (attention and 3x3 resnet convs) and text encoder with LoRA rank 4, alpha 2."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet")
    te = CLIPTextModel.from_pretrained(tiny_sd15, subfolder="text_encoder")
    inject_lora(unet, ["to_q", "to_v", "conv1"], 4, 2.0, 0.0, "lora.unet_targets", dora)
    inject_lora(te, ["q_proj", "out_proj"], 4, 2.0, 0.0, "lora.text_encoder_targets", dora)
    return unet, te


def _kinds(modules) -> dict[int, str]:
    """id(parameter) -> lora_A, lora_B or lora_magnitude_vector."""
    return {id(p): next(part for part in n.split(".") if part.startswith("lora_"))
            for m in modules for n, p in m.named_parameters() if p.requires_grad}


def _delta_norms(module) -> dict[str, float]:
    """‖(alpha/r)·B·A‖ of every adapted layer, from the explicit d_out × d_in product."""
    norms = {}
    for path, layer in lora_layers(module).items():
        up, down = layer.lora_B["default"].weight.double(), layer.lora_A["default"].weight.double()
        delta = layer.scaling["default"] * (up.flatten(1) @ down.flatten(1))
        norms[path] = float(torch.linalg.matrix_norm(delta.detach()))
    return norms


# --- LoRA+ -----------------------------------------------------------------------------------

def test_loraplus_groups_train_b_at_ratio_times_lr_through_the_schedule(tiny_sd15):
    unet, te = _models(tiny_sd15)
    t = TrainConfig(lr=1e-3, loraplus_lr_ratio=16.0, loraplus_text_encoder_lr_ratio=4.0)
    groups = [{"params": trainable_parameters(unet), "lr": 1e-3}, {"params": trainable_parameters(te), "lr": 5e-4}]
    split, names = loraplus_groups(t, [unet, te], groups)
    assert names == ["unet", "unet_plus", "text_encoder", "text_encoder_plus"]
    kind = _kinds([unet, te])
    kinds = [{kind[id(p)] for p in g["params"]} for g in split]
    assert kinds == [{"lora_A"}, {"lora_B"}, {"lora_A"}, {"lora_B"}]
    assert sum(len(g["params"]) for g in split) == sum(len(g["params"]) for g in groups)

    from diffusers.optimization import get_scheduler

    optimizer = build_optimizer(t, split)
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 16e-3, 5e-4, 2e-3]
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=4, num_training_steps=10)
    for step in range(1, 10):
        optimizer.step()
        scheduler.step()
        factor = step / 4 if step < 4 else (10 - step) / 6  # linear warmup, then linear decay
        expected = pytest.approx([1e-3 * factor, 16e-3 * factor, 5e-4 * factor, 2e-3 * factor])
        assert scheduler.get_last_lr() == expected and [g["lr"] for g in optimizer.param_groups] == expected


def test_loraplus_off_keeps_the_groups_and_dora_magnitudes_go_with_b(tiny_sd15):
    unet, te = _models(tiny_sd15, dora=True)
    groups = [{"params": trainable_parameters(unet), "lr": 1e-3}, {"params": trainable_parameters(te), "lr": 1e-3}]
    same, names = loraplus_groups(TrainConfig(), [unet, te], groups)
    assert names == ["unet", "text_encoder"] and len(same) == 2 and all(a is b for a, b in zip(same, groups))
    split, names = loraplus_groups(TrainConfig(loraplus_unet_lr_ratio=8.0), [unet, te], groups)
    assert names == ["unet", "unet_plus", "text_encoder"] and split[2] is groups[1]  # no ratio for the encoder
    kind = _kinds([unet])
    plus = {kind[id(p)] for p in split[1]["params"]}
    assert plus == {"lora_B", "lora_magnitude_vector"} and split[1]["lr"] == 8e-3  # peft's LoRA+ grouping


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_one_loraplus_step_moves_b_ratio_times_as_far(optimizer, tiny_sd15, example_data, tmp_path):
    """At the first step B = 0, so A gets no gradient and B's step is lr × (a direction that does not
    depend on lr) for both optimizers: with LoRA+ it is exactly `ratio` times as long."""
    runs = {}
    for ratio in (None, 4.0):
        extra = [f"train.loraplus_lr_ratio={ratio}"] if ratio else []
        runs[ratio] = train(run_config(tiny_sd15, example_data, tmp_path / str(ratio), *FAST, "train.max_steps=1",
                                       f"train.optimizer={optimizer}", *extra), show_progress=False)
    plain, plus = (dict(runs[r].unet.named_parameters()) for r in (None, 4.0))
    ups = [k for k in plain if ".lora_B." in k]
    assert ups and all(plain[k].abs().max() > 0 for k in ups)
    for name in plain:
        if ".lora_B." in name:
            torch.testing.assert_close(plus[name], 4.0 * plain[name], rtol=1e-5, atol=0)
        elif ".lora_A." in name:
            assert torch.equal(plus[name], plain[name]), name
    record = json.loads((tmp_path / "4.0" / "train_log.jsonl").read_text().splitlines()[-1])
    assert record["lr/unet_plus"] == pytest.approx(4 * record["lr/unet"]) and record["lr/unet"] == 1e-3


@pytest.mark.parametrize("override, message", [
    ("train.loraplus_lr_ratio=0", "train.loraplus_lr_ratio: got 0"),
    ("train.loraplus_text_encoder_lr_ratio=-1", "train.loraplus_text_encoder_lr_ratio: got -1"),
    ("train.scale_weight_norms=0", "train.scale_weight_norms: got 0"),
])
def test_bad_loraplus_and_norm_values_are_one_line_errors(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.base=m", "data.path=d", "train.max_steps=1", override])
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_loraplus_with_prodigy_is_refused_in_one_line():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.base=m", "data.path=d", "train.max_steps=1", "train.optimizer=prodigy",
                           "train.lr=1.0", "train.loraplus_unet_lr_ratio=16"])
    text = str(err.value)
    assert text.startswith("train.loraplus_unet_lr_ratio: Prodigy") and "\n" not in text


# --- max-norm ------------------------------------------------------------------------------------

def test_max_norm_scales_only_the_layers_over_the_limit_back_onto_it(tiny_sd15):
    unet, te = _models(tiny_sd15)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in (unet, te):
            for i, layer in enumerate(lora_layers(module).values()):
                for factor in (layer.lora_A["default"], layer.lora_B["default"]):
                    factor.weight.copy_(torch.randn(factor.weight.shape, generator=generator) * (0.05 + 0.05 * (i % 4)))
    before = {**_delta_norms(unet), **{f"te.{k}": v for k, v in _delta_norms(te).items()}}
    limit = sorted(before.values())[len(before) // 2]  # the median: about half the layers are over it
    factors = {(m, p): (layer.lora_A["default"].weight.clone(), layer.lora_B["default"].weight.clone())
               for m, module in (("", unet), ("te.", te)) for p, layer in lora_layers(module).items()}
    assert any(p.endswith("conv1") for _, p in factors)  # a 3x3 conv layer is among them

    stats = apply_max_norm([unet, te], limit)

    after = {**_delta_norms(unet), **{f"te.{k}": v for k, v in _delta_norms(te).items()}}
    over = {k for k, v in before.items() if v > limit}
    assert 0 < len(over) < len(before) and stats.keys_scaled == len(over)
    for (prefix, path), (down, up) in factors.items():
        layer = lora_layers(te if prefix else unet)[path]
        key = prefix + path
        if key in over:
            assert after[key] == pytest.approx(limit, rel=1e-6)
            gain = math.sqrt(limit / before[key])  # kohya's choice: B and A scaled alike
            torch.testing.assert_close(layer.lora_A["default"].weight, down * gain)
            torch.testing.assert_close(layer.lora_B["default"].weight, up * gain)
        else:
            assert torch.equal(layer.lora_A["default"].weight, down) and torch.equal(layer.lora_B["default"].weight, up)
    assert stats.maximum == pytest.approx(limit)
    assert stats.average == pytest.approx(sum(min(v, limit) for v in before.values()) / len(before), rel=1e-6)


MAXNORM = [*FAST, "train.max_steps=4", "train.loraplus_lr_ratio=4", "train.scale_weight_norms=0.2",
           "output.save_every_n_steps=2"]


@pytest.fixture(scope="module")
def limited(tiny_sd15, example_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("maxnorm") / "out"
    return train(run_config(tiny_sd15, example_data, out, *MAXNORM), show_progress=False)


def test_max_norm_run_logs_the_layers_it_scaled(limited):
    records = [json.loads(line) for line in (limited.output_dir / "train_log.jsonl").read_text().splitlines()]
    assert all({"max_norm/keys_scaled", "max_norm/average_key_norm", "max_norm/max_key_norm"} <= r.keys()
               for r in records)
    norms = list(_delta_norms(limited.unet).values())  # the adapter after the last step's scaling
    assert max(norms) <= 0.2 * (1 + 1e-6)
    at_limit = sum(abs(n - 0.2) <= 0.2 * 1e-6 for n in norms)  # scaled at the last step (others grew past it)
    last = records[-1]
    assert 0 < last["max_norm/keys_scaled"] == at_limit < len(norms)
    assert last["max_norm/max_key_norm"] == pytest.approx(max(norms))
    assert last["max_norm/average_key_norm"] == pytest.approx(sum(norms) / len(norms))
    meta = safetensors.safe_open(str(limited.adapter_paths[0]), "pt").metadata()
    assert (meta["ss_scale_weight_norms"], meta["ss_loraplus_lr_ratio"]) == ("0.2", "4.0")
    assert json.loads(meta["ss_network_args"]) == {"loraplus_lr_ratio": "4"}


def test_loraplus_and_max_norm_resume_exactly(limited, tiny_sd15, example_data, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(limited.output_dir / "checkpoints" / "step-000002", out / "checkpoints" / "step-000002")
    resumed = train(run_config(tiny_sd15, example_data, out, *MAXNORM, "train.resume=latest"), show_progress=False)
    assert resumed.losses == limited.losses[2:]
    straight = dict(limited.unet.named_parameters())
    for name, value in resumed.unet.named_parameters():
        if value.requires_grad:
            assert torch.equal(value, straight[name]), name
    ours, theirs = ((d / "train_log.jsonl").read_text().splitlines()[-1] for d in (out, limited.output_dir))
    drop = ("step_time",)
    assert {k: v for k, v in json.loads(ours).items() if k not in drop} == \
        {k: v for k, v in json.loads(theirs).items() if k not in drop}


def test_two_processes_keep_identical_adapters_with_loraplus_max_norm_and_epoch_files(two_process_runs):
    options, _ = TWO_PROCESS_RUNS["loraplus_max_norm"]
    assert set(FAST) <= set(options) and "train.scale_weight_norms=0.05" in options
    # 8 images, 2 processes × batch 1: 4 steps an epoch; the epoch-1 file at step 4, the final one at 6
    out = two_process_runs["loraplus_max_norm"]
    rank0, rank1 = (torch.load(out / f"rank{r}.pt") for r in (0, 1))
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(records) == 6 and records[-1]["max_norm/keys_scaled"] > 0  # one writer; the limit was hit
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["example-lora-000001.safetensors",
                                                                 "example-lora.safetensors"]


def test_resuming_with_loraplus_switched_off_is_a_one_line_error(limited, tiny_sd15, example_data, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(limited.output_dir / "checkpoints" / "step-000002", out / "checkpoints" / "step-000002")
    plain = [a for a in MAXNORM if not a.startswith("train.loraplus")]
    with pytest.raises(ConfigError) as err:
        train(run_config(tiny_sd15, example_data, out, *plain, "train.resume=latest"), show_progress=False)
    assert str(err.value).startswith("train.resume: ") and "loraplus" in str(err.value) and "\n" not in str(err.value)
