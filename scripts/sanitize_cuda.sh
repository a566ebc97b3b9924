#!/usr/bin/env bash
# Runs a small grid of CUDA forward / backward / probs / dropout-mask calls
# (tests/cuda_sanitize_cases.py) under compute-sanitizer's memcheck,
# racecheck (shared-memory hazards) and initcheck (reads of uninitialised
# global memory). Needs a GPU and the library built with the CUDA kernels.
#
#   bash scripts/sanitize_cuda.sh            # all three tools, full grid
#   bash scripts/sanitize_cuda.sh --quick    # a third of the grid
#   TOOLS="memcheck" bash scripts/sanitize_cuda.sh
#
# The caching allocator is switched off so that memcheck sees every
# allocation's real bounds; the poisoning of outputs (ATTENTION_EXT_POISON) is
# switched off so that initcheck checks the kernels' own writes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-${ATTENTION_EXT_VENV:-.venv}/bin/python}"
[ -x "$PY" ] || PY=python
SAN="${COMPUTE_SANITIZER:-}"
if [ -z "$SAN" ]; then
  for c in compute-sanitizer "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" \
           "${CUDA_HOME:-/usr/local/cuda}/compute-sanitizer/compute-sanitizer"; do
    if command -v "$c" > /dev/null 2>&1; then SAN="$c"; break; fi
  done
fi
if [ -z "$SAN" ]; then
  echo "compute-sanitizer not found (set COMPUTE_SANITIZER=/path/to/compute-sanitizer)" >&2
  exit 2
fi
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
export ATTENTION_EXT_POISON=0
export CUDA_MODULE_LOADING=EAGER
status=0
# On an sm_90 GPU the grid runs twice: through the Hopper kernels (where they
# cover a case) and with ATTENTION_EXT_DISABLE_SM90=1 through the sm80 ones.
passes="0"
if [ "$("$PY" -c 'import torch; print(torch.cuda.get_device_capability() == (9, 0))' 2>/dev/null)" = "True" ]; then
  passes="0 1"
fi
for off in $passes; do
export ATTENTION_EXT_DISABLE_SM90=$off
for tool in ${TOOLS:-memcheck racecheck initcheck}; do
  echo "=== compute-sanitizer --tool $tool (ATTENTION_EXT_DISABLE_SM90=$off)"
  extra=()
  case "$tool" in
    memcheck) extra=(--leak-check no) ;;
    racecheck) extra=(--racecheck-report hazard) ;;
    initcheck) extra=(--track-unused-memory no) ;;
  esac
  # SANITIZER_ARGS: extra options, e.g. a kernel filter such as
  # "--kernel-name kns=flash_" to check only the flash kernels.
  # shellcheck disable=SC2086
  if "$SAN" --tool "$tool" "${extra[@]}" --error-exitcode 99 --print-limit 20 ${SANITIZER_ARGS:-} \
      "$PY" tests/cuda_sanitize_cases.py "$@"; then
    echo "=== $tool: clean"
  else
    echo "=== $tool: FAILED" >&2
    status=1
  fi
done
done
exit $status
