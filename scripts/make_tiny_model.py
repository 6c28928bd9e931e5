"""Build a tiny (or full-size) randomly initialised pipeline offline: `python scripts/make_tiny_model.py --variant sd15 OUT_DIR`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lora_trainer.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["make-tiny", *sys.argv[1:]]))
