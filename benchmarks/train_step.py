"""Seconds per training step and peak memory of the real training loop.

    python benchmarks/train_step.py                 # tiny (64 px, batch 2) and sd15-full (256 px, batch 1, rank 4)
    python benchmarks/train_step.py --cases tiny    # just one
    python benchmarks/train_step.py --cases sdxl-tiny,sdxl-tiny-nocache
    python benchmarks/train_step.py --cases full,full-kohya,full-locon   # module sets: attention, kohya's, + LoCon
    python benchmarks/train_step.py --cases full-bf16,full-bf16-loha,full-bf16-lokr --steps 12   # LoRA, LoHa, LoKr
    python benchmarks/train_step.py --cases gpu-sd15-512,gpu-sd15-512-ckpt-8bit,gpu-sdxl-1024,gpu-sdxl-1024-ckpt-8bit
    python benchmarks/train_step.py --cases tiny,full train.ema_decay=0.999   # overrides apply to every case

Each case runs `train()` in its own process (so peak RSS is that case's alone) on the bundled
example images, UNet LoRA only, and reports the median step time after two warm-up steps. The
`-nocache` cases re-encode every image with the VAE at every step, as a loop without a latent
cache does: the difference is what the cache saves. Models are built once into benchmarks/.models/.
With `train.ema_decay` set, `ema_update_ms` is the EMA's own share of a step (the median of 50
updates over the run's adapter, timed alone), which step-to-step noise would hide in the step time.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "benchmarks" / ".models"

CASES = {
    "tiny": ("sd15", ["data.resolution=64", "train.batch_size=2", "train.mixed_precision=no"]),
    "tiny-bf16": ("sd15", ["data.resolution=64", "train.batch_size=2", "train.mixed_precision=bf16"]),
    "full": ("sd15-full", ["data.resolution=256", "train.batch_size=1", "train.mixed_precision=no"]),
    "full-bf16": ("sd15-full", ["data.resolution=256", "train.batch_size=1", "train.mixed_precision=bf16"]),
    "full-nocache": ("sd15-full", ["data.resolution=256", "train.batch_size=1", "train.mixed_precision=no",
                                   "train.cache_latents=false"]),
    "full-bf16-nocache": ("sd15-full", ["data.resolution=256", "train.batch_size=1", "train.mixed_precision=bf16",
                                        "train.cache_latents=false"]),
    # GPU cases: fp16 needs CUDA; 512 px batch 4 is a realistic SD1.5 run.
    "tiny-fp16": ("sd15", ["data.resolution=64", "train.batch_size=2", "train.mixed_precision=fp16"]),
    "full-fp16": ("sd15-full", ["data.resolution=256", "train.batch_size=1", "train.mixed_precision=fp16"]),
    "full512-fp32": ("sd15-full", ["data.resolution=512", "train.batch_size=4", "train.mixed_precision=no"]),
    "full512-bf16": ("sd15-full", ["data.resolution=512", "train.batch_size=4", "train.mixed_precision=bf16"]),
    "full512-fp16": ("sd15-full", ["data.resolution=512", "train.batch_size=4", "train.mixed_precision=fp16"]),
    "full512-bf16-gc": ("sd15-full", ["data.resolution=512", "train.batch_size=4", "train.mixed_precision=bf16",
                                      "train.gradient_checkpointing=true"]),
    "full512-bf16-nocache": ("sd15-full", ["data.resolution=512", "train.batch_size=4", "train.mixed_precision=bf16",
                                           "train.cache_latents=false"]),
    # kohya's module set (attention, feed-forward, proj_in/out) alone and with LoCon convs at rank 8.
    "full-kohya": ("sd15-full", ["data.resolution=256", "train.batch_size=1", "train.mixed_precision=no",
                                 "lora.unet_targets=[to_q,to_k,to_v,to_out.0,ff.net.0.proj,ff.net.2,proj_in,proj_out]"]),
    "full-locon": ("sd15-full", ["data.resolution=256", "train.batch_size=1", "train.mixed_precision=no",
                                 "lora.unet_targets=[to_q,to_k,to_v,to_out.0,ff.net.0.proj,ff.net.2,proj_in,proj_out]",
                                 "lora.conv_rank=8"]),
    # LyCORIS types at the same rank on the same layers (peft builds each layer's whole ΔW every step)
    "full-bf16-loha": ("sd15-full", ["data.resolution=256", "train.batch_size=1", "train.mixed_precision=bf16",
                                     "lora.type=loha"]),
    "full-bf16-lokr": ("sd15-full", ["data.resolution=256", "train.batch_size=1", "train.mixed_precision=bf16",
                                     "lora.type=lokr"]),
    "sdxl-tiny": ("sdxl", ["data.resolution=64", "train.batch_size=2", "train.mixed_precision=no"]),
    "sdxl-tiny-nocache": ("sdxl", ["data.resolution=64", "train.batch_size=2", "train.mixed_precision=no",
                                   "train.cache_latents=false"]),
    # Real SDXL sizes (2.6 B UNet parameters): a GPU case; on CPU it takes many GiB and minutes per step.
    "sdxl-full-512": ("sdxl-full", ["data.resolution=512", "train.batch_size=1", "train.mixed_precision=bf16",
                                    "train.gradient_checkpointing=true"]),
    # The GPU table: batch 1, bf16, with and without gradient checkpointing + 8-bit AdamW.
    **{f"gpu-{name}{tail}": (variant, [f"data.resolution={res}", "train.batch_size=1", "train.mixed_precision=bf16",
                                       *extra])
       for name, variant, res in (("sd15-512", "sd15-full", 512), ("sdxl-1024", "sdxl-full", 1024))
       for tail, extra in (("", []), ("-ckpt-8bit", ["train.gradient_checkpointing=true",
                                                     "train.optimizer=adamw8bit"]))},
}


def _model(variant: str) -> Path:
    path = MODELS / variant
    if not (path / "model_index.json").is_file():
        from lora_trainer.testing.tiny import make_tiny_model

        print(f"building {variant} into {path} ...", file=sys.stderr)
        make_tiny_model(variant, path)
    return path


def run_case(name: str, steps: int, extra: list[str]) -> dict:
    """Run one case in this process and return its figures."""
    import torch

    from lora_trainer.config import load_config
    from lora_trainer.training.loop import train

    variant, overrides = CASES[name]
    model = _model(variant)
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(None, [
            f"model.base={model}", f"data.path={REPO / 'datasets' / 'example'}", f"output.dir={out}",
            "lora.rank=4", f"train.max_steps={steps}", "train.lr=1e-4", "sample.prompts=[]", *overrides, *extra,
        ])
        started = time.perf_counter()
        result = train(cfg, show_progress=False)
        total = time.perf_counter() - started
        times = [json.loads(line)["step_time"] for line in (Path(out) / "train_log.jsonl").read_text().splitlines()]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    figures = {
        "case": name,
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu x{torch.get_num_threads()} threads",
        "steps": result.steps,
        "median_step_s": round(statistics.median(times[2:] or times), 4),
        "first_step_s": round(times[0], 3),
        "total_s": round(total, 1),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "trainable_params": result.trainable_parameters,
    }
    if device == "cuda":
        figures["peak_cuda_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if cfg.train.ema_decay is not None:
        figures["ema_update_ms"] = _ema_update_ms(result, cfg.train)
    return figures


def _ema_update_ms(result, t) -> float:
    """Median milliseconds of one EMA update over the trained adapter, on the device the run kept it."""
    import torch

    from lora_trainer.training.ema import AdapterEMA

    modules = {"unet": result.unet, "text_encoder": result.text_encoder, "text_encoder_2": result.text_encoder_2}
    named = {f"{c}.{k}": p for c, m in modules.items() if m is not None for k, p in m.named_parameters()
             if p.requires_grad}
    device = next(iter(named.values())).device if t.ema_device == "accelerator" else torch.device("cpu")
    ema = AdapterEMA(named, t.ema_decay, t.ema_warmup, device)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times = []
    for _ in range(50):
        sync()
        started = time.perf_counter()
        ema.update()
        sync()
        times.append(time.perf_counter() - started)
    return round(statistics.median(times) * 1000, 3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="tiny,full,full-nocache", help=f"comma list of {', '.join(CASES)}")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="extra config overrides for every case")
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(run_case(args.worker, args.steps, args.overrides)), flush=True)
        return 0
    rows = []
    for name in args.cases.split(","):
        if name not in CASES:
            parser.error(f"unknown case {name!r}; choose from {', '.join(CASES)}")
        proc = subprocess.run([sys.executable, __file__, "--worker", name, "--steps", str(args.steps), *args.overrides],
                              capture_output=True, text=True)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(f"{name}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            return 1
        rows.append(json.loads(line[len("RESULT "):]))
        print(json.dumps(rows[-1]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
