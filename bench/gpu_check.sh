#!/usr/bin/env bash
# The one prepared GPU check: correctness of the compiled kernels, then their speed against the other paths.
#
#     bash bench/gpu_check.sh [OUT_DIR]             # OUT_DIR defaults to $OUT, else ./gpu_check_out
#     bash bench/gpu_check.sh OUT_DIR learns        # only the 'learns' part (about 9 minutes: its own command)
#     bash bench/gpu_check.sh OUT_DIR compiled      # only the 'compiled' part (compile_blocks; about 5 minutes)
#
# Needs only the project's dev install (`pip install -e ".[dev]"` over a CUDA build of torch). In under 8 minutes
# on one GPU it writes, under OUT_DIR:
#   env.txt         GPU, driver, Python, torch, Triton, CUDA and the project's version
#   log.txt         every part's output, in order:
#     tests         the GPU-only tests: tests/test_triton.py and tests/test_window_attention.py compiled, not
#                   interpreted (bf16, paper-scale shapes, 'auto' picking the kernel)
#     kernels       bench/bench_kernels.py -> kernels.json (pytest-benchmark): one block's window attention forward
#                   and forward+backward for eager, SDPA, NATTEN (where installed) and Triton; the top-k mask
#                   kernel; the whole swin-smit encoder at 128^3 in bf16 for every attn_impl, with its FLOPs
#     flex          the same attention benchmarks with compiled FlexAttention -> flex.json (its own part: compiling
#                   takes a while, and a time limit there must not lose the other results)
#     pretrain      bench/bench_pretrain.py -> pretrain.json: a DAGMaN step at the paper's scale (swin-smit, 128^3
#                   crops, batch 2 x 2 views, bf16) with eager attention and with the Triton kernels, in parts,
#                   with the step's FLOPs, TFLOP/s and MFU
#     compiled      (only when named) the encoder and the step above with compile_blocks (regional torch.compile)
#                   -> compiled.json, pretrain_compiled.json; the compile time is in the untimed warm-up
#     augment       bench/bench_augment.py -> augment.json: fine-tuning's batch augmentation, MONAI per volume
#                   against BatchAugment3D, on the CPU and the GPU
#     learns        (only when named) bench/bench_collapse.py: swin-smit pretrained at 64^3 with the library's
#                   defaults for 8 minutes (batch 8 x 2 views; the LIDC crops of ../shared/data when present, else
#                   synthetic CT) -> learns/<data>/default/seed0/summary.json and the per-step log: do the losses
#                   fall below log K without a collapse (feature cosine, entropy gap) at a GPU's scale?
#   summary.md      bench/gpu_summary.py: the tables for BENCHMARKS.md, measured against the kernel targets
# Each part has its own time limit and a failing part does not stop the next; the exit status is non-zero if any
# part failed. On a machine without CUDA it says so and exits 0.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONSAFEPATH=1  # never import the source tree's dagman_fast (no kernels/ inside) instead of the installed one
export PYTHONUNBUFFERED=1

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False, or torch is missing): nothing to check"
  exit 0
fi
out=${1:-${OUT:-gpu_check_out}}
shift $(( $# > 0 ? 1 : 0 ))
parts=${*:-tests kernels flex pretrain augment}
mkdir -p "$out"
failed=()
want() { [[ " $parts " == *" $1 "* ]]; }

log=$out/log.txt
: >"$log"
part() {  # part NAME LIMIT_S COMMAND...: run with a time limit, append to log.txt, remember failures
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  echo "== $name (at most ${limit} s): $*" | tee -a "$log"
  timeout "$limit" "$@" >"$out/part.txt" 2>&1
  rc=$?
  cat "$out/part.txt" >>"$log"
  tail -n 4 "$out/part.txt"
  rm -f "$out/part.txt"
  echo "-- $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$log"
  [ $rc -eq 0 ] || failed+=("$name (exit $rc$([ $rc -eq 124 ] && echo ', time limit'))")
}

{
  date -u +'%Y-%m-%d %H:%M UTC'
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  "$PY" - <<'EOF'
import platform, torch, dagman_fast
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = 'not installed'
p = torch.cuda.get_device_properties(0)
print(f'python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), triton {tv}, '
      f'dagman_fast {dagman_fast.__version__}')
print(f'{p.name}: sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB')
EOF
} >"$out/env.txt" 2>&1
cat "$out/env.txt"

bench=(-m pytest -q -p no:cacheprovider bench/bench_kernels.py --benchmark-min-rounds=5 --benchmark-max-time=0.5
       --benchmark-columns=min,median,rounds)
want tests && part tests 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_triton.py tests/test_window_attention.py
want kernels && part kernels 120 "$PY" "${bench[@]}" -k 'not flex' --benchmark-json "$out/kernels.json"
want flex && part flex 90 "$PY" "${bench[@]}" -k flex --benchmark-json "$out/flex.json"
want pretrain && part pretrain 120 "$PY" bench/bench_pretrain.py --encoder swin-smit --crop 128 --bs 2 --steps 8 \
  --warmup 3 --methods dagman --attn-impls reference triton --json "$out/pretrain.json"
want augment && part augment 60 "$PY" bench/bench_augment.py --reps 5 --json "$out/augment.json"
if want compiled; then
  part compiled-encoder 200 "$PY" "${bench[@]}" -k 'encoder and compiled' --benchmark-json "$out/compiled.json"
  part compiled-step 240 "$PY" bench/bench_pretrain.py --encoder swin-smit --crop 128 --bs 2 --steps 8 \
    --warmup 3 --methods dagman --attn-impls triton --compile --json "$out/pretrain_compiled.json"
fi
if want learns; then  # the defaults at a GPU's scale: 8 minutes of swin-smit at 64^3, then the monitors' table
  data=synthetic; [ -d ../shared/data/lidc_idri ] && data=ct
  part learns 560 "$PY" bench/bench_collapse.py --data "$data" --configs default --encoder swin-smit --crop 64 \
    --bs 8 --steps 3000 --max-minutes 8 --out "$out/learns"
  "$PY" bench/bench_collapse.py --table "$out/learns" | tee -a "$out/summary.md"
fi
if want kernels || want pretrain || want compiled; then
  "$PY" bench/gpu_summary.py "$out" >"$out/summary.md" 2>&1 || failed+=("summary")
  cat "$out/summary.md"
fi

if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu_check: failed: ${failed[*]} (logs in $out)"
  exit 1
fi
echo "gpu_check: all parts passed (results in $out)"
