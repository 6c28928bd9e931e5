"""What a LyCORIS file costs in `infer.py`: the time to merge it into the base (load), to re-merge it
at another weight, and the denoising step after it (merged, so it should be the base's), beside a
plain LoRA of the same rank and module set, which peft injects instead.

    python benchmarks/lycoris_load.py                      # tiny model
    python benchmarks/lycoris_load.py --model sd15-full    # real SD1.5 layer sizes (random weights)

The adapters cover every attention projection and every ResNet 3x3 conv of the UNet (kohya's
LoCon set, about what a CivitAI LoHa adapts). Models and files are built offline into
benchmarks/.models/ (random weights: speed only).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import safetensors.torch
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lora_trainer.export.layouts import KOHYA_PREFIXES, canonical_path  # noqa: E402
from lora_trainer.inference.adapters import AdapterSpec  # noqa: E402
from lora_trainer.inference.generate import Generator  # noqa: E402

from inference import MODELS, SIZES, base_model, seconds_per_step, speed_options  # noqa: E402  (benchmarks/inference.py)

ATTENTION = (".to_q", ".to_k", ".to_v", ".to_out.0")


def _layers(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Attention projections and ResNet 3x3 convs, by module path."""
    return {path: m for path, m in unet.named_modules()
            if (isinstance(m, torch.nn.Linear) and path.endswith(ATTENTION) and ".attn" in path)
            or (isinstance(m, torch.nn.Conv2d) and ".resnets." in path and m.kernel_size == (3, 3))}


def write_files(model: Path, rank: int, loha: Path, lora: Path) -> int:
    """A LoHa and a LoRA file of `rank` over `_layers` of the model's UNet; returns the layer count."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    g = torch.Generator().manual_seed(0)
    hada, plain = {}, {}
    for path, layer in _layers(unet).items():
        name = f"{KOHYA_PREFIXES['sd15']['unet']}_{canonical_path('unet', path).replace('.', '_')}"
        out_dim = layer.weight.shape[0]
        flat_in = layer.weight[0].numel()
        for part, shape in (("hada_w1_a", (out_dim, rank)), ("hada_w1_b", (rank, flat_in)),
                            ("hada_w2_a", (out_dim, rank)), ("hada_w2_b", (rank, flat_in))):
            hada[f"{name}.{part}"] = torch.randn(*shape, generator=g) * 0.05
        hada[f"{name}.alpha"] = torch.tensor(float(rank))
        down_shape = (rank, *layer.weight.shape[1:])
        up_shape = (out_dim, rank, 1, 1) if layer.weight.dim() == 4 else (out_dim, rank)
        plain[f"{name}.lora_down.weight"] = torch.randn(*down_shape, generator=g) * 0.01
        plain[f"{name}.lora_up.weight"] = torch.randn(*up_shape, generator=g) * 0.01
        plain[f"{name}.alpha"] = torch.tensor(float(rank))
    safetensors.torch.save_file(hada, str(loha), metadata={"ss_network_module": "lycoris.kohya"})
    safetensors.torch.save_file(plain, str(lora), metadata={"ss_network_module": "networks.lora",
                                                            "ss_base_model_version": "sd_v1"})
    return len(_layers(unet))


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    args = speed_options(__doc__.splitlines()[0]).parse_args()
    model = base_model(args.model)
    loha, lora = MODELS / f"{args.model}-loha-r{args.rank}.safetensors", MODELS / f"{args.model}-locon-r{args.rank}.safetensors"
    layers = write_files(model, args.rank, loha, lora)
    size = SIZES[args.model]
    print(f"model {args.model}, {size} px, rank {args.rank}, {layers} UNet layers (attention + ResNet 3x3 convs)")

    gen = Generator(model, device="cpu")
    base = seconds_per_step(gen, size, args.steps, args.repeats)
    rows = {}
    for label, path in (("LoHa (merged)", loha), ("LoRA/LoCon (peft)", lora)):
        start = time.perf_counter()
        name = gen.adapters.load(AdapterSpec(path, 0.8))
        load = time.perf_counter() - start
        reweight = statistics.median(timed(lambda w=w: gen.adapters.set_weight(name, w)) for w in (0.5, 0.7, 0.9))
        step = seconds_per_step(gen, size, args.steps, args.repeats)
        gen.adapters.unload(name)
        rows[label] = (load, reweight, step)
    print(f"{'base':>18}: step {base * 1000:7.1f} ms")
    for label, (load, reweight, step) in rows.items():
        print(f"{label:>18}: load {load:6.2f} s, set_weight {reweight:6.2f} s, step {step * 1000:7.1f} ms "
              f"(×{step / base:.2f} of base)")


if __name__ == "__main__":
    main()
