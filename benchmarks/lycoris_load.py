"""What a LyCORIS file costs in `infer.py`: the time to merge it into the base (load), to re-merge it
at another weight, and the denoising step after it (merged, so it should be the base's), beside a
plain LoRA of the same rank and module set, which peft injects instead.

    python benchmarks/lycoris_load.py                      # tiny model
    python benchmarks/lycoris_load.py --model sd15-full    # real SD1.5 layer sizes (random weights)
    python benchmarks/lycoris_load.py --model sd15-full --kinds loha,lokr,full --steps 0   # load only

The adapters cover every attention projection and every ResNet 3x3 conv of the UNet (kohya's
LoCon set, about what a CivitAI LoHa adapts). `--kinds` picks the files: `loha`, `lokr` (a whole
8x8 w1 and a low-rank w2), `full` (ΔW stored whole: as big as those layers, 2.3 GB at SD1.5 size),
`oft` (blocks of `--rank` rows), `boft` (32 blocks per stage, 6 stages), `glora` (rank `--rank`)
and `locon` (a plain LoRA/LoCon, which peft injects). `--steps 0` skips the denoising steps. Models
and files are built offline into benchmarks/.models/ (random weights: speed only) and reused.
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


KINDS = ("loha", "lokr", "full", "locon", "oft", "boft", "glora")
LABELS = {"loha": "LoHa (merged)", "lokr": "LoKr (merged)", "full": "full (merged)", "locon": "LoRA/LoCon (peft)",
          "oft": "OFT (merged)", "boft": "BOFT (merged)", "glora": "GLoRA (merged)"}


def _module(kind: str, layer: torch.nn.Module, rank: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """The parts of one `kind` module (without the kohya name) for `layer`."""
    shape = tuple(layer.weight.shape)
    out_dim, flat_in = shape[0], layer.weight[0].numel()

    def rand(*size, std):
        return torch.randn(*size, generator=g) * std

    if kind == "loha":
        return {"hada_w1_a": rand(out_dim, rank, std=0.05), "hada_w1_b": rand(rank, flat_in, std=0.05),
                "hada_w2_a": rand(out_dim, rank, std=0.05), "hada_w2_b": rand(rank, flat_in, std=0.05),
                "alpha": torch.tensor(float(rank))}
    if kind == "lokr":  # ΔW = kron(w1, w2_a @ w2_b), w1 whole (8 x 8)
        return {"lokr_w1": rand(8, 8, std=0.1), "lokr_w2_a": rand(out_dim // 8, rank, std=0.05),
                "lokr_w2_b": rand(rank, flat_in // 8, std=0.05), "alpha": torch.tensor(float(rank))}
    if kind == "full":
        return {"diff": rand(*shape, std=0.001)}
    if kind == "oft":  # SD's widths (320, 640, 1280) are multiples of 16
        return {"oft_blocks": rand(out_dim // rank, rank, rank, std=0.01), "alpha": torch.tensor(0.0)}
    if kind == "boft":  # 32 blocks (tiny model: 16) of an even number of rows, every stage
        n = min(32, out_dim // 2)
        return {"oft_blocks": rand(n.bit_length(), n, out_dim // n, out_dim // n, std=0.01), "alpha": torch.tensor(0.0)}
    if kind == "glora":
        in_dim, one = shape[1], (1, 1) if len(shape) == 4 else ()  # a conv's 1x1 factors are conv weights
        return {"a1.weight": rand(in_dim, rank, *one, std=0.01), "a2.weight": rand(rank, in_dim, *one, std=0.01),
                "b1.weight": rand(out_dim, rank, *one, std=0.01),
                "b2.weight": rand(rank, *shape[1:], std=0.01), "alpha": torch.tensor(float(rank))}
    up_shape = (out_dim, rank, 1, 1) if len(shape) == 4 else (out_dim, rank)
    return {"lora_down.weight": rand(rank, *shape[1:], std=0.01), "lora_up.weight": rand(*up_shape, std=0.01),
            "alpha": torch.tensor(float(rank))}


def write_files(model: Path, rank: int, files: dict[str, Path]) -> int:
    """A file of `rank` per kind ({kind: path}) over `_layers` of the model's UNet, unless it is there
    already (the files are the same for a seed); returns the layer count."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    layers = _layers(unet)
    for kind, path in files.items():
        if path.is_file():
            continue
        g = torch.Generator().manual_seed(KINDS.index(kind))
        tensors = {}
        for layer_path, layer in layers.items():
            name = f"{KOHYA_PREFIXES['sd15']['unet']}_{canonical_path('unet', layer_path).replace('.', '_')}"
            tensors.update({f"{name}.{part}": t for part, t in _module(kind, layer, rank, g).items()})
        metadata = ({"ss_network_module": "networks.lora", "ss_base_model_version": "sd_v1"} if kind == "locon"
                    else {"ss_network_module": "lycoris.kohya"})
        safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    return len(layers)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = speed_options(__doc__.splitlines()[0])
    parser.add_argument("--kinds", default="loha,lokr,locon",
                        help=f"comma-separated, of {', '.join(KINDS)} (full writes a file as big as the layers)")
    args = parser.parse_args()
    kinds = args.kinds.split(",")
    if not set(kinds) <= set(KINDS):
        parser.error(f"--kinds: {args.kinds!r}; choose among {', '.join(KINDS)}")

    model = base_model(args.model)
    files = {kind: MODELS / f"{args.model}-{kind}-r{args.rank}.safetensors" for kind in kinds}
    layers = write_files(model, args.rank, files)
    size = SIZES[args.model]
    print(f"model {args.model}, {size} px, rank {args.rank}, {layers} UNet layers (attention + ResNet 3x3 convs)")

    gen = Generator(model, device="cpu")
    base = seconds_per_step(gen, size, args.steps, args.repeats) if args.steps else None
    rows = {}
    for kind, path in files.items():
        start = time.perf_counter()
        name = gen.adapters.load(AdapterSpec(path, 0.8))
        load = time.perf_counter() - start
        reweight = statistics.median(timed(lambda w=w: gen.adapters.set_weight(name, w)) for w in (0.5, 0.7, 0.9))
        step = seconds_per_step(gen, size, args.steps, args.repeats) if args.steps else None
        gen.adapters.unload(name)
        rows[LABELS[kind]] = (load, reweight, step)
    if base is not None:
        print(f"{'base':>18}: step {base * 1000:7.1f} ms")
    for label, (load, reweight, step) in rows.items():
        steps = "" if step is None else f", step {step * 1000:7.1f} ms (×{step / base:.2f} of base)"
        print(f"{label:>18}: load {load:6.2f} s, set_weight {reweight:6.2f} s{steps}")


if __name__ == "__main__":
    main()
