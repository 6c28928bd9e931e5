"""The multi-process tests' runs: the per-process script (train from a config and save this rank's
trained UNet adapter as `<output.dir>/rank<RANK>.pt`), and the runs of several test files launched
together under one `torch.distributed.run`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

from PIL import Image

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

# Each process runs the runs one after the other, each with its own config: a run named with a
# script goes through that script as `torchrun SCRIPT CONFIG ARGS...` would run it.
SEVERAL_RUNS_SCRIPT = textwrap.dedent("""
    import os, runpy, sys
    import torch
    from lora_trainer.config import load_config
    from lora_trainer.training.loop import train

    torch.set_num_threads(1)
    # The runs follow each other in the same 2 processes, as a script or a notebook that trains
    # twice does: each run leaves the process group to the next (destroyed at exit).
    config, runs = sys.argv[1], [run.split("\\n") for run in sys.argv[2:]]
    for script, *args in runs:
        if script:
            sys.argv = [script, config, *args]
            try:
                runpy.run_path(script, run_name="__main__")
            except SystemExit as exc:
                if exc.code:
                    raise
            continue
        cfg = load_config(config, args)
        result = train(cfg, show_progress=False)
        adapter = {k: v.detach() for k, v in result.unet.named_parameters() if v.requires_grad}
        torch.save(adapter, os.path.join(cfg.output.dir, f"rank{os.environ['RANK']}.pt"))
""")

# Images of three aspect ratios, three of each, as (width, height): with data.resolution=96 and
# data.bucket_step=32 the buckets 128x64 (wide), 64x128 (tall) and 96x96.
MIXED_ASPECT = [(160, 90), (150, 80), (170, 95), (90, 160), (80, 150), (95, 170), (120, 120), (100, 100), (110, 110)]
BUCKET_RUN = ["data.path={mixed_aspect}", "data.buckets=true", "data.resolution=96", "data.bucket_step=32",
              "train.batch_size=2", "train.max_steps=null", "train.epochs=2", "output.save_every_n_steps=4",
              "output.save_every_n_epochs=1", "sample.prompts=[]", "output.dtype=fp32"]


def write_mixed_aspect_images(folder: Path, sizes=MIXED_ASPECT) -> Path:
    """Images of `sizes` (w, h) (a light square on a coloured ground) with captions, in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, (w, h) in enumerate(sizes):
        image = Image.new("RGB", (w, h), (40 * k % 255, 90, 200 - 20 * k))
        image.paste((250, 250, 250), (w // 4, h // 4, w // 2, h // 2))
        image.save(folder / f"{k}.png")
        (folder / f"{k}.txt").write_text(f"shape {k}, white square, plain background")
    return folder


# The 2-process runs the tests compare with 1 process (batch 1 per process there, batch 2 here,
# unless a run sets its own): name -> (options, script). Started once per session (see
# `two_process_runs`): each start of 2 processes imports torch, diffusers and peft again, which
# costs far more than these runs. In the options, {mixed_aspect} is a folder of MIXED_ASPECT images
# (the runs' data is the example dataset otherwise) and {<run>} that earlier run's output.dir.
TWO_PROCESS_RUNS = {
    # test_runs: LoRA dropout on, as its masks, too, belong to the sample and not to the process
    "global_batch": (["train.max_steps=6", "sample.prompts=[]", "output.save_every_n_steps=4", "output.dtype=fp32",
                      # LoRA dropout and kohya's neuron/rank/module dropouts: their masks, too, belong to the
                      # sample and not to the process
                      "lora.dropout=0.25", "lora.neuron_dropout=0.1", "lora.rank_dropout=0.25",
                      "lora.module_dropout=0.25",
                      # the EMA: every process averages the same weights, the exported file is rank 0's
                      "train.ema_decay=0.5"], None),
    # test_text_encoder_only: through train.py, DDP wrapping only the text encoder; random noise strengths
    "text_encoder_only": (["lora.train_unet=false", "lora.train_text_encoder=true", "train.text_encoder_lr=5e-3",
                           "output.dtype=fp32", "output.format=both", "sample.prompts=[]", "train.max_steps=3",
                           "train.noise_offset=0.1", "train.noise_offset_random_strength=true",
                           "train.input_perturbation=0.1", "train.input_perturbation_random_strength=true",
                           "train.adaptive_noise_scale=0.2"], "train.py"),
    # test_loraplus_maxnorm: 8 images, 2 processes × batch 1: 4 steps an epoch; the epoch-1 file at
    # step 4, the final one at 6
    "loraplus_max_norm": (["sample.prompts=[]", "output.dtype=fp32", "train.warmup=0", "train.scheduler=constant",
                           "train.max_steps=6", "train.loraplus_lr_ratio=4", "train.scale_weight_norms=0.05",
                           "output.save_every_n_epochs=1"], None),
    # test_pivotal: the trained embedding's gradients averaged over the processes (its own DDP module)
    "pivotal": (["train.max_steps=3", "sample.prompts=[]", "output.dtype=fp32", "embedding.token=geoshape",
                 "embedding.vectors=2", "embedding.init_words=shape", "embedding.lr=5e-3"], None),
    # test_validation: 3 held-out images over 2 processes: one process pads its last round
    "validation": (["train.max_steps=2", "sample.prompts=[]", "data.validation_split=0.375",
                    "train.validate_every_n_steps=1", "train.validation_timesteps=2"], None),
    # test_runs: aspect buckets, batch 2 per process: 3 buckets of 3 images cut into 6 batches (3 of
    # them short), 3 steps an epoch over 2 processes; the epoch-1 file at step 3, a checkpoint at 4
    "buckets": (BUCKET_RUN, None),
    # and from that checkpoint (mid-epoch: 1 batch of epoch 2 done per process) to the end
    "buckets_resumed": ([*BUCKET_RUN, "train.resume={buckets}/checkpoints/step-000004"], None),
}


def write_rank_script(folder: Path) -> Path:
    script = Path(folder) / "per_rank.py"
    script.write_text(PER_RANK_SCRIPT)
    return script



def free_port() -> int:
    """A TCP port free now (the OS picks it), so that two test sessions on one machine never meet
    on a fixed rendezvous port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

def launch_two_process_runs(repo: Path, model: Path, data: Path, folder: Path) -> dict[str, Path]:
    """Runs every TWO_PROCESS_RUNS entry in 2 processes, batch 1 each; returns each run's output.dir."""
    script = Path(folder) / "several_runs.py"
    script.write_text(SEVERAL_RUNS_SCRIPT)
    outs = {name: Path(folder) / name for name in TWO_PROCESS_RUNS}
    places = {**{name: str(out) for name, out in outs.items()},
              "mixed_aspect": str(write_mixed_aspect_images(Path(folder) / "mixed-aspect"))}
    runs = ["\n".join([str(repo / path) if path else "", f"model.base={model}", f"data.path={data}",
                       f"output.dir={outs[name]}", "train.batch_size=1",
                       *(option.format_map(places) for option in options)])
            for name, (options, path) in TWO_PROCESS_RUNS.items()]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         str(script), str(repo / "configs" / "example.yaml"), *runs],
        cwd=repo, env={**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}, capture_output=True,
        text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return outs
