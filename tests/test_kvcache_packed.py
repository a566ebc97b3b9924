"""attention_kvcache with packed queries (cu_seqlens_q): continuous batching, where one call serves prefill chunks
and decoding steps of several sequences at once, each batch element b with its own L_b query rows (and as many new
positions), against its own cache, contiguous or paged.

Checked against the float64 reference of test_kvcache.py per batch element, within 2x the error of PyTorch's way in
the same dtype; the caches after the call bit for bit; the log-sum-exp laid out as the query, (total_q, Hq); a
serving loop that mixes prefills and decoding steps against one causal attention per sequence; the packed call
against the same op called per batch element with rotary embedding; torch.compile / opcheck; the errors."""
import pytest
import torch

import attention_ext
from conftest import cuda_marks, dtype_id, emu_marks
from emu import backend_ops
from reference import ABS_FLOOR, assert_close_vs_baselines
from test_kvcache import pytorch_baseline, reference, shuffled_pages

f32, f16, bf16, f64 = torch.float32, torch.float16, torch.bfloat16, torch.float64

# name: (Hq, Hkv, E, Ev, S_max, cache_seqlens, L_b, new keys, options); paged caches hold the positions in shuffled
# pages of `page` rows
CASES = {
    # decoding steps (L_b = 1), a prefill chunk of 7 on an empty cache, a sequence idle this step (L_b = 0), and a
    # chunk of 3; GQA, causal, pages of 16
    "mixed-paged16": (8, 2, 64, 64, 320, [30, 0, 12, 250], [1, 7, 0, 3], True, dict(is_causal=True, page=16)),
    # a sliding window, ALiBi per (batch, head), a soft cap; MQA, contiguous caches, one empty
    "window-alibi-cap": (4, 1, 32, 48, 256, [100, 7, 0], [5, 1, 9], True,
                         dict(is_causal=True, window=(20, -1), alibi=True, cap=5.0)),
    # queries without new keys, not causal: every query sees its whole cache (one cache empty: output 0, lse -inf)
    "no-new-keys": (2, 2, 16, 16, 64, [40, 1, 0], [3, 2, 2], False, dict(scale=0.3)),
}
BACKEND_DTYPES = (
    [pytest.param("cpu", dt, id=f"cpu-{dtype_id(dt)}") for dt in (f32, bf16, f64)]
    + [pytest.param("emu80", dt, id=f"emu80-{dtype_id(dt)}", marks=emu_marks()) for dt in (f32, bf16, f64)]
    + [pytest.param("emu90", dt, id=f"emu90-{dtype_id(dt)}", marks=emu_marks()) for dt in (f16,)]
    + [pytest.param("cuda", dt, id=f"cuda-{dtype_id(dt)}", marks=cuda_marks()) for dt in (f32, f16, bf16)]
)


def make_packed(case, dtype, device, seed):
    """(args of the op, batch elements' (query (1, Hq, L_b, E), positions (K, V)) in float64 as the dtype rounds
    them, ALiBi slopes, options). Caches filled with random values everywhere (never zeros)."""
    Hq, Hkv, E, Ev, Smax, lens, Lb, new, o = CASES[case]
    B, T = len(lens), sum(Lb)
    g = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g, dtype=f64).to(dtype)  # noqa: E731
    q, key, value = rn(T, Hq, E), rn(T, Hkv, E), rn(T, Hkv, Ev)
    kc, vc = rn(B, Hkv, Smax, E), rn(B, Hkv, Smax, Ev)
    table = None
    caches = (kc, vc)
    if "page" in o:
        *caches, table = shuffled_pages(kc, vc, o["page"], g, rn)
    alibi = (torch.rand(B, Hq, generator=g) * 0.5 + 0.05).to(f32) if o.get("alibi") else None
    cu = torch.tensor([0] + torch.tensor(Lb).cumsum(0).tolist(), dtype=torch.int32)
    seqs = []
    for b in range(B):
        r = slice(int(cu[b]), int(cu[b + 1]))
        kk, vv = kc[b, :, :lens[b]].to(f64), vc[b, :, :lens[b]].to(f64)
        if new:
            kk = torch.cat([kk, key[r].transpose(0, 1).to(f64)], 1)
            vv = torch.cat([vv, value[r].transpose(0, 1).to(f64)], 1)
        seqs.append((q[r].transpose(0, 1)[None].to(f64), (kk, vv)))
    dev = lambda t: None if t is None else t.to(device)  # noqa: E731
    args = [dev(q), dev(caches[0]), dev(caches[1]), torch.tensor(lens, dtype=torch.int32, device=device),
            dev(key) if new else None, dev(value) if new else None, dev(table), dev(cu)]
    return args, seqs, alibi, o


def expected_caches(args):
    """The caches as the call must leave them: packed row t of batch element b written at cache_seqlens[b] + its
    index in b (through the pages)."""
    q, kc, vc, lens, key, value, table, cu = (a.cpu() if isinstance(a, torch.Tensor) else a for a in args)
    kc, vc = kc.clone(), vc.clone()
    if key is None:
        return kc, vc
    P = kc.shape[2]
    for b in range(len(lens)):
        for t in range(int(cu[b]), int(cu[b + 1])):
            pos = int(lens[b]) + t - int(cu[b])
            if table is None:
                kc[b, :, pos], vc[b, :, pos] = key[t], value[t]
            else:
                page = int(table[b, pos // P])
                kc[page, :, pos % P], vc[page, :, pos % P] = key[t], value[t]
    return kc, vc


def _call(ops, args, alibi, o, **kw):
    q, kc, vc, lens, key, value, table, cu = args
    a = None if alibi is None else alibi.to(q.device)
    return ops.attention_kvcache(q, kc, vc, lens, key, value, table, o.get("is_causal", False), o.get("scale"),
                                 list(o.get("window", (-1, -1))), o.get("cap", 0.0), a, cu_seqlens_q=cu, **kw)


def check_vs_reference(name, out, lse, seqs, alibi, o, dtype):
    """out (total_q, Hq, Ev) and lse (total_q, Hq) against the float64 reference of each batch element, within 2x
    PyTorch's error in the same dtype."""
    refs = [reference(qb, [rows], None if alibi is None else alibi[b:b + 1], o) for b, (qb, rows) in enumerate(seqs)]
    r_out = torch.cat([r[0][0].transpose(0, 1) for r in refs])
    r_lse = torch.cat([r[1][0].transpose(0, 1) for r in refs])
    base = torch.cat([pytorch_baseline(qb.to(dtype), [rows], None if alibi is None else alibi[b:b + 1], o,
                                       dtype)[0].transpose(0, 1) for b, (qb, rows) in enumerate(seqs)])
    assert_close_vs_baselines(f"out ({name})", out.cpu(), r_out, [base], dtype)
    floor = 4 * ABS_FLOOR[f32] * (1 + 3 * (dtype != f64))
    assert_close_vs_baselines(f"lse ({name})", lse.cpu(), r_lse, [], dtype, floor=floor)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
def test_packed_vs_reference(backend, dtype, case, monkeypatch):
    """Output (total_q, Hq, Ev) and log-sum-exp (total_q, Hq) against the float64 reference of each batch element
    (within 2x PyTorch's error in the same dtype), the caches bit for bit, and the kernel the log names: one fused
    call over every batch element (float64 on CUDA: the gathered path per batch element)."""
    device = "cuda" if backend == "cuda" else "cpu"
    ops = backend_ops(backend, monkeypatch)
    args, seqs, alibi, o = make_packed(case, dtype, device, seed=len(case) * 5 + len(backend))
    want_k, want_v = expected_caches(args)
    with attention_ext.debug.kernel_log() as lines:
        out, lse = _call(ops, args, alibi, o, max_seqlen_q=max(CASES[case][6]))
    assert torch.equal(args[1].cpu(), want_k) and torch.equal(args[2].cpu(), want_v), "the caches after the call"
    T, Hq = args[0].shape[:2]
    assert out.shape == (T, Hq, CASES[case][3]) and lse.shape == (T, Hq), (out.shape, lse.shape)
    assert lse.dtype == (f64 if dtype == f64 else f32)
    check_vs_reference(f"{backend}, {case}", out, lse, seqs, alibi, o, dtype)
    if backend == "cpu":
        assert len(lines) == 1 and "batch elements of packed queries" in lines[0], lines
    elif dtype == f64:
        assert "the cache gathered" in lines[0], lines
    else:
        assert len(lines) == 1 and "sm80" in lines[0] and "packed queries in one launch" in lines[0], lines
    assert ("paged" in lines[0]) == ("page" in o) or dtype == f64, lines


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", [pytest.param("emu80", marks=emu_marks())])
def test_packed_split_keys(backend, case, monkeypatch):
    """Packed queries with the CUDA cache kernel's key tiles shared among 3 CTAs per query block (flash-decoding,
    ATTENTION_EXT_FWD_SPLITS): the shares are laid out as batch elements padded to the longest L_b, and the merge
    writes each batch element's rows and lse block where the packed layout puts them (idle and empty batch
    elements included) -- the reference's output and lse, in bf16 and f32."""
    ops = backend_ops(backend, monkeypatch)
    monkeypatch.setenv("ATTENTION_EXT_FWD_SPLITS", "3")
    for dtype in (bf16, f32):
        args, seqs, alibi, o = make_packed(case, dtype, "cpu", seed=17)
        want_k, want_v = expected_caches(args)
        with attention_ext.debug.kernel_log() as lines:
            out, lse = _call(ops, args, alibi, o)
        assert len(lines) == 1 and "packed queries in one launch" in lines[0], lines
        assert "keys split 3 ways" in lines[0], lines
        assert torch.equal(args[1], want_k) and torch.equal(args[2], want_v), "the caches after the call"
        check_vs_reference(f"{backend}, {case}, split keys", out, lse, seqs, alibi, o, dtype)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("backend", ["cpu", pytest.param("emu80", marks=emu_marks())])
def test_packed_rotary_matches_per_batch_calls(backend, causal, monkeypatch):
    """With rotary embedding (GPT-NeoX pairs on 16 of 32 features; causal: each row at its own position, else every
    query at cache_seqlens[b], FlashAttention's rule) the packed call equals the op called per batch element on its rows (whose rotary is checked against the reference in
    test_kvcache.py), caches included."""
    ops = backend_ops(backend, monkeypatch)
    args, seqs, alibi, o = make_packed("mixed-paged16", f32, "cpu", seed=3)
    g = torch.Generator().manual_seed(4)
    cos, sin = torch.rand(400, 16, generator=g), torch.rand(400, 16, generator=g)
    q, kc, vc, lens, key, value, table, cu = args
    kc2, vc2 = kc.clone(), vc.clone()
    out, lse = ops.attention_kvcache(q, kc, vc, lens, key, value, table, causal, None, [-1, -1], 0.0, None, cos,
                                     sin, False, cu)
    for b in range(len(lens)):
        r = slice(int(cu[b]), int(cu[b + 1]))
        if r.start == r.stop:
            continue
        ob, lb = ops.attention_kvcache(q[r].transpose(0, 1)[None], kc2, vc2, lens[b:b + 1],
                                       key[r].transpose(0, 1)[None], value[r].transpose(0, 1)[None], table[b:b + 1],
                                       causal, None, [-1, -1], 0.0, None, cos, sin, False)
        torch.testing.assert_close(out[r], ob[0].transpose(0, 1), rtol=0, atol=1e-6)
        torch.testing.assert_close(lse[r], lb[0].transpose(0, 1), rtol=0, atol=1e-6)
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)


@pytest.mark.parametrize("backend,dtype", [("cpu", f32), pytest.param("emu80", f32, marks=emu_marks()),
                                           pytest.param("emu80", f64, marks=emu_marks())])
def test_packed_alibi_slopes_shapes(backend, dtype, monkeypatch):
    """ALiBi slopes of shape (Hq,) or (1, Hq), which stand for every batch element, give what the same slopes
    expanded to (B, Hq) give (the float64 path on CUDA runs a packed call batch element by batch element)."""
    ops = backend_ops(backend, monkeypatch)
    args, _, _, o = make_packed("window-alibi-cap", dtype, "cpu", seed=6)
    slopes = torch.rand(args[0].shape[1], generator=torch.Generator().manual_seed(7)) * 0.5 + 0.05
    outs = []
    for a in (slopes, slopes[None], slopes.expand(len(args[3]), -1).contiguous()):
        call = [t.clone() if isinstance(t, torch.Tensor) else t for t in args]  # (each call writes its caches)
        outs.append(_call(ops, call, a, o))
    for out, lse in outs[:2]:
        torch.testing.assert_close(out, outs[2][0], rtol=0, atol=0)
        torch.testing.assert_close(lse, outs[2][1], rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["cpu", pytest.param("emu80", marks=emu_marks())])
def test_serving_loop_matches_causal_attention(backend, monkeypatch):
    """A continuous-batching loop: three sequences of 23, 9 and 30 tokens (prompts of 13, 5 and 17) arrive at
    different steps; their prompts are prefilled in chunks of up to 8 tokens while the others decode one token per
    step, all in packed calls against one pool of shuffled pages (the caches written by the op). Each sequence's outputs equal one causal attention
    over its whole sequence (float32: the emulator's float32 kernels are exact-float32, 1e-5)."""
    ops = backend_ops(backend, monkeypatch)
    g = torch.Generator().manual_seed(12)
    Hq, Hkv, E, P = 4, 2, 32, 8
    total = [23, 9, 30]
    prompt = [13, 5, 17]
    arrive = [0, 2, 3]  # the step at which each sequence arrives
    seqs = [tuple(torch.randn(h, n, E, generator=g) for h in (Hq, Hkv, Hkv)) for n in total]
    per = 4
    kp = torch.randn(len(total) * per + 2, Hkv, P, E, generator=g)
    vp = torch.randn_like(kp)
    table = torch.randperm(kp.shape[0], generator=g)[: len(total) * per].view(len(total), per).to(torch.int32)
    done = [0, 0, 0]
    got = [[] for _ in total]
    step = 0
    while any(d < n for d, n in zip(done, total)):
        take = [0 if step < a or d >= n else (min(8, p - d) if d < p else 1)
                for a, d, n, p in zip(arrive, done, total, prompt)]
        cu = torch.tensor([0] + torch.tensor(take).cumsum(0).tolist(), dtype=torch.int32)
        rows = lambda i: torch.cat([s[i][:, d:d + t].transpose(0, 1)  # noqa: E731
                                    for s, d, t in zip(seqs, done, take)])
        out = ops.attention_kvcache(rows(0), kp, vp, torch.tensor(done, dtype=torch.int32), rows(1), rows(2), table,
                                    True, cu_seqlens_q=cu)[0]
        for b in range(len(total)):
            got[b].append(out[int(cu[b]):int(cu[b + 1])])
        done = [d + t for d, t in zip(done, take)]
        step += 1
    for b, (q, k, v) in enumerate(seqs):
        want = attention_ext.attention(q[None].double(), k[None].double(), v[None].double(), is_causal=True,
                                       enable_gqa=True)[0]
        torch.testing.assert_close(torch.cat(got[b]).transpose(0, 1).double(), want, rtol=0, atol=1e-5)


def test_packed_compile_and_opcheck():
    """Under torch.compile (fullgraph) a packed step writes the caches and returns the eager result; opcheck passes
    (contiguous with new keys, paged without)."""
    g = torch.Generator().manual_seed(13)
    cu = torch.tensor([0, 1, 4, 4, 6], dtype=torch.int32)
    q = torch.randn(6, 4, 32, generator=g)
    k1, v1 = (torch.randn(6, 2, 32, generator=g) for _ in range(2))
    kc, vc = (torch.randn(4, 2, 40, 32, generator=g) for _ in range(2))
    lens = torch.tensor([3, 30, 0, 7], dtype=torch.int32)

    def step(q, kc, vc, lens, k1, v1, cu):
        return attention_ext.attention_kvcache(q, kc, vc, lens, k1, v1, is_causal=True, cu_seqlens_q=cu,
                                               return_lse=True)

    kc_e, vc_e = kc.clone(), vc.clone()
    want = step(q, kc_e, vc_e, lens, k1, v1, cu)
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(q, kc, vc, lens, k1, v1, cu)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.equal(kc, kc_e) and torch.equal(vc, vc_e)
    op = torch.ops.attention_ext.attention_kvcache.default
    torch.library.opcheck(op, (q, kc.clone(), vc.clone(), lens, k1, v1), dict(is_causal=True, cu_seqlens_q=cu))
    table = torch.tensor([[1, 0], [3, 2], [5, 4], [7, 6]], dtype=torch.int32)
    kp, vp = (torch.randn(8, 2, 16, 32, generator=g) for _ in range(2))
    torch.library.opcheck(op, (q, kp, vp, lens), dict(block_table=table, cu_seqlens_q=cu, max_seqlen_q=3))


def _inputs():
    g = torch.Generator().manual_seed(14)
    q = torch.randn(5, 4, 16, generator=g)
    kc, vc = (torch.randn(2, 2, 32, 16, generator=g) for _ in range(2))
    kn, vn = (torch.randn(5, 2, 16, generator=g) for _ in range(2))
    return q, kc, vc, torch.tensor([3, 5], dtype=torch.int32), kn, vn, torch.tensor([0, 2, 5], dtype=torch.int32)


# name: (args from _inputs' (q, kc, vc, lens, key, value, cu) -> (args, max_seqlen_q), error, message)
ERRORS = {
    "cu-dtype": (lambda q, kc, vc, sl, kn, vn, cu: ((q, kc, vc, sl, kn, vn, cu.long()), None), TypeError,
                 "cu_seqlens_q must be int32"),
    "cu-shape": (lambda q, kc, vc, sl, kn, vn, cu: ((q, kc, vc, sl, kn, vn, cu[None]), None), ValueError,
                 "cu_seqlens_q must be \\(batch \\+ 1,\\)"),
    "cu-batch": (lambda q, kc, vc, sl, kn, vn, cu: ((q, kc, vc, sl, kn, vn, cu[:2]), None), ValueError,
                 "cache_seqlens must have shape \\(batch,\\) = \\(1,\\)"),
    "query-4d": (lambda q, kc, vc, sl, kn, vn, cu: ((q[None], kc, vc, sl, kn, vn, cu), None), ValueError,
                 "query must be \\(total_q, heads, E\\) with cu_seqlens_q"),
    "key-rows": (lambda q, kc, vc, sl, kn, vn, cu: ((q, kc, vc, sl, kn[:4], vn[:4], cu), None), ValueError,
                 "key and value must be \\(total_q, heads_kv, E\\)"),
    "max-without-cu": (lambda q, kc, vc, sl, kn, vn, cu: ((q[:2, :, None], kc, vc, sl, kn[:2, :, None],
                                                           vn[:2, :, None], None), 3),
                       ValueError, "max_seqlen_q goes with cu_seqlens_q"),
    "cu-start": (lambda q, kc, vc, sl, kn, vn, cu: ((q, kc, vc, sl, kn, vn, cu + 1), None), ValueError,
                 "cu_seqlens_q must run from 0 to total_q = 5"),
    "cu-order": (lambda q, kc, vc, sl, kn, vn, cu: ((q, kc, vc, sl, kn, vn, torch.tensor([0, 6, 5],
                 dtype=torch.int32)), None), ValueError, "cu_seqlens_q must be non-decreasing"),
    "max-negative": (lambda q, kc, vc, sl, kn, vn, cu: ((q, kc, vc, sl, kn, vn, cu), -2), ValueError,
                     "max_seqlen_q must be >= 0 \\(or None\\), got -2"),
    "max-too-small": (lambda q, kc, vc, sl, kn, vn, cu: ((q, kc, vc, sl, kn, vn, cu), 2), ValueError,
                      "max_seqlen_q = 2 but batch element 1 has 3 query rows"),
    "capacity": (lambda q, kc, vc, sl, kn, vn, cu: ((q, kc, vc, sl + 27, kn, vn, cu), None), ValueError,
                 "cache_seqlens\\[1\\] = 32 plus the 3 new positions of key exceeds"),
}
VALUE_ERRORS = ("cu-start", "cu-order", "max-too-small", "capacity")


@pytest.mark.parametrize("name", list(ERRORS))
@pytest.mark.parametrize("backend", ["cpu", pytest.param("emu80", marks=emu_marks())])
def test_packed_errors(name, backend, monkeypatch):
    """Each bad argument of a packed call raises the error that names it, through the op on the backend and
    (errors of shapes and dtypes) through its Meta kernel, and leaves the caches untouched."""
    ops = backend_ops(backend, monkeypatch)
    make, exc, msg = ERRORS[name]
    (q, kc, vc, sl, kn, vn, cu), max_q = make(*_inputs())
    before = [kc.clone(), vc.clone()]
    with pytest.raises(exc, match=msg):
        ops.attention_kvcache(q, kc, vc, sl, kn, vn, cu_seqlens_q=cu, max_seqlen_q=max_q)
    assert torch.equal(kc, before[0]) and torch.equal(vc, before[1]), "the caches were written before the error"
    if backend == "cpu" and name not in VALUE_ERRORS:
        meta = [None if t is None else t.to("meta") for t in (q, kc, vc, sl, kn, vn, cu)]
        with pytest.raises(exc, match=msg):
            torch.ops.attention_ext.attention_kvcache(*meta[:6], cu_seqlens_q=meta[6], max_seqlen_q=max_q)


@pytest.mark.parametrize("backend", [pytest.param("cuda", marks=cuda_marks())])
def test_packed_cuda_graph(backend):
    """A packed step (a chunk and two decoding rows) captured in a CUDA graph with max_seqlen_q (no sync under
    capture) replays to the eager result, writing the caches."""
    g = torch.Generator().manual_seed(15)
    cu = torch.tensor([0, 1, 6, 7], dtype=torch.int32, device="cuda")
    q = torch.randn(7, 8, 64, generator=g).cuda().half()
    k1, v1 = (torch.randn(7, 2, 64, generator=g).cuda().half() for _ in range(2))
    kc, vc = (torch.randn(3, 2, 256, 64, generator=g).cuda().half() for _ in range(2))
    lens = torch.tensor([10, 0, 200], dtype=torch.int32, device="cuda")
    kw = dict(is_causal=True, cu_seqlens_q=cu, max_seqlen_q=5)
    kc_e, vc_e = kc.clone(), vc.clone()
    want = attention_ext.attention_kvcache(q, kc_e, vc_e, lens, k1, v1, **kw)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        attention_ext.attention_kvcache(q, kc.clone(), vc.clone(), lens, k1, v1, **kw)  # warm-up
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attention_ext.attention_kvcache(q, kc, vc, lens, k1, v1, **kw)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert torch.equal(kc, kc_e) and torch.equal(vc, vc_e)


@pytest.mark.parametrize("backend", [pytest.param("cuda", marks=cuda_marks())])
def test_packed_float64_capture_refused(backend):
    """float64 packed calls on CUDA run batch element by batch element from lengths read back, which CUDA-graph
    capture cannot do: capturing one raises (before anything is captured) instead of hanging or failing later."""
    cu = torch.tensor([0, 1, 3], dtype=torch.int32, device="cuda")
    q = torch.randn(3, 2, 16, device="cuda", dtype=f64)
    kc, vc = (torch.randn(2, 2, 8, 16, device="cuda", dtype=f64) for _ in range(2))
    lens = torch.tensor([2, 4], dtype=torch.int32, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        with torch.cuda.graph(graph):
            attention_ext.attention_kvcache(q, kc, vc, lens, cu_seqlens_q=cu)
