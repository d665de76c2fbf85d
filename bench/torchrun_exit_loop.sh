#!/usr/bin/env bash
# The exit of data-parallel runs, N times over (issue 26): each round runs a 2-process `dagman pretrain` and a
# 2-process `dagman finetune` under torchrun on the CPU (gloo) and counts the rounds where a rank aborted ("terminate
# called without an active exception") or a run failed. Usage: bench/torchrun_exit_loop.sh [N=30] [PYTHON=python]
set -u
N=${1:-30}
PY=${2:-python}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$PY" - "$WORK" <<'PY'
import sys, numpy as np
from pathlib import Path
rng = np.random.default_rng(0)  # a small file in MedMNIST's layout: 28^3 uint8 images, labels (n, 1)
arrays = {}
for split, k in (('train', 12), ('val', 6), ('test', 8)):
    y = np.arange(k) % 2
    arrays[f'{split}_images'] = (rng.random((k, 28, 28, 28)) * 100 + y[:, None, None, None] * 120).astype(np.uint8)
    arrays[f'{split}_labels'] = y[:, None]
np.savez(Path(sys.argv[1]) / 'adrenalmnist3d.npz', **arrays)
PY
export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore
aborts=0; failures=0
for i in $(seq 1 "$N"); do
  rm -rf "$WORK/pre" "$WORK/cls"
  "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 -m dagman_fast.cli pretrain --synthetic 2 --crop 32 \
    --bs 1 --epochs 1 --preset swin-tiny --set out_dim=64 --set head_hidden=32 --out "$WORK/pre" > "$WORK/log" 2>&1
  rc1=$?
  "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 -m dagman_fast.cli finetune --medmnist adrenalmnist3d \
    --root "$WORK" --epochs 1 --preset swin-tiny --bs 4 --out "$WORK/cls" >> "$WORK/log" 2>&1
  rc2=$?
  if grep -q "terminate called" "$WORK/log"; then aborts=$((aborts + 1)); fi
  if [ $rc1 -ne 0 ] || [ $rc2 -ne 0 ]; then failures=$((failures + 1)); tail -5 "$WORK/log"; fi
  echo "round $i/$N: pretrain $rc1, finetune $rc2; aborts so far $aborts, failed rounds $failures"
done
echo "torchrun exit loop: $N rounds, $((2 * N)) torchrun runs, $aborts with an abort, $failures failed"
[ $aborts -eq 0 ] && [ $failures -eq 0 ]
