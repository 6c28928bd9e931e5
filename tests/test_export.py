"""Adapter files: written from an in-memory peft adapter, loaded by diffusers into a fresh pipeline,
they must reproduce the adapter exactly (LORA_FORMATS.md, "Checks that prove a file is right")."""

from __future__ import annotations

import functools
import hashlib
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch

from lora_trainer.errors import ModelError
from lora_trainer.export import files
from lora_trainer.export.files import adapter_configs, adapter_states, load_adapter, save_adapter
from lora_trainer.export.layouts import (
    detect_layout,
    diffusers_to_peft,
    kohya_to_peft,
    peft_to_diffusers,
    peft_to_kohya,
)
from lora_trainer.export.metadata import kohya_metadata, model_hashes

RANK, ALPHA = 4, 8.0  # scale alpha / r = 2, so a lost alpha shows up as a wrong output
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def _pipeline(model_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def model_dir(tiny_sd15):
    return tiny_sd15


@pytest.fixture(scope="session")
def inputs():
    g = torch.Generator().manual_seed(1)
    return SimpleNamespace(
        latents=torch.randn(1, 4, 8, 8, generator=g),
        timestep=torch.tensor([10]),
        hidden=torch.randn(1, 8, 32, generator=g),  # short sequences keep the forwards cheap
        ids=torch.randint(0, 400, (1, 8), generator=g),
    )


def _outputs(pipe, inputs, **unet_kwargs):
    with torch.no_grad():
        unet = pipe.unet(inputs.latents, inputs.timestep, inputs.hidden, **unet_kwargs).sample
        text = pipe.text_encoder(inputs.ids)[0]
    return unet, text


@pytest.fixture(scope="session")
def trained(model_dir, inputs):
    """A pipeline with our adapters injected as the trainer does, both factors seeded and lora_B
    non-zero so ΔW ≠ 0."""
    return _adapted_pipeline(model_dir, inputs)


def _adapted_pipeline(model_dir, inputs):
    from peft import LoraConfig

    pipe = _pipeline(model_dir)
    base_unet, base_text = _outputs(pipe, inputs)
    pipe.unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian",
                                     target_modules=UNET_TARGETS))
    pipe.text_encoder.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian",
                                             target_modules=TE_TARGETS))
    # Both factors drawn from a seeded generator: peft's own init draws lora_A from the global RNG,
    # whose state depends on which tests ran before, and the weight-2 check below reads the values.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for model in (pipe.unet, pipe.text_encoder):
            for name, param in model.named_parameters():
                if "lora_A" in name:
                    param.copy_(torch.randn(param.shape, generator=g) / RANK)
                elif "lora_B" in name:
                    param.copy_(0.1 * torch.randn(param.shape, generator=g))
    unet_out, text_out = _outputs(pipe, inputs)
    assert (unet_out - base_unet).abs().max() > 1e-3 and (text_out - base_text).abs().max() > 1e-3
    return SimpleNamespace(pipe=pipe, states=adapter_states(pipe.unet, pipe.text_encoder),
                           unet=unet_out, text=text_out, base_unet=base_unet, base_text=base_text)


def _linear_delta(pipe, x):
    """Output change of one adapted UNet linear layer, (layer - base layer)(x)."""
    layer = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    with torch.no_grad():
        return layer(x) - layer.base_layer(x)


@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_file_loads_in_diffusers_and_matches_adapter(layout, trained, model_dir, inputs, tmp_path):
    path = save_adapter(tmp_path / f"{layout}.safetensors", trained.states, RANK, ALPHA, layout=layout,
                        dtype=torch.float32)
    tensors, _ = load_adapter(path)
    assert detect_layout(tensors) == layout
    pipe = _pipeline(model_dir)
    pipe.load_lora_weights(str(path), adapter_name="style")

    unet, text = _outputs(pipe, inputs)
    assert (unet - trained.unet).abs().max() < 1e-4
    assert (text - trained.text).abs().max() < 1e-4

    # Weight 0, by either route, is the base model exactly.
    assert torch.equal(_outputs(pipe, inputs, cross_attention_kwargs={"scale": 0.0})[0], trained.base_unet)
    x = torch.randn(2, 32, generator=torch.Generator().manual_seed(2))
    delta_1 = _linear_delta(pipe, x)
    pipe.set_adapters("style", 0.0)
    unet, text = _outputs(pipe, inputs)
    assert torch.equal(unet, trained.base_unet) and torch.equal(text, trained.base_text)

    # Weight 2 doubles ΔW: the layer's change doubles exactly; the model output moves further.
    pipe.set_adapters("style", 2.0)
    torch.testing.assert_close(_linear_delta(pipe, x), 2 * delta_1)
    unet_2, _ = _outputs(pipe, inputs)
    assert (unet_2 - trained.base_unet).abs().max() > 1.5 * (trained.unet - trained.base_unet).abs().max()


def test_diffusers_file_keeps_alpha_in_lora_config(trained, tmp_path):
    import json

    path = save_adapter(tmp_path / "d.safetensors", trained.states, RANK, ALPHA, layout="diffusers")
    _, metadata = load_adapter(path)
    config = json.loads(metadata[files.LORA_ADAPTER_METADATA_KEY])
    assert config["unet.r"] == RANK and config["unet.lora_alpha"] == ALPHA
    assert config["text_encoder.lora_alpha"] == ALPHA
    # Whole module paths, so peft wraps exactly the layers the file holds and no others.
    modules = sorted({key.rsplit(".lora_", 1)[0] for key in trained.states["unet"]})
    assert sorted(config["unet.target_modules"]) == modules
    # The trainer's own configs can be stored instead of rebuilt ones.
    real = adapter_configs(trained.pipe.unet, trained.pipe.text_encoder)
    path = save_adapter(tmp_path / "d2.safetensors", trained.states, RANK, ALPHA, layout="diffusers",
                        adapter_configs=real)
    config = json.loads(load_adapter(path)[1][files.LORA_ADAPTER_METADATA_KEY])
    assert config["unet.init_lora_weights"] == "gaussian" and config["unet.lora_alpha"] == ALPHA


def test_diffusers_file_keeps_per_module_alpha(trained, model_dir, tmp_path):
    # diffusers 0.42 drops per-module alphas of kohya SD files (its alpha_pattern keys match no
    # module); the diffusers layout carries them in the LoraConfig's alpha_pattern instead.
    modules = sorted({key.rsplit(".lora_", 1)[0] for key in trained.states["unet"]})
    alphas = {m: 2.0 if i % 3 == 0 else ALPHA for i, m in enumerate(modules)}
    path = save_adapter(tmp_path / "a.safetensors", {"unet": trained.states["unet"]}, RANK,
                        {"unet": alphas}, layout="diffusers")
    pipe = _pipeline(model_dir)
    pipe.load_lora_weights(str(path), adapter_name="a")
    scales = {name: layer.scaling["a"] for name, layer in pipe.unet.named_modules() if name in alphas}
    assert scales == {m: a / RANK for m, a in alphas.items()}


def test_kohya_names_follow_the_spec(trained):
    kohya = peft_to_kohya(trained.states["text_encoder"], "lora_te", ALPHA)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in kohya
    kohya = peft_to_kohya(trained.states["unet"], "lora_unet", ALPHA)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"
    assert kohya[f"{name}.alpha"].ndim == 0 and kohya[f"{name}.alpha"].item() == ALPHA
    assert kohya[f"{name}.lora_down.weight"].shape[0] == RANK


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kohya_peft_kohya_is_byte_identical(trained, tmp_path, dtype):
    path = save_adapter(tmp_path / "k.safetensors", trained.states, RANK, ALPHA, dtype=dtype)
    tensors, _ = load_adapter(path)
    states, alphas = kohya_to_peft(tensors)
    assert set(alphas["unet"].values()) == {ALPHA}
    again = {}
    for component, prefix in (("unet", "lora_unet"), ("text_encoder", "lora_te")):
        again.update(peft_to_kohya(states[component], prefix, alphas[component]))
    assert safetensors.torch.save(again) == safetensors.torch.save(tensors)
    # Through the diffusers layout and back as well.
    via = diffusers_to_peft(peft_to_diffusers(states))
    assert all(torch.equal(via[c][k], states[c][k]) for c in states for k in states[c])


def test_kohya_names_resolve_against_model_module_names(trained, tmp_path):
    tensors = peft_to_kohya(trained.states["unet"], "lora_unet", ALPHA)
    names = {"unet": [n for n, _ in trained.pipe.unet.named_modules()]}
    by_model, _ = kohya_to_peft(tensors, module_names=names)
    by_vocabulary, _ = kohya_to_peft(tensors)
    assert by_model["unet"].keys() == by_vocabulary["unet"].keys() == trained.states["unet"].keys()


def test_unknown_keys_are_named_not_dropped(trained):
    tensors = peft_to_kohya(trained.states["unet"], "lora_unet", ALPHA)
    tensors["lora_unet_mid_block_attentions_0_proj_in.dora_scale"] = torch.ones(1)
    with pytest.raises(ModelError, match="dora_scale"):
        kohya_to_peft(tensors)
    with pytest.raises(ModelError, match="model.diffusion_model.x"):
        detect_layout({**tensors, "model.diffusion_model.x": torch.ones(1)})
    with pytest.raises(ModelError, match=r"unet\.foo\.bias"):
        diffusers_to_peft({"unet.foo.bias": torch.ones(1)})
    with pytest.raises(ModelError, match="lora_unet_weird_thing"):
        kohya_to_peft({"lora_unet_weird_thing.lora_down.weight": torch.ones(1, 2),
                       "lora_unet_weird_thing.lora_up.weight": torch.ones(2, 1)})


def test_sdxl_unet_uses_ldm_block_names_like_diffusers_reads_them():
    from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers

    paths = ["down_blocks.1.attentions.1.transformer_blocks.0.attn1.to_q",
             "mid_block.attentions.0.transformer_blocks.9.attn2.to_k",
             "up_blocks.0.attentions.0.transformer_blocks.3.attn2.to_k",
             "up_blocks.1.attentions.2.proj_in"]
    state = {f"{p}.lora_{ab}.weight": torch.ones(1, 1) for p in paths for ab in "AB"}
    kohya = peft_to_kohya(state, "lora_unet", 1.0, unet_blocks="ldm")
    assert "lora_unet_input_blocks_5_1_transformer_blocks_0_attn1_to_q.alpha" in kohya
    assert "lora_unet_output_blocks_0_1_transformer_blocks_3_attn2_to_k.alpha" in kohya
    assert "lora_unet_middle_block_1_transformer_blocks_9_attn2_to_k.alpha" in kohya
    back, _ = kohya_to_peft(kohya)
    assert back["unet"].keys() == state.keys()
    # diffusers renumbers the blocks here and renames input/middle/output later.
    theirs = _maybe_map_sgm_blocks_to_diffusers(dict(kohya), SimpleNamespace(layers_per_block=2))
    renames = {"input_blocks": "down_blocks", "middle_block": "mid_block", "output_blocks": "up_blocks"}
    theirs = {functools.reduce(lambda k, r: k.replace(*r), renames.items(), key) for key in theirs}
    assert theirs == set(peft_to_kohya(state, "lora_unet", 1.0))


def test_metadata_is_strings_and_hash_ignores_user_metadata(trained, tmp_path):
    training = kohya_metadata(
        rank=RANK, alpha=ALPHA, base_model_name="tiny-sd15", resolution=512, num_train_images=10,
        num_epochs=2, steps=20, max_train_steps=20, learning_rate=1e-4, lr_scheduler="constant",
        optimizer="AdamW", mixed_precision="no", seed=0, noise_offset=0.0, min_snr_gamma=5.0,
        training_started_at=1700000000.0, training_finished_at=1700000100.0, output_name="style",
        tag_frequency={"style": {"a cat": 3}}, dataset_dirs={"style": {"n_repeats": 1, "img_count": 10}},
        trigger_phrase="sks", title="Style")
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in training.items())
    assert training["ss_network_dim"] == "4" and training["ss_network_alpha"] == "8.0"
    assert training["ss_resolution"] == "(512, 512)" and training["modelspec.resolution"] == "512x512"
    assert training["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert training["modelspec.date"].startswith("2023-11-14T22:")

    first = load_adapter(save_adapter(tmp_path / "a.safetensors", trained.states, RANK, ALPHA, metadata=training))
    user = {**training, "modelspec.title": "Renamed", "my_note": "x" * 5000}
    second = load_adapter(save_adapter(tmp_path / "b.safetensors", trained.states, RANK, ALPHA, metadata=user))
    assert first[1]["sshs_model_hash"] == second[1]["sshs_model_hash"]
    assert first[1]["sshs_legacy_hash"] == second[1]["sshs_legacy_hash"]
    assert first[1]["ss_tag_frequency"] == '{"style": {"a cat": 3}}'
    # The model hash is the SHA-256 of the tensor bytes after the header of the file itself.
    raw = (tmp_path / "b.safetensors").read_bytes()
    assert hashlib.sha256(raw[8 + int.from_bytes(raw[:8], "little"):]).hexdigest() == second[1]["sshs_model_hash"]


def test_legacy_hash_reads_64k_at_1mib_of_training_only_serialisation():
    big = {"w": torch.arange(600_000, dtype=torch.float32)}  # 2.4 MB, past the 1 MiB window
    blob = safetensors.torch.save(big, metadata={"ss_network_dim": "4"})
    expected = hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]
    assert model_hashes(big, {"ss_network_dim": "4", "modelspec.title": "t"})[1] == expected
    # ss_* keys are part of it: a longer header shifts the window.
    assert model_hashes(big, {"ss_network_dim": "4", "ss_output_name": "x" * 64})[1] != expected


def test_failed_write_leaves_no_file(trained, tmp_path, monkeypatch):
    def half_write(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 100)
        raise OSError("disk full")

    monkeypatch.setattr(files.safetensors.torch, "save_file", half_write)
    with pytest.raises(OSError):
        save_adapter(tmp_path / "out.safetensors", trained.states, RANK, ALPHA)
    assert list(tmp_path.iterdir()) == []


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(ModelError, match="missing.safetensors does not exist"):
        load_adapter(tmp_path / "missing.safetensors")
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(b"\xff" * 64)
    with pytest.raises(ModelError, match="corrupt.safetensors is not a readable") as info:
        load_adapter(bad)
    assert "\n" not in str(info.value)
    assert str(info.value).endswith("damaged or incomplete (an interrupted download or copy?): download or copy it again")


def test_text_encoder_state_is_read_without_a_vocabulary_lookup(tiny_sd15):
    # peft would look for the base's config.json (on disk, then on the hub) and warn when it is not
    # beside the diffusers folder; LoRA never touches the embeddings, so nothing is looked up.
    import warnings

    from transformers import CLIPTextModel

    from lora_trainer.models.lora import inject_lora

    te = CLIPTextModel.from_pretrained(tiny_sd15, subfolder="text_encoder")
    inject_lora(te, ["q_proj", "v_proj"], rank=2, alpha=2.0, dropout=0.0, key="lora")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        states = adapter_states(te)["unet"]  # any component name: the model is what matters
    assert states and all("lora_" in k for k in states)


@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_a_header_only_reading_has_the_files_modules_shapes_and_alphas_without_its_weights(random_adapters,
                                                                                          tmp_path, layout):
    from lora_trainer.export.adapter import read_adapter, write_adapter

    path = tmp_path / f"{layout}.safetensors"
    write_adapter(path, read_adapter(random_adapters["a"]), layout=layout)
    full, header = read_adapter(path), read_adapter(path, header_only=True)
    assert (header.base, header.layout) == (full.base, full.layout)
    pairs = list(zip(full.items(), header.items(), strict=True))
    assert pairs and all(f[:2] == h[:2] for f, h in pairs)
    for (_, _, f), (_, _, h) in pairs:
        assert h.down.is_meta and h.up.is_meta  # nothing of the weights was read
        assert (h.down.shape, h.up.shape, h.down.dtype, h.alpha) == (f.down.shape, f.up.shape, f.down.dtype, f.alpha)
