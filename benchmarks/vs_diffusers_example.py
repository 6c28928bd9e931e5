"""Our training loop against the diffusers example's, on the same model, images and adapter.

    python benchmarks/vs_diffusers_example.py                  # SD1.5-size UNet, 256 px, fp32 and bf16, 24 steps
    python benchmarks/vs_diffusers_example.py --precisions bf16 --steps 40
    python benchmarks/vs_diffusers_example.py --model sd15 --resolution 64 --steps 6   # tiny model: a smoke run

diffusers' `examples/text_to_image/train_text_to_image_lora.py` is the loop most people start from.
Its step is rebuilt here as `reference_case` (its example folder is not part of the diffusers
package): the components loaded one by one, frozen weights cast to the compute dtype, a peft LoRA
on the UNet's attention projections (fp32 factors), AdamW, accelerate's autocast; then per step the
image through the VAE encoder and the caption through the text encoder, noise, the UNet, an MSE
loss, gradient clipping and the update. Our `train()` runs the same model, images, rank, targets,
optimizer, learning rate, batch size and precision (`train_step.py`'s cases `full` / `full-bf16`),
and caches each image's latents and caption's embedding the first time it meets them (the 8
example images: from step 9 on, at batch 1).

Each case runs in its own process, so its peak RSS is its own. Reported per case: the median
seconds per step over the first epoch and over the later ones (the first two steps left out as
warm-up), the seconds from the start of the process's work to the end of the first step (loading
included), the total, and the peak RSS. Models are built once into benchmarks/.models/.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import REPO, _model  # noqa: E402

DATA = REPO / "datasets" / "example"
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
RANK, LR, SEED = 4, 1e-4, 0


class AnonymousMemory:
    """The peak of the process's anonymous memory (Linux's RssAnon: what it holds itself), sampled
    every 50 ms. The peak RSS counts the pages of weight files read through mmap too, which the
    kernel can drop at will; their share is largest while a base loads."""

    def __init__(self):
        self.peak = self.since_mark = 0.0
        threading.Thread(target=self._run, daemon=True).start()

    @staticmethod
    def now() -> float:
        try:
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) for line in f if line.startswith("RssAnon")) / 2**20
        except (OSError, StopIteration):
            return 0.0

    def _run(self) -> None:
        while True:  # a daemon thread: it ends with the process
            time.sleep(0.05)
            gib = self.now()
            self.peak, self.since_mark = max(self.peak, gib), max(self.since_mark, gib)

    def mark(self) -> None:
        """From here on, `since_mark` is the peak of what follows (the training steps)."""
        self.since_mark = self.now()


def _figures(name: str, times: list[float], per_epoch: int, started: float, first_done: float,
             memory: AnonymousMemory) -> dict:
    """The reported numbers for one case: `times` are the step times in order."""
    warm = times[2:]
    first, later = warm[:max(per_epoch - 2, 0)], times[per_epoch:]
    return {
        "case": name,
        "steps": len(times),
        "median_step_s_epoch1": round(statistics.median(first), 3) if first else None,
        "median_step_s_later": round(statistics.median(later), 3) if later else None,
        "median_step_s": round(statistics.median(warm or times), 3),
        "to_first_step_s": round(first_done - started, 1),
        "total_s": round(time.perf_counter() - started, 1),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "peak_anon_gib": round(memory.peak, 2),
        "steps_anon_gib": round(memory.since_mark, 2),
    }


def ours_case(model: Path, resolution: int, precision: str, steps: int) -> dict:
    """Our `train()` on the example images, as `train_step.py` runs it."""
    started, memory = time.perf_counter(), AnonymousMemory()  # imports included, as in reference_case
    import tempfile

    from lora_trainer.config import load_config
    from lora_trainer.training.loop import train


    def mark_at_first_step(step: int, loss):
        if step == 1:  # after the first forward, as in reference_case
            memory.mark()
        return loss

    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(None, [
            f"model.base={model}", f"data.path={DATA}", f"output.dir={out}", f"data.resolution={resolution}",
            "train.batch_size=1", f"train.mixed_precision={precision}", f"lora.rank={RANK}", f"lora.alpha={RANK}",
            f"lora.unet_targets=[{','.join(TARGETS)}]", f"train.max_steps={steps}", f"train.lr={LR}",
            "train.scheduler=constant", "train.warmup=0", f"train.seed={SEED}", "sample.prompts=[]",
            "data.random_flip=true",
        ])
        train(cfg, show_progress=False, loss_hook=mark_at_first_step)
        records = [json.loads(line) for line in (Path(out) / "train_log.jsonl").read_text().splitlines()]
    times = [r["step_time"] for r in records if "step_time" in r]
    # the first step ends at the load plus its own time: the log has the step times, the load is the rest
    total = time.perf_counter() - started
    first_done = started + total - sum(times[1:])
    return _figures(f"ours-{precision}", times, len(_images()), started, first_done, memory)


def _images() -> list[tuple[Path, str]]:
    return [(p, p.with_suffix(".txt").read_text().strip()) for p in sorted(DATA.glob("*.png"))]


def reference_case(model: Path, resolution: int, precision: str, steps: int) -> dict:
    """The diffusers example's training step, rebuilt: every step encodes its image and caption again."""
    started, memory = time.perf_counter(), AnonymousMemory()
    import numpy as np
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(SEED)
    accelerator = Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available())
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    noise_scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    for frozen in (unet, vae, text_encoder):
        frozen.requires_grad_(False)
        frozen.to(accelerator.device, dtype=dtype)
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=TARGETS))
    for p in unet.parameters():  # the factors train in fp32 whatever the frozen weights are held in
        if p.requires_grad:
            p.data = p.data.float()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)

    items = _images()

    def load(i: int) -> dict:  # the example's per-item transforms: resize, center crop, flip, [-1, 1]
        path, caption = items[i]
        image = Image.open(path).convert("RGB")
        w, h = image.size
        scale = resolution / min(w, h)
        image = image.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))),
                             Image.BILINEAR)
        left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
        if torch.rand(()) < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        ids = tokenizer(caption, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                        return_tensors="pt").input_ids[0]
        return {"pixel_values": pixels, "input_ids": ids}

    loader = torch.utils.data.DataLoader(list(range(len(items))), batch_size=1, shuffle=True,
                                         collate_fn=lambda idx: torch.utils.data.default_collate([load(i) for i in idx]))
    unet, optimizer, loader = accelerator.prepare(unet, optimizer, loader)
    unet.train()
    times, first_done = [], None
    step_started = time.perf_counter()
    while len(times) < steps:
        for batch in loader:
            with accelerator.accumulate(unet):
                latents = vae.encode(batch["pixel_values"].to(dtype)).latent_dist.sample() * vae.config.scaling_factor
                noise = torch.randn_like(latents)
                t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  device=latents.device)
                noisy = noise_scheduler.add_noise(latents, noise, t)
                context = text_encoder(batch["input_ids"], return_dict=False)[0]
                pred = unet(noisy, t, context, return_dict=False)[0]
                loss = F.mse_loss(pred.float(), noise.float())
                if not times:
                    memory.mark()
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad()
            if not torch.isfinite(loss):
                raise RuntimeError(f"reference loop: loss {loss.item()} at step {len(times) + 1}")
            now = time.perf_counter()
            times.append(now - step_started)
            first_done = first_done or now
            step_started = now
            if len(times) == steps:
                break
    return _figures(f"diffusers-example-{precision}", times, len(items), started, first_done, memory)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd15-full", help="sd15 (tiny) or sd15-full (real SD1.5 layer sizes)")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--precisions", default="no,bf16", help="comma list of no, bf16, fp16 (fp16: GPU)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        loop, precision = args.worker.split(":")
        case = ours_case if loop == "ours" else reference_case
        figures = case(_model(args.model), args.resolution, precision, args.steps)
        print("RESULT " + json.dumps({**figures, "model": args.model, "resolution": args.resolution}), flush=True)
        return 0
    for precision in args.precisions.split(","):
        for loop in ("diffusers-example", "ours"):
            proc = subprocess.run([sys.executable, __file__, "--worker", f"{loop}:{precision}", "--model", args.model,
                                   "--resolution", str(args.resolution), "--steps", str(args.steps)],
                                  capture_output=True, text=True)
            line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                print(f"{loop} {precision}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                return 1
            print(line[len("RESULT "):], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
