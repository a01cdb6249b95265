#!/usr/bin/env bash
# GPU check for a session lent a GPU machine (< 5 minutes): for SiT-XL/2 + DINOv2-B and SiT-B/2 + DINOv2-B
# (random weights, 256 px images -> 32x32x4 latents): training images/s eager and torch.compile'd (bf16),
# MFU and peak memory (benchmarks/trainer_step.py), then sampling images/s at the paper's protocol
# (fp32 + TF32 as the official generate.py, SDE 250 steps, CFG 1.8 on [0, 0.7]; benchmarks/sample.py).
# Usage (from the repository root, with the package installed or importable):
#     bash benchmarks/gpu.sh [per-GPU batch, default 64]
#     bash benchmarks/gpu.sh --dry-run     # the same sequence on the CPU with a tiny model, in seconds
#     bash benchmarks/gpu.sh --smoke       # = --dry-run (the CI smoke run, tests/integration/test_benchmarks.py)
# The dry run skips the torch.compile passes (a CPU inductor compile alone takes ~1 minute).
# Record the printed figures with the card's name in docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
DRY_RUN=0
if [[ "${1:-}" == "--dry-run" || "${1:-}" == "--smoke" ]]; then
  DRY_RUN=1
  shift
fi
BATCH="${1:-64}"
PY="${PYTHON:-python3}"
SAMPLE_STEPS="${SAMPLE_STEPS:-250}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [[ "$DRY_RUN" == 1 ]]; then
  echo "== dry run: CPU, tiny SiT + tiny timm ViT, no compile (the GPU run's sequence, not its figures)"
  MODELS=("tiny")
  TRAIN=(--smoke)
  SAMPLE=(--smoke --samplers sde --modes interval --precision fp32)
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  MODELS=("SiT-XL/2" "SiT-B/2")
  TRAIN=(--encoder dinov2-vit-b --device cuda --precision bf16 --batch-size "$BATCH" --warmup 5 --steps 20)
  SAMPLE=(--device cuda --precision fp32 --tf32 --batch "$BATCH" --samplers sde --steps "$SAMPLE_STEPS"
          --cfg-scale 1.8 --guidance-high 0.7 --modes interval)
fi
"$PY" -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, 'cuda', torch.version.cuda)"

for MODEL in "${MODELS[@]}"; do
  model_args=()
  [[ "$MODEL" == tiny ]] || model_args=(--model "$MODEL")
  echo "== $MODEL training step, eager"
  "$PY" benchmarks/trainer_step.py "${TRAIN[@]}" "${model_args[@]}"
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "== $MODEL training step, torch.compile: skipped in the dry run"
  else
    echo "== $MODEL training step, torch.compile"
    timeout 150 "$PY" benchmarks/trainer_step.py "${TRAIN[@]}" "${model_args[@]}" --compile \
      || echo "compile run failed or timed out"
  fi
  echo "== $MODEL sampling, paper protocol (fp32 + TF32, SDE, CFG 1.8 on [0, 0.7])"
  "$PY" benchmarks/sample.py "${SAMPLE[@]}" "${model_args[@]}"
done
