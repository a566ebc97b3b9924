"""A small grid of CUDA forward/backward/probs/dropout-mask calls for
compute-sanitizer (scripts/sanitize_cuda.sh runs this file under memcheck,
racecheck and initcheck). Not a pytest file: it just exercises every kernel
family (each dtype, a few head-dim buckets, tails, masks of each kind and
layout, GQA, causal/window, dropout, deterministic and atomic dQ, split keys, packed variable-length
sequences) on shapes
small enough for the sanitizer's slowdown, and checks nothing is NaN.

    python tests/cuda_sanitize_cases.py            # all cases
    python tests/cuda_sanitize_cases.py --quick    # a third of them
"""
import argparse
import itertools
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import attention_ext  # noqa: E402,F401

ops = torch.ops.attention_ext


def case(dtype, E, Ev, L, S, Hq, Hkv, causal, window, mask, dropout, deterministic, layout, softcap=0.0,
         alibi=False):
    dev = "cuda"
    B = 2
    torch.use_deterministic_algorithms(deterministic)
    if layout == "blhe":
        q = torch.randn(B, L, Hq, E, device=dev, dtype=dtype).transpose(1, 2)
        k = torch.randn(B, S, Hkv, E, device=dev, dtype=dtype).transpose(1, 2)
        v = torch.randn(B, S, Hkv, Ev, device=dev, dtype=dtype).transpose(1, 2)
    else:
        q = torch.randn(B, Hq, L, E, device=dev, dtype=dtype)
        k = torch.randn(B, Hkv, S, E, device=dev, dtype=dtype)
        v = torch.randn(B, Hkv, S, Ev, device=dev, dtype=dtype)
    m = None
    if mask == "bool":
        m = torch.rand(B, 1, L, S, device=dev) < 0.8
    elif mask == "float":
        m = torch.randn(1, Hq, L, S, device=dev, dtype=torch.float32)
        m[..., ::5, :] = -math.inf  # fully masked rows
    elif mask == "keypad":
        m = torch.zeros(B, 1, 1, S, device=dev, dtype=dtype)
        m[..., S // 2:] = -math.inf
    elif mask == "keypad_bool":  # the key-padding mask the Hopper kernels read (forward and backward)
        m = (torch.arange(S, device=dev) < S // 2 + 1).view(1, 1, 1, S).expand(B, 1, 1, S)
    elif mask == "strided":
        m = (torch.rand(B, Hq, S, L, device=dev) < 0.8).transpose(-1, -2)
    w = list(window)
    a = torch.rand(B, Hq, device=dev) if alibi else None  # ALiBi slopes per (batch, head)
    out, lse, rng = ops._attention_forward(q, k, v, m, dropout, causal, None, Hq != Hkv, w, softcap, a)
    g = torch.randn_like(out)
    mask_grad = m is not None and m.is_floating_point()
    dq, dk, dv, dm = ops._attention_backward(g, q, k, v, m, out, lse, rng, dropout, causal, None, Hq != Hkv, w,
                                             mask_grad, None, softcap, a)
    probs = ops.attention_probs(q, k, m, lse, rng, dropout, causal, None, Hq != Hkv, w, softcap, a)
    if dropout > 0:
        ops._dropout_mask(rng, B, Hq, L, S, dropout)
    torch.cuda.synchronize()
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv), ("probs", probs)):
        if torch.isnan(t).any():
            raise SystemExit(f"NaN in {name} for {dtype} E={E} Ev={Ev} L={L} S={S} mask={mask}")


def varlen_case(dtype, lengths_q, lengths_k, Hq, Hkv, E, causal, dropout, deterministic, softcap=0.0):
    """attention_varlen over packed sequences (the packed sm80 forward and backward, one launch each)."""
    dev = "cuda"
    torch.use_deterministic_algorithms(deterministic)
    cu_q = torch.tensor([0] + list(itertools.accumulate(lengths_q)), device=dev, dtype=torch.int32)
    cu_k = torch.tensor([0] + list(itertools.accumulate(lengths_k)), device=dev, dtype=torch.int32)
    q = torch.randn(sum(lengths_q), Hq, E, device=dev, dtype=dtype)
    k = torch.randn(sum(lengths_k), Hkv, E, device=dev, dtype=dtype)
    v = torch.randn(sum(lengths_k), Hkv, E, device=dev, dtype=dtype)
    w = [-1, -1]
    out, lse, rng = ops._attention_varlen_forward(q, k, v, cu_q, cu_k, None, None, dropout, causal, None,
                                                  Hq != Hkv, w, softcap)
    g = torch.randn_like(out)
    dq, dk, dv = ops._attention_varlen_backward(g, q, k, v, cu_q, cu_k, out, lse, rng, dropout, causal, None,
                                                Hq != Hkv, w, None, softcap)
    torch.cuda.synchronize()
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        if torch.isnan(t).any():
            raise SystemExit(f"NaN in varlen {name} for {dtype} lengths {lengths_q} / {lengths_k}")


def kvcache_case(dtype, B, Hq, Hkv, L, E, lengths, page, causal, alibi=False, leftpad=None):
    """attention_kvcache: the new rows appended, then the sm80 forward's cache variant on the cache in place
    (page = 0: contiguous; else paged, read in place row by row), with ALiBi slopes per (batch, head) or none, and
    left paddings of the (contiguous) caches or none."""
    dev = "cuda"
    S = max(lengths) + L
    if page:
        per = (S + page - 1) // page
        table = torch.randperm(B * per + 2, device=dev)[:B * per].view(B, per).to(torch.int32)
        kc, vc = (torch.randn(B * per + 2, Hkv, page, E, device=dev, dtype=dtype) for _ in range(2))
    else:
        table = None
        kc, vc = (torch.randn(B, Hkv, S, E, device=dev, dtype=dtype) for _ in range(2))
    q = torch.randn(B, Hq, L, E, device=dev, dtype=dtype)
    k, v = (torch.randn(B, Hkv, L, E, device=dev, dtype=dtype) for _ in range(2))
    lens = torch.tensor(lengths, device=dev, dtype=torch.int32)
    slopes = torch.rand(B, Hq, device=dev) if alibi else None
    pad = None if leftpad is None else torch.tensor(leftpad, device=dev, dtype=torch.int32)
    out, lse = ops.attention_kvcache(q, kc, vc, lens, k, v, table, causal, alibi_slopes=slopes, cache_leftpad=pad)
    torch.cuda.synchronize()
    if torch.isnan(out).any():
        raise SystemExit(f"NaN in kvcache out for {dtype} lengths {lengths} page {page}")


def kvcache_packed_case(dtype, Hq, Hkv, E, lengths, queries, page):
    """attention_kvcache with packed queries: batch element b's queries[b] rows (and new keys) against its cache of
    lengths[b] positions, paged; few CTAs and long caches, so that the keys are split and merged into packed rows."""
    dev = "cuda"
    B, T = len(lengths), sum(queries)
    per = (max(lengths) + max(queries) + page - 1) // page
    table = torch.randperm(B * per + 2, device=dev)[:B * per].view(B, per).to(torch.int32)
    kc, vc = (torch.randn(B * per + 2, Hkv, page, E, device=dev, dtype=dtype) for _ in range(2))
    q = torch.randn(T, Hq, E, device=dev, dtype=dtype)
    k, v = (torch.randn(T, Hkv, E, device=dev, dtype=dtype) for _ in range(2))
    cu = torch.tensor([0] + torch.tensor(queries).cumsum(0).tolist(), device=dev, dtype=torch.int32)
    lens = torch.tensor(lengths, device=dev, dtype=torch.int32)
    out, lse = ops.attention_kvcache(q, kc, vc, lens, k, v, table, True, cu_seqlens_q=cu)
    torch.cuda.synchronize()
    if torch.isnan(out).any() or torch.isnan(lse).any():
        raise SystemExit(f"NaN in packed kvcache out for {dtype} lengths {lengths} queries {queries}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    grid = []
    for dtype, (E, Ev), (L, S) in itertools.product(
        (torch.float16, torch.bfloat16, torch.float32),
        ((64, 64), (40, 128), (256, 256)),
        ((1, 1), (33, 70), (130, 97)),
    ):
        grid.append((dtype, E, Ev, L, S, 4, 4, False, (-1, -1), None, 0.0, False, "contig"))
    variants = [
        dict(Hkv=2, causal=True),
        dict(window=(8, 3)),
        dict(mask="bool"),
        dict(mask="float"),
        dict(mask="keypad"),
        dict(mask="strided"),
        dict(dropout=0.2),
        dict(deterministic=True, causal=True),
        dict(layout="blhe", Hkv=1),
    ]
    keys = ["dtype", "E", "Ev", "L", "S", "Hq", "Hkv", "causal", "window", "mask", "dropout", "deterministic", "layout"]
    for dtype, var in itertools.product((torch.float16, torch.float32), variants):
        base = dict(zip(keys, (dtype, 64, 64, 70, 150, 4, 4, False, (-1, -1), None, 0.0, False, "contig")))
        base.update(var)
        grid.append(tuple(base[k] for k in keys))
    if args.quick:
        grid = grid[::3]
    # On sm_90: the Hopper kernels' own cases (bool key padding through the
    # backward too; a persistent forward with more tiles than multiprocessors,
    # causal, so that CTAs walk several tiles of different lengths; the
    # backward's head-dim split at 256, GQA and causal; the backward's dropout)
    grid.append((torch.bfloat16, 128, 128, 130, 200, 4, 2, False, (-1, -1), "keypad_bool", 0.0, False, "contig"))
    grid.append((torch.float16, 256, 256, 150, 130, 4, 2, True, (-1, -1), "keypad_bool", 0.0, False, "contig"))
    grid.append((torch.bfloat16, 128, 128, 130, 200, 4, 2, True, (-1, -1), None, 0.2, False, "contig"))  # dropout
    grid.append((torch.float16, 64, 64, 512, 512, 36, 36, True, (-1, -1), None, 0.0, False, "contig"))  # 288 tiles
    # split keys (flash-decoding): few CTAs, many key tiles, so the forward shares each CTA's tiles among
    # several CTAs and merges them (fwd_combine_kernel); decode rows with GQA and key padding, and short
    # fp32 rows with a float mask (fully masked rows)
    grid.append((torch.bfloat16, 128, 128, 1, 2048, 4, 2, False, (-1, -1), "keypad_bool", 0.0, False, "contig"))
    grid.append((torch.float32, 64, 40, 3, 1000, 4, 4, False, (-1, -1), "float", 0.0, False, "blhe"))
    # logit soft-capping: the sm80 forward and backward (a window, dropout, TF32-free fp32), and on sm_90 the
    # Hopper forward and backward (key padding, causal)
    grid.append((torch.float16, 64, 64, 70, 150, 4, 2, False, (8, 3), "bool", 0.2, False, "contig", 5.0))
    grid.append((torch.float32, 128, 128, 33, 70, 4, 4, True, (-1, -1), None, 0.0, True, "contig", 5.0))
    grid.append((torch.bfloat16, 128, 128, 130, 200, 4, 2, True, (-1, -1), "keypad_bool", 0.0, False, "contig", 5.0))
    # ALiBi: the sm80 forward, backward and weights (a boolean mask, dropout; deterministic fp32 with L < S), and on
    # sm_90 the Hopper forward and backward (key padding, GQA, causal; MQA with a soft cap)
    grid.append((torch.float16, 64, 64, 70, 150, 4, 2, False, (8, 3), "bool", 0.2, False, "contig", 0.0, True))
    grid.append((torch.float32, 128, 128, 33, 70, 4, 4, True, (-1, -1), None, 0.0, True, "contig", 0.0, True))
    grid.append((torch.bfloat16, 128, 128, 130, 200, 4, 2, True, (-1, -1), "keypad_bool", 0.0, False, "contig", 0.0,
                 True))
    grid.append((torch.bfloat16, 64, 64, 130, 200, 4, 1, False, (-1, -1), "keypad_bool", 0.0, False, "contig", 5.0,
                 True))
    # a soft cap with ALiBi, dropout and a float mask's gradient: the sm80 backward's cap pass writes the mask's
    # gradient buffer and its P loop rescales it in place (fully masked rows, L < S over three key blocks)
    grid.append((torch.float16, 64, 64, 70, 150, 4, 2, False, (-1, -1), "float", 0.2, False, "contig", 5.0, True))
    for i, c in enumerate(grid):
        print(f"[{i + 1}/{len(grid)}] {c}", flush=True)
        case(*c)
    # packed variable-length sequences: an empty sequence, GQA and causal; cross lengths with dropout; the
    # deterministic backward in float32; on sm_90 the packed Hopper forward runs them all (its
    # tensor maps with a base before the tensor's, sequences without queries or keys, dropout)
    varlen = [
        (torch.float16, [70, 0, 130, 5], [70, 0, 130, 5], 4, 2, 64, True, 0.0, False),
        (torch.bfloat16, [33, 200, 1], [90, 17, 64], 2, 2, 128, False, 0.2, False),
        (torch.float32, [40, 75], [40, 75], 2, 1, 40, True, 0.0, True),
        (torch.bfloat16, [130, 257, 3, 0, 260], [300, 7, 129, 50, 0], 4, 2, 64, True, 0.0, False),
        (torch.float16, [140, 129, 200], [140, 129, 200], 2, 2, 128, False, 0.2, False),
        # soft-capped: the packed sm80 forward, the backward sequence by sequence (Hopper's on sm_90)
        (torch.bfloat16, [70, 0, 130, 5], [70, 0, 130, 5], 4, 2, 64, True, 0.0, False, 3.0),
    ]
    for i, c in enumerate(varlen):
        print(f"[varlen {i + 1}/{len(varlen)}] {c}", flush=True)
        varlen_case(*c)
    torch.use_deterministic_algorithms(False)
    # attention_kvcache: decoding against a contiguous cache (an empty one too), a chunk against pages of 128 and
    # of 64, pages of 16 and of 24 (tiles crossing page ends, ALiBi), left paddings (one cache all padding)
    kvcache = [
        (torch.bfloat16, 3, 8, 2, 1, 128, [300, 0, 17], 0, True),
        (torch.float16, 2, 4, 2, 7, 64, [130, 3], 128, True),
        (torch.bfloat16, 2, 8, 1, 1, 128, [500, 64], 64, True),
        (torch.float16, 2, 4, 4, 3, 64, [40, 9], 16, False),
        (torch.bfloat16, 2, 8, 2, 1, 128, [200, 47], 24, True, True),
        (torch.float16, 3, 8, 2, 1, 64, [300, 5, 40], 0, True, False, [37, 5, 0]),
    ]
    for i, c in enumerate(kvcache):
        print(f"[kvcache {i + 1}/{len(kvcache)}] {c}", flush=True)
        kvcache_case(*c)
    # packed queries (a decoding step, a chunk, an idle sequence) against long paged caches: split keys
    print("[kvcache packed]", flush=True)
    kvcache_packed_case(torch.bfloat16, 4, 2, 128, [1500, 700, 30], [1, 5, 0], 16)
    print("all cases ran")


if __name__ == "__main__":
    main()
