"""Captioning speed: N images through BLIP-2 in batches, full precision against half precision
(fp16 on a GPU, bf16 on CPU), and 8-bit with --with-8bit. One JSON line per setting.

    python benchmarks/caption_speed.py                       # the tiny random BLIP-2, built offline
    python benchmarks/caption_speed.py --model Salesforce/blip2-opt-2.7b --batch-size 8
    python benchmarks/caption_speed.py --random-size opt-2.7b  # random weights, the real layer sizes (GPU)

Every caption is exactly --tokens new tokens long (min = max), so settings do the same work.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lora_trainer.config import CaptionConfig  # noqa: E402
from lora_trainer.data.captioning import (  # noqa: E402
    Blip2Captioner,
    generate_captions,
    load_blip2,
    release,
    resolve_device_dtype,
)

TINY = Path(__file__).resolve().parent / ".models" / "blip2"


# Layer sizes of Salesforce/blip2-opt-2.7b (ViT-g/14, Q-Former, OPT-2.7b), and a middle size to try
# the code path on a CPU.
SIZES = {
    "opt-2.7b": dict(vision=dict(), qformer=dict(), queries=32, image=224,
                     text=dict(hidden_size=2560, ffn_dim=10240, num_hidden_layers=32, num_attention_heads=32,
                               word_embed_proj_dim=2560, max_position_embeddings=2048)),
    "small": dict(vision=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4),
                  qformer=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4),
                  queries=32, image=224,
                  text=dict(hidden_size=256, ffn_dim=1024, num_hidden_layers=4, num_attention_heads=4,
                            word_embed_proj_dim=256, max_position_embeddings=512)),
}


def random_captioner(size: str, options: CaptionConfig) -> Blip2Captioner:
    """A randomly initialised BLIP-2 of real layer sizes, built on the device (no weights to fetch),
    with the tiny offline tokenizer: same compute per token as the real model, gibberish words."""
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, Blip2QFormerConfig,
                              Blip2VisionConfig, BlipImageProcessor, OPTConfig)

    from lora_trainer.testing.tiny_blip2 import build_opt_tokenizer

    s = SIZES[size]
    device, dtype = resolve_device_dtype(options)
    processor = Blip2Processor(BlipImageProcessor(size={"height": s["image"], "width": s["image"]}),
                               build_opt_tokenizer(), num_query_tokens=s["queries"])
    tok = processor.tokenizer
    config = Blip2Config(
        vision_config=Blip2VisionConfig(image_size=s["image"], **s["vision"]).to_dict(),
        qformer_config=Blip2QFormerConfig(**s["qformer"]).to_dict(),
        text_config=OPTConfig(vocab_size=50272, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id, **s["text"]).to_dict(),
        num_query_tokens=s["queries"],
        image_token_index=tok.convert_tokens_to_ids(processor.image_token.content),
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = Blip2ForConditionalGeneration(config)
    model.to(dtype).eval()
    return Blip2Captioner(processor, model, device, dtype, options)


def _images(n: int, size: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(model: str, dtype: str, eight_bit: bool, args, images) -> dict:
    options = CaptionConfig(model=model, dtype=dtype, load_in_8bit=eight_bit, device=args.device,
                            batch_size=args.batch_size, max_length=args.tokens, min_length=args.tokens)
    started = time.perf_counter()
    captioner = random_captioner(args.random_size, options) if args.random_size else load_blip2(options)
    load_s = time.perf_counter() - started
    device = captioner.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    generate_captions(captioner, images[: args.batch_size])  # warm-up: kernels, caches, allocator
    _sync(device)
    torch.manual_seed(0)
    started = time.perf_counter()
    captions = []
    for i in range(0, len(images), args.batch_size):
        captions += generate_captions(captioner, images[i:i + args.batch_size])
    _sync(device)
    seconds = time.perf_counter() - started
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    release(captioner)
    return {"model": f"random {args.random_size}" if args.random_size else model, "device": str(device), "dtype": "int8" if eight_bit else dtype,
            "batch_size": args.batch_size, "images": len(images), "tokens_per_caption": args.tokens,
            "seconds": round(seconds, 4), "images_per_s": round(len(images) / seconds, 2),
            "load_s": round(load_s, 2), "peak_mem_mb": round(peak, 1),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "example": captions[0]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="BLIP-2 hub id or folder (default: the tiny random one, built on first use)")
    p.add_argument("--random-size", choices=sorted(SIZES), help="random weights of these layer sizes instead of --model")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--size", type=int, default=256, help="image side in pixels (the processor resizes anyway)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--tokens", type=int, default=20, help="new tokens per caption")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--with-8bit", action="store_true", help="also time bitsandbytes 8-bit (CUDA only)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = args.model
    if model is None:
        if not (TINY / "config.json").is_file():
            from lora_trainer.testing.tiny_blip2 import make_blip2

            make_blip2(TINY)
        model = str(TINY)
    cuda = torch.cuda.is_available() and args.device != "cpu"
    settings = [("fp32", False), ("fp16" if cuda else "bf16", False)]
    if args.with_8bit and cuda:
        settings.append(("fp16", True))
    images = _images(args.images, args.size)
    for dtype, eight_bit in settings:
        print(json.dumps(run(model, dtype, eight_bit, args, images)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
