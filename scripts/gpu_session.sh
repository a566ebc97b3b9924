#!/usr/bin/env bash
# Everything a session with a lent GPU machine does, in as few calls as its
# 10-minute limit allows (the build is reused between calls on a warm machine):
#
#   bash scripts/gpu_session.sh build test        # build (MAX_JOBS=16) + GPU tests
#   bash scripts/gpu_session.sh sanitize          # compute-sanitizer, quick grid
#   bash scripts/gpu_session.sh bench             # bench_cuda.py + python -m benchmarks.run
#
# Uses the machine's own python (torch 2.11 there, no network: no venv, no
# pip). Logs and results go to $OUT (the device tool brings them back; at most
# 8 files) when it is set, else to gpu_session_out/.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
OUT="${OUT:-gpu_session_out}"
mkdir -p "$OUT"
export MAX_JOBS="${MAX_JOBS:-16}"
export ATTENTION_EXT_EMU=0  # the emulator is for machines without a GPU
rc=0
for stage in "$@"; do
  start=$(date +%s)
  case "$stage" in
    build)
      "$PY" setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 || { rc=1; tail -40 "$OUT/build.log"; }
      ;;
    test)
      nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1
      ATTENTION_EXT_POISON=1 "$PY" -m pytest -q -ra -m cuda tests/ > "$OUT/test_cuda.log" 2>&1 || rc=1
      tail -60 "$OUT/test_cuda.log"
      ;;
    sanitize)
      PYTHON="$PY" bash scripts/sanitize_cuda.sh --quick > "$OUT/sanitize.log" 2>&1 || rc=1
      tail -40 "$OUT/sanitize.log"
      ;;
    bench)
      "$PY" benchmarks/bench_cuda.py --out "$OUT/bench_cuda" > "$OUT/bench_cuda.log" 2>&1 || rc=1
      tail -40 "$OUT/bench_cuda.log"
      "$PY" -m benchmarks.run --quick --out "$OUT/run" > "$OUT/bench_run.log" 2>&1 || rc=1
      tail -20 "$OUT/bench_run.log"
      ;;
    *)
      echo "unknown stage '$stage' (build, test, sanitize, bench)" >&2
      exit 2
      ;;
  esac
  echo "== $stage: $(( $(date +%s) - start )) s (rc so far $rc)"
done
exit $rc
