"""Check a dataset folder before training: `python scripts/check_data.py DIR [--resolution 512] [--model BASE] [--json]`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lora_trainer.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["check-data", *sys.argv[1:]]))
