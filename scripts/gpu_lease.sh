#!/usr/bin/env bash
# One GPU lease (about 9 minutes): train the embedded transformer fmnist_dit, then DiT-XL/2's sampling speed with
# and without torch.compile (README "Speed"). Run from the repository root on a CUDA machine that has torch and
# this project's dependencies; results go to $OUT (default outputs/gpu).
#   DIFFGUIDE_FMNIST_DIR=... bash scripts/gpu_lease.sh
# The training length is fitted to TRAIN_S seconds from a 300-step probe (the card records the steps taken);
# STEPS=N fixes it instead.
set -u
OUT=${OUT:-outputs/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import torch, diffusers, hydra; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"

if [ -z "${STEPS:-}" ]; then
    start=$(date +%s.%N)
    $PY -m diffguide.train train=fmnist_dit device=cuda train.steps=300 train.log_every=100 train.checkpoint_every=0 \
        train.out=/tmp/probe/fmnist_dit.safetensors out_dir=/tmp/probe/run 2>&1 | tail -2
    wall=$($PY -c "import json,sys; print(json.loads(open('/tmp/probe/fmnist_dit.md').read().split('\`\`\`json')[1].split('\`\`\`')[0])['wall_time_s'])")
    STEPS=$($PY -c "print(max(1000, min(40000, int(${TRAIN_S:-240} * 300 / $wall) // 1000 * 1000)))")
    echo "probe: 300 steps in ${wall}s of training -> train.steps=$STEPS"
fi
timeout $(( ${TRAIN_S:-240} + 90 )) $PY -m diffguide.train train=fmnist_dit device=cuda train.steps="$STEPS" \
    train.out="$OUT/fmnist_dit.safetensors" out_dir=/tmp/train_dit 2>&1 | tee "$OUT/train.log" | tail -8

for args in "--batch 8" "--batch 64" "--batch 8 --compile" "--batch 64 --compile"; do
    echo "== bench_dit --arch XL --device cuda $args"
    timeout 150 $PY scripts/bench_dit.py --arch XL --device cuda $args 2>&1 | tail -6
done 2>&1 | tee "$OUT/bench_dit_xl.log"
