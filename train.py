"""Train a LoRA adapter: `python train.py CONFIG.yaml [key=value ...]` (also under `accelerate launch`)."""

import sys

if __name__ == "__main__":
    from lora_trainer.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
