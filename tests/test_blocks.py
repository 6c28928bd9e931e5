"""Block-wise learning rates and ranks (kohya's networks.lora block args): modules get kohya's block
numbers, the UNet's optimizer groups carry lr × block weight (blocks of weight 0 left out), per-block
ranks and alphas reach both file layouts and load in diffusers with the trained effect, and the
kohya arguments come in through from-kohya and go out in ss_network_args."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import run_config
from locon_helpers import assert_outputs_close, inputs, load_pipeline, outputs

from lora_trainer.config import BlockLrWeights, LoraConfig, TrainConfig, load_config
from lora_trainer.errors import ConfigError
from lora_trainer.export.files import load_adapter
from lora_trainer.cli import main
from lora_trainer.kohya.mapping import config_from_kohya
from lora_trainer.models.blocks import block_index, block_lr_weights, block_plan, module_ranks, parse_lr_weights
from lora_trainer.models.lora import candidate_layers, inject_lora, is_locon_3x3, lora_layers
from lora_trainer.training.block_groups import block_groups
from lora_trainer.training.loop import train
from lora_trainer.training.loraplus import loraplus_groups
from lora_trainer.training.optimizers import build_optimizer

SD15_BLOCKS = {  # diffusers path -> kohya's block (input 1-11, middle 12, output 13-24)
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": 1,
    "down_blocks.0.attentions.1.proj_in": 2,
    "down_blocks.0.downsamplers.0.conv": 3,
    "down_blocks.1.resnets.0.conv1": 4,
    "down_blocks.3.resnets.1.conv2": 11,
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_k": 12,
    "mid_block.resnets.1.time_emb_proj": 12,
    "up_blocks.0.resnets.0.conv1": 13,
    "up_blocks.0.upsamplers.0.conv": 15,
    "up_blocks.1.attentions.2.proj_out": 18,
    "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2": 24,
    "conv_in": -1,
}
SDXL_BLOCKS = {  # via the LDM name: input_blocks.N -> 1+N, middle_block.K -> 10+K, output_blocks.N -> 13+N
    "time_embedding.linear_1": 0,
    "conv_in": 1,
    "down_blocks.0.resnets.0.conv1": 2,
    "down_blocks.0.downsamplers.0.conv": 4,
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": 5,
    "down_blocks.2.attentions.1.proj_out": 9,
    "mid_block.resnets.0.conv1": 10,
    "mid_block.attentions.0.transformer_blocks.9.attn2.to_v": 11,
    "mid_block.resnets.1.conv2": 12,
    "up_blocks.0.attentions.0.proj_in": 13,
    "up_blocks.0.upsamplers.0.conv": 15,
    "up_blocks.2.resnets.2.conv_shortcut": 21,
    "conv_out": 22,
}


@pytest.mark.parametrize("variant,expected", [("sd15", SD15_BLOCKS), ("sdxl", SDXL_BLOCKS)])
def test_block_index_follows_kohyas_numbering(variant, expected):
    assert {path: block_index(path, variant) for path in expected} == expected


def test_presets_threshold_and_counts():
    sine = parse_lr_weights("sine", 12, "k")
    assert sine[0] == 0 and sine[-1] == pytest.approx(1) and sine[6] == pytest.approx(math.sin(math.pi / 2 * 6 / 11))
    assert parse_lr_weights("cosine+0.5", 12, "k") == pytest.approx([w + 0.5 for w in sine[::-1]])
    assert parse_lr_weights("linear", 9, "k") == pytest.approx([i / 8 for i in range(9)])
    assert parse_lr_weights("reverse_linear", 9, "k")[0] == 1 and parse_lr_weights("zeros+0.1", 9, "k") == [0.1] * 9
    assert parse_lr_weights("1,0.5, 0", 3, "k") == [1, 0.5, 0]
    with pytest.raises(ConfigError, match="the part after \\+ must be a number"):  # before the base is known too
        parse_lr_weights("cosine+abc", None, "k")
    lora = LoraConfig(block_lr_weights=BlockLrWeights(down=[0.1] + [1] * 8, mid="0.2,0.3,0.05"), block_lr_zero_threshold=0.1)
    weights = block_lr_weights(lora, "sdxl")  # embeddings and `out` always at 1
    assert weights == [1.0, 0.0] + [1.0] * 8 + [0.2, 0.3, 0.0] + [1.0] * 9 + [1.0] and len(weights) == 23
    assert block_lr_weights(LoraConfig(), "sd15") is None


def _cfg(tiny, data, tmp, *extra):
    return run_config(tiny, data, tmp, *extra)


def test_counts_and_values_are_checked_with_the_key(tiny_sd15, example_data, tmp_path):
    for bad, message in (
            (["model.variant=sd15", "lora.block_ranks=[4,4]"], "lora.block_ranks: got 2 values; this base has 25"),
            (["model.variant=sdxl", "lora.block_ranks=[4,4]", "lora.block_alphas=" + str([1] * 25)],
             "lora.block_alphas: got 25 values; this base has 23"),
            (["lora.block_lr_weights.up=sinus"], "lora.block_lr_weights.up: got 'sinus'"),
            (["lora.block_lr_weights.mid=cosine"], "lora.block_lr_weights.mid: got 'cosine'; presets"),
            (["lora.block_lr_zero_threshold=-1"], "lora.block_lr_zero_threshold: got -1.0"),
            (["lora.block_alphas=[1]"], "lora.block_alphas: set without lora.block_ranks")):
        with pytest.raises(ConfigError, match=message):
            _cfg(tiny_sd15, example_data, tmp_path, *bad)
    # variant auto: the count is checked once the base is read, before any data or model loads
    cfg = _cfg(tiny_sd15, example_data, tmp_path / "auto", "lora.conv_block_ranks=[1,1,1]")
    with pytest.raises(ConfigError, match="^lora.conv_block_ranks: got 3 values; this base has 25 kohya blocks"):
        train(cfg, show_progress=False)
    assert not (tmp_path / "auto").exists()


def _unet(tiny_sd15):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet")


def test_groups_carry_lr_times_block_weight_and_zero_blocks_are_left_out(tiny_sd15):
    unet = _unet(tiny_sd15)
    lora = LoraConfig(block_lr_weights=BlockLrWeights(down="zeros+0.5", mid=[0.0]))
    weights = block_lr_weights(lora, "sd15")
    plan = block_plan(lora, "sd15", 4.0, 0.0, weights)
    paths = candidate_layers(unet, ["to_q", "to_k", "to_v", "to_out.0"], locon=False)
    ranks = module_ranks(paths, is_locon_3x3, plan, "sd15", (4, 4.0), layers_per_block=1)
    inject_lora(unet, ["to_q"], 4, 4.0, 0.0, "k", ranks=ranks)
    adapted = lora_layers(unet)
    assert adapted and not any(p.startswith("mid_block.") for p in adapted)  # mid weight 0: no adapter
    assert set(adapted) == {p for p in paths if not p.startswith("mid_block.")}
    groups, names = block_groups(unet, weights, 1e-3, "sd15", layers_per_block=1)
    assert names == ["unet_w0.5", "unet_w1"] and [g["lr"] for g in groups] == [5e-4, 1e-3]
    owner = {id(p): n.split(".")[0] for n, p in unet.named_parameters()}
    assert {owner[id(p)] for p in groups[0]["params"]} == {"down_blocks"}
    assert {owner[id(p)] for p in groups[1]["params"]} == {"up_blocks"}
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in unet.parameters())

    # LoRA+ splits each block group into A and B; a step moves each group by its lr (Adam's first
    # step is lr × sign(grad)), the frozen base (and so the left-out mid block) not at all.
    split, split_names = loraplus_groups(TrainConfig(loraplus_unet_lr_ratio=4.0), [unet], groups, names)
    assert split_names == ["unet_w0.5", "unet_w0.5_plus", "unet_w1", "unet_w1_plus"]
    assert [g["lr"] for g in split] == [5e-4, 2e-3, 1e-3, 4e-3]
    optimizer = build_optimizer(TrainConfig(weight_decay=0.0), split)
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    for p in unet.parameters():
        p.grad = torch.ones_like(p) if p.requires_grad else None
    optimizer.step()
    name_of = {id(p): n for n, p in unet.named_parameters()}
    for group in split:
        for p in group["params"]:
            moved = (p.detach() - before[name_of[id(p)]]).abs()
            assert moved.min().item() == pytest.approx(group["lr"], rel=1e-4) == moved.max().item()
    mid = {n for n in before if n.startswith("mid_block.")}
    assert all(torch.equal(before[n], p) for n, p in unet.named_parameters() if n in mid)


# SD1.5 tiny UNet blocks in use: input 1, 2 (level 0), 3 (its downsampler), 4, 5, 6, 7 (level 2 resnet);
# middle 12; output 13, 14, 15 (level 0 + upsampler), 16-18, 19-20.
RANKS = [4, 2, 3, 1, 4, 2, 0, 4, 4, 4, 4, 4, 3, 1, 2, 3, 4, 2, 1, 4, 2, 4, 4, 4, 4]
ALPHAS = [8.0] * 25
ALPHAS[1], ALPHAS[16] = 1.0, 3.0
CONV_RANKS = [2] * 25
CONV_RANKS[13] = 1
RUN = ["train.max_steps=2", "train.lr=1e-2", "output.dtype=fp32", "output.format=both", "sample.prompts=[]",
       "sample.grid_weights=[]", "lora.rank=4", "lora.alpha=8", "lora.conv_rank=2",
       f"lora.block_ranks=[{','.join(map(str, RANKS))}]", f"lora.block_alphas=[{','.join(map(str, ALPHAS))}]",
       f"lora.conv_block_ranks=[{','.join(map(str, CONV_RANKS))}]",
       "lora.block_lr_weights.down=[1,1,1,1,1,1,1,1,1,1,1,1]", "lora.block_lr_weights.mid=0",
       "lora.block_lr_weights.up=linear+0.5", "train.loraplus_unet_lr_ratio=4", "train.log_every_n_steps=1"]


@pytest.fixture(scope="module")
def block_run(tiny_sd15, example_data, tmp_path_factory):
    result = train(run_config(tiny_sd15, example_data, tmp_path_factory.mktemp("blocks") / "sd15", *RUN),
                   show_progress=False)
    result.unet.eval()
    x = inputs("sd15")
    return result, x, outputs(SimpleNamespace(unet=result.unet, text_encoder=result.text_encoder), x)


def test_per_block_ranks_and_alphas_reach_the_files(block_run, tiny_sd15):
    result = block_run[0]
    tensors, metadata = load_adapter(result.adapter_paths[0])
    base = dict(result.unet.named_modules())
    checked = 0
    for path in candidate_layers(_unet(tiny_sd15), ["to_q", "to_k", "to_v", "to_out.0"], locon=True):
        index, name = block_index(path, "sd15"), "lora_unet_" + path.replace(".", "_")
        # the 3x3 convs: conv_block_ranks; conv alphas null: each block's alpha is its conv rank
        r, a = (CONV_RANKS[index], float(CONV_RANKS[index])) if is_locon_3x3(path) else (RANKS[index], ALPHAS[index])
        if index == 12 or r == 0:  # mid: lr weight 0; block 6 (no module in the tiny UNet) rank 0
            assert f"{name}.alpha" not in tensors and path not in lora_layers(result.unet)
            continue
        weight = base[path].get_base_layer().weight
        assert tensors[f"{name}.lora_down.weight"].shape == (r, *weight.shape[1:])
        assert tensors[f"{name}.lora_up.weight"].shape[:2] == (weight.shape[0], r)
        assert tensors[f"{name}.alpha"].item() == a
        checked += 1
    assert checked > 40
    args = json.loads(metadata["ss_network_args"])
    assert args["block_dims"] == ",".join(map(str, RANKS)) and args["mid_lr_weight"] == "0"
    assert args["up_lr_weight"] == "linear+0.5" and args["block_alphas"].startswith("8,1,8")
    assert args["conv_block_dims"].startswith("2,2,2") and args["conv_dim"] == "2"
    assert metadata["ss_network_dim"] == "4"  # kohya writes --network_dim, whatever the blocks


def test_block_run_logs_each_group_and_loads_in_diffusers(block_run, tiny_sd15, tmp_path):
    result, x, trained = block_run
    first = json.loads((result.output_dir / "train_log.jsonl").read_text().splitlines()[0])
    up = parse_lr_weights("linear+0.5", 12, "k")
    lrs = {k: v for k, v in first.items() if k.startswith("lr/")}
    base = lrs["lr/unet_w1"]  # 1e-2 through the example config's warmup: each group scaled alike
    assert base == pytest.approx(1e-2 / 4) and lrs["lr/unet_w1_plus"] == pytest.approx(4 * base)
    assert lrs[f"lr/unet_w{up[0]:g}"] == pytest.approx(up[0] * base)  # output block 13
    assert len(lrs) == 2 * len({1.0, *up[:8]})  # A and B groups per weight; tiny UNet: output blocks 13-20
    # The kohya file's attention alphas differ per block, which diffusers (0.42) reads as the most
    # common one (the run warns): converted to the diffusers layout it gives the trained outputs too.
    converted = tmp_path / "converted.safetensors"
    assert main(["convert", str(result.adapter_paths[0]), str(converted), "--to", "diffusers"]) == 0
    for path in (result.adapter_paths[1], converted):
        pipe = load_pipeline(tiny_sd15, "sd15")
        pipe.load_lora_weights(str(path), adapter_name="blocks")
        assert_outputs_close(outputs(pipe, x), trained, atol=1e-5)
    # Our own inference reads the kohya file itself, so its per-block alphas load right.
    from lora_trainer.inference.adapters import AdapterSpec, AdapterStack

    pipe = load_pipeline(tiny_sd15, "sd15")
    AdapterStack(pipe).load(AdapterSpec(result.adapter_paths[0]), name="blocks")
    assert_outputs_close(outputs(pipe, x), trained, atol=1e-5)
    plain = load_pipeline(tiny_sd15, "sd15")  # while plain diffusers misreads it (what the run warns about)
    plain.load_lora_weights(str(result.adapter_paths[0]), adapter_name="blocks")
    with pytest.raises(AssertionError):
        assert_outputs_close(outputs(plain, x), trained, atol=1e-5)


def test_from_kohya_maps_the_block_args():
    args = {"pretrained_model_name_or_path": "base", "train_data_dir": "img", "network_dim": 8, "network_alpha": 4,
            "network_args": ["down_lr_weight=sine+0.1", "mid_lr_weight=0.5", "up_lr_weight=1,1,0,1",
                             "block_lr_zero_threshold=0.2", f"block_dims={','.join(map(str, RANKS))}",
                             "block_alphas=" + ",".join(["2"] * 25), "conv_dim=4",
                             "conv_block_dims=" + ",".join(["4"] * 25), "conv_block_alphas=" + ",".join(["1"] * 25)],
            "_script": "train_network.py"}
    cfg, notes = config_from_kohya(args)
    lora = cfg["lora"]
    # kohya fills a short list with 1.0 to the base's 12 up blocks; the import does it and says so
    assert lora["block_lr_weights"] == {"down": "sine+0.1", "mid": [0.5], "up": [1.0, 1.0, 0.0, 1.0] + [1.0] * 8}
    assert lora["block_lr_zero_threshold"] == 0.2 and lora["block_ranks"] == RANKS
    assert lora["block_alphas"] == [2.0] * 25 and lora["conv_block_ranks"] == [4] * 25
    assert lora["conv_block_alphas"] == [1.0] * 25
    assert [n for n in notes if "lr_weight" in n or "block_" in n] == [
        "--network_args up_lr_weight: 4 values; SD1.x has 12 up blocks, so the missing 8 are 1.0, as kohya fills them"]


def test_from_kohya_fits_lr_weight_lists_of_another_length_to_the_base():
    """kohya's networks.lora cuts a long down/mid/up list and fills a short one with 1.0; the config
    refuses other counts, so from-kohya writes the fitted list, with a note per list."""
    def convert(script, *network_args):
        return config_from_kohya({"pretrained_model_name_or_path": "base", "train_data_dir": "img",
                                  "network_args": list(network_args), "_script": script})

    cfg, notes = convert("sdxl_train_network.py", "down_lr_weight=" + ",".join(["0.5"] * 11), "mid_lr_weight=0",
                         "up_lr_weight=0.25,0.75")
    weights = cfg["lora"]["block_lr_weights"]
    assert weights == {"down": [0.5] * 9, "mid": [0.0, 1.0, 1.0], "up": [0.25, 0.75] + [1.0] * 7}
    assert sum("lr_weight" in n for n in notes) == 3
    assert any("down_lr_weight: 11 values; SDXL has 9 down blocks, so the values after the 9th are left out" in n
               for n in notes)
    lora = LoraConfig(block_lr_weights=BlockLrWeights(**weights))  # the run's strict count check takes it
    assert block_lr_weights(lora, "sdxl") == [1.0, *[0.5] * 9, 0.0, 1.0, 1.0, 0.25, 0.75, *[1.0] * 8]
    # exact counts pass untouched; with the base unknown (a TOML without the script) a wrong count is noted
    cfg, notes = convert("train_network.py", "down_lr_weight=" + ",".join(["2"] * 12), "mid_lr_weight=3")
    assert cfg["lora"]["block_lr_weights"] == {"down": [2.0] * 12, "mid": [3.0]}
    assert not any("lr_weight" in n for n in notes)
    cfg, notes = convert(None, "up_lr_weight=1,0")
    assert cfg["lora"]["block_lr_weights"] == {"up": [1.0, 0.0]}
    assert any("up_lr_weight: 2 values" in n and "so does the run once it reads the base" in n for n in notes)
    # per-block ranks and alphas: kohya refuses another count, so does the import when the base is known
    with pytest.raises(ConfigError, match=r"^--network_args block_alphas: 25 values; SDXL has 23 kohya blocks, and "
                                          r"kohya refuses another count too; give 23$"):
        convert("sdxl_train_network.py", "block_dims=" + ",".join(["4"] * 23), "block_alphas=" + ",".join(["1"] * 25))
    cfg, _ = convert(None, "block_dims=" + ",".join(["4"] * 24))  # base unknown: the run checks it
    assert cfg["lora"]["block_ranks"] == [4] * 24


def test_lr_weight_lists_of_another_count_are_fitted_as_kohya_fits_them_with_a_warning(tiny_sd15, example_data,
                                                                                      tmp_path, caplog):
    """A list copied for the other base (or too short) trains as kohya trains it: cut after the
    base's count, or filled with 1.0; each fitted key is named once with what the run assumed."""
    from lora_trainer.training.loop import _for_variant

    cfg = _cfg(tiny_sd15, example_data, tmp_path, "model.variant=sdxl", "lora.block_lr_weights.down=" + str([0.5] * 12),
               "lora.block_lr_weights.mid=0.25", "lora.block_lr_weights.up=linear", "lora.block_lr_zero_threshold=0.3")
    with caplog.at_level("WARNING"):
        fitted = _for_variant(cfg, "sdxl")
    assert fitted.lora.block_lr_weights.down == [0.5] * 9 and fitted.lora.block_lr_weights.mid == [0.25, 1.0, 1.0]
    assert fitted.lora.block_lr_weights.up == "linear"  # a preset spans the base's blocks already
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [
        "lora.block_lr_weights.down: 12 values; SDXL has 9 down blocks, so the values after the 9th are left out, as "
        "kohya leaves them out (the run trains with 0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5; give 9 values to choose them)",
        "lora.block_lr_weights.mid: 1 value; SDXL has 3 mid blocks, so the missing 2 are 1.0, as kohya fills them "
        "(the run trains with 0.25,1,1; give 3 values to choose them)"]
    weights = block_lr_weights(fitted.lora, "sdxl")  # the per-block weights the optimizer groups get
    assert weights[:14] == [1.0, *[0.5] * 9, 0.0, 1.0, 1.0, 0.0]  # 0.25 and linear's first 0 under the threshold
    assert _for_variant(fitted, "sdxl") == fitted  # fitted once: the resolved config.yaml holds exact counts
    with pytest.raises(ConfigError, match="lora.block_lr_weights.mid: got 'x'"):
        _for_variant(_cfg(tiny_sd15, example_data, tmp_path, "lora.block_lr_weights.mid=x"), "sd15")


def test_defaults_keep_one_unet_group_and_no_block_args(trained):
    log = json.loads((trained.output_dir / "train_log.jsonl").read_text().splitlines()[0])
    assert [k for k in log if k.startswith("lr/")] == ["lr/unet"]
    metadata = load_adapter(trained.adapter_paths[0])[1]
    assert "ss_network_args" not in metadata


def test_sdxl_block_ranks_follow_the_ldm_blocks(tiny_sdxl):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl, subfolder="unet")
    ranks = [1 + i % 4 for i in range(23)]
    ranks[5] = 0  # input_blocks.4 (down level 1's first attention): left out
    lora = LoraConfig(rank=4, block_ranks=ranks, block_alphas=[float(2 * r or 1) for r in ranks])
    plan = block_plan(lora, "sdxl", 4.0, 0.0, None)
    paths = candidate_layers(unet, ["to_q", "to_k", "to_v", "to_out.0", "proj_in"], locon=False)
    inject_lora(unet, ["to_q"], 4, 4.0, 0.0, "k", ranks=module_ranks(paths, is_locon_3x3, plan, "sdxl", (4, 4.0)))
    layers = lora_layers(unet)
    assert "down_blocks.1.attentions.0.proj_in" not in layers and "down_blocks.1.attentions.1.proj_in" in layers
    for path, layer in layers.items():
        index = block_index(path, "sdxl")
        assert layer.r["default"] == ranks[index] and layer.scaling["default"] == 2.0
    assert {block_index(p, "sdxl") for p in layers} == {6, 8, 9, 11, 13, 14, 15, 16, 17, 18}
