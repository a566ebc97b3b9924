"""Every CPU bfloat16 product path, whichever one this CPU would pick.

bfloat16 runs on AMX tiles, on the AVX512-BF16 dot-product tiles, on the BLAS's
own bf16 GEMM (MKL's cblas_gemm_bf16bf16f32, itself on AMX where the CPU has it)
or on fp32 copies through the BLAS (csrc/cpu/flash_cpu_bf16.cpp: bf16_path). The
choice is made once per process, at the first bfloat16 call (ATTENTION_EXT_CPU_BF16=
amx|dot|mkl|blas|auto, auto timing every available path), so each path runs here in
its own subprocess with the variable set, through tests/test_ops.py's run_case:
forward and backward against the float64 reference, error at most 2x PyTorch's
own bf16 SDPA error. float16 always takes the fp32 BLAS path and is covered by
test_ops.py.

That a forced path really is the one that ran is checked twice: by the kernel
log (ATTENTION_EXT_LOG_KERNEL=1 names the path), and on the outputs: amx, dot and
mkl round P to bfloat16 before P V, the fp32 BLAS path does not, and the dot
tiles sum in a different order than the AMX tiles, so different paths give different
bits for the same inputs (except amx and MKL's GEMM, which on a CPU with AMX run the
same tile instruction over k in the same order).
A path the CPU or the BLAS lacks falls back to the fp32 BLAS path, and only then.
"""
import concurrent.futures
import os
import re
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
    # the AMX tiles move a power-of-two scale into Q (and store Q K^T straight into the score tile);
    # any other scale goes through the product's alpha
    Case("scale_pow2", dtype=bf16, batch=(1,), hq=2, L=70, S=600, E=32, scale=0.25, causal=True),
    Case("scale_other_e128", dtype=bf16, batch=(2,), hq=2, L=50, S=130, E=128, Ev=96),
    # more key blocks (6 of 512) than the AMX tiles keep packed (4): slots are evicted and reused
    Case("many_key_blocks", dtype=bf16, batch=(2,), hq=2, hkv=1, L=40, S=2600, E=64, Ev=40),
]
# fmt: on

_WORKER = r"""
import hashlib, os, sys, traceback
sys.path.insert(0, {tests!r})
import torch
import attention_ext
import test_cpu_bf16_paths as m
import test_ops

def fingerprint():
    # a fixed bf16 forward: output (bf16) and log-sum-exp (fp32) bits, different on every path
    # (see the module docstring; the bf16 output alone can hide fp32 summation-order differences)
    g = torch.Generator().manual_seed(1234)
    q, k, v = (torch.randn(1, 2, 64, 64, generator=g).to(torch.bfloat16) for _ in range(3))
    out, lse, _ = torch.ops.attention_ext._attention_forward(q, k, v, None, 0.0, False, None, False, [-1, -1])
    return hashlib.sha1(out.view(torch.int16).numpy().tobytes() + lse.numpy().tobytes()).hexdigest()

os.environ["ATTENTION_EXT_LOG_KERNEL"] = "1"
print("FINGERPRINT", fingerprint(), flush=True)
sys.stderr.flush()
del os.environ["ATTENTION_EXT_LOG_KERNEL"]
for case in (m.CASES if {run_cases!r} else []):
    try:
        test_ops.run_case(case, "cpu")
        print("PASS", case.name, flush=True)
    except Exception:
        print("FAIL", case.name, flush=True)
        traceback.print_exc()
if {run_cases!r}:
    try:
        test_ops.check_probs_bf16_masked("cpu")
        print("PASS probs_bf16_masked", flush=True)
    except Exception:
        print("FAIL probs_bf16_masked", flush=True)
        traceback.print_exc()
    try:
        test_ops.check_score_jumps("cpu", torch.bfloat16)
        print("PASS score_jumps", flush=True)
    except Exception:
        print("FAIL score_jumps", flush=True)
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
    ran = sorted(set(re.findall(r"cpu forward: flash kernel, bf16 \(([^)]*)\)", r.stderr)))
    assert len(ran) == 1, f"ATTENTION_EXT_CPU_BF16={path}: kernel log names {ran}:\n{r.stderr[-2000:]}"
    return fp, passed, failed, r.stderr, ran[0]


def cpu_has(flag: str) -> bool:
    """The CPU (and the kernel, which lists only what it supports) has this /proc/cpuinfo flag."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and flag in line.split() for line in f)
    except OSError:
        return False


AMX, DOT, MKL, BLAS = "AMX tiles", "AVX512-BF16 dot-product tiles", "BLAS bf16 GEMM tiles", "fp32 BLAS tiles"


def mkl_bf16_gemm_expected() -> bool:
    """torch's BLAS is MKL on x86-64 (then cblas_gemm_bf16bf16f32 is there)."""
    return torch.backends.mkl.is_available() and os.uname().machine == "x86_64"


def run_workers(paths, run_cases: bool = True):
    """run_worker for each path, the subprocesses side by side (one per core): {path: its result}."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        return dict(zip(paths, pool.map(lambda p: run_worker(p, run_cases), paths)))


@pytest.fixture(scope="module")
def forced_runs():
    return run_workers(["amx", "dot", "mkl", "blas"])


@pytest.mark.parametrize("path", ["amx", "dot", "mkl", "blas"])
def test_forced_path_vs_reference(path, forced_runs):
    _, passed, failed, stderr, _ = forced_runs[path]
    assert not failed, f"ATTENTION_EXT_CPU_BF16={path}: cases {failed} failed:\n{stderr[-6000:]}"
    expected = [c.name for c in CASES] + ["probs_bf16_masked", "score_jumps"]
    assert sorted(passed) == sorted(expected), (passed, stderr[-2000:])


def test_forced_paths_are_the_paths_used():
    """Each forced path runs (by the kernel log) where the CPU and the BLAS have it, the fp32 BLAS
    path otherwise; different paths give different bits, the same path the same bits; auto picks
    one of the paths the CPU has and gives its bits."""
    runs = run_workers(["amx", "dot", "mkl", "blas", "auto", ""], False)
    auto = {p: runs.pop(p) for p in ("auto", "")}
    fp = {p: r[0] for p, r in runs.items()}
    ran = {p: r[4] for p, r in runs.items()}
    assert ran["blas"] == BLAS
    assert ran["dot"] == (DOT if cpu_has("avx512_bf16") else BLAS), ran
    assert ran["amx"] == (AMX if cpu_has("avx512_bf16") and cpu_has("amx_bf16") and cpu_has("amx_tile") else BLAS), ran
    assert ran["mkl"] == (MKL if mkl_bf16_gemm_expected() else BLAS), ran
    for a in fp:
        for b in fp:
            if a < b:
                same_path = ran[a] == ran[b]
                if not same_path and {ran[a], ran[b]} == {AMX, MKL}:
                    continue  # MKL's bf16 GEMM runs the same tile instruction over k in the same order: same bits
                assert (fp[a] == fp[b]) == same_path, f"{a} ({ran[a]}) vs {b} ({ran[b]}): fingerprints {fp[a]} {fp[b]}"
    for path, r in auto.items():
        assert r[4] in ran.values(), (path, r[4], ran)
        assert r[0] == fp[next(p for p in ran if ran[p] == r[4])], f"ATTENTION_EXT_CPU_BF16={path!r}"


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
        assert "ATTENTION_EXT_CPU_BF16" in line and "'fast'" in line and "'amx'" in line, line
        assert "'dot'" in line and "'blas'" in line and "'auto'" in line, line
