#!/usr/bin/env bash
# Issue 12's speed, accuracy and memory figures on a lent machine whose CPU may have AVX-512 VNNI / AMX
# (the int8 kernels' fast path). Run from the repository root:
#
#   bash bench/device_issue12.sh        # the measurement (estimated 5-7 min on a 16-core Xeon; cut to BUDGET s)
#   QUICK=1 PYTHON=.venv/bin/python OUT=/tmp/o BUDGET=3000 nice bash bench/device_issue12.sh   # dry run
#
# Needs .devcarry/ (git-ignored, carried beside the working tree; CARRY= overrides the path):
#   data/cifar10_test.npz, data/cifar10_calib1000.npz, models/cifar10_resnet20.th (copies of ../shared),
#   r20_t4.cbd (cbdnet compress --arch cifar-resnet20 --weights ../shared/models/cifar10_resnet20.th
#   --target-bits 4.0 --calib cifar10-npz:../shared/data/cifar10_calib1000.npz -o .devcarry/r20_t4.cbd),
#   whl/*.whl (constriction, safetensors: installed into /tmp/site when the Python lacks them).
# When numba is not importable (its llvmlite wheel is too big to carry), bench/device_shim/numba stands in:
# njit returns the function unchanged; no numba kernel runs on the paths measured here, and the logs name any
# that does. NUMBA_SHIM=1 forces it, for a dry run of that path.
# Each step's output goes to $OUT/<step>.log (OUT defaults to /tmp/out); a failed or timed-out step is recorded
# and the next one runs; every step is cut so that the whole run ends within BUDGET seconds (default 450) and
# a summary ends it ($OUT/summary.log). Timings are 1 thread unless a line says otherwise. Other knobs:
# PYTHON (default python3), WORK (ONNX files and the memory bench's .cbd, default /tmp/cbdnet_issue12: not
# under $OUT, VGG-16's files are 1.4 GB), RT_ROUNDS / VGG_ROUNDS (bench_runtime rounds), RT_MODELS (default
# resnet20 resnet18), VGG16=0 (skip the VGG-16 step: about 5 min on a 2-core box), LIMIT_SCALE (multiplies
# each step's time limit; 3 for a dry run on a slow box, with a BUDGET to match).
set -euo pipefail

PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/out}
QUICK=${QUICK:-0}
BUDGET=${BUDGET:-450}
CARRY=${CARRY:-$PWD/.devcarry}
WORK=${WORK:-/tmp/cbdnet_issue12}
START=$(date +%s)
mkdir -p "$OUT" "$WORK"

if ! "$PY" -c "import constriction, safetensors" 2>/dev/null; then
  if "$PY" -m pip --version >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "$CARRY"/whl/*.whl
  else
    for wheel in "$CARRY"/whl/*.whl; do "$PY" -m zipfile -e "$wheel" /tmp/site; done
  fi
fi
export PYTHONPATH=$PWD/src:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
NUMBA=installed
if [ "${NUMBA_SHIM:-0}" = 1 ] || ! "$PY" -c "import numba" 2>/dev/null; then
  export PYTHONPATH=$PYTHONPATH:$PWD/bench/device_shim CBDNET_NUMBA_SHIM_LOG=1
  NUMBA="not installed: bench/device_shim stands in (plain Python), any kernel that runs is named in the logs"
fi
export CBDNET_SHARED=$CARRY PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore

if [ "$QUICK" = 1 ]; then
  R18_ROUNDS=1 R20_ROUNDS=1 RT_ROUNDS=1 VGG_ROUNDS=1
else
  R18_ROUNDS=7 R20_ROUNDS=5 RT_ROUNDS=${RT_ROUNDS:-5} VGG_ROUNDS=${VGG_ROUNDS:-3}
fi
EVAL_THREADS=$(( $(nproc) >= 8 ? 8 : 2 ))  # top-1 only, never timed

declare -a SUMMARY=()

# run_step NAME SECONDS CMD...: tee to $OUT/NAME.log under a time limit (cut to what BUDGET leaves, 20 s kept
# for the summary), the exit code recorded (124: timed out), never fatal.
run_step() {
  local name=$1 limit=$(( $2 * ${LIMIT_SCALE:-1} )) start rc left
  shift 2
  start=$(date +%s)
  left=$(( BUDGET - (start - START) - 20 ))
  if [ "$left" -lt 20 ]; then
    SUMMARY+=("$name: skipped, ${left} s of the ${BUDGET} s budget left")
    return
  fi
  [ "$limit" -le "$left" ] || limit=$left
  echo "=== $name: $* (limit ${limit} s, $(date -u +%H:%M:%S) UTC)"
  set +e
  if declare -F "$1" >/dev/null; then
    "$@" 2>&1 | tee "$OUT/$name.log"
  else
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  fi
  rc=${PIPESTATUS[0]}
  set -e
  SUMMARY+=("$name: exit $rc in $(( $(date +%s) - start )) s (limit $limit s)")
  echo "=== $name: exit $rc in $(( $(date +%s) - start )) s"
}

environment() {
  lscpu
  echo "--- CPU flags that matter:"
  for flag in avx2 avx512f avx512bw avx512_vnni avx_vnni amx_tile amx_int8 amx_bf16; do
    if grep -qw "$flag" /proc/cpuinfo; then echo "  $flag yes"; else echo "  $flag no"; fi
  done
  echo "nproc $(nproc); $(free -g | awk '/Mem:/ {print $2 " GiB RAM"}'); numba: $NUMBA; QUICK=$QUICK; $PY"
  "$PY" - <<'EOF'
import sys

import numpy, onnx, onnxruntime as ort, torch, torchvision
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"numpy {numpy.__version__}, onnx {onnx.__version__}, onnxruntime {ort.__version__}")
print(f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}, quantized engines "
      f"{torch.backends.quantized.supported_engines}, mkldnn {torch.backends.mkldnn.is_available()}, "
      f"threads {torch.get_num_threads()}")
print(ort.get_build_info() if hasattr(ort, "get_build_info") else "(no ort build info)",
      ort.get_available_providers())
import cbdnet, constriction, safetensors  # noqa: E401,F401
print(f"cbdnet {cbdnet.__version__} from {cbdnet.__file__}")
EOF
}

R20=$CARRY/r20_t4.cbd
run_step env 60 environment
run_step int8_resnet18 70 "$PY" bench/bench_int8.py resnet18 --rounds "$R18_ROUNDS"
run_step int8_resnet20 100 "$PY" bench/bench_int8.py resnet20 --rounds "$R20_ROUNDS" --cbd "$R20" \
  --eval-threads "$EVAL_THREADS"
run_step runtime 200 "$PY" bench/bench_runtime.py --cbd "$R20" --models ${RT_MODELS:-resnet20 resnet18} \
  --batches 1 64 --threads 1 2 --rounds "$RT_ROUNDS" --eval-threads "$EVAL_THREADS" --out "$WORK" \
  --json "$OUT/bench_runtime.json"
if [ -f "$WORK/resnet20_cbd_int8.onnx" ]; then
  run_step agree 60 "$PY" bench/bench_int8_agree.py "$R20" "$WORK/resnet20_cbd_int8.onnx"
else
  SUMMARY+=("agree: skipped ($WORK/resnet20_cbd_int8.onnx absent: the runtime step did not write it)")
fi
run_step memory 70 "$PY" bench/bench_memory.py --models resnet18 --modes fp32 load int8 --dir "$WORK/mem"
if [ "${VGG16:-1}" = 1 ]; then
  run_step runtime_vgg16 240 "$PY" bench/bench_runtime.py --models vgg16 --threads 1 2 --rounds "$VGG_ROUNDS" \
    --out "$WORK" --json "$OUT/bench_runtime_vgg16.json"
  rm -f "$WORK"/vgg16_*.onnx
fi

echo
echo "===== summary ($(date -u +%H:%M:%S) UTC, $(( $(date +%s) - START )) s) ====="
printf '%s\n' "${SUMMARY[@]}" | tee "$OUT/summary.log"
{
  grep -h -E "^(CPU flags|int8 layers|bytes:|logits|batch |file |torch int8|int8 runtime|.*ONNX top-1)" \
    "$OUT"/int8_*.log "$OUT"/agree.log 2>/dev/null || true
  grep -h -E "^\| resnet18" "$OUT/memory.log" 2>/dev/null || true
  grep -h "numba shim:" "$OUT"/*.log 2>/dev/null | sort -u || true
  "$PY" - "$OUT/bench_runtime.json" "$OUT/bench_runtime_vgg16.json" <<'EOF' || true
import json, os, sys
for path in sys.argv[1:]:
    results = json.load(open(path)) if os.path.exists(path) else {}
    for name, result in results.items():
        fp32 = result["sizes"]["FP32 ORT"]
        top1 = result.get("top1") or {}
        for key, size in result["sizes"].items():
            acc = f", top-1 {top1[key]:.4f}" if key in top1 else ""
            print(f"{name} {key}: {size:,} bytes ({size / fp32:.3f}x FP32 ONNX){acc}")
        for cfg, t in result["latency"].items():
            cbd = t["cbdnet --int8"]
            qs = ", ".join(f"{k.split('(')[1].rstrip(')')} {t[k] / cbd:.2f}x" for k in t if k.startswith("ORT quant"))
            print(f"{name} {cfg}: cbdnet --int8 {cbd * 1e3:.2f} ms, FP32 ORT {t['FP32 ORT'] * 1e3:.2f} ms "
                  f"(--int8 {t['FP32 ORT'] / cbd:.2f}x its speed), FP32 torch {t['FP32 torch'] * 1e3:.2f} ms; "
                  f"--int8 speed / quantize_static's: {qs}")
EOF
} | tee -a "$OUT/summary.log"
