"""The per-process script of the multi-process tests: train from a config and save this rank's
trained UNet adapter as `<output.dir>/rank<RANK>.pt`, for comparing processes with each other."""

from __future__ import annotations

import textwrap
from pathlib import Path

PER_RANK_SCRIPT = textwrap.dedent("""
    import os, sys
    import torch
    from lora_trainer.config import load_config
    from lora_trainer.training.loop import train

    torch.set_num_threads(1)
    cfg = load_config(sys.argv[1], sys.argv[2:])
    result = train(cfg, show_progress=False)
    adapter = {k: v.detach() for k, v in result.unet.named_parameters() if v.requires_grad}
    torch.save(adapter, os.path.join(cfg.output.dir, f"rank{os.environ['RANK']}.pt"))
""")


def write_rank_script(folder: Path) -> Path:
    script = Path(folder) / "per_rank.py"
    script.write_text(PER_RANK_SCRIPT)
    return script
