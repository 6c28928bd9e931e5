"""Generate images: `python infer.py --model BASE --lora FILE[:WEIGHT] --prompt "..." --out DIR`."""

import sys

if __name__ == "__main__":
    from lora_trainer.cli import main

    sys.exit(main(["infer", *sys.argv[1:]]))
