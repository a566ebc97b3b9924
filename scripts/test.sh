#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh), then runs the whole test suite.
# Extra arguments go to pytest, e.g.  bash scripts/test.sh -k gradcheck
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. "${ATTENTION_EXT_VENV:-.venv}/bin/activate"
# Outputs are filled with NaN before the kernels write them (see csrc/glue.h: poison).
export ATTENTION_EXT_POISON=1
python -m pytest -q -ra --durations=25 "$@"
