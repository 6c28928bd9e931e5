"""Generate images: `python infer.py --model BASE --lora FILE[:WEIGHT] --prompt "..." --out DIR`."""

import sys

from lora_trainer.cli import main

if __name__ == "__main__":
    sys.exit(main(["infer", *sys.argv[1:]]))
