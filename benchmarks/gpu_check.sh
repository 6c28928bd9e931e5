#!/usr/bin/env bash
# The GPU checks, as one script for a lent accelerator machine: versions, the training tests on
# CUDA, then the step benchmark for fp32/bf16/fp16 at 256 and 512 px. Wheels for packages the
# machine lacks travel in .whl/ (see README "Benchmarks").
set -uo pipefail
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, diffusers, transformers, peft, accelerate; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__, 'cuda', torch.cuda.is_available())"
# The README demo on the GPU, in each precision: train, export, samples, then inference.
# DEMO=0 skips it (e.g. to spend a short device budget on the SDXL cases only).
if [ "${DEMO:-1}" != 0 ]; then
python3 scripts/make_tiny_model.py --variant sd15 /tmp/tiny-sd15 >/dev/null
for mp in no bf16 fp16; do
  python3 train.py configs/example.yaml model.base=/tmp/tiny-sd15 output.dir=/tmp/demo-$mp train.mixed_precision=$mp --quiet 2>&1 | grep -E "adapter:|error" || echo "demo $mp FAILED"
  python3 -c "import json; l=[json.loads(x)['loss'] for x in open('/tmp/demo-$mp/train_log.jsonl')]; print('$mp loss first10 %.4f last10 %.4f' % (sum(l[:10])/10, sum(l[-10:])/10))"
done
python3 infer.py --model /tmp/tiny-sd15 --lora /tmp/demo-bf16/example-lora.safetensors:0.8 --prompt "geoshape, a red circle" --steps 10 --width 64 --height 64 --out /tmp/demo-images 2>&1 | tail -1
fi
python3 benchmarks/train_step.py --steps ${STEPS:-12} --cases ${CASES:-tiny,tiny-fp16,full,full-bf16,full-fp16,full512-fp32,full512-bf16,full512-fp16,full512-bf16-gc,full512-bf16-nocache} 2>&1 | tee "$OUT/bench.jsonl"
