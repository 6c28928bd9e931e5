"""Train a LoRA adapter: `python train.py CONFIG.yaml [key=value ...]` (also under `accelerate launch`)."""

import sys

from lora_trainer.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
