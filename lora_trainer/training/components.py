"""The modules a run trains, by component ("unet", "text_encoder", "text_encoder_2"), and what the
loop makes of them: the UNet and text encoders a step calls, the adapter files, the sample images.

A run trains the UNet, the UNet and its text encoder(s), or (lora.train_unet false) the text
encoder(s) only, or (with embedding.token) an embedding alone; nothing here assumes which comes
first. A component that is not trained is called
as the base's frozen module, without an adapter, and is left out of the files.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import RunConfig
from .outputs import export_adapter, save_samples, save_sweep
from .tracking import log_images

log = logging.getLogger(__name__)

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def trained_components(cfg: RunConfig, num_text_encoders: int) -> list[str]:
    """The components `cfg` trains, in COMPONENTS order."""
    names = ["unet"] if cfg.lora.train_unet else []
    if cfg.lora.train_text_encoder:
        names += list(COMPONENTS[1:1 + num_text_encoders])
    return names


@dataclass
class Trained:
    """The trained modules by component, in COMPONENTS order; after accelerate's `prepare` they may
    be wrapped (DDP), which `unwrapped` takes off."""

    named: dict[str, torch.nn.Module]

    @property
    def modules(self) -> list[torch.nn.Module]:
        return list(self.named.values())

    def with_module(self, name: str, module: torch.nn.Module) -> "Trained":
        """These components and one more (the trained embedding of embedding.token)."""
        return Trained({**self.named, name: module})

    def words(self, accelerator, base) -> list | None:
        """The trained embedding's word tables for the prompt encoder (None without one)."""
        from .pivotal import COMPONENT, word_tables

        words = self.unwrapped(accelerator).get(COMPONENT)
        return word_tables(base, words.token, words.fixed()) if words is not None else None

    def replace(self, modules: list[torch.nn.Module]) -> "Trained":
        """The same components with `modules` (what `prepare` returned, in the same order)."""
        return Trained(dict(zip(self.named, modules)))

    def unet(self, base) -> torch.nn.Module:
        """The UNet a step calls: the trained one, or the base's frozen one."""
        return self.named.get("unet", base.unet)

    def text_encoders(self, base) -> list[torch.nn.Module]:
        """The text encoders a step calls: the trained ones, or the base's frozen ones."""
        trained = [self.named[name] for name in COMPONENTS[1:] if name in self.named]
        return trained or list(base.text_encoders)

    def unwrapped(self, accelerator) -> dict[str, torch.nn.Module]:
        return {name: accelerator.unwrap_model(module) for name, module in self.named.items()}

    def pipeline_modules(self, accelerator, base) -> tuple:
        """(unet, text_encoder, text_encoder_2 or None), unwrapped, the base's where not trained: what
        samples are drawn with."""
        own = self.unwrapped(accelerator)
        encoders = own.get("text_encoder", base.text_encoders[0]), own.get(
            "text_encoder_2", base.text_encoders[1] if len(base.text_encoders) > 1 else None)
        return (own.get("unet", base.unet), *encoders)


def export_trained(cfg: RunConfig, accelerator, base, trained: Trained, examples, step: int, max_steps: int,
                   started_at: float, suffix: str = "", folder: Path | None = None, epoch: int | None = None,
                   num_epochs: int | None = None) -> list[Path]:
    """The adapter file(s) of the trained components (main process only; others get [])."""
    if not accelerator.is_main_process:
        return []
    own = trained.unwrapped(accelerator)
    return export_adapter(
        cfg, own.get("unet"), own.get("text_encoder"), examples, step, max_steps, started_at,
        prediction_type=base.prediction_type, suffix=suffix, folder=folder,
        text_encoder_2=own.get("text_encoder_2"), variant=base.variant, epoch=epoch, num_epochs=num_epochs,
        words=own.get("embedding"),
    )


def draw_samples(cfg: RunConfig, accelerator, base, trained: Trained, step: int,
                 folder_name: str | None = None) -> list:
    """sample.prompts drawn with the adapters as they are, into samples/ and to the trackers at `step`
    (main process only; others get [])."""
    if not cfg.sample.prompts or not accelerator.is_main_process:
        return []
    unet, text_encoder, text_encoder_2 = trained.pipeline_modules(accelerator, base)
    with accelerator.autocast():
        images = save_samples(cfg, base, unet, text_encoder, step, text_encoder_2, folder_name,
                              trained.words(accelerator, base))
    log_images(accelerator, "samples", images, step)
    return images


def draw_sweep(cfg: RunConfig, accelerator, base, trained: Trained) -> None:
    """samples/sweep.png (main process only); none with no LoRA to scale (an embedding alone)."""
    if not (cfg.lora.train_unet or cfg.lora.train_text_encoder):
        log.info("sample.grid_weights: no sweep grid, as no LoRA trained (an embedding alone)")
    elif accelerator.is_main_process:
        with accelerator.autocast():
            save_sweep(cfg, base, *trained.pipeline_modules(accelerator, base), words=trained.words(accelerator, base))


@dataclass
class TrainResult:
    """What train() returns: the files, the losses, and the trained modules (tests compare them)."""

    output_dir: Path
    adapter_paths: list[Path]
    steps: int
    losses: list[float] = field(default_factory=list)
    trainable_parameters: int = 0
    unet: Any = None  # the modules, adapters in place (lora.train_unet false: the base's frozen UNet)
    text_encoder: Any = None
    text_encoder_2: Any = None  # SDXL
    resumed_from: Path | None = None  # the checkpoint the run continued from
    val_losses: dict[int, float] = field(default_factory=dict)  # step -> validation loss computed in this run
    finished: str = ""  # train.resume=latest on a run already that long: why nothing was done
    ema: dict[str, torch.Tensor] | None = None  # train.ema_decay: the EMA by "<component>.<parameter name>"
    embedding: dict[str, torch.Tensor] | None = None  # embedding.token: the trained vectors by part (as trained)
