"""lora-trainer: LoRA and DreamBooth fine-tuning for Stable Diffusion, from one config file."""

__version__ = "0.1.0"
