#!/usr/bin/env bash
# Everything a session with a lent GPU machine does, in as few calls as its
# 10-minute limit allows (the build is reused between calls on a warm machine):
#
#   bash scripts/gpu_session.sh build test        # build (MAX_JOBS=16) + GPU tests
#   bash scripts/gpu_session.sh sanitize          # compute-sanitizer, quick grid
#   bash scripts/gpu_session.sh bench             # bench_cuda.py + benchmarks.run + bench_decode/varlen/lse/softcap/alibi/kvcache.py
#   bash scripts/gpu_session.sh first             # all a 15-minute lease allows, in one call
#
# `first` is for a session whose whole device time is about 15 minutes, a
# minute or more of it the machine's start: one command of at most ~9.5
# minutes, each step under its own time limit, the most informative first --
# build for 9.0a only (~3 min on 16 cores), the Hopper GPU tests (layout
# self-test, Hopper vs sm80 kernels against float64), the issue's benchmark
# grid against cuDNN / FLASH (results rewritten after every point), a
# kernel-by-kernel profile (profile_cuda.py: ours vs cuDNN at L = 4k), then as
# much of the whole GPU suite as the remaining time allows. 8 files come back:
# gpu.txt, build.log, test_hopper.log, bench/ (JSON + table), bench_cuda.log,
# profile.txt, test_cuda.log. Run it with
# timeout_s=600:  run(command="bash scripts/gpu_session.sh first", timeout_s=600)
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
      # decoding shapes (split keys against SDPA): the table goes into bench_run.log (8 files come back at most)
      "$PY" benchmarks/bench_decode.py --dtypes bfloat16 --out /tmp/bench_decode.json >> "$OUT/bench_run.log" 2>&1 || rc=1
      # packed variable-length batches (one launch per sequence on CUDA) against SDPA's ways
      "$PY" benchmarks/bench_varlen.py --dtypes bfloat16 --out /tmp/bench_varlen.json >> "$OUT/bench_run.log" 2>&1 || rc=1
      # gradients through the log-sum-exp (return_lse, sinks) as a ratio to plain attention
      "$PY" benchmarks/bench_lse.py --dtypes bfloat16 --out /tmp/bench_lse.json >> "$OUT/bench_run.log" 2>&1 || rc=1
      # logit soft-capping (Gemma 2) against plain attention and the eager formula
      "$PY" benchmarks/bench_softcap.py --dtypes bfloat16 --out /tmp/bench_softcap.json >> "$OUT/bench_run.log" 2>&1 || rc=1
      # ALiBi against plain attention and SDPA with the bias as a float mask
      "$PY" benchmarks/bench_alibi.py --dtypes bfloat16 --out /tmp/bench_alibi.json >> "$OUT/bench_run.log" 2>&1 || rc=1
      # decoding against a contiguous or paged key / value cache (attention_kvcache) against SDPA's ways
      "$PY" benchmarks/bench_kvcache.py --dtypes bfloat16 --out /tmp/bench_kvcache.json >> "$OUT/bench_run.log" 2>&1 || rc=1
      tail -40 "$OUT/bench_run.log"
      ;;
    first)
      nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1
      TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}" timeout 240 "$PY" setup.py -q build_ext --inplace \
        > "$OUT/build.log" 2>&1 || { rc=1; tail -40 "$OUT/build.log"; }
      echo "== build: $(( $(date +%s) - start )) s"
      ATTENTION_EXT_POISON=1 timeout 100 "$PY" -m pytest -q -ra -m cuda tests/test_cuda.py tests/test_varlen.py \
        -k "sm90 or hopper" > "$OUT/test_hopper.log" 2>&1 || rc=1
      tail -15 "$OUT/test_hopper.log"
      echo "== hopper tests: $(( $(date +%s) - start )) s"
      PYTHONUNBUFFERED=1 timeout 200 "$PY" benchmarks/bench_cuda.py --issue --out "$OUT/bench" \
        > "$OUT/bench_cuda.log" 2>&1 || rc=1
      tail -30 "$OUT/bench_cuda.log"
      echo "== bench: $(( $(date +%s) - start )) s"
      PYTHONUNBUFFERED=1 timeout 60 "$PY" benchmarks/profile_cuda.py > "$OUT/profile.txt" 2>&1 || rc=1
      echo "== profile: $(( $(date +%s) - start )) s"
      left=$(( 540 - ($(date +%s) - start) ))
      if [ "$left" -gt 20 ]; then
        ATTENTION_EXT_POISON=1 timeout "$left" "$PY" -m pytest -q -ra -m cuda tests/ > "$OUT/test_cuda.log" 2>&1 || rc=1
        tail -20 "$OUT/test_cuda.log"
      fi
      ;;
    *)
      echo "unknown stage '$stage' (build, test, sanitize, bench, first)" >&2
      exit 2
      ;;
  esac
  echo "== $stage: $(( $(date +%s) - start )) s (rc so far $rc)"
done
exit $rc
