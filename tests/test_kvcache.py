"""attention_kvcache: new queries against a key / value cache (FlashAttention's flash_attn_with_kvcache in the
(batch, heads, seq, dim) layout), contiguous or paged (block_table), with new keys appended in place, per-batch
cache lengths, any GQA group, and causal / window / ALiBi bottom-right aligned (query i at position i + S_b - L).

The CPU kernel reads the cache in place (pages included); the CUDA backend (here its emulator, the same glue and
kernels) runs the sm80 forward's cache variant on it in place (pages of any size, ALiBi), and for float64 gathers
the visible cache into one fused call with a mask. Checked against a float64 reference written
here, within 2x the error of PyTorch's way in the same dtype (SDPA over each batch element's gathered keys with
the bias as a mask, or the eager formula with a soft cap); the caches after the call bit for bit; a prefill
followed by decoding steps against one causal attention over the whole sequence; torch.compile, opcheck and the
errors."""
import math

import pytest
import torch
import torch.nn.functional as F

import attention_ext
from conftest import cuda_marks, dtype_id, emu_marks
from emu import backend_ops
from reference import ABS_FLOOR, assert_close_vs_baselines

f32, f16, bf16, f64 = torch.float32, torch.float16, torch.bfloat16, torch.float64

# name: (B, Hq, Hkv, L, L_new, E, Ev, S_max, cache_seqlens, options); paged caches hold the same positions in
# shuffled pages of `page` rows
CASES = {
    # one decoding step of a GQA model: one query, one new key, very different lengths (one empty cache)
    "decode-gqa": (3, 8, 2, 1, 1, 64, 64, 300, [17, 250, 0], dict(is_causal=True)),
    # the same, paged (16 positions a page: the CPU's and CUDA's key tiles span pages)
    "decode-paged16": (3, 8, 2, 1, 1, 64, 64, 320, [17, 250, 0], dict(is_causal=True, page=16)),
    # a chunk of 7 queries and new keys, paged by 128 (pages of whole key tiles), a window
    "chunk-paged128-window": (2, 4, 2, 7, 7, 64, 32, 256, [130, 3], dict(is_causal=True, window=(70, -1), page=128)),
    # a chunk of 9 queries and new keys, head dim 128, pages of 24 (key tiles of 32 or 64 cross page ends mid-tile)
    "chunk-paged24": (2, 4, 2, 9, 9, 128, 128, 240, [100, 31], dict(is_causal=True, page=24)),
    # a chunk of 5 queries and 5 new keys, a sliding window, ALiBi per (batch, head), a soft cap; MQA, paged by 32
    "chunk-window-alibi-cap": (2, 4, 1, 5, 5, 32, 48, 256, [100, 7],
                               dict(is_causal=True, window=(20, -1), alibi=True, cap=5.0, page=32)),
    # queries without new keys, not causal, the cache a (B, S, H, E) buffer seen through transpose(1, 2);
    # one batch element with nothing cached (output 0, lse -inf)
    "no-new-keys-strided": (3, 2, 2, 3, 0, 16, 16, 64, [40, 1, 0], dict(bshd=True, scale=0.3)),
    # more queries than positions: causal rows before the first position see nothing
    "L-gt-S": (2, 2, 2, 4, 2, 16, 16, 8, [1, 5], dict(is_causal=True)),
    # decoding steps whose GQA query heads stay one CTA each on CUDA (not packed into rows as in decode-gqa): a
    # sliding window; ALiBi with MQA, not causal
    "decode-gqa-window": (2, 8, 2, 1, 1, 64, 64, 192, [150, 9], dict(is_causal=True, window=(40, -1))),
    "decode-mqa-alibi": (2, 4, 1, 1, 1, 32, 32, 128, [100, 3], dict(alibi=True)),
}


def gqa_packed(case):
    """Whether the CUDA glue runs the case's query heads as rows of their key / value head (one query row per batch
    element, a GQA group, no left window bound, no ALiBi)."""
    B, Hq, Hkv, L, Ln, E, Ev, Smax, lens, o = CASES[case]
    return L == 1 and Hq > Hkv and o.get("window", (-1, -1))[0] < 0 and not o.get("alibi")
BACKEND_DTYPES = (
    [pytest.param("cpu", dt, id=f"cpu-{dtype_id(dt)}") for dt in (f32, bf16, f16, f64)]
    + [pytest.param("emu80", dt, id=f"emu80-{dtype_id(dt)}", marks=emu_marks()) for dt in (f32, bf16, f64)]
    + [pytest.param("emu90", dt, id=f"emu90-{dtype_id(dt)}", marks=emu_marks()) for dt in (f16,)]
    + [pytest.param("cuda", dt, id=f"cuda-{dtype_id(dt)}", marks=cuda_marks()) for dt in (f32, f16, bf16)]
)


def shuffled_pages(kc, vc, P, g, rn):
    """The positions of contiguous caches kc / vc (B, Hkv, S_max, E / Ev) in shuffled pages of P rows, plus 3 spare
    pages of rn's random values (never zeros): (key pages, value pages, the int32 block table (B, S_max // P))."""
    B, Hkv, Smax, E = kc.shape
    per = Smax // P
    npages = B * per + 3
    perm = torch.randperm(npages, generator=g)[: B * per].view(B, per)
    kp, vp = rn(npages, Hkv, P, E), rn(npages, Hkv, P, vc.shape[-1])
    for b in range(B):
        for i in range(per):
            kp[perm[b, i]] = kc[b, :, i * P:(i + 1) * P]
            vp[perm[b, i]] = vc[b, :, i * P:(i + 1) * P]
    return kp, vp, perm.to(torch.int32)


def make_inputs(case, dtype, device, seed):
    """(args of the op, positions (B lists of (K, V) rows before the call) for the reference, options). The cache
    is filled with random values everywhere (never zeros: rows past the lengths must not leak into the result)."""
    B, Hq, Hkv, L, Ln, E, Ev, Smax, lens, o = CASES[case]
    g = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g, dtype=f64)  # noqa: E731
    q = rn(B, Hq, L, E)
    kc, vc = rn(B, Hkv, Smax, E), rn(B, Hkv, Smax, Ev)
    key = rn(B, Hkv, Ln, E) if Ln else None
    value = rn(B, Hkv, Ln, Ev) if Ln else None
    table = None
    if "page" in o:  # the same positions in shuffled pages, plus spare pages
        *caches, table = shuffled_pages(kc, vc, o["page"], g, rn)
    elif o.get("bshd"):  # (B, S, H, E) memory, seen as (B, H, S, E)
        caches = (kc.transpose(1, 2).contiguous().transpose(1, 2), vc.transpose(1, 2).contiguous().transpose(1, 2))
    else:
        caches = (kc, vc)
    alibi = None
    if o.get("alibi"):
        alibi = (torch.rand(B, Hq, generator=g) * 0.5 + 0.05).to(f32)
    conv = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    kc_d, vc_d = caches[0].to(dtype).to(device), caches[1].to(dtype).to(device)
    if o.get("bshd"):
        kc_d = kc_d.transpose(1, 2).contiguous().transpose(1, 2)
        vc_d = vc_d.transpose(1, 2).contiguous().transpose(1, 2)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    args = [conv(q), kc_d, vc_d, seqlens, conv(key), conv(value), None if table is None else table.to(device)]
    # the positions each batch element attends to, as the dtype rounds them
    rows = []
    for b in range(B):
        kk = kc[b, :, :lens[b]].to(dtype).to(f64)
        vv = vc[b, :, :lens[b]].to(dtype).to(f64)
        if Ln:
            kk = torch.cat([kk, key[b].to(dtype).to(f64)], 1)
            vv = torch.cat([vv, value[b].to(dtype).to(f64)], 1)
        rows.append((kk, vv))
    return args, rows, alibi, o


def bias_and_visibility(L, S, o, slopes_b):
    """The float64 ALiBi bias (Hq or 1, L, S) and the boolean visibility (L, S) of a batch element with S
    positions, the queries the last L of them."""
    i = torch.arange(L, dtype=f64)[:, None] + S - L
    j = torch.arange(S, dtype=f64)[None, :]
    vis = torch.ones(L, S, dtype=torch.bool)
    if o.get("is_causal"):
        vis &= j <= i
    wl, wr = o.get("window", (-1, -1))
    if wl >= 0:
        vis &= j >= i - wl
    if wr >= 0:
        vis &= j <= i + wr
    bias = torch.zeros(1, L, S, dtype=f64)
    if slopes_b is not None:
        bias = -slopes_b.to(f64)[:, None, None] * (i - j).abs()
    return bias, vis


def reference(q, rows, alibi, o):
    """float64 (out, lse) per batch element; rows that see nothing give 0 and -inf."""
    B, Hq, L, _ = q.shape
    Ev = rows[0][1].shape[-1]
    out = torch.zeros(B, Hq, L, Ev, dtype=f64)
    lse = torch.full((B, Hq, L), -math.inf, dtype=f64)
    scale = o.get("scale", q.shape[-1] ** -0.5)
    cap = o.get("cap", 0.0)
    for b, (kk, vv) in enumerate(rows):
        S = kk.shape[1]
        if S == 0:
            continue
        G = Hq // kk.shape[0]
        kk, vv = kk.repeat_interleave(G, 0), vv.repeat_interleave(G, 0)
        s = q[b].to(f64) @ kk.transpose(-1, -2) * scale
        if cap > 0:
            s = cap * torch.tanh(s / cap)
        bias, vis = bias_and_visibility(L, S, o, None if alibi is None else alibi[b])
        s = (s + bias).masked_fill(~vis, -math.inf)
        seen = vis.any(-1)
        s0 = torch.where(seen[:, None], s, torch.zeros((), dtype=f64))
        out[b] = torch.softmax(s0, -1) @ vv * seen[:, None]
        lse[b] = torch.where(seen, torch.logsumexp(s0, -1), torch.full((), -math.inf, dtype=f64))
    return out, lse


def pytorch_baseline(q, rows, alibi, o, dtype):
    """PyTorch's way in the dtype on the CPU, per batch element: SDPA over the gathered positions with the bias and
    the visibility as its mask; with a soft cap the eager formula (scores in the dtype, softmax in float32)."""
    q = q.cpu()
    B, Hq, L, _ = q.shape
    out = torch.zeros(B, Hq, L, rows[0][1].shape[-1], dtype=dtype)
    scale = o.get("scale")
    cap = o.get("cap", 0.0)
    for b, (kk, vv) in enumerate(rows):
        S = kk.shape[1]
        if S == 0:
            continue
        kk, vv = kk.to(dtype), vv.to(dtype)
        bias, vis = bias_and_visibility(L, S, o, None if alibi is None else alibi[b])
        mask = bias.to(dtype).masked_fill(~vis, -math.inf)
        if cap > 0:
            G = Hq // kk.shape[0]
            s = q[b] @ kk.repeat_interleave(G, 0).transpose(-1, -2) * (scale or q.shape[-1] ** -0.5)
            s = torch.tanh(s / cap) * cap + mask
            w = torch.softmax(s, -1, dtype=f32).nan_to_num(0.0).to(dtype)
            out[b] = w @ vv.repeat_interleave(G, 0)
        else:
            out[b] = F.scaled_dot_product_attention(q[b], kk, vv, attn_mask=mask, scale=scale,
                                                    enable_gqa=True).nan_to_num(0.0)
    return out


def expected_caches(args, case):
    """The caches as the call must leave them: the new rows written at cache_seqlens[b] + t (through the pages),
    every other element unchanged."""
    q, kc, vc, lens, key, value, table = args
    kc, vc = kc.clone(), vc.clone()
    if key is None:
        return kc, vc
    P = kc.shape[2]
    for b in range(q.shape[0]):
        for t in range(key.shape[2]):
            pos = int(lens[b]) + t
            if table is None:
                kc[b, :, pos], vc[b, :, pos] = key[b, :, t], value[b, :, t]
            else:
                page = int(table[b, pos // P])
                kc[page, :, pos % P], vc[page, :, pos % P] = key[b, :, t], value[b, :, t]
    return kc, vc


def _call(ops, args, alibi, o):
    q, kc, vc, lens, key, value, table = args
    a = None if alibi is None else alibi.to(q.device)
    return ops.attention_kvcache(q, kc, vc, lens, key, value, table, o.get("is_causal", False), o.get("scale"),
                                 list(o.get("window", (-1, -1))), o.get("cap", 0.0), a)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
def test_kvcache_vs_reference(backend, dtype, case, monkeypatch):
    """Output and log-sum-exp against the float64 reference (within 2x PyTorch's error in the same dtype), the
    caches after the call bit for bit, and the kernel the log names."""
    device = "cuda" if backend == "cuda" else "cpu"
    ops = backend_ops(backend, monkeypatch)
    args, rows, alibi, o = make_inputs(case, dtype, device, seed=len(case) * 7 + len(backend))
    want_k, want_v = expected_caches(args, case)
    with attention_ext.debug.kernel_log() as lines:
        out, lse = _call(ops, args, alibi, o)
    assert torch.equal(args[1], want_k) and torch.equal(args[2], want_v), "the caches after the call"
    r_out, r_lse = reference(args[0].cpu(), rows, alibi, o)
    base = pytorch_baseline(args[0].cpu(), rows, alibi, o, dtype)
    assert_close_vs_baselines(f"out ({backend}, {case})", out.cpu(), r_out, [base], dtype)
    assert lse.dtype == (f64 if dtype == f64 else f32)
    floor = 4 * ABS_FLOOR[f32] * (1 + 3 * (dtype != f64))
    assert_close_vs_baselines(f"lse ({backend}, {case})", lse.cpu(), r_lse, [], dtype, floor=floor)
    if backend == "cpu":
        assert len(lines) == 1 and lines[0].startswith("cpu kvcache forward: flash kernel"), lines
        assert ("paged" in lines[0]) == ("page" in o), lines
    else:  # the sm80 kernel on the cache in place, but for float64
        gathered = dtype == f64
        assert ("the cache gathered" in lines[0]) == gathered, lines
        if not gathered:
            assert len(lines) == 1 and "sm80" in lines[0] and "batch elements in one launch" in lines[0], lines
            assert ("paged" in lines[0]) == ("page" in o), lines
            G = CASES[case][1] // CASES[case][2]
            assert (f"GQA heads packed {G} per CTA" in lines[0]) == gqa_packed(case), lines


@pytest.mark.parametrize("case", ["decode-gqa", "chunk-paged128-window", "decode-paged16", "chunk-window-alibi-cap",
                                  "decode-gqa-window"])
@pytest.mark.parametrize("backend", [pytest.param("emu80", marks=emu_marks())])
def test_kvcache_split_keys(backend, case, monkeypatch):
    """The CUDA cache kernel with its key tiles shared among 3 CTAs per query block (flash-decoding,
    ATTENTION_EXT_FWD_SPLITS) and merged: the reference's output and log-sum-exp, every batch element with its own
    number of tiles (an empty cache too); decoding steps with their GQA heads packed into rows (decode-gqa,
    decode-paged16) or not."""
    ops = backend_ops(backend, monkeypatch)
    monkeypatch.setenv("ATTENTION_EXT_FWD_SPLITS", "3")
    args, rows, alibi, o = make_inputs(case, bf16, "cpu", seed=11)
    with attention_ext.debug.kernel_log() as lines:
        out, lse = _call(ops, args, alibi, o)
    assert len(lines) == 1 and "keys split 3 ways" in lines[0], lines
    assert ("GQA heads packed" in lines[0]) == gqa_packed(case), lines
    r_out, r_lse = reference(args[0], rows, alibi, o)
    assert_close_vs_baselines(f"out ({case})", out, r_out, [pytorch_baseline(args[0], rows, alibi, o, bf16)], bf16)
    assert_close_vs_baselines(f"lse ({case})", lse, r_lse, [], bf16, floor=16 * ABS_FLOOR[f32])


@pytest.mark.parametrize("pack", ["1", "0"])
@pytest.mark.parametrize("backend", [pytest.param("emu80", marks=emu_marks())])
def test_kvcache_gqa_decode_packing_switch(backend, pack, monkeypatch):
    """ATTENTION_EXT_PACK_GQA=0 keeps a GQA decoding step one CTA per query head on CUDA, as for dense calls; both
    ways match the reference (fp16, paged by 16, one empty cache)."""
    ops = backend_ops(backend, monkeypatch)
    monkeypatch.setenv("ATTENTION_EXT_PACK_GQA", pack)
    args, rows, alibi, o = make_inputs("decode-paged16", f16, "cpu", seed=13)
    with attention_ext.debug.kernel_log() as lines:
        out, lse = _call(ops, args, alibi, o)
    assert len(lines) == 1 and ("GQA heads packed 4 per CTA" in lines[0]) == (pack == "1"), lines
    r_out, r_lse = reference(args[0], rows, alibi, o)
    base = pytorch_baseline(args[0], rows, alibi, o, f16)
    assert_close_vs_baselines("out (decode-paged16)", out, r_out, [base], f16)
    assert_close_vs_baselines("lse (decode-paged16)", lse, r_lse, [], f16, floor=16 * ABS_FLOOR[f32])


def test_kvcache_decode_loop_matches_causal_attention():
    """A prefill of 37 tokens appended to empty paged caches, then 20 decoding steps of one token each (the cache
    written by the op), against one causal attention over the whole 57-token sequence (float64, both fused)."""
    g = torch.Generator().manual_seed(5)
    B, Hq, Hkv, E, P, T, pre = 2, 4, 2, 32, 8, 57, 37
    q, k, v = (torch.randn(B, h, T, E, generator=g, dtype=f64) for h in (Hq, Hkv, Hkv))
    want = attention_ext.attention(q, k, v, is_causal=True, enable_gqa=True)
    kp = torch.randn(20, Hkv, P, E, generator=g, dtype=f64)  # random, not zeros: nothing unwritten may leak
    vp = torch.randn(20, Hkv, P, E, generator=g, dtype=f64)
    table = torch.randperm(20, generator=g)[:16].view(B, 8).to(torch.int32)
    lens = torch.zeros(B, dtype=torch.int32)
    got = [attention_ext.attention_kvcache(q[:, :, :pre], kp, vp, lens, k[:, :, :pre], v[:, :, :pre],
                                           block_table=table, is_causal=True)]
    lens += pre
    for t in range(pre, T):
        got.append(attention_ext.attention_kvcache(q[:, :, t:t + 1], kp, vp, lens, k[:, :, t:t + 1], v[:, :, t:t + 1],
                                                   block_table=table, is_causal=True))
        lens += 1
    torch.testing.assert_close(torch.cat(got, 2), want, rtol=0, atol=1e-12)


def test_kvcache_int_lengths_and_lse_merge():
    """cache_seqlens as an int; return_lse, whose lse merges two halves of the cache into the whole
    (merge_attention), as cascade decoding does."""
    g = torch.Generator().manual_seed(6)
    q = torch.randn(2, 4, 1, 16, generator=g, dtype=f64)
    kc, vc = (torch.randn(2, 4, 64, 16, generator=g, dtype=f64) for _ in range(2))
    whole = attention_ext.attention_kvcache(q, kc, vc, 50)
    o1, l1 = attention_ext.attention_kvcache(q, kc[:, :, :30].contiguous(), vc[:, :, :30].contiguous(), 30,
                                             return_lse=True)
    o2, l2 = attention_ext.attention_kvcache(q, kc[:, :, 30:].contiguous(), vc[:, :, 30:].contiguous(), 20,
                                             return_lse=True)
    merged, _ = attention_ext.merge_attention([o1, o2], [l1, l2])
    torch.testing.assert_close(merged, whole, rtol=0, atol=1e-12)


def _sink_formula(q, rows, alibi, o, sinks, dt):
    """(out, lse) in dtype dt on the CPU, the sink's logit one more column of each row's softmax (gpt-oss's eager
    way): float64 is the reference, the inputs' dtype the yardstick. A row that sees no position: 0, lse = sink."""
    B, Hq, L, _ = q.shape
    outs, lses = [], []
    for b, (kk, vv) in enumerate(rows):
        G = Hq // kk.shape[0]
        kk, vv = kk.to(dt).repeat_interleave(G, 0), vv.to(dt).repeat_interleave(G, 0)
        s = q[b].cpu().to(dt) @ kk.transpose(-1, -2) * o.get("scale", q.shape[-1] ** -0.5)
        if o.get("cap", 0.0) > 0:
            s = o["cap"] * torch.tanh(s / o["cap"])
        bias, vis = bias_and_visibility(L, kk.shape[1], o, None if alibi is None else alibi[b])
        s = (s + bias.to(dt)).masked_fill(~vis, -math.inf)
        z = torch.cat([s, sinks.to(dt)[:, None, None].expand(Hq, L, 1)], -1)
        outs.append(torch.softmax(z, -1)[..., :-1] @ vv)
        lses.append(torch.logsumexp(z, -1))
    return torch.stack(outs), torch.stack(lses)


@pytest.mark.parametrize("case", ["decode-gqa", "chunk-paged128-window", "chunk-window-alibi-cap",
                                  "no-new-keys-strided"])
@pytest.mark.parametrize("device,dtype", [pytest.param("cpu", dt, id=f"cpu-{dtype_id(dt)}") for dt in (f32, bf16, f64)]
                         + [pytest.param("cuda", dt, id=f"cuda-{dtype_id(dt)}", marks=cuda_marks()) for dt in (bf16, f16)])
def test_kvcache_sinks(device, dtype, case):
    """sinks= (gpt-oss's attention sinks on a cache; with a window, paged, ALiBi and a cap too): output, log-sum-exp
    and the gradient reaching the sinks against the float64 formula with the sink as one more softmax column,
    within 2x that formula's error in the same dtype; a cache with nothing to see gives 0 and lse = sink; the
    caches are written as without sinks; a decoding step with packed queries gives the dense rows."""
    args, rows, alibi, o = make_inputs(case, dtype, device, seed=len(case) + 3)
    want_k, want_v = expected_caches(args, case)
    g = torch.Generator().manual_seed(len(case))
    sinks = (2 * torch.randn(args[0].shape[1], generator=g, dtype=f64)).to(device, f64 if dtype == f64 else f32)
    leaf = sinks.clone().requires_grad_()
    q, kc, vc, lens, key, value, table = args
    out, lse = attention_ext.attention_kvcache(
        q, kc, vc, lens, key, value, block_table=table, is_causal=o.get("is_causal", False), scale=o.get("scale"),
        window_size=o.get("window"), softcap=o.get("cap", 0.0), alibi_slopes=None if alibi is None else
        alibi.to(device), sinks=leaf, return_lse=True)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v), "the caches after the call"
    do = torch.randn(out.shape, generator=g, dtype=f64)
    (dsink,) = torch.autograd.grad(out, leaf, do.to(device, dtype))
    r_leaf, b_leaf = sinks.cpu().to(f64).requires_grad_(), sinks.cpu().to(dtype).requires_grad_()
    r_out, r_lse = _sink_formula(q, rows, alibi, o, r_leaf, f64)
    b_out, _ = _sink_formula(q, rows, alibi, o, b_leaf, dtype)
    (r_ds,) = torch.autograd.grad(r_out, r_leaf, do)
    (b_ds,) = torch.autograd.grad(b_out, b_leaf, do.to(dtype))
    assert_close_vs_baselines(f"out ({device}, {case})", out.detach().cpu(), r_out.detach(), [b_out.detach()], dtype)
    assert_close_vs_baselines(f"dsinks ({device}, {case})", dsink.cpu(), r_ds, [b_ds], dtype)
    floor = 4 * ABS_FLOOR[f32] * (1 + 3 * (dtype != f64))
    assert_close_vs_baselines(f"lse ({device}, {case})", lse.cpu(), r_lse.detach(), [], dtype, floor=floor)
    empty = [b for b, r in enumerate(rows) if r[0].shape[1] == 0]
    for b in empty:  # nothing cached and nothing new: all weight to the sink
        assert torch.equal(out[b].detach().cpu(), torch.zeros_like(out[b].cpu()))
        assert torch.equal(lse[b].cpu(), sinks.cpu()[:, None].to(lse.dtype).expand_as(lse[b].cpu()))
    if case == "decode-gqa":  # the same step with packed queries: (B, Hq, E) rows, cu_seqlens_q 0..B
        args2, _, _, _ = make_inputs(case, dtype, device, seed=len(case) + 3)
        q2, kc2, vc2, lens2, key2, value2, _ = args2
        B = q2.shape[0]
        cu = torch.arange(B + 1, dtype=torch.int32, device=device)
        out2, lse2 = attention_ext.attention_kvcache(q2[:, :, 0], kc2, vc2, lens2, key2[:, :, 0], value2[:, :, 0],
                                                     is_causal=True, cu_seqlens_q=cu, max_seqlen_q=1, sinks=sinks,
                                                     return_lse=True)
        assert_close_vs_baselines(f"packed out ({device})", out2.cpu(), r_out.detach()[:, :, 0],
                                  [b_out.detach()[:, :, 0]], dtype)
        assert_close_vs_baselines(f"packed lse ({device})", lse2.cpu(), r_lse.detach()[:, :, 0], [], dtype, floor=floor)


def test_kvcache_sinks_errors():
    """A bad sinks argument raises before the caches are written."""
    args, _, _, _ = make_inputs("decode-gqa", f32, "cpu", seed=1)
    q, kc, vc, lens, key, value, _ = args
    before = kc.clone()
    for bad, err, msg in ((torch.zeros(3), ValueError, r"one logit per query head \(8\)"),
                          (torch.zeros(8, dtype=torch.int32), TypeError, "floating-point"),
                          (torch.zeros(2, 4), ValueError, "1-D tensor")):
        with pytest.raises(err, match=msg):
            attention_ext.attention_kvcache(q, kc, vc, lens, key, value, sinks=bad)
        with pytest.raises(err, match=msg):  # packed queries
            attention_ext.attention_kvcache(q[:, :, 0], kc, vc, lens, key[:, :, 0], value[:, :, 0], sinks=bad,
                                            cu_seqlens_q=torch.arange(4, dtype=torch.int32))
    assert torch.equal(kc, before)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda_marks())])
def test_kvcache_autocast(device):
    """Under torch.autocast a float32 query and float32 new keys / values run in the caches' dtype when that is
    bfloat16 or float16 (the caches are written in place and keep it): bit for bit the call on inputs cast by hand,
    the output in the caches' dtype, the new rows written; packed queries and ALiBi / rotary tables in float32 too.
    A float32 cache keeps the call in float32, as outside autocast. Inputs that require grad still raise."""
    g = torch.Generator().manual_seed(24)
    rn = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    q, kn, vn = rn(2, 8, 1, 32), rn(2, 2, 1, 32), rn(2, 2, 1, 32)
    lens = torch.tensor([9, 30], dtype=torch.int32, device=device)
    slopes = torch.rand(8, generator=g).to(device)
    cos, sin = torch.rand(64, 8, generator=g).to(device), torch.rand(64, 8, generator=g).to(device)
    kw = dict(is_causal=True, alibi_slopes=slopes, rotary_cos=cos, rotary_sin=sin)
    for cache_dtype, amp in ((bf16, bf16), (f16, bf16), (f32, bf16)):
        kc, vc = rn(2, 2, 40, 32).to(cache_dtype), rn(2, 2, 40, 32).to(cache_dtype)
        kc_h, vc_h = kc.clone(), vc.clone()
        cast = (lambda t: t.to(cache_dtype))  # noqa: E731
        want = attention_ext.attention_kvcache(cast(q), kc_h, vc_h, lens, cast(kn), cast(vn), **kw)
        with torch.autocast(device, dtype=amp):
            got = attention_ext.attention_kvcache(q, kc, vc, lens, kn, vn, **kw)
        assert got.dtype == cache_dtype, (cache_dtype, got.dtype)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert torch.equal(kc, kc_h) and torch.equal(vc, vc_h), "the caches after the call"
    # packed queries (cu_seqlens_q), the bfloat16 cache
    cu = torch.tensor([0, 1, 3], dtype=torch.int32, device=device)
    qp, kp, vp = rn(3, 8, 32), rn(3, 2, 32), rn(3, 2, 32)
    kc, vc = rn(2, 2, 40, 32).to(bf16), rn(2, 2, 40, 32).to(bf16)
    want = attention_ext.attention_kvcache(qp.to(bf16), kc.clone(), vc.clone(), lens, kp.to(bf16), vp.to(bf16),
                                           is_causal=True, cu_seqlens_q=cu)
    with torch.autocast(device, dtype=bf16):
        got = attention_ext.attention_kvcache(qp, kc, vc, lens, kp, vp, is_causal=True, cu_seqlens_q=cu)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with torch.autocast(device, dtype=bf16), pytest.raises(ValueError, match="attention_kvcache has no gradient"):
        attention_ext.attention_kvcache(q.clone().requires_grad_(), kc, vc, lens)


def test_kvcache_compile_and_opcheck():
    """Under torch.compile (fullgraph) a decoding step writes the caches and returns the eager result; opcheck
    (schema with the caches' mutation, fake tensors, functionalization) passes, contiguous, paged, rotary, a pool
    of rows (cache_batch_idx) and a left padding (cache_leftpad)."""
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, 4, 1, 32, generator=g)
    kc, vc = (torch.randn(2, 2, 40, 32, generator=g) for _ in range(2))
    k1, v1 = (torch.randn(2, 2, 1, 32, generator=g) for _ in range(2))
    lens = torch.tensor([3, 30], dtype=torch.int32)

    def step(q, kc, vc, lens, k1, v1):
        return attention_ext.attention_kvcache(q, kc, vc, lens, k1, v1, is_causal=True)

    kc_e, vc_e = kc.clone(), vc.clone()
    want = step(q, kc_e, vc_e, lens, k1, v1)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(q, kc, vc, lens, k1, v1)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.equal(kc, kc_e) and torch.equal(vc, vc_e)
    op = torch.ops.attention_ext.attention_kvcache.default
    torch.library.opcheck(op, (q, kc.clone(), vc.clone(), lens, k1, v1, None, True, None, [-1, -1], 0.0, None))
    table = torch.tensor([[1, 0], [3, 2]], dtype=torch.int32)
    kp, vp = (torch.randn(4, 2, 16, 32, generator=g) for _ in range(2))
    torch.library.opcheck(op, (q, kp, vp, lens, k1, v1, table, False, 0.5, [8, -1], 0.0, None))
    cos, sin = torch.rand(64, 8, generator=g), torch.rand(64, 8, generator=g)  # rotary, on 16 of the 32 features
    torch.library.opcheck(op, (q, kc.clone(), vc.clone(), lens, k1, v1, None, True, None, [-1, -1], 0.0, None, cos,
                               sin, True))
    pool_k, pool_v = (torch.randn(5, 2, 40, 32, generator=g) for _ in range(2))  # a pool of rows, cache_batch_idx
    torch.library.opcheck(op, (q, pool_k, pool_v, lens, k1, v1), {"is_causal": True,
                                                                  "cache_batch_idx": torch.tensor([4, 1])})
    torch.library.opcheck(op, (q, kc.clone(), vc.clone(), lens, k1, v1), {"is_causal": True,  # a left padding
                                                                         "cache_leftpad": torch.tensor([2, 11])})


def _err_inputs():
    g = torch.Generator().manual_seed(8)
    q = torch.randn(2, 4, 1, 16, generator=g)
    kc, vc = (torch.randn(2, 2, 32, 16, generator=g) for _ in range(2))
    kn, vn = (torch.randn(2, 2, 1, 16, generator=g) for _ in range(2))
    return q, kc, vc, torch.tensor([3, 5], dtype=torch.int32), kn, vn


def _overlapping(kc):
    """Two caches of kc's shape, the second 16 elements further into one buffer than the first."""
    buf = torch.cat([kc.flatten(), kc.flatten()[:16]])
    return buf[:kc.numel()].view_as(kc), buf[16:].view_as(kc)


def _paged(table):
    g = torch.Generator().manual_seed(9)
    return [torch.randn(4, 2, 8, 16, generator=g) for _ in range(2)] + [table]


ERRORS = {
    "query-3d": (lambda q, kc, vc, sl, kn, vn: (q[0], kc, vc, sl, kn, vn), ValueError, "query must be \\(batch"),
    "cache-batch": (lambda q, kc, vc, sl, kn, vn: (q, kc[:1], vc[:1], sl, kn, vn), ValueError,
                    "must have the query's batch"),
    "cache-dtype": (lambda q, kc, vc, sl, kn, vn: (q, kc.double(), vc, sl, kn, vn), TypeError, "key dtype"),
    "cache-strided-dim": (lambda q, kc, vc, sl, kn, vn: (q, kc[..., ::2].repeat(1, 1, 1, 1), vc, sl, kn, vn),
                          ValueError, "head dim"),
    "heads-not-multiple": (lambda q, kc, vc, sl, kn, vn: (q[:, :3], kc, vc, sl, kn, vn), ValueError,
                           "multiple of the number of key/value heads"),
    "key-without-value": (lambda q, kc, vc, sl, kn, vn: (q, kc, vc, sl, kn, None), ValueError,
                          "key and value must be given together"),
    "key-heads": (lambda q, kc, vc, sl, kn, vn: (q, kc, vc, sl, kn[:, :1], vn[:, :1]), ValueError,
                  "key has 1 heads but key_cache has 2"),
    "seqlens-dtype": (lambda q, kc, vc, sl, kn, vn: (q, kc, vc, sl.float(), kn, vn), TypeError,
                      "cache_seqlens must be int32 or int64"),
    "seqlens-shape": (lambda q, kc, vc, sl, kn, vn: (q, kc, vc, sl[:1], kn, vn), ValueError,
                      "cache_seqlens must have shape \\(batch,\\)"),
    "seqlens-negative": (lambda q, kc, vc, sl, kn, vn: (q, kc, vc, sl - 4, kn, vn), ValueError,
                         "cache_seqlens\\[0\\] = -1 is negative"),
    "seqlens-capacity": (lambda q, kc, vc, sl, kn, vn: (q, kc, vc, sl + 27, kn, vn), ValueError,
                         "cache_seqlens\\[1\\] = 32 plus the 1 new positions of key exceeds the cache's capacity "
                         "\\(32"),
    "table-dtype": (lambda q, kc, vc, sl, kn, vn: (q, *_paged(torch.zeros(2, 2, dtype=torch.long))[:2], sl, kn, vn,
                                                   _paged(torch.zeros(2, 2, dtype=torch.long))[2]),
                    TypeError, "block_table must be int32"),
    "table-shape": (lambda q, kc, vc, sl, kn, vn: (q, *_paged(None)[:2], sl, kn, vn,
                                                   torch.zeros(3, 2, dtype=torch.int32)),
                    ValueError, "block_table must be \\(batch, max_pages\\)"),
    "table-page-range": (lambda q, kc, vc, sl, kn, vn: (q, *_paged(None)[:2], sl + 8, kn, vn,
                                                        torch.tensor([[0, 1], [2, 4]], dtype=torch.int32)),
                         ValueError, "block_table\\[1, 1\\] = 4 is not a page of key_cache \\(num_pages = 4\\)"),
    "table-capacity": (lambda q, kc, vc, sl, kn, vn: (q, *_paged(None)[:2], sl + 12, kn, vn,
                                                      torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)),
                       ValueError, "max_pages \\* page_size"),
    "value-pages": (lambda q, kc, vc, sl, kn, vn: (q, _paged(None)[0], _paged(None)[1][:3], sl, kn, vn,
                                                   torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)),
                    ValueError, "value_cache has 3 pages but key_cache has 4"),
    "window": (lambda q, kc, vc, sl, kn, vn: (q, kc, vc, sl, kn, vn, None, False, None, [-2, 0]), ValueError,
               "window_size"),
    # the new positions are written in place: not into an expanded cache, nor into a value cache that is the key's
    "cache-expanded": (lambda q, kc, vc, sl, kn, vn: (q, kc[:1].expand_as(kc), vc, sl, kn, vn), ValueError,
                       "key_cache is expanded along dim 0 \\(stride 0, size 2\\)"),
    "value-cache-expanded": (lambda q, kc, vc, sl, kn, vn: (q, kc, vc[:, :, :1].expand_as(vc), sl, kn, vn),
                             ValueError, "value_cache is expanded along dim 2 \\(stride 0, size 32\\)"),
    "caches-shared": (lambda q, kc, vc, sl, kn, vn: (q, kc, kc, sl, kn, vn), ValueError,
                      "key_cache and value_cache share memory"),
    "caches-overlapping": (lambda q, kc, vc, sl, kn, vn: (q, *_overlapping(kc), sl, kn, vn), ValueError,
                           "key_cache and value_cache share memory"),
}


# errors of values (and of memory, which the Meta kernel does not see)
VALUE_ERRORS = ("seqlens-negative", "seqlens-capacity", "table-page-range", "table-capacity", "caches-shared",
                "caches-overlapping")


@pytest.mark.parametrize("name", list(ERRORS))
@pytest.mark.parametrize("backend", ["cpu", pytest.param("emu80", marks=emu_marks())])
def test_kvcache_errors(name, backend, monkeypatch):
    """Each bad argument raises the error that names it, through the op on the backend and (errors of shapes and
    dtypes, not of the lengths' values) through its Meta kernel, and leaves the caches untouched."""
    ops = backend_ops(backend, monkeypatch)
    make, exc, msg = ERRORS[name]
    args = list(make(*_err_inputs()))
    args += [None] * (7 - len(args)) if len(args) < 7 else []
    before = [a.clone() for a in args[1:3]]
    with pytest.raises(exc, match=msg):
        ops.attention_kvcache(*args)
    assert all(torch.equal(a, b) for a, b in zip(args[1:3], before)), "the caches were written before the error"
    if backend == "cpu" and name not in VALUE_ERRORS:
        # the bad argument made from meta inputs (an expanded cache stays expanded), the rest moved there
        meta = list(make(*[t.to("meta") for t in _err_inputs()]))
        meta = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in meta + [None] * (7 - len(meta))]
        with pytest.raises(exc, match=msg):
            torch.ops.attention_ext.attention_kvcache(*meta)


@pytest.mark.parametrize("backend", ["cpu", pytest.param("emu80", marks=emu_marks())])
def test_kvcache_caches_in_one_buffer(backend, monkeypatch):
    """Key and value caches that are two halves of one buffer (vLLM's layout) append and attend exactly as two
    separate caches; one tensor as both caches is fine when nothing is appended (read only)."""
    ops = backend_ops(backend, monkeypatch)
    q, kc, vc, sl, kn, vn = _err_inputs()
    kv = torch.stack([kc, vc])
    out, lse = ops.attention_kvcache(q, kv[0], kv[1], sl, kn, vn, None, True)
    want_out, want_lse = ops.attention_kvcache(q, kc, vc, sl, kn, vn, None, True)
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
    assert torch.equal(kv[0], kc) and torch.equal(kv[1], vc)
    out, lse = ops.attention_kvcache(q, kc, kc, sl + 1)
    want_out, want_lse = ops.attention_kvcache(q, kc, kc.clone(), sl + 1)
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)


IDX_BACKENDS = [pytest.param("cpu", f32, id="cpu-f32"), pytest.param("cpu", f64, id="cpu-f64"),
                pytest.param("emu80", bf16, id="emu80-bf16", marks=emu_marks()),
                pytest.param("emu80", f64, id="emu80-f64", marks=emu_marks()),
                pytest.param("cuda", f16, id="cuda-f16", marks=cuda_marks())]


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("backend,dtype", IDX_BACKENDS)
def test_kvcache_cache_batch_idx(backend, dtype, packed, monkeypatch):
    """cache_batch_idx: batch element b reads and appends to row cache_batch_idx[b] of a pool of 6 cache rows (random
    everywhere): bit for bit the call on those rows copied out in that order (itself checked against the reference
    above), the pool's named rows written as that call writes them and the others untouched; a decode step of GQA
    (float64 on CUDA: the gathered path) and packed queries; without new keys two batch elements may share a row."""
    device = "cuda" if backend == "cuda" else "cpu"
    ops = backend_ops(backend, monkeypatch)
    g = torch.Generator().manual_seed(21)
    R, B, Hq, Hkv, E, Smax = 6, 3, 8, 2, 64, 96
    rn = lambda *sh: torch.randn(*sh, generator=g, dtype=f64).to(device=device, dtype=dtype)  # noqa: E731
    kp, vp = rn(R, Hkv, Smax, E), rn(R, Hkv, Smax, E)
    idx = torch.tensor([4, 0, 2], dtype=torch.int32, device=device)
    lens = torch.tensor([50, 0, 90], dtype=torch.int32, device=device)
    if packed:
        cu = torch.tensor([0, 1, 4, 5], dtype=torch.int32, device=device)
        q, kn, vn = rn(5, Hq, E), rn(5, Hkv, E), rn(5, Hkv, E)
        kw = dict(cu_seqlens_q=cu)
    else:
        q, kn, vn = rn(B, Hq, 1, E), rn(B, Hkv, 1, E), rn(B, Hkv, 1, E)
        kw = {}
    kc, vc = kp[idx.long()].clone(), vp[idx.long()].clone()  # the named rows, copied out in batch order
    want = ops.attention_kvcache(q, kc, vc, lens, kn, vn, None, True, **kw)
    pool_k, pool_v = kp.clone(), vp.clone()
    with attention_ext.debug.kernel_log() as lines:
        got = ops.attention_kvcache(q, pool_k, pool_v, lens, kn, vn, None, True, **kw, cache_batch_idx=idx)
    path = "cpu kvcache forward" if backend == "cpu" else ("the cache gathered" if dtype == f64 else "sm80")
    assert path in lines[0] and (len(lines) == 1 or dtype == f64), lines  # (gathered: then the dense calls' lines)
    for a, b in zip(got, want):
        assert torch.equal(a, b), (a - b).abs().max()
    assert torch.equal(pool_k[idx.long()], kc) and torch.equal(pool_v[idx.long()], vc), "the named rows"
    rest = torch.tensor([1, 3, 5], device=device)
    assert torch.equal(pool_k[rest], kp[rest]) and torch.equal(pool_v[rest], vp[rest]), "rows not named"
    if not packed:  # one row read by two batch elements (no append): each sees it
        shared = torch.tensor([3, 3, 1], dtype=torch.int32, device=device)
        out, _ = ops.attention_kvcache(q, pool_k, pool_v, lens, None, None, None, True, cache_batch_idx=shared)
        ref, _ = ops.attention_kvcache(q, pool_k[shared.long()].clone(), pool_v[shared.long()].clone(), lens, None,
                                       None, None, True)
        assert torch.equal(out, ref)


IDX_ERRORS = {
    "dtype": (lambda idx: idx.float(), TypeError, "cache_batch_idx must be int32 or int64"),
    "shape": (lambda idx: idx[:1], ValueError, "cache_batch_idx must be \\(batch,\\) = \\(2,\\)"),
    "range": (lambda idx: idx + 4, ValueError, "cache_batch_idx\\[1\\] = 5 is not a row of key_cache \\(5 rows\\)"),
    "negative": (lambda idx: idx - 1, ValueError, "cache_batch_idx\\[0\\] = -1 is not a row"),
    "shared-append": (lambda idx: torch.zeros_like(idx), ValueError,
                      "cache_batch_idx\\[0\\] = cache_batch_idx\\[1\\] = 0: two batch elements cannot append"),
    "paged": (None, ValueError, "cache_batch_idx takes a contiguous cache, not a paged one"),
}


LEFTPAD_ERRORS = {
    "dtype": (lambda pad: pad.float(), TypeError, "cache_leftpad must be int32 or int64"),
    "shape": (lambda pad: pad[:1], ValueError, "cache_leftpad must be \\(batch,\\) = \\(2,\\)"),
    "past-seqlens": (lambda pad: pad + 4, ValueError,
                     "cache_leftpad\\[0\\] = 4 must be in \\[0, cache_seqlens\\[0\\] = 3\\]"),
    "negative": (lambda pad: pad - 1, ValueError, "cache_leftpad\\[0\\] = -1 must be in \\[0, cache_seqlens"),
    "paged": (None, ValueError, "cache_leftpad takes a contiguous cache, not a paged one"),
}


@pytest.mark.parametrize("arg,name", [("cache_batch_idx", n) for n in IDX_ERRORS] +
                         [("cache_leftpad", n) for n in LEFTPAD_ERRORS])
@pytest.mark.parametrize("backend", ["cpu", pytest.param("emu80", marks=emu_marks())])
def test_kvcache_index_argument_errors(arg, name, backend, monkeypatch):
    """A bad cache_batch_idx or cache_leftpad raises the error that names it (shapes, dtypes and a paged cache
    through the Meta kernel too) and leaves the caches untouched."""
    ops = backend_ops(backend, monkeypatch)
    make, exc, msg = (IDX_ERRORS if arg == "cache_batch_idx" else LEFTPAD_ERRORS)[name]
    q, kc, vc, sl, kn, vn = _err_inputs()
    if arg == "cache_batch_idx":  # a pool of 5 rows
        kc, vc = torch.cat([kc, kc, kc[:1]]), torch.cat([vc, vc, vc[:1]])
    value = torch.tensor([0, 1], dtype=torch.int32)
    table = None
    if name == "paged":
        kc, vc, table = _paged(torch.tensor([[0, 1], [2, 3]], dtype=torch.int32))
    else:
        value = make(value)
    before = [kc.clone(), vc.clone()]
    with pytest.raises(exc, match=msg):
        ops.attention_kvcache(q, kc, vc, sl, kn, vn, table, **{arg: value})
    assert torch.equal(kc, before[0]) and torch.equal(vc, before[1]), "the caches were written"
    if backend == "cpu" and name in ("dtype", "shape", "paged"):
        meta = [t.to("meta") for t in (q, kc, vc, sl, kn, vn)]
        with pytest.raises(exc, match=msg):
            torch.ops.attention_ext.attention_kvcache(*meta, None if table is None else table.to("meta"),
                                                      **{arg: value.to("meta")})


def _leftpad_reference(q, rows, alibi, o, cu, dtype):
    """The float64 reference and PyTorch's way over rows (per batch element, the positions from its padding's end),
    dense (B, Hq, L, E) or, with cu (a list), packed (total_q, Hq, E) as the op returns them."""
    if cu is None:
        return (*reference(q, rows, alibi, o), pytorch_baseline(q.to(dtype), rows, alibi, o, dtype))
    outs, lses, bases = [], [], []
    for b in range(len(cu) - 1):
        qb = q[cu[b]:cu[b + 1]].transpose(0, 1).unsqueeze(0)
        ab = None if alibi is None else alibi[b:b + 1]
        r_out, r_lse = reference(qb, rows[b:b + 1], ab, o)
        outs.append(r_out[0].transpose(0, 1))
        lses.append(r_lse[0].transpose(0, 1))
        bases.append(pytorch_baseline(qb.to(dtype), rows[b:b + 1], ab, o, dtype)[0].transpose(0, 1))
    return torch.cat(outs), torch.cat(lses), torch.cat(bases)


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("backend,dtype", IDX_BACKENDS)
def test_kvcache_cache_leftpad(backend, dtype, packed, monkeypatch):
    """cache_leftpad (FlashAttention's): batch element b's cache starts at position cache_leftpad[b]. Against the
    float64 reference over positions cache_leftpad[b] .. S_b - 1 only (random values in the padding, never zeros),
    causal and ALiBi distances counted from there, within 2x PyTorch's error; bit for bit the call on caches with the
    padding cut off (each row shifted left by its padding, cache_seqlens less it; float64 on CUDA gathers, to 1e-12);
    the new keys written at cache_seqlens[b] onwards and nothing else. One cache all padding (cache_leftpad =
    cache_seqlens: only the new keys are seen), one without padding; GQA decoding steps, or packed queries."""
    device = "cuda" if backend == "cuda" else "cpu"
    ops = backend_ops(backend, monkeypatch)
    g = torch.Generator().manual_seed(23)
    B, Hq, Hkv, E, Smax = 3, 8, 2, 64, 96
    rn = lambda *sh: torch.randn(*sh, generator=g, dtype=f64)  # noqa: E731
    lens_l, pad_l = [50, 7, 90], [13, 7, 0]
    n_new = [1, 3, 2] if packed else [1, 1, 1]
    cu = [0, 1, 4, 6] if packed else None
    kc, vc = rn(B, Hkv, Smax, E), rn(B, Hkv, Smax, E)
    if packed:
        q, kn, vn = rn(6, Hq, E), rn(6, Hkv, E), rn(6, Hkv, E)
        new = lambda x, b: x[cu[b]:cu[b + 1]].transpose(0, 1)  # noqa: E731  (b's new rows, (Hkv, n, E))
        kw = dict(cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=device))
    else:
        q, kn, vn = rn(B, Hq, 1, E), rn(B, Hkv, 1, E), rn(B, Hkv, 1, E)
        new = lambda x, b: x[b]  # noqa: E731
        kw = {}
    alibi = (torch.rand(B, Hq, generator=g) * 0.3 + 0.05).to(f32)
    o = dict(is_causal=True, alibi=True)
    rnd = lambda t: t.to(dtype).to(f64)  # noqa: E731
    rows = [(torch.cat([rnd(kc[b, :, pad_l[b]:lens_l[b]]), rnd(new(kn, b))], 1),
             torch.cat([rnd(vc[b, :, pad_l[b]:lens_l[b]]), rnd(new(vn, b))], 1)) for b in range(B)]
    r_out, r_lse, base = _leftpad_reference(rnd(q), rows, alibi, o, cu, dtype)
    dev = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    lens = torch.tensor(lens_l, dtype=torch.int32, device=device)
    pad = torch.tensor(pad_l, dtype=torch.int64, device=device)
    kc_d, vc_d = dev(kc), dev(vc)
    args = (dev(q), kc_d, vc_d, lens, dev(kn), dev(vn), None, True)
    with attention_ext.debug.kernel_log() as lines:
        out, lse = ops.attention_kvcache(*args, alibi_slopes=alibi.to(device), cache_leftpad=pad, **kw)
    gathered = backend != "cpu" and dtype == f64
    path = "cpu kvcache forward" if backend == "cpu" else ("the cache gathered" if gathered else "sm80")
    assert path in lines[0] and (len(lines) == 1 or gathered), lines
    assert_close_vs_baselines(f"out ({backend})", out.cpu(), r_out, [base], dtype)
    floor = 4 * ABS_FLOOR[f32] * (1 + 3 * (dtype != f64))
    assert_close_vs_baselines(f"lse ({backend})", lse.cpu(), r_lse, [], dtype, floor=floor)
    # the caches: the new rows at cache_seqlens[b] onwards, every other element as before
    want_k, want_v = dev(kc), dev(vc)
    for b in range(B):
        want_k[b, :, lens_l[b]:lens_l[b] + n_new[b]] = dev(new(kn, b))
        want_v[b, :, lens_l[b]:lens_l[b] + n_new[b]] = dev(new(vn, b))
    assert torch.equal(kc_d, want_k) and torch.equal(vc_d, want_v), "the caches after the call"
    # the call on the caches without their padding (random beyond each row's end)
    cut_k, cut_v = dev(rn(B, Hkv, Smax, E)), dev(rn(B, Hkv, Smax, E))
    for b in range(B):
        cut_k[b, :, :Smax - pad_l[b]] = dev(kc)[b, :, pad_l[b]:]
        cut_v[b, :, :Smax - pad_l[b]] = dev(vc)[b, :, pad_l[b]:]
    cut = ops.attention_kvcache(args[0], cut_k, cut_v, lens - pad.int(), *args[4:], alibi_slopes=alibi.to(device),
                                **kw)
    for a, c in zip((out, lse), cut):
        torch.testing.assert_close(a, c, rtol=0, atol=1e-12 if gathered else 0)




def test_kvcache_grad_and_strided_cache_errors():
    """Inputs that require grad raise (no gradient; the op is for inference): the query, the new keys, the ALiBi
    slopes and the rotary tables; a cache whose last dim is not unit-stride raises instead of being copied (it is
    written in place)."""
    q, kc, vc, sl, kn, vn = _err_inputs()
    slopes = torch.rand(4, requires_grad=True)
    cos, sin = torch.rand(64, 4, requires_grad=True), torch.rand(64, 4)
    for kwargs in (dict(key=kn.clone().requires_grad_(), value=vn), dict(alibi_slopes=slopes),
                   dict(rotary_cos=cos, rotary_sin=sin)):
        with pytest.raises(ValueError, match="attention_kvcache has no gradient"):
            attention_ext.attention_kvcache(q, kc, vc, sl, **{"key": kn, "value": vn, **kwargs})
    with pytest.raises(ValueError, match="attention_kvcache has no gradient"):
        attention_ext.attention_kvcache(q.requires_grad_(), kc, vc, sl, kn, vn)
    with torch.no_grad():
        attention_ext.attention_kvcache(q, kc, vc, sl, kn, vn)  # fine under no_grad
    strided = torch.randn(2, 2, 32, 32)[..., ::2]
    with pytest.raises(ValueError, match="unit-stride last dimension"):
        attention_ext.attention_kvcache(q.detach(), strided, strided, sl)


# Values out of range under CUDA-graph capture. There the glue cannot read cache_seqlens, cache_batch_idx, the block
# table or cu_seqlens_q back, so the kernels must stay inside the tensors on their own. ATTENTION_EXT_EMU_CAPTURE=1
# runs the emulated CUDA glue that way, and the emulator faults on any access outside the launch's tensors. Each
# case: (what it calls, how it corrupts batch element 1, the query rows that must come out NaN).
def _capture_inputs(kind):
    """(query, key cache, value cache, cache_seqlens, keyword arguments) of a bf16 decoding step (packed: chunks of
    2, 1, 3 queries) with 3 batch elements, 8 query and 2 key / value heads; contiguous, a pool of 5 rows
    (cache_batch_idx) or pages of 16 (shuffled, 2 spare). A kind ending in "+rotary": with a rotary embedding of 64
    positions (seqlen_ro) over 16 of the 32 features."""
    kind, _, extra = kind.partition("+")
    q, kc, vc, lens, kw = _capture_inputs_plain(kind)
    if extra == "rotary":
        angles = torch.rand(64, 8, generator=torch.Generator().manual_seed(32), dtype=torch.float64) * 6.3
        kw.update(rotary_cos=angles.cos().float(), rotary_sin=angles.sin().float())
    return q, kc, vc, lens, kw


def _capture_inputs_plain(kind):
    g = torch.Generator().manual_seed(31)
    rn = lambda *sh: torch.randn(*sh, generator=g).to(bf16)  # noqa: E731
    Hq, Hkv, E, Smax = 8, 2, 32, 96
    lens = torch.tensor([17, 60, 5], dtype=torch.int32)
    kw = dict(is_causal=True)
    if kind == "pool":
        kc, vc = rn(5, Hkv, Smax, E), rn(5, Hkv, Smax, E)
        kw["cache_batch_idx"] = torch.tensor([3, 0, 4], dtype=torch.int32)
    elif kind == "paged":
        kc, vc = rn(3 * Smax // 16 + 2, Hkv, 16, E), rn(3 * Smax // 16 + 2, Hkv, 16, E)
        kw["block_table"] = torch.randperm(kc.shape[0], generator=g)[: 3 * Smax // 16].view(3, -1).to(torch.int32)
    else:
        kc, vc = rn(3, Hkv, Smax, E), rn(3, Hkv, Smax, E)
    if kind == "packed":
        kw["cu_seqlens_q"] = torch.tensor([0, 2, 3, 6], dtype=torch.int32)
        return rn(6, Hq, E), kc, vc, lens, kw
    return rn(3, Hq, 1, E), kc, vc, lens, kw


def _set(name, index, value):
    def corrupt(lens, kw):
        t = lens if name == "cache_seqlens" else kw[name]
        t[index] = value
    return corrupt


CAPTURE_BAD = {
    "seqlens-past-capacity": ("dense", _set("cache_seqlens", 1, 97), [1]),
    "seqlens-negative": ("dense", _set("cache_seqlens", 1, -4), [1]),
    "seqlens-int64-wraps": ("dense", lambda lens, kw: None, [1]),  # 2**32 + 60 as int64 (60 if cut to int32)
    "batch-idx-past": ("pool", _set("cache_batch_idx", 1, 5), [1]),
    "batch-idx-negative": ("pool", _set("cache_batch_idx", 1, -1), [1]),
    "page-past": ("paged", _set("block_table", (1, 2), 20), [1]),  # a page of positions 32..47 of 60
    "page-negative": ("paged", _set("block_table", (1, 3), -1), [1]),  # the page of position 59
    "page-unused": ("paged", _set("block_table", (1, 4), -7), []),  # past position 59: never read, no harm
    "packed-seqlens-past-capacity": ("packed", _set("cache_seqlens", 1, 200), [2]),
    # cu_seqlens_q not non-decreasing from batch element 1 on: elements 1 and 2 get no rows (rows 2..5 NaN)
    "packed-rows-unordered": ("packed", _set("cu_seqlens_q", 2, 1), [2, 3, 4, 5]),
    # element 2 would end past total_q: its rows (3..5) NaN
    "packed-rows-past-total": ("packed", _set("cu_seqlens_q", 3, 7), [3, 4, 5]),
    # a length inside the cache whose rotated position is past the rotary table's 64 (the table is indexed with the
    # positions clamped, the element refused); a negative one with a rotary embedding
    "rotary-past-table": ("dense+rotary", _set("cache_seqlens", 1, 70), [1]),
    "rotary-negative": ("dense+rotary", _set("cache_seqlens", 1, -4), [1]),
    "packed-rotary-past-table": ("packed+rotary", _set("cache_seqlens", 1, 64), [2]),
}


@pytest.mark.parametrize("splits", ["1", "3"], ids=["one-cta", "split-keys"])
@pytest.mark.parametrize("name", list(CAPTURE_BAD))
@pytest.mark.parametrize("backend", [pytest.param("emu80", marks=emu_marks())])
def test_kvcache_capture_values_out_of_range(backend, name, splits, monkeypatch):
    """Under (emulated) graph capture the values are not checked on the host: the same call with good values gives
    the eager result bit for bit, and with one bad value of batch element 1 (a length past the capacity or negative,
    an int64 length that int32 would wrap, a cache row or a page outside the cache, packed query rows out of order or
    past total_q, a position past the rotary table) no access leaves the tensors, that element's query rows come out
    NaN (output and log-sum-exp) and every other row is the eager result bit for bit; one CTA per query block and
    keys split 3 ways (the combine kernel). A bad page past the element's positions is never read."""
    ops = backend_ops(backend, monkeypatch)
    monkeypatch.setenv("ATTENTION_EXT_FWD_SPLITS", splits)
    kind, corrupt, nan_rows = CAPTURE_BAD[name]
    q, kc, vc, lens, kw = _capture_inputs(kind)
    want_out, want_lse = ops.attention_kvcache(q, kc, vc, lens, **kw)
    monkeypatch.setenv("ATTENTION_EXT_EMU_CAPTURE", "1")
    out, lse = ops.attention_kvcache(q, kc, vc, lens, **kw)
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse), "good values under capture"
    if name == "seqlens-int64-wraps":
        lens = lens.long()
        lens[1] += 2**32
    corrupt(lens, kw)
    out, lse = ops.attention_kvcache(q, kc, vc, lens, **kw)
    if not kind.startswith("packed"):  # (B, H, 1, E) and (B, H, 1): rows are batch elements
        out, lse, want_out, want_lse = (t.squeeze(2) for t in (out, lse, want_out, want_lse))
    bad = torch.zeros(out.shape[0], dtype=torch.bool)
    bad[nan_rows] = True
    assert out[bad].isnan().all() and lse[bad].isnan().all(), "the bad element's rows"
    assert torch.equal(out[~bad], want_out[~bad]) and torch.equal(lse[~bad], want_lse[~bad]), "the other rows"


@pytest.mark.parametrize("backend", [pytest.param("emu80", marks=emu_marks())])
def test_kvcache_capture_rotary_float64(backend, monkeypatch):
    """float64 (no kernel: the visible cache gathered into one dense call) under (emulated) graph capture with a
    rotary embedding: good lengths give the eager result; a length inside the cache whose rotated position is past
    the rotary table gives that batch element NaN rows (no indexing error, no rotation by a clamped position), the
    others the eager result."""
    ops = backend_ops(backend, monkeypatch)
    q, kc, vc, lens, kw = _capture_inputs("dense+rotary")
    q, kc, vc = q.double(), kc.double(), vc.double()
    want_out, want_lse = ops.attention_kvcache(q, kc, vc, lens, **kw)
    monkeypatch.setenv("ATTENTION_EXT_EMU_CAPTURE", "1")
    out, lse = ops.attention_kvcache(q, kc, vc, lens, **kw)
    torch.testing.assert_close(out, want_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, want_lse, rtol=1e-12, atol=1e-12)
    lens = lens.clone()
    lens[1] = 70  # (capacity 96, rotary table 64)
    out, lse = ops.attention_kvcache(q, kc, vc, lens, **kw)
    assert out[1].isnan().all() and lse[1].isnan().all()
    keep = torch.tensor([0, 2])
    torch.testing.assert_close(out[keep], want_out[keep], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse[keep], want_lse[keep], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bad", [-1, 96], ids=["negative", "full"])
@pytest.mark.parametrize("kind", ["dense", "pool", "paged", "packed", "dense+rotary", "packed+rotary"])
@pytest.mark.parametrize("backend", [pytest.param("emu80", marks=emu_marks())])
def test_kvcache_capture_append_out_of_range(backend, kind, bad, monkeypatch):
    """New keys under (emulated) graph capture, written by the CUDA glue's append kernel: with good lengths the
    caches and outputs of the eager call bit for bit; a batch element whose length is negative or leaves no room for
    its new keys has nothing written (its cache row or pages untouched, no position counted from the end as a
    negative Python index would be) and NaN rows, the others as eagerly; with a rotary embedding too (the new keys
    rotated first)."""
    ops = backend_ops(backend, monkeypatch)
    q, kc, vc, lens, kw = _capture_inputs(kind)
    g = torch.Generator().manual_seed(5)
    rows = q.shape[0] if kind.startswith("packed") else 3
    new = (rows, 2, 32) if kind.startswith("packed") else (3, 2, 1, 32)
    kn, vn = torch.randn(*new, generator=g).to(bf16), torch.randn(*new, generator=g).to(bf16)
    caches = [kc.clone(), vc.clone()]
    want_out, want_lse = ops.attention_kvcache(q, *caches, lens, kn, vn, **kw)
    monkeypatch.setenv("ATTENTION_EXT_EMU_CAPTURE", "1")
    got = [kc.clone(), vc.clone()]
    out, lse = ops.attention_kvcache(q, *got, lens, kn, vn, **kw)
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse), "good lengths under capture"
    assert all(torch.equal(a, b) for a, b in zip(got, caches)), "the caches, good lengths"
    lens = lens.clone()
    lens[1] = bad
    got = [kc.clone(), vc.clone()]
    out, lse = ops.attention_kvcache(q, *got, lens, kn, vn, **kw)
    if kind == "paged":  # element 1's pages, and the others' as eagerly
        mine = torch.zeros(kc.shape[0], dtype=torch.bool)
        mine[kw["block_table"][1].long()] = True
    else:  # element 1's cache row (its pool row), the others as eagerly
        mine = torch.zeros(kc.shape[0], dtype=torch.bool)
        mine[kw["cache_batch_idx"][1] if kind == "pool" else 1] = True
    for a, before, want in zip(got, (kc, vc), caches):
        assert torch.equal(a[mine], before[mine]), "element 1's cache was written"
        assert torch.equal(a[~mine], want[~mine]), "the other elements' caches"
    bad_rows = torch.zeros(out.shape[0], dtype=torch.bool)
    bad_rows[2 if kind.startswith("packed") else 1] = True
    assert out[bad_rows].isnan().all() and lse[bad_rows].isnan().all()
    assert torch.equal(out[~bad_rows], want_out[~bad_rows]) and torch.equal(lse[~bad_rows], want_lse[~bad_rows])


@pytest.mark.parametrize("backend", [pytest.param("cuda", marks=cuda_marks())])
def test_kvcache_cuda_graph(backend):
    """A decoding step captured in a CUDA graph (no sync under capture) replays to the eager result, writing the
    caches."""
    g = torch.Generator().manual_seed(10)
    q = torch.randn(2, 8, 1, 64, generator=g).cuda().half()
    kc, vc = (torch.randn(2, 2, 256, 64, generator=g).cuda().half() for _ in range(2))
    k1, v1 = (torch.randn(2, 2, 1, 64, generator=g).cuda().half() for _ in range(2))
    lens = torch.tensor([10, 200], dtype=torch.int32, device="cuda")
    kc_e, vc_e = kc.clone(), vc.clone()
    want = attention_ext.attention_kvcache(q, kc_e, vc_e, lens, k1, v1, is_causal=True)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        attention_ext.attention_kvcache(q, kc.clone(), vc.clone(), lens, k1, v1, is_causal=True)  # warm-up
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attention_ext.attention_kvcache(q, kc, vc, lens, k1, v1, is_causal=True)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert torch.equal(kc, kc_e) and torch.equal(vc, vc_e)


@pytest.mark.parametrize("kind", ["dense", "paged", "packed"])
@pytest.mark.parametrize("backend", [pytest.param("cuda", marks=cuda_marks())])
def test_kvcache_cuda_graph_values_out_of_range(backend, kind):
    """A decoding step captured with good values, replayed after batch element 1's length was set past the capacity
    (dense, packed) or its page outside the cache (paged) in the captured tensors: the replay neither faults nor
    reads outside the caches; that element's rows are NaN, the others the eager result bit for bit."""
    q, kc, vc, lens, kw = _capture_inputs(kind)
    to = lambda t: t.cuda() if isinstance(t, torch.Tensor) else t  # noqa: E731
    q, kc, vc, lens = to(q), to(kc), to(vc), to(lens)
    kw = {n: to(v) for n, v in kw.items()}
    want_out, want_lse = attention_ext.attention_kvcache(q, kc, vc, lens, **kw)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        attention_ext.attention_kvcache(q, kc, vc, lens, **kw)  # warm-up
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = attention_ext.attention_kvcache(q, kc, vc, lens, **kw)
    if kind == "paged":
        kw["block_table"][1, 2] = kc.shape[0] + 3
    else:
        lens[1] = 200
    graph.replay()
    torch.cuda.synchronize()
    bad = torch.zeros(out.shape[0], dtype=torch.bool, device="cuda")
    bad[2 if kind == "packed" else 1] = True
    if kind != "packed":
        out, lse, want_out, want_lse = (t.squeeze(2) for t in (out, lse, want_out, want_lse))
    assert out[bad].isnan().all() and lse[bad].isnan().all()
    assert torch.equal(out[~bad], want_out[~bad]) and torch.equal(lse[~bad], want_lse[~bad])

def rope(x, cos, sin, pos, interleaved):
    """x (B, H, n, E) with its first 2 * cos.shape[1] features rotated at positions pos (B, n), in x's dtype
    (float64 for the reference, the inputs' dtype for PyTorch's way, as Hugging Face's apply_rotary_pos_emb)."""
    half = cos.shape[1]
    c = cos.to(x.dtype)[pos][:, None]  # (B, 1, n, half)
    s = sin.to(x.dtype)[pos][:, None]
    r = x[..., :2 * half]
    if interleaved:
        a, b = r[..., 0::2], r[..., 1::2]
        rot = torch.stack([a * c - b * s, a * s + b * c], -1).flatten(-2)
    else:
        a, b = r[..., :half], r[..., half:]
        rot = torch.cat([a * c - b * s, a * s + b * c], -1)
    return torch.cat([rot, x[..., 2 * half:]], -1)


# name: (case of CASES for the shapes, rotary_dim, interleaved)
ROTARY = {
    # a causal chunk: queries at consecutive positions, half the features rotated (GPT-NeoX's partial rotary)
    "chunk-partial": ("chunk-window-alibi-cap", 16, False),
    # decoding against pages of 128 (CUDA reads them in place), every feature rotated in pairs (GPT-J)
    "paged-interleaved": ("chunk-paged128-window", 64, True),
    # no causal bound: every query at cache_seqlens[b]
    "not-causal": ("no-new-keys-strided", 16, False),
    # GQA decoding with left paddings (cache_leftpad; one cache all padding): the rotary positions stay absolute,
    # cache_seqlens[b] + t, as FlashAttention's
    "decode-leftpad": ("decode-gqa", 32, False, [5, 250, 0]),
}


@pytest.mark.parametrize("name", list(ROTARY))
@pytest.mark.parametrize("backend,dtype", [
    pytest.param("cpu", f32, id="cpu-f32"), pytest.param("cpu", bf16, id="cpu-bf16"),
    pytest.param("cpu", f64, id="cpu-f64"), pytest.param("emu80", bf16, id="emu80-bf16", marks=emu_marks()),
    pytest.param("cuda", bf16, id="cuda-bf16", marks=cuda_marks())])
def test_kvcache_rotary(backend, dtype, name, monkeypatch):
    """rotary_cos / rotary_sin (FlashAttention's): the query and the new keys rotated before the attention, the keys
    stored rotated. The output against the float64 reference over float64-rotated inputs, within 2x the error of
    PyTorch's way (the rotation in the dtype, as Hugging Face's apply_rotary_pos_emb, then SDPA); the lse against
    the reference over those inputs rounded to the dtype; the appended rows within the dtype's rounding of the
    float64 rotation, every other cache element unchanged."""
    case, rd, inter, *pad = ROTARY[name]
    pad = pad[0] if pad else None

    def unpadded(rows):  # each batch element's positions after its left padding
        return rows if pad is None else [(k[:, p:], v[:, p:]) for p, (k, v) in zip(pad, rows)]

    device = "cuda" if backend == "cuda" else "cpu"
    ops = backend_ops(backend, monkeypatch)
    args, rows, alibi, o = make_inputs(case, dtype, device, seed=21 + len(name))
    q, kc, vc, lens, key, value, table = args
    g = torch.Generator().manual_seed(22)
    theta = torch.rand(rd // 2, generator=g, dtype=f64) + 0.01
    pos_all = torch.arange(400, dtype=f64)[:, None] * theta[None]
    cos, sin = torch.cos(pos_all).to(f32), torch.sin(pos_all).to(f32)
    advance = o.get("is_causal", False) or "window" in o
    B, L = q.shape[0], q.shape[2]
    start = lens.cpu().long()[:, None]
    qpos = start + torch.arange(L) if advance else start.expand(B, L)
    q64 = rope(q.cpu().to(f64), cos, sin, qpos, inter)
    rows64, new_rows = [], None
    if key is not None:
        new_rows = rope(key.cpu().to(f64), cos, sin, start + torch.arange(key.shape[2]), inter)
        for b, (kk, vv) in enumerate(rows):  # the cached positions, then the rotated new ones
            n = int(lens[b])
            rows64.append((torch.cat([kk[:, :n], new_rows[b]], 1), vv))
    else:
        rows64 = rows
    want_k, want_v = expected_caches(args, case)  # (the appended rows as given: replaced below)
    with attention_ext.debug.kernel_log() as lines:
        out, lse = ops.attention_kvcache(q, kc, vc, lens, key, value, table, o.get("is_causal", False), o.get("scale"),
                                         list(o.get("window", (-1, -1))), o.get("cap", 0.0),
                                         None if alibi is None else alibi.to(device), cos.to(device),
                                         sin.to(device), inter,
                                         cache_leftpad=None if pad is None else torch.tensor(pad, device=device))
    rows64 = unpadded(rows64)
    r_out, _ = reference(q64, rows64, alibi, o)
    # the log-sum-exp has no PyTorch yardstick: its reference takes the rotated inputs as the op stores and uses
    # them, rounded to the dtype (the rotation itself is checked by the output above and the cache rows below)
    rnd = lambda t: t.to(dtype).to(f64)  # noqa: E731
    _, r_lse = reference(rnd(q64), [(rnd(kk), vv) for kk, vv in rows64], alibi, o)
    # PyTorch's way: the rotation in the dtype, then its attention over the same positions
    qb = rope(q.cpu(), cos, sin, qpos, inter)
    rows_b = rows
    if key is not None:
        kb = rope(key.cpu(), cos, sin, start + torch.arange(key.shape[2]), inter)
        rows_b = [(torch.cat([kk[:, :int(lens[b])], kb[b].to(f64)], 1), vv) for b, (kk, vv) in enumerate(rows)]
    rows_b = unpadded(rows_b)
    base = pytorch_baseline(qb, rows_b, alibi, o, dtype)
    assert_close_vs_baselines(f"out ({backend}, {name})", out.cpu(), r_out, [base], dtype)
    floor = 4 * ABS_FLOOR[f32] * (1 + 3 * (dtype != f64))
    assert_close_vs_baselines(f"lse ({backend}, {name})", lse.cpu(), r_lse, [], dtype, floor=floor)
    if key is not None:  # the rotated rows in the cache, the rest untouched
        P = kc.shape[2]
        for b in range(B):
            for t in range(key.shape[2]):
                p_ = int(lens[b]) + t
                at = (b, slice(None), p_) if table is None else (int(table[b, p_ // P]), slice(None), p_ % P)
                # (the rotation's rounding: a few ulps of the largest input where a * cos - b * sin cancels)
                torch.testing.assert_close(kc[at].cpu().to(f64), new_rows[b][:, t], rtol=torch.finfo(dtype).eps,
                                           atol=8 * torch.finfo(dtype).eps * float(key.abs().max()))
                want_k[at] = kc[at]
        assert torch.equal(kc, want_k) and torch.equal(vc, want_v)
    assert lines


ROTARY_ERRORS = {
    "cos-without-sin": (dict(sin=None), ValueError, "rotary_cos and rotary_sin must be given together"),
    "shape": (dict(sin=lambda s: s[:, :3]), ValueError, "must be \\(seqlen_ro, rotary_dim / 2\\) of one shape"),
    "too-wide": (dict(cos=lambda c: torch.ones(64, 9), sin=lambda s: torch.ones(64, 9)), ValueError,
                 "rotary_dim must be in \\[2, E = 16\\]"),
    "dtype": (dict(sin=lambda s: s.double()), TypeError, "floating point of one dtype"),
    "too-short": (dict(cos=lambda c: c[:5], sin=lambda s: s[:5]), ValueError,
                  "rotary_cos has 5 positions \\(seqlen_ro\\) but batch element 1 rotates positions up to 5"),
}


@pytest.mark.parametrize("name", list(ROTARY_ERRORS))
def test_kvcache_rotary_errors(name):
    """Bad rotary tables raise errors that name them (the last one, a table too short for the positions, from the
    lengths read back), and leave the caches untouched."""
    q, kc, vc, sl, kn, vn = _err_inputs()
    cos, sin = torch.ones(64, 4), torch.zeros(64, 4)
    change, exc, msg = ROTARY_ERRORS[name]
    if "cos" in change:
        cos = change["cos"](cos)
    if "sin" in change:
        sin = None if change["sin"] is None else change["sin"](sin)
    before = (kc.clone(), vc.clone())
    with pytest.raises(exc, match=msg):
        torch.ops.attention_ext.attention_kvcache(q, kc, vc, sl, kn, vn, None, False, None, [-1, -1], 0.0, None, cos,
                                                  sin, False)
    assert torch.equal(kc, before[0]) and torch.equal(vc, before[1])
