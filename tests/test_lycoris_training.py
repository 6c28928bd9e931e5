"""LoHa and LoKr training (`lora.type`): peft's LoHa/LoKr on LoRA's layers, written as LyCORIS writes
them under kohya; the file gives the trained outputs through our reader and the ΔW the LyCORIS
package computes from it (a LoKr of two whole factors included, which LyCORIS trains and applies at
scale 1, and so does our training);
checkpoints resume exactly; what the slice does not support is refused by key before any model loads."""

from __future__ import annotations

import json
import shutil

import pytest
import safetensors
import safetensors.torch
import torch
import yaml
from conftest import model_outputs as _outputs, run_config

from lora_trainer.errors import ConfigError
from lora_trainer.export.layouts import KOHYA_PREFIXES, kohya_name
from lora_trainer.models.lycoris import layer_parts, lycoris_layers
from lora_trainer.training.loop import train

RUN = ["lora.alpha=2", "train.lr=1e-2", "train.max_steps=4", "output.save_every_n_steps=2", "output.dtype=fp32",
       "sample.prompts=[]"]
# LoHa on UNet and text encoder; LoKr at rank 4 (the tiny layers, 32 or 64 wide, split 4·8 or 8·8,
# keep both factors whole: scale 1 whatever alpha, in LyCORIS and here) and at rank 2, alpha 1 with
# lokr_factor 2 (w1 2 × 2, w2 a low-rank pair: scale alpha/r in both)
CASES = {
    "loha": ["lora.type=loha", "lora.train_text_encoder=true", "train.text_encoder_lr=5e-3"],
    "lokr": ["lora.type=lokr"],
    "lokr-low-rank": ["lora.type=lokr", "lora.rank=2", "lora.alpha=1", "lora.lokr_factor=2"],
    # convs named in unet_targets (SD1.5's 1x1 proj_in, the ResNets' 3x3 conv1): peft's flattened
    # kernels, which LyCORIS writes the same way without CP cores
    "loha-conv": ["lora.type=loha", "lora.unet_targets=[to_q,proj_in,conv1]"],
    "lokr-conv": ["lora.type=lokr", "lora.unet_targets=[to_q,proj_in,conv1]"],
    # LyCORIS' conv_dim: the ResNet blocks and samplers too, the 3x3 convs at their own rank and alpha
    # (LoKr's attention layers whole at rank 4, its 3x3 convs a rank-2 pair: two scales in one file)
    "loha-locon": ["lora.type=loha", "lora.conv_rank=2", "lora.conv_alpha=1"],
    "lokr-locon": ["lora.type=lokr", "lora.conv_rank=2", "lora.conv_alpha=1"],
}


def _adapter(result) -> dict[str, torch.Tensor]:
    modules = {"unet": result.unet, "text_encoder": result.text_encoder}
    return {f"{c}.{k}": v.detach().clone() for c, m in modules.items() for k, v in m.named_parameters()
            if v.requires_grad}


@pytest.fixture(scope="module")
def runs(tiny_sd15, example_data, tmp_path_factory):
    """{case: (result, adapter weights, (UNet output, text encoder output))}: 4 steps each, a checkpoint at 2."""
    out = {}
    for case, overrides in CASES.items():
        folder = tmp_path_factory.mktemp(case) / "out"
        result = train(run_config(tiny_sd15, example_data, folder, *RUN, *overrides), show_progress=False)
        out[case] = (result, _adapter(result), _outputs(result.unet, result.text_encoder))
    return out


def _fresh(model_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _file(path):
    with safetensors.safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _layers(result):
    """(component, peft module path, kohya name, wrapped layer) of every trained layer."""
    for component in ("unet", "text_encoder"):
        for path, layer in lycoris_layers(getattr(result, component)).items():
            yield component, path, kohya_name(KOHYA_PREFIXES["sd15"][component], component, path), layer


@pytest.mark.parametrize("case", list(CASES))
def test_file_gives_the_trained_outputs_through_our_inference(runs, tiny_sd15, case):
    from lora_trainer.inference.adapters import AdapterSpec, AdapterStack

    result, _, (unet_ref, te_ref) = runs[case]
    pipe = _fresh(tiny_sd15)
    unet_base, te_base = _outputs(pipe.unet, pipe.text_encoder)
    assert (unet_ref - unet_base).abs().max() > 1e-3  # the adapter changed something worth comparing
    if case == "loha":
        assert (te_ref - te_base).abs().max() > 1e-3
    stack = AdapterStack(pipe)
    stack.load(AdapterSpec(result.adapter_paths[0]), name=case)
    unet_out, te_out = _outputs(pipe.unet, pipe.text_encoder)
    torch.testing.assert_close(unet_out, unet_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(te_out, te_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_each_layer_has_the_delta_w_the_lycoris_package_computes_from_the_file(runs, case):
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    from lora_trainer.export.lycoris import read_lycoris

    result = runs[case][0]
    tensors, _ = _file(result.adapter_paths[0])
    ours = read_lycoris(result.adapter_paths[0])
    kind = LohaModule if case.startswith("loha") else LokrModule
    names = set()
    for component, path, name, layer in _layers(result):
        names.add(name)
        trained = layer.get_delta_weight("default").detach()
        weight = layer.get_base_layer().weight
        with torch.no_grad():  # the package copies the file's tensors into its parameters
            reference = kind.make_module_from_state_dict(name, layer.get_base_layer(),
                                                         *kind.extract_state_dict(tensors, name))
            # what its forward adds at multiplier 1 (4.1.3's get_diff_weight applies alpha/r a second time)
            lycoris_delta = reference.get_weight(weight.shape)
        torch.testing.assert_close(lycoris_delta, trained, rtol=1e-5, atol=1e-7)
        read = next(m for m in ours.modules[component].values() if m.name == name)
        torch.testing.assert_close(read.delta(weight, torch.float32), trained, rtol=1e-5, atol=1e-7)
        assert trained.abs().max() > 0
    assert names == {key.partition(".")[0] for key in tensors}


def test_a_lokr_of_whole_factors_trains_at_scale_1_as_lycoris_does(runs, tiny_sd15):
    """LyCORIS ignores alpha for a LoKr module of two whole factors (scale 1): kohya's full-matrix
    recipe (network_dim 100000, network_alpha 1) would otherwise train 10^-5 as fast here. Low-rank
    modules keep alpha / r."""
    from diffusers import UNet2DConditionModel

    from lora_trainer.models.lycoris import inject_lycoris

    whole = [layer for *_, layer in _layers(runs["lokr"][0])]
    low = [layer for *_, layer in _layers(runs["lokr-low-rank"][0])]
    assert whole and all(layer.scaling["default"] == 1.0 and "default" in layer.lokr_w2 for layer in whole)
    assert low and all(layer.scaling["default"] == 0.5 and "default" in layer.lokr_w2_a for layer in low)
    unet = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet")
    assert inject_lycoris(unet, "lokr", ["to_q"], 100000, 1.0, "lora.unet_targets") > 0
    layers = lycoris_layers(unet).values()
    assert all(layer.scaling["default"] == 1.0 and layer.alpha["default"] == 100000 for layer in layers)
    layer = next(iter(layers))
    layer.set_scale("default", 0.5)  # the sweep's weight: peft's alpha / r reading stays scale 1 × weight
    assert layer.scaling["default"] == 0.5


def test_the_log_says_when_lokr_modules_train_at_scale_1(tiny_sd15):
    """kohya's full-matrix recipe logs `rank 100000, alpha 1`; the log line also says that rank and alpha do
    not act on whole-factor modules, and how many there are."""
    from diffusers import UNet2DConditionModel

    from lora_trainer.models.lycoris import inject_lycoris
    from lora_trainer.training.adapters import _whole_factor_note

    unet = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet")
    n = inject_lycoris(unet, "lokr", ["to_q"], 100000, 1.0, "lora.unet_targets")
    assert _whole_factor_note({"unet": unet}) == (f"; all {n} modules are two whole factors, trained at scale 1 "
                                                  "whatever rank and alpha say, as in LyCORIS")
    low = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet")
    inject_lycoris(low, "lokr", ["to_q"], 2, 1.0, "lora.unet_targets", factor=2)
    assert _whole_factor_note({"unet": low}) == ""


@pytest.mark.parametrize("case", ["loha-locon", "lokr-locon"])
def test_conv_rank_adds_locons_layers_at_their_own_rank_and_alpha(runs, case):
    tensors, header = _file(runs[case][0].adapter_paths[0])
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"  # a 3x3 conv: conv rank 2, alpha 1
    attn = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # rank 4, alpha 2
    for name in (conv, "lora_unet_down_blocks_0_resnets_0_time_emb_proj", "lora_unet_down_blocks_0_downsamplers_0_conv"):
        assert f"{name}.alpha" in tensors
    assert float(tensors[f"{conv}.alpha"]) == 1.0
    if case == "loha-locon":
        assert tensors[f"{conv}.hada_w1_b"].shape[0] == 2 and tensors[f"{attn}.hada_w1_b"].shape[0] == 4
        assert float(tensors[f"{attn}.alpha"]) == 2.0
    else:  # the conv's w2 a rank-2 pair at alpha/r = 0.5; the attention layer's factors whole (scale 1)
        assert tensors[f"{conv}.lokr_w2_a"].shape[1] == 2 and f"{attn}.lokr_w2" in tensors
        assert float(tensors[f"{attn}.alpha"]) == 4.0
    assert json.loads(header["ss_network_args"]) == {"algo": case.split("-")[0], "conv_dim": "2", "conv_alpha": "1"}


def test_layout_parts_and_metadata_are_lycoris_under_kohya(runs):
    loha, _ = _file(runs["loha"][0].adapter_paths[0])
    lokr, _ = _file(runs["lokr"][0].adapter_paths[0])
    low, header = _file(runs["lokr-low-rank"][0].adapter_paths[0])
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert {k.partition(".")[2] for k in loha if k.startswith(name + ".")} == {
        "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for k in loha)
    assert {k.partition(".")[2] for k in lokr if k.startswith(name + ".")} == {"lokr_w1", "lokr_w2", "alpha"}
    assert {k.partition(".")[2] for k in low if k.startswith(name + ".")} == {
        "lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"}
    assert low[f"{name}.lokr_w1"].shape == (2, 2) and low[f"{name}.lokr_w2_a"].shape == (16, 2)
    assert float(loha[f"{name}.alpha"]) == 2.0 and float(low[f"{name}.alpha"]) == 1.0
    assert float(lokr[f"{name}.alpha"]) == 4.0  # two whole factors: alpha = r (scale 1), as LyCORIS writes it
    assert all(t.dtype == torch.float32 for t in loha.values())
    assert header["ss_network_module"] == "lycoris.kohya"
    assert json.loads(header["ss_network_args"]) == {"algo": "lokr", "factor": "2"}
    assert (header["ss_network_dim"], header["ss_network_alpha"]) == ("2", "1.0")
    assert header["modelspec.architecture"] == "stable-diffusion-v1/lora" and "sshs_model_hash" in header
    _, loha_header = _file(runs["loha"][0].adapter_paths[0])
    assert json.loads(loha_header["ss_network_args"]) == {"algo": "loha"}
    assert loha_header["ss_network_train_unet_only"] == "False"


def test_trainable_parameters_are_the_loha_factors(runs):
    result = runs["loha"][0]
    expected = sum(2 * 4 * (layer.get_base_layer().in_features + layer.get_base_layer().out_features)
                   for *_, layer in _layers(result))
    assert result.trainable_parameters == expected
    assert all(p.dtype == torch.float32 for *_, layer in _layers(result) for p in layer_parts(layer).values())


def test_the_checkpoint_holds_the_same_kind_of_file(runs):
    result = runs["lokr-low-rank"][0]
    files = list((result.output_dir / "checkpoints" / "step-000002").glob("*.safetensors"))
    assert len(files) == 1
    tensors, header = _file(files[0])
    assert header["ss_steps"] == "2" and any(k.endswith(".lokr_w2_a") for k in tensors)


@pytest.mark.parametrize("case", ["loha", "lokr"])
def test_resume_is_bit_identical(runs, tiny_sd15, example_data, tmp_path, case):
    result, reference, _ = runs[case]
    out = tmp_path / "out"
    shutil.copytree(result.output_dir / "checkpoints" / "step-000002", out / "checkpoints" / "step-000002")
    resumed = train(run_config(tiny_sd15, example_data, out, *RUN, *CASES[case], "train.resume=latest"),
                    show_progress=False)
    assert resumed.losses == result.losses[2:]
    after = _adapter(resumed)
    assert reference.keys() == after.keys() and all(torch.equal(v, after[k]) for k, v in reference.items())
    first, second = _file(result.adapter_paths[0])[0], _file(resumed.adapter_paths[0])[0]
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_inspect_names_the_type(runs, capsys):
    from lora_trainer.cli import main

    assert main(["inspect", str(runs["loha"][0].adapter_paths[0])]) == 0
    assert "LoHa 64" in capsys.readouterr().out
    assert main(["inspect", str(runs["lokr"][0].adapter_paths[0])]) == 0
    assert "LoKr 56" in capsys.readouterr().out


def test_fp16_output_keeps_alphas_in_fp32(runs, tmp_path):
    from lora_trainer.export.files import adapter_states
    from lora_trainer.export.lycoris_write import save_lycoris_adapter
    from lora_trainer.models.lycoris import lycoris_alphas

    result = runs["lokr"][0]
    path = save_lycoris_adapter(tmp_path / "half.safetensors", adapter_states(result.unet),
                                {"unet": lycoris_alphas(result.unet)}, {}, torch.float16)
    tensors, _ = _file(path)
    assert {t.dtype for k, t in tensors.items() if not k.endswith(".alpha")} == {torch.float16}
    assert {t.dtype for k, t in tensors.items() if k.endswith(".alpha")} == {torch.float32}


@pytest.mark.parametrize("override, key", [
    ("output.format=diffusers", "output.format"), ("output.format=both", "output.format"),
    ("lora.use_dora=true", "lora.use_dora"), ("lora.dropout=0.1", "lora.dropout"),
    ("lora.neuron_dropout=0.1", "lora.neuron_dropout"), ("lora.rank_dropout=0.1", "lora.rank_dropout"),
    ("lora.module_dropout=0.1", "lora.module_dropout"),
    ("lora.block_lr_weights.down=cosine", "lora.block_lr_weights.down"),
    ("lora.block_lr_zero_threshold=0.1", "lora.block_lr_zero_threshold"),
    ("lora.block_ranks=[4]", "lora.block_ranks"), ("lora.block_alphas=[4]", "lora.block_alphas"),
    ("lora.conv_block_ranks=[4]", "lora.conv_block_ranks"), ("lora.conv_block_alphas=[4]", "lora.conv_block_alphas"),
    ("train.loraplus_lr_ratio=16", "train.loraplus_lr_ratio"),
    ("train.loraplus_unet_lr_ratio=16", "train.loraplus_unet_lr_ratio"),
    ("train.scale_weight_norms=1", "train.scale_weight_norms"),
])
@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_what_the_slice_does_not_support_is_refused_by_key(tmp_path, example_data, override, key, kind):
    with pytest.raises(ConfigError) as err:
        run_config(tmp_path / "no-model", example_data, tmp_path / "out", f"lora.type={kind}", override)
    lines = [line for line in str(err.value).splitlines() if f"lora.type {kind!r}" in line]
    assert len(lines) == 1 and lines[0].split(": ", 2)[1] == key


def test_lokr_factor_is_checked(tmp_path, example_data):
    for overrides, message in ((["lora.lokr_factor=4"], "lora.lokr_factor: got 4 with lora.type 'lora'"),
                               (["lora.type=loha", "lora.lokr_factor=4"], "with lora.type 'loha', which does not"),
                               (["lora.type=lokr", "lora.lokr_factor=0"], "lora.lokr_factor: got 0; expected -1")):
        with pytest.raises(ConfigError, match=message):
            run_config(tmp_path / "no-model", example_data, tmp_path / "out", *overrides)
    with pytest.raises(ConfigError, match="lora.type: got 'ia3'"):
        run_config(tmp_path / "no-model", example_data, tmp_path / "out", "lora.type=ia3")


def test_sdxl_loha_with_both_text_encoders_gives_the_trained_outputs(tiny_sdxl, example_data, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from lora_trainer.inference.adapters import AdapterSpec, AdapterStack

    result = train(run_config(tiny_sdxl, example_data, tmp_path / "out", *RUN, "output.save_every_n_steps=0",
                              "train.max_steps=2", "lora.type=loha", "lora.train_text_encoder=true"),
                   show_progress=False)
    tensors, _ = _file(result.adapter_paths[0])
    prefixes = {k.split("_")[1] for k in tensors}
    assert prefixes == {"unet", "te1", "te2"} and any("input_blocks" in k for k in tensors)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 400, (1, 77), generator=g)
    latents, hidden = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 64, generator=g)
    extra = {"added_cond_kwargs": {"text_embeds": torch.randn(1, 32, generator=g), "time_ids": torch.randn(1, 6, generator=g)}}

    def outputs(unet, te1, te2):
        for m in (unet, te1, te2):
            m.eval()
        with torch.no_grad():
            return [unet(latents, torch.tensor([500]), hidden, **extra).sample, te1(ids)[0], te2(ids)[0]]

    want = outputs(result.unet, result.text_encoder, result.text_encoder_2)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    AdapterStack(pipe).load(AdapterSpec(result.adapter_paths[0]), name="xl")
    for got, ref in zip(outputs(pipe.unet, pipe.text_encoder, pipe.text_encoder_2), want):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_ema_file_and_sweep_grid_with_loha(tiny_sd15, example_data, tmp_path):
    """The file holds the EMA of the factors (train.ema_decay), and the sweep grid scales LoHa layers,
    their scale put back after it."""
    result = train(run_config(tiny_sd15, example_data, tmp_path / "out", *RUN, "output.save_every_n_steps=0",
                              "train.max_steps=2", "lora.type=loha", "train.ema_decay=0.5",
                              "sample.prompts=[a red circle]", "sample.steps=2", "sample.grid_weights=[0,1]"),
                   show_progress=False)
    tensors, _ = _file(result.adapter_paths[0])
    for component, path, name, layer in _layers(result):
        if component != "unet":
            continue
        assert layer.scaling["default"] == 0.5
        for part, param in layer_parts(layer).items():
            ema = result.ema[f"unet.{path}.{part}.default"]
            assert torch.equal(tensors[f"{name}.{part}"], ema) and not torch.equal(ema, param.detach())
    assert (result.output_dir / "samples" / "sweep.png").is_file()


def test_a_loha_run_is_published_as_its_kohya_file_alone_and_packaged_as_lycoris(runs, tmp_path, monkeypatch):
    """diffusers' load_lora_weights reads no LoHa: the Hub folder holds no diffusers copy, the card
    says LoHa and shows how to generate with it, and the CivitAI fields give CivitAI's LyCORIS type."""
    import zipfile

    from lora_trainer.cli import main

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    result = runs["loha"][0]
    run_file = next(p for p in result.output_dir.glob("*.safetensors") if "-step" not in p.name)
    repo = tmp_path / "repo"
    assert main(["publish", str(result.output_dir), "--hub", "alice/shapes", "--dry-run", "--out", str(repo)]) == 0
    assert [p.name for p in repo.glob("*.safetensors")] == [run_file.name]
    published, metadata = _file(repo / run_file.name)
    assert metadata["ss_network_module"] == "lycoris.kohya"
    assert {k.rsplit(".", 1)[1] for k in published} == {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}
    card = (repo / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n", 2)[1])
    assert "lycoris" in front["tags"] and "A LoHa adapter for" in card
    # diffusers reads no LoHa: the Hub must not offer its load_lora_weights snippet
    assert "library_name" not in front and "diffusers" not in front["tags"]
    assert "pytorch_lora_weights" not in card and "load_lora_weights(" not in card
    assert "lora-trainer infer --model " in card and f"--lora {run_file.name}:" in card
    assert "| LoHa rank / alpha | 4 / 2 |" in card

    package = tmp_path / "shapes.zip"
    assert main(["package", str(result.output_dir), "--civitai", str(package)]) == 0
    with zipfile.ZipFile(package) as z:
        fields = json.loads(z.read("civitai.json"))
        readme = z.read("README.txt").decode()
    assert fields["type"] == "LoCon" and fields["description"].startswith("LoHa for ")
    assert "Type: LyCORIS" in readme and "type LyCORIS;" in readme


def test_the_card_of_a_pivotal_loha_run_sends_diffusers_users_to_the_embedding_files(runs):
    """A LoHa/LoKr repo has no diffusers-layout file: the card's embedding section names the adapter's type
    and no such file, and says that the `lora-trainer infer` command reads the bundled vectors."""
    import dataclasses

    from lora_trainer.publish.embeddings import card_section
    from lora_trainer.publish.run import read_run

    run = read_run(runs["loha"][0].output_dir)
    run = dataclasses.replace(run, bundle={"ohwx": {"clip_l": torch.zeros(1, 32)}})
    text = "\n".join(card_section(run, "alice/shapes", ["embeddings/ohwx.safetensors"]))
    assert "trained with the LoHa:" in text and "whatever the LoHa's weight" in text
    assert "diffusers-layout file" not in text and "`lora-trainer infer` command below" in text
