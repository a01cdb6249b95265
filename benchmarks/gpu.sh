#!/usr/bin/env bash
# GPU check for a session lent a GPU machine (< 5 minutes): training throughput, MFU and peak memory of
# SiT-XL/2 + DINOv2-B (random weights, 256 px images -> 32x32x4 latents, bf16), plus a tiny sampling run.
# Usage (from the repository root, with the package installed or importable):
#     bash benchmarks/gpu.sh [per-GPU batch, default 64]
# Record the printed figures with the card's name in docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
BATCH="${1:-64}"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, 'cuda', torch.version.cuda)"

echo "== SiT-XL/2 + DINOv2-B training step, bf16, batch $BATCH, eager"
"$PY" benchmarks/trainer_step.py --model SiT-XL/2 --encoder dinov2-vit-b --device cuda --precision bf16 \
    --batch-size "$BATCH" --warmup 5 --steps 20
echo "== same, torch.compile"
timeout 240 "$PY" benchmarks/trainer_step.py --model SiT-XL/2 --encoder dinov2-vit-b --device cuda \
    --precision bf16 --batch-size "$BATCH" --warmup 5 --steps 20 --compile || echo "compile run failed or timed out"

echo "== SiT-XL/2 sampling: SDE 50 steps, cfg 1.8 on [0, 0.7], batch 64, bf16 autocast"
"$PY" - <<'PYEOF'
import time

import torch

from repa.models import build_model
from repa.sampling import sample

torch.backends.cuda.matmul.allow_tf32 = True
model = build_model("SiT-XL/2", z_dims=[768]).cuda().eval()
z = torch.randn(64, 4, 32, 32, device="cuda")
y = torch.randint(0, 1000, (64,), device="cuda")
gen = torch.Generator(device="cuda").manual_seed(0)
for label, steps in (("warm-up", 5), ("timed", 50)):
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = sample(model, z, y, sampler="sde", num_steps=steps, cfg_scale=1.8, guidance_low=0.0,
                     guidance_high=0.7, generator=gen)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    print(f"{label}: {steps} SDE steps, {64 / seconds:.1f} images/s, finite={bool(torch.isfinite(out).all())}")
print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
PYEOF
