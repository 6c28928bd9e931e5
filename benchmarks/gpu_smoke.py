"""GPU smoke run of the training paths a CPU cannot exercise (fp16 with loss scaling, bf16 SDXL with
buckets + prior preservation + both text encoders, 8-bit AdamW), then the SD1.5 512 px GPU benchmark.

    python benchmarks/gpu_smoke.py     # about 3 minutes on one H100, most of it building sd15-full
"""
import os, subprocess, sys, time, tempfile
from pathlib import Path
sys.path.insert(0, os.getcwd())
import torch
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(), flush=True)
import importlib.util
print("bitsandbytes", importlib.util.find_spec("bitsandbytes") is not None, "prodigyopt", importlib.util.find_spec("prodigyopt") is not None, flush=True)
from lora_trainer.testing.tiny import make_tiny_model
from lora_trainer.config import load_config
from lora_trainer.training.loop import train
from PIL import Image
tmp = Path(tempfile.mkdtemp())
make_tiny_model("sdxl", tmp / "sdxl"); make_tiny_model("sd15", tmp / "sd15")
data = tmp / "mixed"; data.mkdir()
for k, (w, h) in enumerate([(160, 90), (90, 160), (120, 120), (150, 80), (100, 100)]):
    Image.new("RGB", (w, h), (40 * k, 90, 200)).save(data / f"{k}.png"); (data / f"{k}.txt").write_text(f"shape {k}")
def run(name, model, extra):
    t0 = time.time()
    cfg = load_config("configs/example.yaml", [f"model.base={model}", f"data.path={data}", f"output.dir={tmp/name}",
                      "train.max_steps=4", "sample.steps=2", *extra])
    r = train(cfg, show_progress=False)
    print(name, "OK", [round(l, 4) for l in r.losses], round(time.time() - t0, 1), "s", flush=True)
for name, model, extra in [
    ("sdxl-bf16-buckets-prior-te", tmp / "sdxl", ["train.mixed_precision=bf16", "data.resolution=96", "data.buckets=true",
      "data.bucket_step=32", "lora.train_text_encoder=true", "dreambooth.class_prompt=a shape",
      f"dreambooth.class_data={tmp/'cls'}", "dreambooth.num_class_images=2", "dreambooth.class_steps=2"]),
    ("sdxl-fp16", tmp / "sdxl", ["train.mixed_precision=fp16", "lora.train_text_encoder=true"]),
    ("sd15-fp16-disk-cache", tmp / "sd15", ["train.mixed_precision=fp16", "train.cache_latents_to_disk=true",
      f"train.cache_dir={tmp/'c'}", "train.input_perturbation=0.1", "data.shuffle_tags=true"]),
    ("sd15-adamw8bit", tmp / "sd15", ["train.optimizer=adamw8bit", "sample.prompts=[]"]),
]:
    try:
        run(name, model, extra)
    except Exception as e:
        print(name, "FAILED", type(e).__name__, str(e)[:300], flush=True)
subprocess.run([sys.executable, "benchmarks/train_step.py", "--cases", "gpu-sd15-512,gpu-sd15-512-ckpt-8bit", "--steps", "8"])
