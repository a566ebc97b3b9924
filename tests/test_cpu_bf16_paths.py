"""Both CPU bfloat16 product paths, whichever one this CPU would pick.

bfloat16 runs either on the AVX512-BF16 dot-product tiles or on fp32 copies
through the BLAS (csrc/cpu/flash_cpu_bf16.cpp: bf16_use_dot). The choice is
made once per process, at the first bfloat16 call (ATTENTION_EXT_CPU_BF16=
dot|blas|auto, auto timing both), so each path runs here in its own subprocess
with the variable set, through tests/test_ops.py's run_case: forward and
backward against the float64 reference, error at most 2x PyTorch's own bf16
SDPA error. float16 always takes the BLAS path and is covered by test_ops.py.

That a forced path really is the one that ran is checked on the outputs: the
dot tiles round P to bfloat16 before P V, the BLAS path does not, so the two
give different bits for the same inputs (on a CPU without AVX512-BF16 "dot"
falls back to the BLAS and the bits are equal).
"""
import os
import subprocess
import sys
from functools import lru_cache

import pytest
import torch

from test_ops import Case

bf16 = torch.bfloat16
TESTS = os.path.dirname(os.path.abspath(__file__))

# fmt: off
CASES = [
    # several key blocks (forward 512, backward 128) and query blocks
    Case("multi_block", dtype=bf16, batch=(1,), hq=2, L=200, S=600, E=64),
    Case("causal", dtype=bf16, batch=(2,), hq=2, L=300, S=300, E=64, causal=True),
    # float mask with a gradient: the exact-D pass of row_stats runs the tiles too
    Case("floatq_mask_grad", dtype=bf16, batch=(1,), hq=2, L=150, S=260, E=64, mask="floatq", mask_shape="HLS",
         mask_grad=True, ninf=True),
    Case("float32_mask_grad_causal", dtype=bf16, batch=(2,), hq=2, L=70, S=90, E=32, mask="float",
         mask_shape="B1LS", mask_grad=True, causal=True),
    # finfo.min rows: row statistics recomputed through the tiles
    Case("finfo_min_mask_grad", dtype=bf16, batch=(1,), hq=2, L=40, S=50, E=64, mask="floatq", mask_shape="HLS",
         mask_grad=True, finfo_min=True),
    Case("gqa_causal", dtype=bf16, batch=(2,), hq=6, hkv=2, L=130, S=140, E=64, causal=True),
    # odd head dims: a half pair at the end of k in the packed operands (Q K^T over E, dO V^T over Ev)
    Case("odd_head_dims", dtype=bf16, batch=(2,), hq=2, L=70, S=90, E=33, Ev=17),
    Case("odd_head_dim_gqa_window", dtype=bf16, batch=(1,), hq=4, hkv=1, L=140, S=150, E=17, Ev=64,
         window=(30, 5)),
    Case("head_dim_1", dtype=bf16, batch=(), hq=2, L=9, S=13, E=1, Ev=8),
]
# fmt: on

_WORKER = r"""
import hashlib, sys, traceback
sys.path.insert(0, {tests!r})
import torch
import attention_ext
import test_cpu_bf16_paths as m
import test_ops

def fingerprint():
    # a fixed bf16 forward: different bits on the two paths (see the module docstring)
    g = torch.Generator().manual_seed(1234)
    q, k, v = (torch.randn(1, 2, 64, 64, generator=g).to(torch.bfloat16) for _ in range(3))
    out = attention_ext.attention(q, k, v)
    return hashlib.sha1(out.view(torch.int16).numpy().tobytes()).hexdigest()

print("FINGERPRINT", fingerprint(), flush=True)
for case in (m.CASES if {run_cases!r} else []):
    try:
        test_ops.run_case(case, "cpu")
        print("PASS", case.name, flush=True)
    except Exception:
        print("FAIL", case.name, flush=True)
        traceback.print_exc()
"""


@lru_cache(maxsize=None)
def run_worker(path: str, run_cases: bool = True):
    """Runs the cases (or only the fingerprint) in a fresh process with ATTENTION_EXT_CPU_BF16=path."""
    env = dict(os.environ, ATTENTION_EXT_CPU_BF16=path, ATTENTION_EXT_POISON="1")
    r = subprocess.run([sys.executable, "-c", _WORKER.format(tests=TESTS, run_cases=run_cases)], env=env,
                       capture_output=True, text=True, timeout=600, cwd=TESTS)
    assert r.returncode == 0, f"ATTENTION_EXT_CPU_BF16={path}: return code {r.returncode}; stderr:\n{r.stderr[-4000:]}"
    lines = r.stdout.split("\n")
    fp = next(line.split()[1] for line in lines if line.startswith("FINGERPRINT"))
    passed = [line.split()[1] for line in lines if line.startswith("PASS")]
    failed = [line.split()[1] for line in lines if line.startswith("FAIL")]
    return fp, passed, failed, r.stderr


def cpu_has_avx512_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and "avx512_bf16" in line.split() for line in f)
    except OSError:
        return False


@pytest.mark.parametrize("path", ["dot", "blas"])
def test_forced_path_vs_reference(path):
    _, passed, failed, stderr = run_worker(path)
    assert not failed, f"ATTENTION_EXT_CPU_BF16={path}: cases {failed} failed:\n{stderr[-6000:]}"
    assert sorted(passed) == sorted(c.name for c in CASES), (passed, stderr[-2000:])


def test_forced_paths_are_the_paths_used():
    """dot and blas give different bits where the CPU has AVX512-BF16 (else dot falls back to
    the BLAS: equal bits), and auto gives the bits of one of them."""
    fp_dot, fp_blas = run_worker("dot", False)[0], run_worker("blas", False)[0]
    if cpu_has_avx512_bf16():
        assert fp_dot != fp_blas, "ATTENTION_EXT_CPU_BF16=dot and =blas gave identical outputs: one is not applied"
    else:
        assert fp_dot == fp_blas, "without AVX512-BF16, dot must fall back to the BLAS path"
    for path in ("auto", ""):
        assert run_worker(path, False)[0] in (fp_dot, fp_blas), f"ATTENTION_EXT_CPU_BF16={path!r}"


_BAD_VALUE = r"""
import torch, attention_ext
q = torch.randn(1, 1, 8, 16)
attention_ext.attention(q, q, q)  # float32 never asks for the bf16 path
for _ in range(2):  # the error is not cached as a decision: every bf16 call raises it
    try:
        attention_ext.attention(q.bfloat16(), q.bfloat16(), q.bfloat16())
    except ValueError as e:
        print("ERROR", str(e).splitlines()[0])
    else:
        print("NO ERROR")
"""


def test_bad_value_raises_naming_the_variable():
    env = dict(os.environ, ATTENTION_EXT_CPU_BF16="fast")
    r = subprocess.run([sys.executable, "-c", _BAD_VALUE], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().split("\n")
    assert len(lines) == 2, r.stdout
    for line in lines:
        assert line.startswith("ERROR"), r.stdout
        assert "ATTENTION_EXT_CPU_BF16" in line and "'fast'" in line, line
        assert "'dot'" in line and "'blas'" in line and "'auto'" in line, line
