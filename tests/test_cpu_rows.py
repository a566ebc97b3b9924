"""The CPU kernels' AVX-512 / F16C rows against the generic loops.

csrc/cpu/vec_ops.cpp computes exp(s - m) and its row sum twice over: as plain loops
that GCC vectorises for any x86-64 CPU, and in AVX-512 intrinsics (vscalefps), which
the kernels use when the CPU has AVX-512; for bfloat16 tiles the intrinsics also
round P to bf16 in the same pass (vcvtneps2bf16, AVX512-BF16). Each exponential is
the same operations in the same order (bit-identical), but the row sums add the 16
lanes in another order, so results may differ in the last bit of the fp32 sums.
float16 <-> float32 conversions likewise run on the conversion instructions (AVX-512,
or F16C) or as bit-level loops; those agree exactly (up to a NaN's payload).
ATTENTION_EXT_CPU_AVX512=0 switches all of these intrinsics off; the choice is made once per
process, so each side runs in its own subprocess. On a CPU with AVX-512 the rest of
the suite runs the intrinsics, so here:
  - the same for the short query rows' dot products and row updates (csrc/cpu/vec_ops.cpp: dot_rows,
    axpy_rows; AVX512-BF16 dot products for bfloat16 keys);
  - the generic loops run the whole reference grid of test_ops.py (float64 reference,
    2x PyTorch's error), as they do on a CPU without AVX-512;
  - both sides compute the same outputs, lse, gradients and attention weights on
    inputs that reach every branch (-inf scores, rows that see no key, scores near
    the -87 flush, rows that are not multiples of 16 long, dropout, which keeps the
    fp32 P, and NaN inputs): NaN in the same places, and within a few units of the
    last place (fp32) or one bf16 / fp16 rounding step of each other elsewhere;
  - every float16 and bfloat16 value passes through the kernels' conversions unchanged
    (bfloat16 subnormals, below 1.2e-38, may become 0: the AMX and AVX512-BF16 product
    instructions read them as zero).
"""
import os
import subprocess
import sys

import pytest
import torch

TESTS = os.path.dirname(os.path.abspath(__file__))

_WORKER = r"""
import sys, traceback
import torch
import attention_ext
from attention_ext import ops

g = torch.Generator().manual_seed(7)
results = {}
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for (L, S, E) in ((3, 600, 40), (37, 83, 64), (130, 530, 32), (16, 16, 128)):  # L = 3: the short-row kernels
        q = (torch.randn(2, 3, L, E, generator=g) * 4).to(dtype)   # wide scores: some far below the row max
        k = torch.randn(2, 3, S, E, generator=g).to(dtype)
        v = torch.randn(2, 3, S, E, generator=g).to(dtype)
        mask = torch.rand(2, 1, L, S, generator=g) > 0.3
        mask[:, :, 1] = False                                      # a row that sees no key
        for name, m, causal, window in (("plain", None, False, None), ("bool", mask, False, None),
                                        ("causal", None, True, None), ("window", None, False, (5, 3))):
            out, lse, rng = ops.attention_forward(q, k, v, m, 0.0, causal, None, False, window)
            do = torch.randn(out.shape, generator=g).to(dtype)
            grads = ops.attention_backward(do, q, k, v, out, lse, rng, m, 0.0, causal, None, False, window)
            probs = ops.attention_probs(q, k, lse, m, None, 0.0, causal, None, False, window)
            results[f"{dtype}-{L}-{S}-{E}-{name}"] = (out, lse, *grads[:3], probs)
        torch.manual_seed(3)
        results[f"{dtype}-{L}-{S}-{E}-dropout"] = ops.attention_forward(q, k, v, None, 0.25, False, None, False, None)[:2]
    qn = q.clone()
    qn[0, 0, 3, 5] = float("nan")
    results[f"{dtype}-nan"] = ops.attention_forward(qn, k, v, None, 0.0, False, None, False, None)[:2]
# every 16-bit pattern as a value (one key, so P = 1 and the output is the value itself): the conversions
# to float32 and back are exact both ways (zeros may lose their sign, NaN its payload)
bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
for dtype in (torch.float16, torch.bfloat16):
    v = bits.view(dtype).reshape(256, 1, 1, 256)
    qk = torch.randn(256, 1, 1, 8).to(dtype)
    out = ops.attention(qk, qk, v)
    same = (out.view(torch.int16) == v.view(torch.int16)) | (out.isnan() & v.isnan()) | ((out == 0) & (v == 0))
    if dtype == torch.bfloat16:  # the bf16 tile instructions (AMX, AVX512-BF16) read subnormals as zero
        same |= (out == 0) & (v.abs() < torch.finfo(dtype).tiny)
    assert same.all(), f"{dtype}: {(~same).sum().item()} values changed, e.g. {v[~same][:4]} -> {out[~same][:4]}"
    results[f"{dtype}-all-values"] = (out,)
torch.save(results, sys.argv[1])
if __RUN_GRID__:
    sys.path.insert(0, __TESTS__)
    import test_ops
    failed = []
    for case in test_ops.CASES:
        try:
            test_ops.run_case(case, "cpu")
        except Exception:
            failed.append(case.id)
            traceback.print_exc()
    for dtype in (torch.float32, torch.bfloat16, torch.float16):  # the bf16 one-pass softmax's redo
        try:
            test_ops.check_score_jumps("cpu", dtype)
        except Exception:
            failed.append(f"score_jumps-{dtype}")
            traceback.print_exc()
    print("RAN", len(test_ops.CASES) + 3, "FAILED", failed)
"""


def run(avx512: bool, path: str) -> dict:
    env = dict(os.environ, ATTENTION_EXT_POISON="1")
    env.pop("ATTENTION_EXT_CPU_AVX512", None)
    if not avx512:
        env["ATTENTION_EXT_CPU_AVX512"] = "0"
    code = _WORKER.replace("__RUN_GRID__", repr(not avx512)).replace("__TESTS__", repr(TESTS))
    r = subprocess.run([sys.executable, "-c", code, path], env=env, capture_output=True, text=True, timeout=1200,
                       cwd=TESTS)
    side = "default" if avx512 else "0"
    assert r.returncode == 0, f"ATTENTION_EXT_CPU_AVX512={side}:\n{r.stderr[-4000:]}"
    if not avx512:
        import test_ops
        assert f"RAN {len(test_ops.CASES) + 3} FAILED []" in r.stdout, f"generic loops: reference grid failed:\n{r.stdout[-2000:]}\n{r.stderr[-6000:]}"
    return torch.load(path)


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AVX512_BF16", "AMX"),
                    reason="this CPU has no AVX-512, so only the generic loops exist here (and every test runs them)")
def test_avx512_rows_against_generic(tmp_path):
    fast, generic = run(True, str(tmp_path / "fast.pt")), run(False, str(tmp_path / "generic.pt"))
    assert fast.keys() == generic.keys() and len(fast) == 65  # 3 dtypes x 4 shapes x (4 masks + dropout) + NaN, + 2
    for key in fast:
        for i, (a, b) in enumerate(zip(fast[key], generic[key])):
            where = f"{key}, result {i}"
            assert torch.equal(a.isnan(), b.isnan()), f"{where}: NaN in different places"
            assert torch.equal(a.isinf(), b.isinf()) and torch.equal(a[a.isinf()], b[b.isinf()]), where
            ok = a.isfinite()
            a64, b64 = a[ok].double(), b[ok].double()
            if a.dtype in (torch.bfloat16, torch.float16):  # one rounding step of a value the size of the largest
                step = 2.0 ** -7 if a.dtype == torch.bfloat16 else 2.0 ** -10
                tol = step * a64.abs().max().item() if a64.numel() else 0.0
            else:  # an fp32 sum in another order: a few ulps of the largest value
                # (the short rows, L = 3, also sum each score q . k in another order: exp(s - lse) turns the
                # last-bit differences of scores up to ~13 here into relative differences of that many ulps,
                # which the gradients sum over 600 keys)
                ulps = 64 if "-3-600-" in key else 16
                tol = ulps * torch.finfo(torch.float32).eps * a64.abs().max().item() if a64.numel() else 0.0
            err = (a64 - b64).abs().max().item() if a64.numel() else 0.0
            assert err <= tol, f"{where}: AVX-512 and generic differ by {err:.3g} (tolerance {tol:.3g})"


@pytest.mark.parametrize("L,G,expect", [(1, 4, 4), (4, 4, 4), (2, 8, 8), (4, 8, 4), (3, 8, 4), (8, 4, 2)])
def test_gqa_heads_grouped_per_block(L, G, expect):
    """Short query rows: the heads of a GQA group run as one block of at most 16 rows (the most heads, a divisor
    of the group, leaving two tasks per thread); the kernel log says how many. Same output as one head per block
    (grouping off where the tasks would be too few: a single kv head of one batch element)."""
    import attention_ext
    from reference import reference_attention

    torch.manual_seed(5)
    B, Hkv, S = 2, 2, 300
    q = torch.randn(B, Hkv * G, L, 32)
    k, v = torch.randn(B, Hkv, S, 32), torch.randn(B, Hkv, S, 32)
    with attention_ext.debug.kernel_log() as lines, torch.no_grad():
        out = attention_ext.attention(q, k, v, enable_gqa=True)
    nt = torch.get_num_threads()
    if B * Hkv * G // expect < 2 * nt:
        pytest.skip(f"{nt} threads: fewer heads per block would be chosen")
    assert any(f"a GQA group's heads {expect} per block" in ln for ln in lines), lines
    assert (out.double() - reference_attention(q, k, v, enable_gqa=True).out).abs().max() < 1e-5
