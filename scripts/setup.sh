#!/usr/bin/env bash
# One-step setup on a fresh machine: a virtual environment (.venv) that also
# sees the system's packages (so a machine with its own torch keeps it), torch
# 2.14.1 when no torch is importable, the pinned dependencies, and an
# incremental build of the extension in place. Safe to run again.
#
#   ATTENTION_EXT_VENV   where the environment lives (default .venv)
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
if ! python -c "import torch" >/dev/null 2>&1; then
  pip install -q "torch==2.14.1"
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
if [ -n "$missing" ]; then pip install -q $missing; fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
python setup.py -q build_ext --inplace
site=$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$PWD" > "$site/attention_ext_dev.pth"
python -c "import attention_ext, torch; print('attention_ext ready: torch', torch.__version__, '| CUDA kernels:', attention_ext._loader.has_cuda_kernels())"
