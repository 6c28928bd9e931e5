"""Convert a LoRA adapter between the kohya and diffusers layouts.

    python scripts/convert_lora.py IN.safetensors OUT.safetensors --to kohya|diffusers [--dtype fp16]

Same as `lora-trainer convert ...`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lora_trainer.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
