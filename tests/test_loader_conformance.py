"""Our adapter files load in AUTOMATIC1111 and ComfyUI: under each loader's key rule (our reading of
their sources, tests/loader_rules*.py), every key of every kind of file the trainer and the file tools
write resolves to exactly one layer of the model, whose weight its ΔW fits, with all of its parts.

The model side is our tiny SD1.5 and SDXL checkpoints in the original single-file layout, the one
both programs load. A1111's SD 1.x rule hard-codes SD1.5's two resnets per UNet level, so the SD1.5
files are trained on a tiny model with two (the session's tiny SD1.5 has one; ComfyUI's rule, which
reads the structure off the checkpoint, is checked on both)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import run_config
from loader_rules import checkpoint_shapes, groups, save_checkpoint, sd15_with_two_resnets_per_level, under
from loader_rules_a1111 import a1111
from loader_rules_comfyui import comfy_diffusers_names, comfy_layers, comfyui

from lora_trainer.cli import main
from lora_trainer.kohya.mapping import KOHYA_TEXT_ENCODER_TARGETS, KOHYA_UNET_TARGETS
from lora_trainer.models.single_file import unet_names
from lora_trainer.training.loop import train

RUN = ["train.max_steps=1", "sample.prompts=[]", "output.save_every_n_steps=0", "train.text_encoder_lr=1e-3"]
KOHYA_SET = [f"lora.unet_targets=[{','.join(KOHYA_UNET_TARGETS)}]",
             f"lora.text_encoder_targets=[{','.join(KOHYA_TEXT_ENCODER_TARGETS)}]"]
TE = ["lora.train_text_encoder=true"]
TRAINED = {
    # the default module set, both text encoders, the pivotal embedding bundled as A1111 reads it
    "lora": [*TE, "embedding.token=geoshape", "embedding.bundle=true"],
    # kohya's module set (ff, proj_in/out, the encoders' MLPs) plus LoCon's resnet/sampler convs
    "locon": [*TE, *KOHYA_SET, "lora.conv_rank=2", "lora.conv_alpha=1", "output.format=both"],
    "dora": [*TE, *KOHYA_SET, "lora.conv_rank=2", "lora.use_dora=true"],
    "loha": [*TE, "lora.type=loha", "lora.conv_rank=2"],
    "lokr": [*TE, "lora.type=lokr", "lora.conv_rank=2", "lora.lokr_factor=2"],
    # the UNet's top-level layers: conv_in/conv_out and the time (and SDXL's size) embedding linears
    "edges": ["lora.unet_targets=[to_q,conv_in,conv_out,linear_1,linear_2]"],
}
TOOLS = ("convert", "resize", "resize-loha", "merge-loras", "extract")
VARIANTS = ("sd15", "sdxl")
CASES = [(v, c) for v in VARIANTS for c in (*TRAINED, *TOOLS)]
BUNDLED = {"lora", "merge-loras"}  # the files that carry `bundle_emb.geoshape.*`


def _kohya_and_diffusers(folder: Path) -> tuple[Path, Path | None]:
    found = {"kohya": None, "diffusers": None}
    for path in folder.glob("*.safetensors"):
        with safetensors.safe_open(str(path), framework="pt") as f:
            found["diffusers" if next(iter(f.keys())).startswith(("unet.", "text_encoder")) else "kohya"] = path
    return found["kohya"], found["diffusers"]


def _tools(variant: str, base: Path, tuned: Path, trained: dict[str, Path], diffusers_locon: Path, out: Path) -> dict:
    files = {tool: out / f"{variant}-{tool}.safetensors" for tool in TOOLS}
    commands = {
        "convert": ["convert", str(diffusers_locon), str(files["convert"]), "--to", "kohya"],
        "resize": ["resize", str(trained["locon"]), str(files["resize"]), "--rank", "2", "--conv-rank", "1"],
        "resize-loha": ["resize", str(trained["loha"]), str(files["resize-loha"]), "--rank", "2"],
        "merge-loras": ["merge-loras", f"{trained['lora']}:0.7", f"{trained['locon']}:0.5", "--out", str(files["merge-loras"])],
        "extract": ["extract", "--base", str(base), "--tuned", str(tuned), "--rank", "2", "--out", str(files["extract"])],
    }
    for tool, argv in commands.items():
        assert main(argv) == 0, tool
    return files


@pytest.fixture(scope="module")
def models(tiny_sd15, tiny_sdxl, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """{variant: (base model folder, a model of the same shape that differs in every layer)}."""
    from lora_trainer.testing.tiny import make_sdxl

    out = tmp_path_factory.mktemp("loader-models")
    return {"sd15": (sd15_with_two_resnets_per_level(tiny_sd15, out / "sd15"),
                     sd15_with_two_resnets_per_level(tiny_sd15, out / "sd15-tuned", seed=1)),
            "sdxl": (tiny_sdxl, make_sdxl(out / "sdxl-tuned", seed=1))}


@pytest.fixture(scope="module")
def checkpoints(models, tmp_path_factory) -> dict[str, dict]:
    """{variant: {tensor key: shape}} of the base saved as an original-layout single file."""
    out = tmp_path_factory.mktemp("loader-checkpoints")
    return {v: checkpoint_shapes(save_checkpoint(base, out / f"{v}.safetensors")) for v, (base, _) in models.items()}


@pytest.fixture(scope="module")
def files(models, example_data, tmp_path_factory) -> dict[tuple[str, str], Path]:
    """{(variant, case): adapter file}: one-step runs of each kind, and what the file tools make of them."""
    out = tmp_path_factory.mktemp("loader-files")
    found = {}
    for variant, (base, tuned) in models.items():
        trained, diffusers_locon = {}, None
        for case, overrides in TRAINED.items():
            folder = out / variant / case
            train(run_config(base, example_data, folder, *RUN, *overrides), show_progress=False)
            trained[case], diffusers = _kohya_and_diffusers(folder)
            diffusers_locon = diffusers_locon or diffusers
        tools = _tools(variant, base, tuned, trained, diffusers_locon, out)
        found.update({(variant, case): path for case, path in {**trained, **tools}.items()})
    return found


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(path))


def _modules(tensors) -> dict[str, dict]:
    return {m: parts for m, parts in groups(tensors).items() if m != "bundle_emb"}


@pytest.mark.parametrize("variant,case", CASES)
def test_every_key_patches_one_layer_in_comfyui(files, checkpoints, variant, case):
    tensors = _tensors(files[variant, case])
    res = comfyui(tensors, checkpoints[variant])
    assert res.problems == []
    # ComfyUI has no place for bundled embeddings (README: give it the standalone file); nothing else is left
    assert res.unread == sorted(k for k in tensors if k.startswith("bundle_emb."))
    assert set(res.layers) == set(_modules(tensors)) and len(set(res.layers.values())) == len(res.layers)


@pytest.mark.parametrize("variant,case", CASES)
def test_every_key_patches_one_layer_in_a1111(files, checkpoints, variant, case):
    tensors = _tensors(files[variant, case])
    res = a1111(tensors, checkpoints[variant])
    assert (res.unread, res.problems) == ([], [])
    assert set(res.layers) == set(_modules(tensors)) and len(set(res.layers.values())) == len(res.layers)
    assert res.embeddings == ({"geoshape": 1} if case in BUNDLED else {})
    # DoRA loads, but A1111 normalises per input column: the documented gap (README, DoRA)
    assert len(res.notes) == (len(res.layers) if case == "dora" else 0)


@pytest.mark.parametrize("variant,case", CASES)
def test_both_loaders_patch_the_same_unet_weights(files, checkpoints, variant, case):
    tensors = _tensors(files[variant, case])
    comfy, auto = comfyui(tensors, checkpoints[variant]), a1111(tensors, checkpoints[variant])
    unet = [m for m in comfy.layers if m.startswith("lora_unet_")]
    assert unet and all(under(comfy.layers[m].removesuffix(".weight")) == auto.layers[m] for m in unet)
    assert comfy.kinds == auto.kinds


def _expected_parts(kind: str, parts, dora: bool) -> set[str]:
    if kind == "lora":
        return {"lora_up.weight", "lora_down.weight", "alpha"} | ({"dora_scale"} if dora else set())
    if kind == "loha":
        return {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}
    w1 = {"lokr_w1"} if "lokr_w1" in parts else {"lokr_w1_a", "lokr_w1_b"}
    return w1 | ({"lokr_w2"} if "lokr_w2" in parts else {"lokr_w2_a", "lokr_w2_b"}) | {"alpha"}


@pytest.mark.parametrize("variant,case", CASES)
def test_each_module_has_all_its_parts(files, checkpoints, variant, case):
    tensors = _tensors(files[variant, case])
    kinds = comfyui(tensors, checkpoints[variant]).kinds
    want = {"loha": {"loha"}, "lokr": {"lokr"}}.get(case, {"lora"})
    assert set(kinds.values()) == want
    for module, parts in _modules(tensors).items():
        assert set(parts) == _expected_parts(kinds[module], parts, case == "dora"), module


@pytest.mark.parametrize("variant", VARIANTS)
def test_locon_patches_every_resnet_and_sampler_conv_at_its_kernel(files, checkpoints, variant):
    """kohya's LoCon set covers each resnet's 3x3 convs, time projection and 1x1 shortcut and each
    sampler conv: as many modules as the model has such weights, with 3x3 down factors on the 3x3s."""
    ckpt = checkpoints[variant]
    convs = {k for k in ckpt if k.endswith((".in_layers.2.weight", ".out_layers.3.weight", ".op.weight", ".emb_layers.1.weight",
                                             ".skip_connection.weight")) or (k.endswith(".conv.weight") and "output_blocks" in k)}
    tensors = _tensors(files[variant, "locon"])
    layer_of = {under(k.removeprefix("model.").removesuffix(".weight")): k for k in convs}
    for res in (a1111(tensors, ckpt), comfyui(tensors, ckpt)):
        patched = [layer_of.get(under(layer.removesuffix(".weight"))) for layer in res.layers.values()]
        # both tiny UNets: 17 resnets (conv1, conv2, time_emb_proj), 10 shortcuts, 2 + 2 samplers
        assert set(patched) - {None} == convs and len(convs) == 17 * 3 + 10 + 4
    three = [k for k in convs if len(ckpt[k]) == 4 and ckpt[k][2:] == (3, 3)]
    downs = [t for k, t in tensors.items() if k.endswith("lora_down.weight") and t.ndim == 4 and t.shape[2:] == (3, 3)]
    assert len(downs) == len(three) > 0 and all(t.shape[0] == 2 for t in downs)  # conv_rank


@pytest.mark.parametrize("variant", VARIANTS)
def test_comfyuis_block_numbering_is_our_single_file_numbering(models, checkpoints, variant):
    """ComfyUI's diffusers<->LDM map, rebuilt from the checkpoint's structure, names every UNet weight
    as our single-file converter does (which diffusers' from_single_file reads back: test_single_file)."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(models[variant][0] / "unet")
    ours = {k.removesuffix(".weight"): v.removeprefix("model.diffusion_model.").removesuffix(".weight")
            for k, v in unet_names(unet).items() if k.endswith(".weight")}
    theirs = comfy_diffusers_names(comfy_layers(checkpoints[variant]))
    assert {k: theirs.get(k) for k in ours} == ours and len(ours) > 100


def test_comfyui_reads_the_structure_of_a_unet_with_one_resnet_per_level(trained, tiny_sd15, tmp_path):
    """The session's tiny SD1.5 (one resnet per level): ComfyUI numbers its blocks from the checkpoint and
    places every module; A1111's rule, written for SD1.5's two, would drop or misplace most of them."""
    ckpt = checkpoint_shapes(save_checkpoint(tiny_sd15, tmp_path / "one.safetensors"))
    tensors = _tensors(trained.adapter_paths[0])
    comfy, auto = comfyui(tensors, ckpt), a1111(tensors, ckpt)
    # 7 transformer blocks × attn1/attn2 × q/k/v/out, all placed
    assert (comfy.unread, comfy.problems) == ([], []) and len(comfy.layers) == len(_modules(tensors)) == 7 * 2 * 4
    assert len(auto.unread) + len(auto.problems) > 0


def test_the_rules_catch_what_a_loader_would_drop(files, checkpoints):
    """The rules are not vacuous: a misspelt module, swapped factors and an OpenCLIP attention with
    only some of q/k/v/out (which A1111 skips whole) are each caught."""
    ckpt = checkpoints["sdxl"]
    tensors = _tensors(files["sdxl", "lora"])
    q = next(k.split(".")[0] for k in tensors if k.startswith("lora_te2_") and "_q_proj." in k)
    up = next(k for k in tensors if k.startswith("lora_unet_") and k.endswith("attn2_to_k.lora_up.weight"))
    misspelt = {k.replace("lora_unet_input_blocks_4", "lora_unet_input_block_4"): t for k, t in tensors.items()}
    swapped = {**tensors, up: tensors[up].T.contiguous(), up.replace("lora_up", "lora_down"):
               tensors[up.replace("lora_up", "lora_down")].T.contiguous()}
    no_out = {k: t for k, t in tensors.items() if not k.startswith(q.replace("q_proj", "out_proj") + ".")}
    for rule in (comfyui, a1111):
        assert any("input_block_4" in k for k in rule(misspelt, ckpt).unread)
        assert any("rows" in p or "rank" in p for p in rule(swapped, ckpt).problems)
    assert comfyui(no_out, ckpt).problems == []
    assert any("q/k/v/out_proj together" in p for p in a1111(no_out, ckpt).problems)
    width = ckpt["conditioner.embedders.1.model.token_embedding.weight"][1]
    assert math.prod(tensors["bundle_emb.geoshape.clip_g"].shape) == width  # one vector, bigG's width


def test_an_sdxl_run_adapting_part_of_the_openclip_attention_warns_that_a1111_skips_it(
        tiny_sdxl, example_data, checkpoints, tmp_path, caplog):
    result = train(run_config(tiny_sdxl, example_data, tmp_path / "out", *RUN, *TE,
                              "lora.text_encoder_targets=[q_proj,v_proj,fc1]"), show_progress=False)
    assert "attention is adapted in q_proj, v_proj only" in caplog.text and "add k_proj, out_proj" in caplog.text
    tensors = _tensors(result.adapter_paths[0])
    assert comfyui(tensors, checkpoints["sdxl"]).problems == []
    skipped = [p for p in a1111(tensors, checkpoints["sdxl"]).problems if "together" in p]
    assert len(skipped) == 2  # each layer of the tiny bigG; its first encoder (CLIP-L) is fine
