"""Caption the images of a folder that have no caption, with BLIP-2 or WD14 tags (--method wd14): `python scripts/caption.py DIR [--prefix "sks, "] [--overwrite] [--model ID]`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lora_trainer.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["caption", *sys.argv[1:]]))
