"""Racecheck: the CUDA kernels' shared- and global-memory accesses proven ordered on the CPU emulator.

With ATTENTION_EXT_EMU_RACECHECK=1 the emulator (csrc/cuda/emu/racecheck.h) gives every CUDA thread a
vector clock, takes every way the kernels order threads (__syncthreads, named barriers, warp collectives,
mbarriers, the waits of cp.async / TMA / wgmma) as an edge, keeps asynchronous copies and wgmma operand
reads in flight from issue to completion, and checks every load and store of dynamic shared memory (seen
through GCC's -fsanitize=thread instrumentation) against the last write and the reads since: what
compute-sanitizer's racecheck does on a GPU, for code no GPU has run yet. Global memory (the tensors the glue
hands a launch: inputs, outputs, workspaces, partial results; the emulator's cp.async / TMA copies of them
included) is checked too, which compute-sanitizer's racecheck does not: within
a CTA with the same edges, and between the CTAs of a launch, which nothing orders: a byte one CTA writes may not
be read or written by another unless both accesses are atomic.

What these tests pin down: each kind of race is caught, with both threads named, in small kernels that
have it (and the same kernels without it pass); the attention kernels, sm80 and Hopper, forward and
backward, over their features (masks, dropout, GQA, windows, head-dim buckets, packed sequences, split
keys, the deterministic backward, the weights kernel), have no race; and racecheck changes no result bit.
"""
import pytest
import torch

import attention_ext
import emu
from test_cuda_emu import _inputs

pytestmark = [pytest.mark.emu, pytest.mark.skipif(not emu.LOADED, reason=emu.SKIP_REASON or "")]

bf16, f16 = torch.bfloat16, torch.float16


@pytest.fixture
def racecheck(monkeypatch):
    monkeypatch.setenv("ATTENTION_EXT_EMU_RACECHECK", "1")


RACES = [
    ("race_raw", r"thread 1 \(warp 0, warpgroup 0\) reads shared memory at byte 0xc \(a load\) while the write of "
                 r"thread 0 .* is not ordered before it: a read-after-write race"),
    ("race_war", r"thread 1 .* writes shared memory at byte 0xc \(a store\) while the read of thread 0 .* "
                 r"write-after-read race"),
    ("race_waw", r"thread 1 .* writes shared memory at byte 0xc .* the write of thread 0 .* write-after-write race"),
    ("race_cp_async", r"thread 0 .* reads shared memory at byte 0x0 \(a load\) while an asynchronous write to it "
                      r"\(cp.async / TMA load\) is in flight"),
    ("race_tma_unwaited", r"thread 1 .* reads shared memory at byte 0x404 \(a load\) while the write of thread 0 .* "
                          r"\(a TMA load\) is not ordered before it"),
    ("race_wgmma_released", r"thread 0 .* writes shared memory at byte 0x400 \(a TMA load\) while the read of "
                            r"thread \d+ .* \(a wgmma A operand\) is not ordered before it"),
    # global memory (the launch's registered tensors): between CTAs, nothing but atomics may share a byte
    ("race_global_ctas", r"thread 0 .* of CTA [01] writes global memory at 0x[0-9a-f]+ \(a store\) that CTA [01] "
                         r"wrote \(a store\) in the same launch: a write-after-write race between CTAs"),
    ("race_global_atomic", r"of CTA [01] (reads|writes) global memory at 0x[0-9a-f]+ \((a load|an atomic update)\) "
                           r"that CTA [01] (wrote|read) .* race between CTAs"),
    # ... the emulator's copies included: cp.async and TMA loads read, TMA reduces add atomically
    ("race_global_cp_async", r"of CTA [01] (reads|writes) global memory at 0x[0-9a-f]+ \((cp.async|a store)\) "
                             r"that CTA [01] (wrote|read) \((a store|cp.async)\) .* race between CTAs"),
    ("race_global_tma_load", r"of CTA [01] (reads|writes) global memory at 0x[0-9a-f]+ \((a TMA load|a store)\) "
                             r"that CTA [01] (wrote|read) \((a store|a TMA load)\) .* race between CTAs"),
    ("race_global_tma_reduce", r"of CTA [01] (reads|writes) global memory at 0x[0-9a-f]+ \((a load|a TMA reduce)\) "
                               r"that CTA [01] (wrote|read) \((a TMA reduce|a load)\) .* race between CTAs"),
    # ... and within a CTA, the same happens-before edges as shared memory (either order of the two threads)
    ("race_global_raw", r"thread [01] .* of CTA 0 (reads|writes) global memory at 0x[0-9a-f]+ \(a (load|store)\) "
                        r"while the (write|read) of thread [01] .* is not ordered before it: a "
                        r"(read-after-write|write-after-read) race"),
    ("race_global_cp_async_raw", r"thread [01] .* of CTA 0 (reads|writes) global memory at 0x[0-9a-f]+ "
                                 r"\((cp.async|a store)\) while the (write|read) of thread [01] .* is not ordered "
                                 r"before it"),
]


@pytest.mark.parametrize("fault,message", RACES, ids=[r[0] for r in RACES])
def test_racecheck_catches_races(racecheck, fault, message):
    """Each kind of race is reported, naming both threads and accesses, and the well-formed kernels using the
    same instructions (cp.async, ldmatrix, shuffles, barriers; TMA, mbarriers, wgmma, a buffer refilled after
    the wgmma reading it was waited for) pass."""
    emu.ops._selftest("clean")
    emu.ops._selftest("sm90_clean")
    emu.ops._selftest("global_clean")  # disjoint words per CTA, a barrier-ordered read, atomics on one word
    emu.ops._selftest("grid_atomics")  # 64 CTAs adding to two words (atomicAdd, red.global.add)
    emu.ops._selftest("copy_clean")  # cp.async / TMA loads of the same bytes by two CTAs, TMA reduces into one row
    with pytest.raises(RuntimeError, match="racecheck: .*" + message):
        emu.ops._selftest(fault)


@pytest.mark.parametrize("fault", [r[0] for r in RACES])
def test_races_are_invisible_without_racecheck(fault):
    """The same kernels run without an error when racecheck is off: these races are found only by it."""
    emu.ops._selftest(fault)


@pytest.mark.parametrize("value", ["2", "yes"])
def test_racecheck_setting_checked(monkeypatch, value):
    monkeypatch.setenv("ATTENTION_EXT_EMU_RACECHECK", value)
    with pytest.raises(RuntimeError, match="ATTENTION_EXT_EMU_RACECHECK must be 0 or 1, got '" + value + "'"):
        emu.ops._selftest("clean")


def _mask(kind, B, Hq, L, S, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    if kind == "bool":
        m = torch.rand(B, 1, L, S, generator=g) > 0.3
        m[..., 0] = True
        return m
    if kind == "padding":
        m = torch.ones(B, 1, 1, S, dtype=torch.bool)
        m[..., S - S // 3:] = False
        return m
    if kind == "float":
        return torch.randn(B, Hq, L, S, generator=g).to(dtype).requires_grad_()
    return None


# name: (arch, B, Hq, Hkv, L, S, E, Ev, dtype, mask, keywords, what the kernel log must name of the forward
# and the backward). Each loop runs
# past the pipeline's depth (several key / query tiles per block), where a buffer is refilled while others
# are read: moving the Hopper forward's release of a V stage above the wgmma wait that ends its P V
# product passes every other emulated test (the data lands late enough) and fails racecheck only here.
SM80, SM90 = ("sm80 mma.sync", "sm80 mma.sync"), ("sm90a", "sm90a")
KERNELS = {
    "sm80_causal_bf16_64": ("80", 1, 2, 2, 300, 300, 64, 64, bf16, None, dict(is_causal=True), SM80),
    "sm80_gqa_window_f16_128": ("80", 1, 4, 2, 70, 100, 128, 128, f16, None, dict(window_size=(16, 8)), SM80),
    "sm80_bool_dropout_fp32_64": ("80", 1, 2, 2, 40, 300, 64, 64, torch.float32, "bool", dict(dropout_p=0.2),
                                  ("3xTF32", "3xTF32")),
    "sm80_float_mask_bf16_256": ("80", 1, 2, 1, 33, 200, 256, 256, bf16, "float", {},
                                 ("mma.sync kernel, head-dim bucket 256", "mma.sync kernel, head-dim bucket 256")),
    # the soft cap's pass before ALiBi and the mask (NOTES 59): it writes the float mask's gradient buffer,
    # which the P / dS loop then rescales in place, with the dropout bits drawn before that pass
    "sm80_softcap_alibi_float_mask_dropout_f16_64": (
        "80", 1, 2, 2, 70, 150, 64, 64, f16, "float",
        dict(dropout_p=0.25, softcap=5.0, alibi_slopes=torch.tensor([0.3, 0.05]), is_causal=True), SM80),
    "sm80_padding_e96_ev64": ("80", 2, 2, 2, 50, 260, 96, 64, f16, "padding", {}, ("bucket 96", "bucket 96")),
    "sm80_decode_gqa_split": ("80", 1, 8, 2, 1, 450, 64, 64, bf16, None, {}, ("keys split", "sm80 mma.sync")),
    "sm90_causal_bf16_64": ("90", 1, 2, 2, 640, 640, 64, 64, bf16, None, dict(is_causal=True), SM90),
    "sm90_gqa_window_f16_128": ("90", 1, 4, 2, 130, 200, 128, 96, f16, None, dict(window_size=(40, 10)), SM90),
    "sm90_padding_dropout_bf16_128": ("90", 1, 4, 2, 130, 600, 128, 128, bf16, "padding", dict(dropout_p=0.3),
                                      SM90),
    "sm90_softcap_alibi_bf16_64": ("90", 1, 2, 1, 200, 330, 64, 64, bf16, None,
                                   dict(softcap=4.0, alibi_slopes=torch.tensor([0.2, 0.02]), is_causal=True), SM90),
    "sm90_bf16_256": ("90", 1, 1, 1, 140, 400, 256, 256, bf16, None, {},
                      ("wgmma + TMA kernel (warp-specialised), head-dim bucket 256", "sm90a")),
}
# few emulated multiprocessors, so that the forward does not split the keys (an sm80 kernel) to fill them
FEW_SMS = {"sm90_padding_dropout_bf16_128"}


def _run(case):
    arch, B, Hq, Hkv, L, S, E, Ev, dtype, mask_kind, kw, kernel = KERNELS[case]
    q, k, v, do = _inputs(B, Hq, Hkv, L, S, E, Ev, dtype, 0)
    mask = _mask(mask_kind, B, Hq, L, S, dtype)
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    torch.manual_seed(3)
    with attention_ext.debug.kernel_log() as lines:
        out = emu.attention(qs, ks, vs, mask, enable_gqa=Hq != Hkv, **kw)
        out.backward(do)
    assert len(lines) == 2 and kernel[0] in lines[0] and kernel[1] in lines[1], lines
    grads = [qs.grad, ks.grad, vs.grad] + ([mask.grad] if mask is not None and mask.requires_grad else [])
    return [out.detach()] + grads


@pytest.mark.parametrize("case", list(KERNELS))
def test_kernels_race_free(case, monkeypatch):
    """Forward and backward of each kernel family under racecheck: no race, and the very same bits as
    without it (one emulator thread, so that dQ's atomic adds come in one order)."""
    arch = KERNELS[case][0]
    monkeypatch.setenv("ATTENTION_EXT_EMU_ARCH", arch)
    monkeypatch.setenv("ATTENTION_EXT_EMU_THREADS", "1")
    if case in FEW_SMS:
        monkeypatch.setenv("ATTENTION_EXT_EMU_SMS", "4")
    plain = _run(case)
    monkeypatch.setenv("ATTENTION_EXT_EMU_RACECHECK", "1")
    checked = _run(case)
    for a, b in zip(plain, checked):
        assert torch.isfinite(a).all()
        assert torch.equal(a, b)


def test_deterministic_backward_race_free(racecheck, monkeypatch):
    """The deterministic backward (dQ summed in a fixed order through shared memory, no atomics)."""
    monkeypatch.setenv("ATTENTION_EXT_EMU_ARCH", "80")
    torch.use_deterministic_algorithms(True)
    try:
        first = _run("sm80_causal_bf16_64")
        second = _run("sm80_causal_bf16_64")
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("arch", ["80", "90"])
def test_packed_sequences_race_free(racecheck, monkeypatch, arch):
    """attention_varlen's packed kernels (sm80, and Hopper's kPacked variants with 3 emulated multiprocessors,
    so that a persistent CTA walks tiles of several sequences)."""
    monkeypatch.setenv("ATTENTION_EXT_EMU_ARCH", arch)
    monkeypatch.setenv("ATTENTION_EXT_EMU_SMS", "3")
    lens_q, lens_k = [200, 3, 0, 130], [600, 40, 17, 0]
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(sum(lens_q), 4, 64, generator=g).to(bf16)
    k = torch.randn(sum(lens_k), 2, 64, generator=g).to(bf16)
    v = torch.randn(sum(lens_k), 2, 64, generator=g).to(bf16)
    args = (True, None, True, [-1, -1])
    out, lse, rng = emu.ops._attention_varlen_forward(q, k, v, cu_q, cu_k, None, None, 0.0, *args)
    grad = torch.randn(out.shape, generator=g).to(bf16)
    dq, dk, dv = emu.ops._attention_varlen_backward(grad, q, k, v, cu_q, cu_k, out, lse, rng, 0.0, *args)
    for x in (out, dq, dk, dv):
        assert torch.isfinite(x).all()


def test_weights_kernel_race_free(racecheck, monkeypatch):
    """need_weights: the forward with the head-mean weights, and attention_probs (fp16 scores on tensor cores)."""
    monkeypatch.setenv("ATTENTION_EXT_EMU_ARCH", "80")
    q, k, v, _ = _inputs(1, 4, 2, 40, 70, 64, 64, f16, 0)
    out, lse, rng, w = emu.ops._attention_forward_weights(q, k, v, None, 0.0, False, None, True, [-1, -1], True)
    probs = emu.ops.attention_probs(q, k, None, lse, rng, 0.0, False, None, True, [-1, -1])
    assert torch.isfinite(w).all() and torch.isfinite(probs).all()
    assert torch.allclose(probs.float().mean(1), w.float(), atol=1e-3)


@pytest.mark.parametrize("order,cp_async", [("reverse", "early"), ("shuffle", "late")])
@pytest.mark.parametrize("case", ["sm80_causal_bf16_64", "sm90_causal_bf16_64"])
def test_race_free_in_other_schedules(racecheck, monkeypatch, case, order, cp_async):
    """The edges do not depend on the schedule: other fiber orders, and copies / wgmma taking effect at issue."""
    monkeypatch.setenv("ATTENTION_EXT_EMU_ARCH", KERNELS[case][0])
    with emu.schedule(order, cp_async):
        for x in _run(case):
            assert torch.isfinite(x).all()


@pytest.mark.parametrize("splits", ["1", "3"])
def test_kvcache_race_free(racecheck, monkeypatch, splits):
    """attention_kvcache's kernel (the sm80 forward's cache variant) on pages of 24 positions, whose rows it loads one
    by one (key tiles that cross page ends), a chunk of 5 queries per batch element, with its key tiles whole or
    shared among 3 CTAs (split keys, merged by the combine kernel)."""
    monkeypatch.setenv("ATTENTION_EXT_EMU_ARCH", "80")
    monkeypatch.setenv("ATTENTION_EXT_FWD_SPLITS", splits)
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, L, E, page, per = 2, 4, 2, 5, 64, 24, 10
    kc, vc = (torch.randn(B * per + 1, Hkv, page, E, generator=g).to(bf16) for _ in range(2))
    table = torch.randperm(B * per + 1, generator=g)[: B * per].view(B, per).to(torch.int32)
    q = torch.randn(B, Hq, L, E, generator=g).to(bf16)
    key, value = (torch.randn(B, Hkv, L, E, generator=g).to(bf16) for _ in range(2))
    lens = torch.tensor([180, 33], dtype=torch.int32)
    with attention_ext.debug.kernel_log() as lines:
        out, lse = emu.ops.attention_kvcache(q, kc, vc, lens, key, value, table, True)
    assert len(lines) == 1 and "paged (24 positions a page)" in lines[0], lines
    assert (splits == "3") == ("keys split 3 ways" in lines[0]), lines
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()


@pytest.mark.parametrize("splits", ["1", "3"])
def test_kvcache_packed_race_free(racecheck, monkeypatch, splits):
    """attention_kvcache with packed queries (cu_seqlens_q): one launch over batch elements of 70, 1 and 0 query
    rows (CTAs past a batch element's rows leave at once) against caches paged by 16, the key tiles whole or shared
    among 3 CTAs (the merge writing the packed rows)."""
    monkeypatch.setenv("ATTENTION_EXT_EMU_ARCH", "80")
    monkeypatch.setenv("ATTENTION_EXT_FWD_SPLITS", splits)
    g = torch.Generator().manual_seed(1)
    Hq, Hkv, E, page, per = 4, 2, 64, 16, 12
    B = 3
    kc, vc = (torch.randn(B * per, Hkv, page, E, generator=g).to(f16) for _ in range(2))
    table = torch.randperm(B * per, generator=g).view(B, per).to(torch.int32)
    cu = torch.tensor([0, 70, 71, 71], dtype=torch.int32)
    q = torch.randn(71, Hq, E, generator=g).to(f16)
    key, value = (torch.randn(71, Hkv, E, generator=g).to(f16) for _ in range(2))
    lens = torch.tensor([40, 150, 9], dtype=torch.int32)
    with attention_ext.debug.kernel_log() as lines:
        out, lse = emu.ops.attention_kvcache(q, kc, vc, lens, key, value, table, True, cu_seqlens_q=cu)
    assert len(lines) == 1 and "packed queries in one launch" in lines[0], lines
    assert (splits == "3") == ("keys split 3 ways" in lines[0]), lines
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()


def test_kvcache_capture_refusals_race_free(racecheck, monkeypatch):
    """attention_kvcache as under CUDA-graph capture (ATTENTION_EXT_EMU_CAPTURE=1: values not read back) with values
    out of range: the lengths kernel (one warp per batch element) refusing batch element 1 (a length past the
    capacity) and element 3 (cu_seqlens_q stepping down), the cache kernel with split keys and the merge skipping
    them: race free, those rows NaN and the others finite."""
    monkeypatch.setenv("ATTENTION_EXT_EMU_ARCH", "80")
    monkeypatch.setenv("ATTENTION_EXT_FWD_SPLITS", "3")
    monkeypatch.setenv("ATTENTION_EXT_EMU_CAPTURE", "1")
    g = torch.Generator().manual_seed(2)
    Hq, Hkv, E, page, per, B = 4, 2, 64, 16, 6, 4
    kc, vc = (torch.randn(B * per, Hkv, page, E, generator=g).to(bf16) for _ in range(2))
    table = torch.randperm(B * per, generator=g).view(B, per).to(torch.int32)
    cu = torch.tensor([0, 3, 4, 6, 5], dtype=torch.int32)
    q = torch.randn(6, Hq, E, generator=g).to(bf16)
    lens = torch.tensor([40, 500, 9, 20], dtype=torch.int32)
    out, lse = emu.ops.attention_kvcache(q, kc, vc, lens, None, None, table, True, cu_seqlens_q=cu)
    bad = torch.tensor([False, False, False, True, False, False])  # element 1's row 3; element 3 has none
    assert out[bad].isnan().all() and lse[bad].isnan().all()
    assert torch.isfinite(out[~bad]).all() and torch.isfinite(lse[~bad]).all()
