#!/usr/bin/env bash
# Sets everything up (scripts/setup.sh), then runs the demo.
# Extra arguments go to the demo, e.g.  bash scripts/demo.sh --out ./my_demo
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. "${ATTENTION_EXT_VENV:-.venv}/bin/activate"
python -m attention_ext.demo "$@"
