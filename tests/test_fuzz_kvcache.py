"""Randomised attention_kvcache calls: every option drawn at once from a seed, against the float64 reference.

test_kvcache.py and test_kvcache_packed.py pick their cases by hand; here each case draws batch size, GQA group,
query rows per batch element (decoding steps of one row most often), new keys or none, head dims (a different
value dim), cache lengths (empty caches included), the cache's layout (contiguous, a (B, S, H, E) buffer seen
through transpose, or shuffled pages of 16, 24, 32 or 64 positions), causal, windows, ALiBi slopes, a soft cap,
the scale, a pool of cache rows named by cache_batch_idx, a left padding of each cache (cache_leftpad), key and
value caches that are the two halves of one buffer (vLLM's layout), and packed queries (cu_seqlens_q: continuous
batching, idle batch elements included); on the CUDA kernels' emulator also forced key splits, GQA row packing
turned off, and the glue as under CUDA-graph capture (ATTENTION_EXT_EMU_CAPTURE: the lengths checked on the
device, launches planned without them). Output and log-sum-exp against the
float64 reference of test_kvcache.py, within 2x the error of PyTorch's way in the same dtype, and the caches
after the call bit for bit. A failure prints the case, which its id reproduces: `pytest
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
        want_k, want_v = tp.expected_caches(args)
        pool = _pool(args, o, seed)
        _one_buffer(args, o)
        out, lse = tp._call(ops, args, alibi, o, **_extra(pool, o, device))
        _check_caches(args, pool, want_k, want_v, where)
        seqs = [(qb, _unpadded(rows, o, b)) for b, (qb, rows) in enumerate(seqs)]
        tp.check_vs_reference(where, out, lse, seqs, alibi, o, dtype)
        return
    monkeypatch.setitem(tk.CASES, name, spec)
    args, rows, alibi, o = tk.make_inputs(name, dtype, device, seed=seed)
    want_k, want_v = tk.expected_caches(args, name)
    pool = _pool(args, o, seed)
    _one_buffer(args, o)
    q, kc, vc, lens, key, value, table = args
    out, lse = ops.attention_kvcache(q, kc, vc, lens, key, value, table, o.get("is_causal", False), o.get("scale"),
                                     list(o.get("window", (-1, -1))), o.get("cap", 0.0),
                                     None if alibi is None else alibi.to(device), **_extra(pool, o, device))
    _check_caches(args, pool, want_k, want_v, where)
    rows = [_unpadded(kv, o, b) for b, kv in enumerate(rows)]
    r_out, r_lse = tk.reference(args[0].cpu(), rows, alibi, o)
    base = tk.pytorch_baseline(args[0].cpu(), rows, alibi, o, dtype)
    assert_close_vs_baselines(f"out\n{where}", out.cpu(), r_out, [base], dtype)
    floor = 4 * ABS_FLOOR[f32] * (1 + 3 * (dtype != f64))
    assert_close_vs_baselines(f"lse\n{where}", lse.cpu(), r_lse, [], dtype, floor=floor)


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
    }
    assert all(seen.values()), [k for k, v in seen.items() if not v]
