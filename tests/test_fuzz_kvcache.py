"""Randomised attention_kvcache calls: every option drawn at once from a seed, against the float64 reference.

test_kvcache.py and test_kvcache_packed.py pick their cases by hand; here each case draws batch size, GQA group,
query rows per batch element (decoding steps of one row most often), new keys or none, head dims (a different
value dim), cache lengths (empty caches included), the cache's layout (contiguous, a (B, S, H, E) buffer seen
through transpose, or shuffled pages of 16, 24, 32 or 64 positions), causal, windows, ALiBi slopes, a soft cap,
the scale, a pool of cache rows named by cache_batch_idx, a left padding of each cache (cache_leftpad), key and
value caches that are the two halves of one buffer (vLLM's layout), a rotary embedding (all, half or 16 features,
interleaved or not: the new keys must land in the cache rotated as the op computes them, bit for bit), and packed
queries (cu_seqlens_q: continuous batching, idle batch elements included); on the CUDA kernels' emulator also
forced key splits, GQA row packing turned off, and the glue as under CUDA-graph capture (ATTENTION_EXT_EMU_CAPTURE:
the lengths checked on the device, launches planned without them). Output and log-sum-exp against the float64
reference of test_kvcache.py, within 2x the error of PyTorch's way in the same dtype, and the caches after the call
bit for bit. A failure prints the case, which its id reproduces: `pytest
tests/test_fuzz_kvcache.py -k "emu80-7"`. ATTENTION_EXT_FUZZ_CASES=n draws n cases per backend.
"""
from __future__ import annotations

import random

import pytest
import torch

import test_kvcache as tk
import test_kvcache_packed as tp
from reference import ABS_FLOOR, assert_close_vs_baselines
from test_fuzz import _params  # (cases per backend, ATTENTION_EXT_FUZZ_CASES, one skipped case where none runs)

f32, f16, bf16, f64 = torch.float32, torch.float16, torch.bfloat16, torch.float64

_BACKENDS = {"cpu": 40, "emu80": 24, "cuda": 300}


def draw(seed: int, backend: str):
    """(packed, spec in test_kvcache.CASES' or test_kvcache_packed.CASES' form, dtype, environment)."""
    r = random.Random(f"kvcache-{backend}-{seed}")
    dtypes = (f32, bf16, f16, f64) if backend == "cpu" else (f32, bf16, f16)
    dtype = r.choice(dtypes)
    packed = r.random() < 0.4
    Hkv = r.choice((1, 2, 3))
    Hq = Hkv * r.choice((1, 2, 4))
    E = r.choice((16, 32, 64, 80, 128))
    Ev = E if r.random() < 0.7 else r.choice((16, 48, 64))
    page = r.choice((None, None, 16, 24, 32, 64))
    B = r.randint(1, 4)
    queries = [r.choice((0, 1, 1, 1, 2, 5, 17)) if packed else 0 for _ in range(B)]
    L = r.choice((1, 1, 1, 2, 5, 17))
    new = r.random() < 0.7
    longest = max(queries) if packed else L
    lens = [r.choice((0, 1, 7, 33, 64, 100, 200, 300)) for _ in range(B)]
    Smax = max(lens) + longest + r.choice((0, 5))
    if page:  # (a block table holds one page at least)
        Smax = max(1, (Smax + page - 1) // page) * page
    o = {}
    if r.random() < 0.6:
        o["is_causal"] = True
    if r.random() < 0.25:
        o["window"] = (r.choice((0, 3, 40, 150)), r.choice((-1, -1, 0, 2)))
    if r.random() < 0.25:
        o["alibi"] = True
    if r.random() < 0.2:
        o["cap"] = r.choice((2.0, 10.0))
    if r.random() < 0.2:
        o["scale"] = r.choice((0.05, 0.3))
    if page:
        o["page"] = page
    elif not packed and r.random() < 0.2:
        o["bshd"] = True
    elif r.random() < 0.3:
        o["pool"] = True  # a pool of cache rows with cache_batch_idx
    env = {}
    if backend.startswith("emu"):
        env["ATTENTION_EXT_EMU_ARCH"] = backend[3:]
        if r.random() < 0.3:
            env["ATTENTION_EXT_FWD_SPLITS"] = str(r.choice((2, 3, 5)))
        if r.random() < 0.2:
            env["ATTENTION_EXT_PACK_GQA"] = "0"
    if not page and r.random() < 0.25:  # (drawn last: the draws above stay those of earlier versions)
        o["leftpad"] = [r.randint(0, n) for n in lens]
    if Ev == E and not o.get("bshd") and r.random() < 0.25:  # (after leftpad, for the same reason)
        o["one_buffer"] = True  # key and value caches the two halves of one buffer (vLLM's layout)
    if backend.startswith("emu") and r.random() < 0.25:  # (last too) the glue as under CUDA-graph capture
        env["ATTENTION_EXT_EMU_CAPTURE"] = "1"
    if r.random() < 0.3:  # (last) a rotary embedding: (rotary_dim, interleaved)
        o["rotary"] = (r.choice((E, E // 2 + E // 2 % 2, 16)), r.random() < 0.5)
    if packed:
        spec = (Hq, Hkv, E, Ev, Smax, lens, queries, new, o)
    else:
        spec = (B, Hq, Hkv, L, L if new else 0, E, Ev, Smax, lens, o)
    return packed, spec, dtype, env


@pytest.mark.parametrize("backend,seed", _params(_BACKENDS))
def test_fuzz_kvcache(backend, seed, monkeypatch):
    packed, spec, dtype, env = draw(seed, backend)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    device = "cuda" if backend == "cuda" else "cpu"
    ops = tk.backend_ops(backend, monkeypatch)
    where = f"{backend}-{seed}: {'packed ' if packed else ''}{spec}, {dtype}, {env}"
    name = f"fuzz-{backend}-{seed}"
    if packed:
        monkeypatch.setitem(tp.CASES, name, spec)
        args, seqs, alibi, o = tp.make_packed(name, dtype, device, seed=seed)
        rot = _Rotary(o, args[3], spec[4], dtype, seed, args[7])
        want_k, want_v = tp.expected_caches(rot.stored_args(args))
        pool = _pool(args, o, seed)
        _one_buffer(args, o)
        out, lse = tp._call(ops, args, alibi, o, **_extra(pool, o, device), **rot.kwargs(device))
        _check_caches(args, pool, want_k, want_v, where)
        floor = 4 * ABS_FLOOR[f32] * (1 + 3 * (dtype != f64))
        for how, xs in rot.packed_inputs(args, seqs).items():  # (out: float64 rotation; lse: the op's rotation)
            xs = [(qb, _unpadded(rows, o, b)) for b, (qb, rows) in enumerate(xs)]
            r_out, r_lse = _packed_reference(xs, alibi, o)
            if how in ("exact", "plain"):
                base = torch.cat([tk.pytorch_baseline(qb.to(dtype), [rows], None if alibi is None else
                                                      alibi[b:b + 1], o, dtype)[0].transpose(0, 1)
                                  for b, (qb, rows) in enumerate(rot.baseline(args, seqs, o))])
                assert_close_vs_baselines(f"out\n{where}", out.cpu(), r_out, [base], dtype)
            if how in ("stored", "plain"):
                assert_close_vs_baselines(f"lse\n{where}", lse.cpu(), r_lse, [], dtype, floor=floor)
        return
    monkeypatch.setitem(tk.CASES, name, spec)
    args, rows, alibi, o = tk.make_inputs(name, dtype, device, seed=seed)
    rot = _Rotary(o, args[3], spec[7], dtype, seed)
    want_k, want_v = tk.expected_caches(rot.stored_args(args), name)
    pool = _pool(args, o, seed)
    _one_buffer(args, o)
    q, kc, vc, lens, key, value, table = args
    out, lse = ops.attention_kvcache(q, kc, vc, lens, key, value, table, o.get("is_causal", False), o.get("scale"),
                                     list(o.get("window", (-1, -1))), o.get("cap", 0.0),
                                     None if alibi is None else alibi.to(device), **_extra(pool, o, device),
                                     **rot.kwargs(device))
    _check_caches(args, pool, want_k, want_v, where)
    # out against the float64 rotation, within 2x PyTorch's way (the rotation in the dtype, as Hugging Face's); lse
    # against the reference over the rotated inputs as the op uses them (no PyTorch yardstick: test_kvcache_rotary)
    q64, rows64 = rot.dense_inputs(args, rows, "exact")
    r_out, _ = tk.reference(q64, [_unpadded(kv, o, b) for b, kv in enumerate(rows64)], alibi, o)
    qb, rows_b = rot.dense_inputs(args, rows, "baseline")
    base = tk.pytorch_baseline(qb, [_unpadded(kv, o, b) for b, kv in enumerate(rows_b)], alibi, o, dtype)
    assert_close_vs_baselines(f"out\n{where}", out.cpu(), r_out, [base], dtype)
    qs, rows_s = rot.dense_inputs(args, rows, "stored")
    _, r_lse = tk.reference(qs, [_unpadded(kv, o, b) for b, kv in enumerate(rows_s)], alibi, o)
    floor = 4 * ABS_FLOOR[f32] * (1 + 3 * (dtype != f64))
    assert_close_vs_baselines(f"lse\n{where}", lse.cpu(), r_lse, [], dtype, floor=floor)


def _packed_reference(seqs, alibi, o):
    """test_kvcache_packed.check_vs_reference's float64 (out (total_q, Hq, Ev), lse (total_q, Hq))."""
    refs = [tk.reference(qb, [rows], None if alibi is None else alibi[b:b + 1], o) for b, (qb, rows) in enumerate(seqs)]
    return torch.cat([r[0][0].transpose(0, 1) for r in refs]), torch.cat([r[1][0].transpose(0, 1) for r in refs])


class _Rotary:
    """A case's rotary embedding (o["rotary"] = (rotary_dim, interleaved); absent: none, every method the identity):
    a table of Smax + 20 positions (seqlen_ro) at random frequencies, the queries at cache_seqlens[b] + i where a
    causal or window bound makes them advance (else all at cache_seqlens[b]), new key t at cache_seqlens[b] + t.
    Three roundings of the rotated inputs: "exact" (float64), "stored" (as the op computes them: float32, float64 for
    float64, rounded to the dtype: the new keys it writes into the cache, bit for bit) and "baseline" (in the dtype,
    as Hugging Face's apply_rotary_pos_emb)."""

    def __init__(self, o, lens, smax, dtype, seed, cu=None):
        self.on = "rotary" in o
        if not self.on:
            return
        rd, self.inter = o["rotary"]
        g = torch.Generator().manual_seed(seed + 7)
        theta = torch.rand(rd // 2, generator=g, dtype=f64) * 0.5 + 0.01
        angles = torch.arange(smax + 20, dtype=f64)[:, None] * theta[None]
        self.cos, self.sin = angles.cos().to(f32), angles.sin().to(f32)
        self.dtype, self.advance = dtype, o.get("is_causal", False) or "window" in o
        self.lens = lens.cpu().long()
        self.cu = None if cu is None else cu.cpu().long()

    def kwargs(self, device):
        if not self.on:
            return {}
        return dict(rotary_cos=self.cos.to(device), rotary_sin=self.sin.to(device), rotary_interleaved=self.inter)

    def _rope(self, x, pos, how):
        """x (B, H, n, E) at positions pos (B, n), rounded as `how` says, in float64."""
        if how == "exact":
            return tk.rope(x.cpu().to(f64), self.cos, self.sin, pos, self.inter)
        if how == "stored":
            acc = f64 if self.dtype == f64 else f32
            return tk.rope(x.cpu().to(acc), self.cos, self.sin, pos, self.inter).to(self.dtype).to(f64)
        return tk.rope(x.cpu().to(self.dtype), self.cos, self.sin, pos, self.inter).to(f64)

    def _dense_pos(self, n, queries):
        start = self.lens[:, None]
        return start + torch.arange(n) if (self.advance or not queries) else start.expand(-1, n)

    def dense_inputs(self, args, rows, how):
        """(query, rows) of a dense case for the reference (float64; "baseline": the query in the dtype)."""
        q, key = args[0], args[4]
        if not self.on:
            return (q.cpu() if how == "baseline" else q.cpu().to(f64)), rows
        qr = self._rope(q, self._dense_pos(q.shape[2], True), how)
        if key is None:
            new_rows = rows
        else:
            kr = self._rope(key, self._dense_pos(key.shape[2], False), how)
            new_rows = [(torch.cat([kk[:, :int(self.lens[b])], kr[b]], 1), vv) for b, (kk, vv) in enumerate(rows)]
        return (qr.to(self.dtype) if how == "baseline" else qr), new_rows

    def _packed_pos(self, queries):
        """(1, total_q) positions of the packed rows."""
        b = torch.repeat_interleave(torch.arange(len(self.lens)), self.cu[1:] - self.cu[:-1])
        i = torch.arange(int(self.cu[-1])) - self.cu[b]
        return (self.lens[b] + (i if (self.advance or not queries) else 0))[None]

    def _packed_rope(self, x, queries, how):  # x (total, H, E) -> (total, H, E) float64
        return self._rope(x.transpose(0, 1)[None], self._packed_pos(queries), how)[0].transpose(0, 1)

    def _packed_seqs(self, args, seqs, how):
        q, key, cu = args[0], args[4], self.cu
        qr = self._packed_rope(q, True, how)
        kr = None if key is None else self._packed_rope(key, False, how)
        out = []
        for b, (_, (kk, vv)) in enumerate(seqs):
            r = slice(int(cu[b]), int(cu[b + 1]))
            if kr is not None:
                kk = torch.cat([kk[:, :int(self.lens[b])], kr[r].transpose(0, 1)], 1)
            out.append((qr[r].transpose(0, 1)[None], (kk, vv)))
        return out

    def packed_inputs(self, args, seqs):
        """{"exact" / "stored": the batch elements' (query, rows) for the reference}, or {"plain": seqs}."""
        if not self.on:
            return {"plain": seqs}
        return {how: self._packed_seqs(args, seqs, how) for how in ("exact", "stored")}

    def baseline(self, args, seqs, o):
        return self._packed_seqs(args, seqs, "baseline") if self.on else seqs

    def stored_args(self, args):
        """args with the new keys as the op writes them into the cache (rotated: "stored", in the dtype)."""
        if not self.on or args[4] is None:
            return args
        key = args[4]
        if self.cu is None:
            kr = self._rope(key, self._dense_pos(key.shape[2], False), "stored")
        else:
            kr = self._packed_rope(key, False, "stored")
        return [*args[:4], kr.to(self.dtype).to(key.device), *args[5:]]


def _pool(args, o, seed):
    """With o["pool"]: the caches args[1:3] (one row per batch element) moved into a pool of 2 more rows of random
    values, at rows idx in shuffled order; args[1:3] become the pool. Returns {"cache_batch_idx": idx, "before":
    the pool before the call}, or {}."""
    if not o.get("pool"):
        return {}
    kc, vc = args[1], args[2]
    B, R = kc.shape[0], kc.shape[0] + 2
    g = torch.Generator().manual_seed(seed + 99)
    idx = torch.randperm(R, generator=g)[:B].to(kc.device)
    pools = []
    for c in (kc, vc):
        p = torch.randn(R, *c.shape[1:], generator=g, dtype=f64).to(device=c.device, dtype=c.dtype)
        p[idx] = c
        pools.append(p)
    args[1], args[2] = pools
    return {"cache_batch_idx": idx.to(torch.int32), "before": [p.clone() for p in pools]}


def _one_buffer(args, o):
    """With o["one_buffer"]: the caches args[1:3] (pooled or paged or not) copied into the two halves of one buffer,
    (2, ...) as vLLM lays its cache out, and args[1:3] become those halves (views the op writes through)."""
    if o.get("one_buffer"):
        buf = torch.stack([args[1], args[2]])
        args[1], args[2] = buf[0], buf[1]


def _extra(pool, o, device):
    """The op's keyword arguments of a case: cache_batch_idx (a pool), cache_leftpad (o["leftpad"])."""
    kw = {k: v for k, v in pool.items() if k != "before"}
    if "leftpad" in o:
        kw["cache_leftpad"] = torch.tensor(o["leftpad"], dtype=torch.int32, device=device)
    return kw


def _unpadded(rows, o, b):
    """Batch element b's (K, V) positions without its left padding (o["leftpad"][b] first positions)."""
    pad = o.get("leftpad", [0] * (b + 1))[b]
    return rows[0][:, pad:], rows[1][:, pad:]


def _check_caches(args, pool, want_k, want_v, where):
    """The caches after the call: want_k / want_v (one row per batch element), at the pool's rows when pooled,
    the pool's other rows as they were."""
    kc, vc = args[1].cpu(), args[2].cpu()
    if pool:
        idx = pool["cache_batch_idx"].long().cpu()
        rest = torch.ones(kc.shape[0], dtype=torch.bool)
        rest[idx] = False
        same = all(torch.equal(a[rest], b.cpu()[rest]) for a, b in zip((kc, vc), pool["before"]))
        assert same, f"the pool's other rows\n{where}"
        kc, vc = kc[idx], vc[idx]
    assert torch.equal(kc, want_k.cpu()) and torch.equal(vc, want_v.cpu()), f"the caches\n{where}"


def test_draws_cover_the_options():
    """The default draws reach every option the docstring names."""
    ds = [draw(s, b) for b, n in _BACKENDS.items() if b != "cuda" for s in range(n)]
    opts = [spec[-1] for _, spec, _, _ in ds]
    seen = {
        "packed": any(p for p, *_ in ds), "dense": any(not p for p, *_ in ds),
        "decoding step": any(not p and spec[3] == 1 for p, spec, _, _ in ds),
        "GQA decoding": any(not p and spec[3] == 1 and spec[1] > spec[2] for p, spec, _, _ in ds),
        "idle batch element": any(p and 0 in spec[6] for p, spec, _, _ in ds),
        "no new keys": any((not p and spec[4] == 0) or (p and not spec[7]) for p, spec, _, _ in ds),
        "empty cache": any(0 in spec[-2 if not p else 5] for p, spec, _, _ in ds),
        "paged 16": any(o.get("page") == 16 for o in opts), "paged 24": any(o.get("page") == 24 for o in opts),
        "bshd": any(o.get("bshd") for o in opts), "causal": any(o.get("is_causal") for o in opts),
        "window": any("window" in o for o in opts), "alibi": any(o.get("alibi") for o in opts),
        "cap": any("cap" in o for o in opts), "scale": any("scale" in o for o in opts),
        "f16": any(d == f16 for *_, d, _ in ds), "f64": any(d == f64 for *_, d, _ in ds),
        "forced splits": any("ATTENTION_EXT_FWD_SPLITS" in e for *_, e in ds),
        "GQA packing off": any("ATTENTION_EXT_PACK_GQA" in e for *_, e in ds),
        "packed with splits": any(p and "ATTENTION_EXT_FWD_SPLITS" in e for p, *_, e in ds),
        "pool": any(o.get("pool") for o in opts), "leftpad": any(any(o.get("leftpad", [])) for o in opts),
        "packed leftpad": any(p and any(spec[-1].get("leftpad", [])) for p, spec, _, _ in ds),
        "packed pool": any(p and spec[-1].get("pool") for p, spec, _, _ in ds),
        "one buffer": any(o.get("one_buffer") for o in opts),
        "paged one buffer": any(o.get("one_buffer") and o.get("page") for o in opts),
        "as captured": any("ATTENTION_EXT_EMU_CAPTURE" in e for *_, e in ds),
        "packed as captured": any(p and "ATTENTION_EXT_EMU_CAPTURE" in e for p, *_, e in ds),
        "rotary": any("rotary" in o for o in opts),
        "rotary interleaved": any(o.get("rotary", (0, False))[1] for o in opts),
        "packed rotary": any(p and "rotary" in spec[-1] for p, spec, _, _ in ds),
        "rotary as captured": any("rotary" in spec[-1] and "ATTENTION_EXT_EMU_CAPTURE" in e for _, spec, _, e in ds),
    }
    assert all(seen.values()), [k for k, v in seen.items() if not v]
