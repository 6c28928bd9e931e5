"""Inference speed with adapters: load time per adapter, and seconds per denoising step for the base,
1 and 3 stacked adapters, and 3 merged; stacked-vs-merged overhead as ratios.

    python benchmarks/inference.py                      # tiny model, 64 px
    python benchmarks/inference.py --model sd15-full    # real SD1.5 layer sizes, 256 px (random weights)

Models and adapters are built offline into benchmarks/.models/ (random weights: speed only).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lora_trainer.inference.generate import Generator, Request  # noqa: E402
from lora_trainer.testing.inference_models import make_random_adapter  # noqa: E402
from lora_trainer.testing.tiny import make_tiny_model  # noqa: E402

MODELS = Path(__file__).resolve().parent / ".models"
SIZES = {"sd15": 64, "sd15-full": 256}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def seconds_per_step(gen: Generator, size: int, steps: int, repeats: int) -> float:
    """Median over `repeats` runs of (time with `steps` steps - time with 1 step) / (steps - 1), so
    text encoding and VAE decoding are left out."""
    def run(n: int) -> float:
        _sync(gen.device)
        start = time.perf_counter()
        gen.generate(Request(prompt="a harbour at dawn, (mystyle:1.2)", steps=n, width=size, height=size,
                             guidance_scale=7.5, sampler="euler"))
        _sync(gen.device)
        return time.perf_counter() - start

    run(2)  # warm-up
    return statistics.median((run(steps) - run(1)) / (steps - 1) for _ in range(repeats))


def _steps(text: str) -> int:
    steps = int(text)
    if steps == 1 or steps < 0:
        raise argparse.ArgumentTypeError(f"{text}: give 2 or more (or 0 where a benchmark skips the steps)")
    return steps


def speed_options(description: str) -> argparse.ArgumentParser:
    """The options the adapter speed benchmarks share (this one and lycoris_load.py)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", choices=list(SIZES), default="sd15",
                        help="sd15: the tiny model, 64 px; sd15-full: real SD1.5 layer sizes, 256 px (random weights)")
    parser.add_argument("--rank", type=int, default=16, help="adapter rank")
    parser.add_argument("--steps", type=_steps, default=6,
                        help="denoising steps per timed image (at least 2: one step is timed apart and subtracted)")
    parser.add_argument("--repeats", type=int, default=3, help="timed images per figure (the median is shown)")
    return parser


def base_model(name: str) -> Path:
    """benchmarks/.models/NAME, built offline on first use."""
    model = MODELS / name
    if not (model / "model_index.json").is_file():
        make_tiny_model(name, model)
    return model


def main() -> None:
    parser = speed_options(__doc__.splitlines()[0])
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)

    model = base_model(args.model)
    adapters = []
    for k in range(3):
        path = MODELS / f"{args.model}-r{args.rank}-{k}.safetensors"
        if not path.is_file():
            make_random_adapter(model, path, rank=args.rank, alpha=args.rank, seed=k, std=0.01)
        adapters.append(path)

    size = SIZES[args.model]
    gen = Generator(model, device=args.device)
    print(f"model {args.model}, {size} px, {gen.device} {str(gen.dtype).removeprefix('torch.')}, rank {args.rank}, "
          f"{args.steps} steps, CFG on (UNet batch 2)")
    rows = {"base": seconds_per_step(gen, size, args.steps, args.repeats)}
    load_times = []
    for k, path in enumerate(adapters):
        _sync(gen.device)
        start = time.perf_counter()
        gen.adapters.load(path_spec(path))
        _sync(gen.device)
        load_times.append(time.perf_counter() - start)
        if k == 0:
            rows["1 stacked"] = seconds_per_step(gen, size, args.steps, args.repeats)
    rows["3 stacked"] = seconds_per_step(gen, size, args.steps, args.repeats)
    gen.merge()
    rows["3 merged"] = seconds_per_step(gen, size, args.steps, args.repeats)
    gen.unmerge()

    print(f"adapter load: median {statistics.median(load_times):.3f} s ({', '.join(f'{t:.3f}' for t in load_times)})")
    for name, value in rows.items():
        print(f"{name:>10}: {value * 1000:8.1f} ms/step   ×{value / rows['base']:.2f} of base")
    print(f"overhead stacked/merged: 1 adapter ×{rows['1 stacked'] / rows['3 merged']:.2f}, "
          f"3 adapters ×{rows['3 stacked'] / rows['3 merged']:.2f}")


def path_spec(path: Path):
    from lora_trainer.inference.adapters import AdapterSpec

    return AdapterSpec(path, 0.7)


if __name__ == "__main__":
    main()
