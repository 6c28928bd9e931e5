"""resize, merge-loras and extract on tiny SD1.5/SDXL adapters: exact where the maths is exact, the
reported retained norm equal to what the written file keeps, and diffusers loading the results
with the effect the maths promises."""

from __future__ import annotations

import shutil

import pytest
import safetensors.torch
import torch
from locon_helpers import TE_TARGETS, UNET_TARGETS, inputs, layer, load_pipeline, outputs, text_encoders

from lora_trainer.cli import main
from lora_trainer.export.adapter import Adapter, LoraModule, read_adapter, write_adapter


def _layers(pipe, component: str, targets) -> dict[str, torch.nn.Module]:
    model = getattr(pipe, component)
    found = {}
    for name, module in model.named_modules():
        if hasattr(module, "get_base_layer"):  # a layer already wrapped by peft (an earlier test)
            module = module.get_base_layer()
        elif ".base_layer" in name or ".lora_" in name:
            continue
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and any(
                name == t or name.endswith("." + t) for t in targets):
            found[("text_model." + name) if component != "unet" and not name.startswith("text_model.") else name] = module
    return found


def random_adapter(pipe, variant: str, rank: int, alpha: float, seed: int, unet_targets=UNET_TARGETS,
                   te_targets=TE_TARGETS) -> Adapter:
    """An adapter with random factors on the targeted layers; down rows decay at a random rate per
    module, so singular values spread out differently in each (as in trained adapters)."""
    g = torch.Generator().manual_seed(seed)
    modules = {}
    components = {"unet": unet_targets, **{name: te_targets for name in text_encoders(pipe)}}
    for component, targets in components.items():
        for path, linear_or_conv in _layers(pipe, component, targets).items():
            w = linear_or_conv.weight
            kernel = tuple(w.shape[2:])
            spread = torch.logspace(0, -1.5 * float(torch.rand(1, generator=g)), rank)[:, None]
            down = (torch.randn(rank, w.shape[1] * (kernel[0] * kernel[1] if kernel else 1), generator=g) * spread)
            up = 0.1 * torch.randn(w.shape[0], rank, generator=g)
            if kernel:
                down, up = down.reshape(rank, w.shape[1], *kernel), up.reshape(w.shape[0], rank, 1, 1)
            modules.setdefault(component, {})[path] = LoraModule(down, up, alpha)
    return Adapter(modules, variant)


@pytest.fixture(scope="module")
def sd15_pipe(tiny_sd15):
    return load_pipeline(tiny_sd15, "sd15")


@pytest.fixture(scope="module")
def locon_file(sd15_pipe, tmp_path_factory):
    adapter = random_adapter(sd15_pipe, "sd15", rank=4, alpha=8.0, seed=0)
    return write_adapter(tmp_path_factory.mktemp("locon") / "locon.safetensors", adapter, dtype=torch.float32)


def _fused_weights_match(pipe, path, adapter_name: str) -> None:
    """Load `path` into `pipe`, fuse it, and compare every adapted weight with W + ΔW from our reader."""
    adapter = read_adapter(path)
    before = {(c, p): layer(pipe, c, p).weight.detach().clone() for c, p, _ in adapter.items()}
    pipe.load_lora_weights(str(path), adapter_name=adapter_name)
    pipe.fuse_lora(components=list(adapter.modules), adapter_names=[adapter_name])
    for c, p, module in adapter.items():
        torch.testing.assert_close(layer(pipe, c, p).weight.detach(), before[(c, p)] + module.delta(),
                                   rtol=1e-4, atol=1e-5, msg=f"{c}.{p}")
    pipe.unfuse_lora(components=list(adapter.modules))
    pipe.delete_adapters(adapter_name)


def test_resize_to_full_rank_is_exact(locon_file, tmp_path, capsys):
    out = tmp_path / "same.safetensors"
    assert main(["resize", str(locon_file), str(out), "--rank", "4", "--dtype", "fp32"]) == 0
    assert "retained Frobenius norm 100.00% overall" in capsys.readouterr().out
    before, after = read_adapter(locon_file), read_adapter(out)
    assert after.metadata["ss_network_dim"] == "4" and after.metadata["ss_network_alpha"] == "8.0"
    for component, path, module in before.items():
        again = after.modules[component][path]
        assert again.rank == 4 and again.alpha == 8.0
        torch.testing.assert_close(again.delta(torch.float64), module.delta(torch.float64), rtol=1e-5, atol=1e-7)


def test_resize_to_lower_rank_keeps_the_reported_energy(locon_file, sd15_pipe, tmp_path):
    from lora_trainer.export.resize import resize_adapter

    source = read_adapter(locon_file)
    for kwargs in ({"rank": 2}, {"rank": 4, "dynamic": "sv_fro", "param": 0.9}):
        resized, report = resize_adapter(source, **kwargs)
        path = write_adapter(tmp_path / f"r{len(kwargs)}.safetensors", resized, dtype=torch.float32)
        written = read_adapter(path)
        kept_sq = total_sq = 0.0
        for fit in report.modules:
            old = source.modules[fit.component][fit.path].delta(torch.float64)
            new = written.modules[fit.component][fit.path].delta(torch.float64)
            assert written.modules[fit.component][fit.path].rank == fit.rank
            # The kept norm is what the file holds; what is lost is the rest of the energy (Eckart–Young).
            assert new.norm().item() == pytest.approx(fit.kept, rel=1e-5)
            assert (old - new).norm().item() ** 2 == pytest.approx(fit.norm**2 - fit.kept**2, rel=1e-3, abs=1e-9)
            kept_sq, total_sq = kept_sq + new.norm().item() ** 2, total_sq + old.norm().item() ** 2
            if kwargs.get("dynamic"):  # the fewest singular values that keep 90% of the norm
                assert fit.retained >= 0.9 - 1e-6
                s = torch.linalg.svdvals(old.reshape(old.shape[0], -1))
                assert fit.rank == 1 or s[: fit.rank - 1].norm() < 0.9 * s.norm()
            else:
                assert fit.rank == 2
        assert report.retained == pytest.approx((kept_sq / total_sq) ** 0.5, rel=1e-5)
        assert report.retained < 0.999
    assert len({f.rank for f in report.modules}) > 1 and written.metadata["ss_network_dim"] == "Dynamic"
    assert len({m.alpha for _, _, m in written.items()}) == 1  # one alpha, so every consumer scales alike
    _fused_weights_match(sd15_pipe, path, "dynamic")  # mixed ranks load right in diffusers


def test_resize_rewrites_the_rank_metadata_of_a_locon_block_file(sd15_pipe, tmp_path, capsys):
    import json

    from lora_trainer.export.files import LORA_ADAPTER_METADATA_KEY

    # LoCon with per-block ranks: linears rank 4 (2 in the first down block), 3x3 convs rank 4
    adapter = random_adapter(sd15_pipe, "sd15", rank=4, alpha=8.0, seed=3, unet_targets=["to_q", "to_v", "conv1"],
                             te_targets=["q_proj"])
    for path, m in adapter.modules["unet"].items():
        if path.startswith("down_blocks.0.") and not m.is_conv:
            adapter.modules["unet"][path] = LoraModule(m.down[:2].clone(), m.up[:, :2].clone(), 8.0)
    args = {"conv_dim": "4", "conv_alpha": "8", "block_dims": "4,2,4", "block_alphas": "8,8,8",
            "conv_block_dims": "4,4,1", "conv_block_alphas": "8,8,8", "loraplus_lr_ratio": "16", "up_lr_weight": "1,0.5"}
    source = write_adapter(tmp_path / "blocks.safetensors", adapter, dtype=torch.float32, metadata={
        "ss_network_dim": "4", "ss_network_alpha": "8.0", "ss_network_args": json.dumps(args)})

    fixed = tmp_path / "fixed.safetensors"
    assert main(["resize", str(source), str(fixed), "--rank", "3", "--conv-rank", "2", "--dtype", "fp32"]) == 0
    out = read_adapter(fixed)
    ranks = {(p, m.is_conv): m.rank for _, p, m in out.items()}
    assert set(ranks.values()) == {2, 3}  # first down block's linears 2, other linears 3, convs 2
    alpha = next(iter({m.alpha for _, _, m in out.items()}))
    shown = f"{alpha:g}"
    assert (out.metadata["ss_network_dim"], out.metadata["ss_network_alpha"]) == ("3", str(float(alpha)))
    assert json.loads(out.metadata["ss_network_args"]) == {
        "conv_dim": "2", "conv_alpha": shown, "block_dims": "3,2,3", "block_alphas": ",".join([shown] * 3),
        "conv_block_dims": "2,2,1", "conv_block_alphas": ",".join([shown] * 3),
        "loraplus_lr_ratio": "16", "up_lr_weight": "1,0.5"}  # what is not a rank or alpha stays

    dynamic = tmp_path / "dynamic.diffusers.safetensors"
    assert main(["resize", str(source), str(dynamic), "--rank", "4", "--dynamic", "sv_fro", "--dynamic-param",
                 "0.9", "--to", "diffusers", "--dtype", "fp32"]) == 0
    capsys.readouterr()
    out = read_adapter(dynamic)
    network_args = json.loads(out.metadata["ss_network_args"])
    assert out.metadata["ss_network_dim"] == "Dynamic" and network_args["conv_dim"] == "Dynamic"
    assert network_args["block_dims"] == network_args["conv_block_dims"] == "Dynamic"
    # the diffusers LoraConfig rebuilds exactly the new ranks, not the source's
    config = json.loads(out.metadata[LORA_ADAPTER_METADATA_KEY])
    for _, path, m in (t for t in out.items() if t[0] == "unet"):
        pattern = next((r for key, r in config["unet.rank_pattern"].items() if path.endswith(key.replace("\\", ""))),
                       config["unet.r"])
        assert pattern == m.rank, path
    assert len({m.rank for _, _, m in out.items()}) > 1


def test_merge_exact_equals_stacking_in_diffusers(sd15_pipe, tmp_path, capsys):
    a = random_adapter(sd15_pipe, "sd15", 4, 8.0, seed=1, unet_targets=["to_q", "to_v", "conv1", "proj_in"],
                       te_targets=["q_proj", "v_proj", "out_proj"])
    b = random_adapter(sd15_pipe, "sd15", 2, 1.0, seed=2, unet_targets=["to_q", "to_k", "conv1", "conv2"],
                       te_targets=["k_proj", "out_proj", "fc1"])
    path_a = write_adapter(tmp_path / "a.safetensors", a, "kohya", torch.float32)
    path_b = write_adapter(tmp_path / "b.safetensors", b, "diffusers", torch.float32)
    merged = tmp_path / "ab.safetensors"
    assert main(["merge-loras", f"{path_a}:0.6", f"{path_b}:-0.4", "--out", str(merged), "--dtype", "fp32"]) == 0
    capsys.readouterr()
    c = read_adapter(merged)
    assert c.layout == "kohya" and "a.safetensors:0.6, b.safetensors:-0.4" in c.metadata["ss_training_comment"]
    keys = {(comp, p) for comp, p, _ in a.items()} | {(comp, p) for comp, p, _ in b.items()}
    assert {(comp, p) for comp, p, _ in c.items()} == keys
    for comp, p, module in c.items():  # ΔW of the merge = 0.6 ΔA − 0.4 ΔB, rank = the ranks added up
        want = sum(w * x.modules[comp][p].delta(torch.float64) for x, w in ((a, 0.6), (b, -0.4)) if p in x.modules[comp])
        assert module.rank == sum(x.modules[comp][p].rank for x in (a, b) if p in x.modules[comp])
        torch.testing.assert_close(module.delta(torch.float64), want, rtol=1e-5, atol=1e-7)

    x = inputs("sd15")
    pipe = sd15_pipe
    pipe.load_lora_weights(str(path_a), adapter_name="first")
    pipe.load_lora_weights(str(path_b), adapter_name="second")
    pipe.set_adapters(["first", "second"], [0.6, -0.4])
    stacked = outputs(pipe, x)
    pipe.load_lora_weights(str(merged), adapter_name="merged")
    pipe.set_adapters(["merged"], [1.0])
    alone = outputs(pipe, x)
    pipe.delete_adapters(["first", "second", "merged"])
    base = outputs(pipe, x)
    for name in stacked:
        assert (alone[name] - stacked[name]).abs().max() < 1e-4
        assert (stacked[name] - base[name]).abs().max() > 1e-3  # the adapters do change the outputs

    # To a target rank by SVD: the report is what the file keeps of the exact merge.
    assert main(["merge-loras", str(path_a), str(path_b), "--out", str(tmp_path / "r3.safetensors"), "--rank", "3",
                 "--dtype", "fp32", "--to", "diffusers", "--per-module"]) == 0
    assert "retained Frobenius norm" in capsys.readouterr().out
    small = read_adapter(tmp_path / "r3.safetensors")
    assert small.layout == "diffusers"
    for comp, p, module in small.items():
        parts = [x.modules[comp][p] for x in (a, b) if p in x.modules[comp]]
        assert module.rank == min(3, sum(m.rank for m in parts))  # a rank-2 module stays rank 2
        exact = sum(m.delta(torch.float64) for m in parts)
        flat = exact.reshape(exact.shape[0], -1)
        s = torch.linalg.svdvals(flat)
        err = (module.delta(torch.float64) - exact).norm()
        # The best rank-3 error (Eckart–Young), up to the fp32 rounding of the file.
        assert err.item() == pytest.approx(s[3:].norm().item(), rel=1e-4, abs=1e-6 * exact.norm().item())


def _add_to_weights(folder, component: str, file: str, deltas: dict[str, torch.Tensor]) -> None:
    path = folder / component / file
    weights = safetensors.torch.load_file(str(path))
    for key, delta in deltas.items():
        key = key if key in weights else "text_model." + key  # CLIP checkpoints are saved both ways
        weights[key] = weights[key] + delta
    safetensors.torch.save_file(weights, str(path), metadata={"format": "pt"})


def test_extract_recovers_a_known_rank_r_difference(tiny_sdxl, tmp_path, capsys):
    g = torch.Generator().manual_seed(5)
    low_rank = lambda shape, r=2: (torch.randn(shape[0], r, generator=g) @ torch.randn(r, torch.Size(shape[1:]).numel(),  # noqa: E731
                                                                                       generator=g)).reshape(shape) * 0.05
    unet = {"down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": (32, 32),
            "up_blocks.0.resnets.1.conv1": (64, 128, 3, 3),
            "down_blocks.2.resnets.0.conv_shortcut": (64, 32, 1, 1)}
    deltas = {("unet", p): low_rank(s) for p, s in unet.items()}
    deltas[("text_encoder_2", "text_model.encoder.layers.0.mlp.fc1")] = low_rank((128, 32))
    tuned = tmp_path / "tuned"
    shutil.copytree(tiny_sdxl, tuned)
    _add_to_weights(tuned, "unet", "diffusion_pytorch_model.safetensors",
                    {f"{p}.weight": d for (c, p), d in deltas.items() if c == "unet"})
    _add_to_weights(tuned, "text_encoder_2", "model.safetensors",
                    {"encoder.layers.0.mlp.fc1.weight": deltas[("text_encoder_2", "text_model.encoder.layers.0.mlp.fc1")]})

    out = tmp_path / "extracted.safetensors"
    assert main(["extract", "--base", str(tiny_sdxl), "--tuned", str(tuned), "--rank", "2", "--out", str(out),
                 "--dtype", "fp32"]) == 0
    assert "retained Frobenius norm 100.00% overall" in capsys.readouterr().out
    adapter = read_adapter(out)
    assert adapter.base == "sdxl" and adapter.layout == "kohya"
    assert {(c, p) for c, p, _ in adapter.items()} == set(deltas)  # untouched layers are left out
    for c, p, module in adapter.items():
        assert module.rank == 2
        torch.testing.assert_close(module.delta(), deltas[(c, p)], rtol=1e-4, atol=1e-6)
    tensors = safetensors.torch.load_file(str(out))
    assert "lora_unet_output_blocks_1_0_in_layers_2.lora_down.weight" in tensors  # kohya's SDXL names

    assert main(["extract", "--base", str(tiny_sdxl), "--tuned", str(tuned), "--rank", "2", "--conv-rank", "0",
                 "--out", str(tmp_path / "linear.safetensors")]) == 0
    assert {p for _, p, _ in read_adapter(tmp_path / "linear.safetensors").items()} == {
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "text_model.encoder.layers.0.mlp.fc1"}
    assert main(["extract", "--base", str(tiny_sdxl), "--tuned", str(tiny_sdxl), "--rank", "2",
                 "--out", str(tmp_path / "none.safetensors")]) == 2
    assert "do not differ" in capsys.readouterr().err


def test_merge_weight_that_is_not_a_number_is_one_line(tmp_path, capsys):
    rc = main(["merge-loras", f"{tmp_path}/a.safetensors:abc", "--out", str(tmp_path / "m.safetensors")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "'abc' is not a weight" in err and "\n" not in err


def test_an_output_that_cannot_be_written_is_one_line_before_any_work(random_adapters, tmp_path, capsys):
    from infer_helpers import unwritable_folder

    folder = unwritable_folder(tmp_path)
    a = str(random_adapters["a"])
    for args in (["convert", a, str(folder / "a.safetensors"), "--to", "diffusers"],
                 ["resize", a, str(folder / "a.safetensors"), "--rank", "2"],
                 ["merge-loras", f"{a}:0.5", "--out", str(folder / "a.safetensors")],
                 # the base does not exist: the output is refused before it would load
                 ["merge", "--model", str(tmp_path / "no-model"), "--lora", a, "--out", str(folder / "merged")]):
        rc = main(args)
        err = capsys.readouterr().err.strip()
        assert rc == 2 and "\n" not in err and "Traceback" not in err, err
        assert f"{folder} cannot be written to (" in err and "you can write to" in err, err
