"""The Hopper (sm_90a) PTX on the CPU SIMT emulator (csrc/cuda/emu/sm90_emu.h).

A GEMM kernel written against csrc/cuda/hopper/sm90_ptx.cuh (TMA loads into
swizzled shared memory completing on an mbarrier, wgmma over K in k16 steps,
A from shared memory or registers) must equal a float64 matmul of its 16-bit
inputs for every swizzle, major-ness, N and dtype, bit for bit across fiber
orders and landing times; each fault check fires with its message; and a read
of TMA'd shared memory without the mbarrier wait shows up (NaN) in late mode.
"""
import itertools

import pytest
import torch

import emu

pytestmark = [pytest.mark.emu, pytest.mark.skipif(not emu.LOADED, reason=emu.SKIP_REASON or "")]

f16, bf16 = torch.float16, torch.bfloat16
SWIZZLES = (0, 32, 64, 128)
# (a_mn_major, b_mn_major, a_in_regs)
OPERANDS = [(False, False, False), (True, False, False), (False, True, False), (True, True, False),
            (False, False, True), (False, True, True)]


def _ids(o):
    a_mn, b_mn, regs = o
    return ("Areg" if regs else ("Amn" if a_mn else "Ak")) + ("-Bmn" if b_mn else "-Bk")


def _inputs(K, N, dtype, seed):
    g = torch.Generator().manual_seed(seed)

    def nonzero(*shape):  # random, never zero (a zero would hide a misplaced element)
        x = torch.randn(*shape, generator=g)
        return torch.where(x.abs() < 0.05, torch.full_like(x, 0.5), x).to(dtype)

    return nonzero(64, K), nonzero(K, N)


def _check(a, b, swizzle, a_mn, b_mn, regs):
    N = b.shape[1]
    d = emu.ops._sm90_gemm(a, b, swizzle, a_mn, b_mn, regs, N)
    assert d.dtype == torch.float32 and d.shape == (64, N)
    _assert_matmul_close(d, a, b)
    return d


def _assert_matmul_close(d, a, b):
    """Each k16 step sums its products exactly (in double) and rounds once to
    fp32: at most K/16 roundings, each within 2^-24 of the running |sum|."""
    ref = a.double() @ b.double()
    bound = (a.shape[1] // 16) * 2.0 ** -24 * (a.double().abs() @ b.double().abs()) + 1e-30
    err = (d.double() - ref).abs()
    assert (err <= bound).all(), f"max error {err.max().item()}, max error / bound {(err / bound).max().item()}"


@pytest.mark.parametrize("dtype", [f16, bf16], ids=["f16", "bf16"])
@pytest.mark.parametrize("N", [64, 128, 256])
@pytest.mark.parametrize("operands", OPERANDS, ids=_ids)
@pytest.mark.parametrize("swizzle", SWIZZLES, ids=lambda s: f"sw{s}")
def test_gemm_layouts(swizzle, operands, N, dtype):
    a, b = _inputs(64, N, dtype, seed=swizzle + N)
    _check(a, b, swizzle, *operands)


@pytest.mark.parametrize("K", [16, 48, 128])
@pytest.mark.parametrize("operands", OPERANDS, ids=_ids)
@pytest.mark.parametrize("swizzle", SWIZZLES, ids=lambda s: f"sw{s}")
def test_gemm_depths(swizzle, operands, K):
    """K below one swizzle row (the TMA box's zero fill past the tensor) and
    K spanning several swizzle rows (descriptor steps across TMA boxes)."""
    a, b = _inputs(K, 64, bf16, seed=K)
    _check(a, b, swizzle, *operands)


@pytest.mark.parametrize("swizzle", [0, 128], ids=lambda s: f"sw{s}")
@pytest.mark.parametrize("operands", [OPERANDS[0], OPERANDS[3], OPERANDS[5]], ids=_ids)
def test_gemm_schedules_bit_identical(swizzle, operands):
    """Fiber order and landing time (TMA and wgmma: late / early) must not change a bit."""
    a, b = _inputs(64, 128, f16, seed=7)
    results = {}
    for order, landing in itertools.product(("forward", "reverse", "shuffle"), ("late", "early")):
        with emu.schedule(order, landing):
            results[order, landing] = emu.ops._sm90_gemm(a, b, swizzle, *operands, 128)
    first = next(iter(results.values()))
    _assert_matmul_close(first, a, b)
    for key, d in results.items():
        assert torch.equal(d, first), key


def test_gemm_inputs_checked():
    a, b = _inputs(64, 64, f16, seed=0)
    with pytest.raises(ValueError, match="swizzle is 0, 32, 64 or 128"):
        emu.ops._sm90_gemm(a, b, 16, False, False, False, 64)
    with pytest.raises(ValueError, match="A from registers has no major-ness"):
        emu.ops._sm90_gemm(a, b, 0, True, False, True, 64)


@pytest.mark.parametrize("order", ["forward", "reverse", "shuffle"])
def test_tma_hazard_detected(order):
    """Reading TMA'd shared memory without waiting on its mbarrier: NaN (the
    0xFF fill) in late mode, the data only by luck in early mode; with the wait,
    the data in both."""
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(1)).to(bf16)
    with emu.schedule(order, "late"):
        assert torch.equal(emu.ops._sm90_tma_hazard(x, True), x)
        racy = emu.ops._sm90_tma_hazard(x, False)
        assert racy.isnan().all()
    with emu.schedule(order, "early"):
        assert torch.equal(emu.ops._sm90_tma_hazard(x, True), x)
        assert torch.equal(emu.ops._sm90_tma_hazard(x, False), x)


@pytest.mark.parametrize("order", ["forward", "shuffle"])
@pytest.mark.parametrize("landing", ["late", "early"])
def test_proxy_fence_required(order, landing):
    """Generic-proxy stores to shared memory read by the async proxy (a TMA reduce-add
    here; wgmma operands alike) need fence.proxy.async in between: without it the
    emulated async proxy reads the CTA's initial fill (NaN), with it the data."""
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(2))
    with emu.schedule(order, landing):
        assert torch.equal(emu.ops._sm90_proxy_hazard(x, True), x)
        assert emu.ops._sm90_proxy_hazard(x, False).isnan().all()
    with pytest.raises(ValueError, match="_sm90_proxy_hazard: x is 64 x 32 float32"):
        emu.ops._sm90_proxy_hazard(x.double(), True)


SM90_FAULTS = [
    ("mbarrier_deadlock", r"deadlock; thread 0 waits at mbarrier.try_wait.parity 0 on mbarrier at smem 0x40 \(phase 0, 1 of 1 arrivals pending, tx-count 0\) \(so do threads 1-127\)"),
    ("mbarrier_uninit", "mbarrier.arrive on an uninitialised mbarrier at smem 0x40"),
    ("mbarrier_extra_arrival", "more arrivals than pending in the current phase"),
    ("wgmma_nonuniform", "thread 77: wgmma.mma_async op #0 of warpgroup 0 is not warpgroup-uniform: A descriptor"),
    ("wgmma_outside", r"operand A .* is outside the 8192 bytes of dynamic shared memory"),
    ("wgmma_not_waited", "thread exits with 1 wgmma.mma_async ops it has not waited for"),
    ("tma_misaligned", "the destination must be aligned to 1024 bytes for 128B swizzle"),
    ("tma_outside", "TMA load .* reads global memory outside every tensor of the launch"),
    ("named_barrier_deadlock", r"deadlock; thread 0 waits at named barrier 1 \(64 of 128 threads arrived\) \(so do threads 1-63\)"),
]


@pytest.mark.parametrize("landing", ["late", "early"])
@pytest.mark.parametrize("fault,message", SM90_FAULTS, ids=[f for f, _ in SM90_FAULTS])
def test_sm90_fault_detected(fault, message, landing):
    with emu.schedule("forward", landing):
        emu.ops._selftest("sm90_clean")  # the same kernel, used correctly, passes
        with pytest.raises(RuntimeError, match=message):
            emu.ops._selftest(fault)
