"""Tiny SD1.5 / SDXL pipelines with LoCon adapters (linear + conv modules, every text encoder),
injected with peft as a trainer would, for the adapter-file tests."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from lora_trainer.export.files import adapter_states

RANK, ALPHA = 4, 8.0  # scale 2: a lost alpha changes every output
# Attention linears and 1x1 projections, resnet convs (3x3, 1x1 shortcut) and their time
# projection, down/up-samplers, and conv_in: the LoCon set plus one top-level conv.
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2", "conv1", "conv2",
                "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv", "conv_in"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def load_pipeline(model_dir, variant: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if variant == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def inputs(variant: str) -> SimpleNamespace:
    g = torch.Generator().manual_seed(1)
    width = 64 if variant == "sdxl" else 32  # cross-attention width of the tiny models
    extra = {}
    if variant == "sdxl":
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(1, 32, generator=g),
                                       "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}}
    return SimpleNamespace(latents=torch.randn(1, 4, 8, 8, generator=g), timestep=torch.tensor([10]),
                           hidden=torch.randn(1, 8, width, generator=g), ids=torch.randint(0, 400, (1, 8), generator=g),
                           extra=extra)


def text_encoders(pipe) -> dict:
    return {name: getattr(pipe, name) for name in ("text_encoder", "text_encoder_2") if getattr(pipe, name, None) is not None}


def layer(pipe, component: str, path: str) -> torch.nn.Module:
    """The frozen layer at `path` (file spelling), unwrapped from peft if adapted."""
    modules = dict(getattr(pipe, component).named_modules())
    found = modules.get(path) or modules[path.removeprefix("text_model.")]  # transformers 5 drops text_model
    return found.get_base_layer() if hasattr(found, "get_base_layer") else found


def outputs(pipe, x: SimpleNamespace) -> dict[str, torch.Tensor]:
    """UNet noise prediction and each text encoder's last hidden state on fixed inputs."""
    with torch.no_grad():
        out = {"unet": pipe.unet(x.latents, x.timestep, x.hidden, **x.extra).sample}
        for name, encoder in text_encoders(pipe).items():
            out[name] = encoder(x.ids).last_hidden_state
    return out


def add_locon(pipe, rank: int = RANK, alpha: float = ALPHA, seed: int = 0, unet_targets=UNET_TARGETS,
              te_targets=TE_TARGETS, adapter_name: str = "default") -> dict:
    """Inject LoRA into UNet and text encoders, with random lora_B so ΔW ≠ 0; return peft states."""
    from peft import LoraConfig

    models = {"unet": (pipe.unet, unet_targets), **{n: (m, te_targets) for n, m in text_encoders(pipe).items()}}
    g = torch.Generator().manual_seed(seed)
    for model, targets in models.values():
        model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                     target_modules=targets), adapter_name=adapter_name)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name and adapter_name in name:
                    param.copy_(0.1 * torch.randn(param.shape, generator=g))
    return adapter_states(pipe.unet, pipe.text_encoder, getattr(pipe, "text_encoder_2", None),
                          adapter_name=adapter_name)


def adapted(model_dir, variant: str, **kwargs) -> SimpleNamespace:
    """A pipeline with a LoCon adapter, its peft states, and outputs with and without it."""
    pipe = load_pipeline(model_dir, variant)
    x = inputs(variant)
    base = outputs(pipe, x)
    states = add_locon(pipe, **kwargs)
    out = outputs(pipe, x)
    assert all((out[k] - base[k]).abs().max() > 1e-3 for k in out)
    return SimpleNamespace(pipe=pipe, states=states, out=out, base=base, x=x, variant=variant, model_dir=model_dir)


def assert_outputs_close(got: dict, want: dict, atol: float = 1e-4) -> None:
    assert got.keys() == want.keys()
    for name in want:
        err = (got[name] - want[name]).abs().max().item()
        assert err < atol, f"{name} differs by {err}"
