#!/usr/bin/env bash
# One-step setup on a fresh machine: a virtual environment (.venv) that also
# sees the system's packages (so a machine with its own torch keeps it), torch
# 2.14.1 when no torch is importable (2.13.0, CPU only, when the disk is short),
# the pinned dependencies, and an
# incremental build of the extension in place. Safe to run again.
#
#   ATTENTION_EXT_VENV   where the environment lives (default .venv)
#   ATTENTION_EXT_TORCH  the torch to install when none is importable
#                        (default torch==2.14.1)
#   ATTENTION_EXT_REQUIREMENTS  requirement files (default: requirements/base.txt
#                        requirements/clients.txt)
#   MAX_JOBS             parallel compile jobs (default: all cores)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ATTENTION_EXT_VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv --system-site-packages "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch: the CUDA-enabled 2.14.1 (about 5.5 GB installed) so that the CUDA
# sources are compiled and linked even on a machine without a GPU. Where the
# disk cannot hold it, the CPU build 2.13.0 (about 1 GB) instead, said loudly:
# the CPU kernels and the CUDA emulator are still built and tested, the CUDA
# translation units are not. ATTENTION_EXT_TORCH overrides the first choice.
free_gb() { df -Pk "$VENV" | awk 'NR == 2 { print int($4 / 1048576) }'; }
if ! python -c "import torch" >/dev/null 2>&1; then
  want=${ATTENTION_EXT_TORCH:-torch==2.14.1}
  if [ "$want" = "torch==2.14.1" ] && [ "$(free_gb)" -lt 8 ]; then
    echo "setup: only $(free_gb) GB free on the disk of $VENV; torch 2.14.1 (CUDA build) needs about 6." >&2
    want=torch==2.13.0
  fi
  if ! pip install -q --no-cache-dir "$want"; then
    echo "setup: installing $want failed ($(free_gb) GB free); trying the CPU build torch==2.13.0." >&2
    # A half-finished install leaves CUDA libraries behind: start the environment afresh.
    deactivate
    rm -rf "$VENV"
    "$PY" -m venv --system-site-packages "$VENV"
    # shellcheck disable=SC1091
    . "$VENV/bin/activate"
    want=torch==2.13.0
    pip install -q --no-cache-dir "$want"
  fi
  if [ "$want" = "torch==2.13.0" ]; then
    echo "setup: WARNING: built against the CPU-only torch 2.13.0; the CUDA sources are NOT compiled in this run." >&2
  fi
fi
# Install what is missing from the requirement files; a package that is already
# installed (any version, e.g. the GPU machine's own torchvision) is kept, so
# this also works offline on a machine that has everything.
missing=$(python - ${ATTENTION_EXT_REQUIREMENTS:-requirements/base.txt requirements/clients.txt} <<'PY'
import importlib.metadata as md, re, sys
need = []
for path in sys.argv[1:]:
    for line in open(path):
        line = line.split("#")[0].strip()
        if not line:
            continue
        name = re.split("[=<>!~ \\[]", line)[0]
        try:
            md.distribution(name)
        except md.PackageNotFoundError:
            need.append(line)
print(" ".join(need))
PY
)
# PyPI's torchvision does not load beside the CPU build torch 2.13.0+cpu (torchvision::nms is missing), and
# timm needs torchvision: with that torch both stay out, and their tests are skipped.
if [ -n "$missing" ] && python -c "import sys, torch; sys.exit(not torch.__version__.endswith('+cpu'))"; then
  kept=$(printf '%s\n' $missing | grep -v -E '^(torchvision|timm)([=<>!~ ]|$)' | tr '\n' ' ' || true)
  if [ "$(echo $kept)" != "$(echo $missing)" ]; then
    echo "setup: WARNING: torchvision and timm are not installed beside a CPU build of torch (their tests are skipped)." >&2
  fi
  missing=$kept
fi
# torch stays the one installed above (a package that would replace it, such as
# torchvision 0.29.1 beside the fallback torch 2.13.0, is left out with a warning).
if [ -n "$missing" ]; then
  pin=$(mktemp)
  python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > "$pin"
  if ! pip install -q --no-cache-dir -c "$pin" $missing; then
    for req in $missing; do
      pip install -q --no-cache-dir -c "$pin" "$req" ||
        echo "setup: WARNING: $req not installed (its tests are skipped)." >&2
    done
  fi
  rm -f "$pin"
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
python setup.py -q build_ext --inplace
site=$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$PWD" > "$site/attention_ext_dev.pth"
python -c "import attention_ext, torch; print('attention_ext ready: torch', torch.__version__, '| CUDA kernels:', attention_ext._loader.has_cuda_kernels())"
