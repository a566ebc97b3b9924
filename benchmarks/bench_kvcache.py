"""Decoding against a key / value cache: attention_ext.attention_kvcache against PyTorch's way in the same run.

    python benchmarks/bench_kvcache.py [--quick] [--device cpu|cuda] [--dtypes float32,bfloat16]

One decoding step (one query row and one new key appended per batch element) of an LLM-like layer (32 query heads,
8 key / value heads of dim 128) with caches of different lengths per batch element (S/4 .. S), the cache either
contiguous (B, Hkv, S_max, E) or paged with 16 or 256 positions a page (vLLM's and FlashAttention's sizes), the
pages shuffled. PyTorch has no cache op: its two ways are the new row written with index_put_ (through the block
table), then either one F.scaled_dot_product_attention call over every whole cache (pages gathered into a dense
one) with a key-padding mask of the lengths, or one SDPA call per batch element over exactly its visible positions
(a slice, or its pages gathered). attention_ext.attention_kvcache does it in one call (the append, then the fused
kernel; the CPU kernel reads the pages in place). Such a call is bound by reading K and V: besides the times and
the ratio (the faster of PyTorch's ways / ours, > 1: ours is faster) it reports the bandwidth over the visible K
and V bytes, and on CUDA the gain of packing a GQA group's query heads into one CTA's rows (the time with
ATTENTION_EXT_PACK_GQA=0 / ours). Medians of interleaved
repeats (CUDA: device events); raw JSON into benchmarks/results/<device>/bench_kvcache_<commit>.json.
"""
import os
import sys

import torch
import torch.nn.functional as F

import attention_ext
from bench_decode import Bench, measure

# (batch, query heads, key / value heads, head dim, longest cache)
POINTS = [(4, 32, 8, 128, 1024), (4, 32, 8, 128, 4096), (1, 32, 8, 128, 8192)]
QUICK = [(2, 32, 8, 128, 512)]
LAYOUTS = ["contiguous", "paged16", "paged256"]


def make_point(B, Hq, Hkv, E, S, layout, dtype, device):
    """Inputs of one step: the query, the new key / value, the caches (contiguous, or shuffled pages with their
    block table), the lengths before the step (S/4 .. S - 1, spread over the batch)."""
    g = torch.Generator(device="cpu").manual_seed(S + B)
    rn = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
    lens = torch.linspace(S // 4, S - 1, B).long().to(torch.int32)
    q, k1, v1 = rn(B, Hq, 1, E), rn(B, Hkv, 1, E), rn(B, Hkv, 1, E)
    if layout == "contiguous":
        return q, k1, v1, rn(B, Hkv, S, E), rn(B, Hkv, S, E), lens.to(device), None
    page = int(layout[len("paged"):])
    per = S // page
    table = torch.randperm(B * per, generator=g).view(B, per).to(torch.int32)
    return q, k1, v1, rn(B * per, Hkv, page, E), rn(B * per, Hkv, page, E), lens.to(device), table.to(device)


def torch_write(k1, v1, kc, vc, lens, table):
    """PyTorch's way of appending: the new row written through index_put_ (through the block table)."""
    B, pos = k1.shape[0], lens.long()
    if table is None:
        kc[torch.arange(B, device=kc.device), :, pos] = k1[:, :, 0]
        vc[torch.arange(B, device=kc.device), :, pos] = v1[:, :, 0]
    else:
        P = kc.shape[2]
        page = table.long().gather(1, (pos // P)[:, None])[:, 0]
        kc[page, :, pos % P] = k1[:, :, 0]
        vc[page, :, pos % P] = v1[:, :, 0]


def torch_masked(q, k1, v1, kc, vc, lens, table):
    """The write, then one SDPA call over every batch element's whole cache (its pages gathered into a dense
    one) with a key-padding mask of the lengths."""
    torch_write(k1, v1, kc, vc, lens, table)
    B = q.shape[0]
    if table is None:
        k, v, S = kc, vc, kc.shape[2]
    else:
        S = table.shape[1] * kc.shape[2]
        k = kc[table.long()].permute(0, 2, 1, 3, 4).reshape(B, kc.shape[1], S, -1)
        v = vc[table.long()].permute(0, 2, 1, 3, 4).reshape(B, vc.shape[1], S, -1)
    mask = (torch.arange(S, device=q.device)[None, :] <= lens.long()[:, None])[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def torch_sliced(q, k1, v1, kc, vc, lens, table, host_lens):
    """The write, then one SDPA call per batch element over exactly its visible positions, without a mask (a
    slice of the contiguous cache, or its pages gathered)."""
    torch_write(k1, v1, kc, vc, lens, table)
    outs = []
    for b, n in enumerate(host_lens):
        if table is None:
            k, v = kc[b:b + 1, :, :n], vc[b:b + 1, :, :n]
        else:
            P = kc.shape[2]
            pages = table[b, :(n + P - 1) // P].long()
            k = kc[pages].transpose(0, 1).reshape(1, kc.shape[1], -1, kc.shape[3])[:, :, :n]
            v = vc[pages].transpose(0, 1).reshape(1, vc.shape[1], -1, vc.shape[3])[:, :, :n]
        outs.append(F.scaled_dot_product_attention(q[b:b + 1], k, v, enable_gqa=True))
    return torch.cat(outs)


def run_point(B, Hq, Hkv, E, S, layout, dtype, device, budget):
    q, k1, v1, kc, vc, lens, table = make_point(B, Hq, Hkv, E, S, layout, dtype, device)
    kc_m, vc_m, kc_s, vc_s = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    host_lens = [n + 1 for n in lens.tolist()]
    with torch.no_grad():
        ours = attention_ext.attention_kvcache(q, kc, vc, lens, k1, v1, block_table=table, is_causal=True)
        ref = torch_sliced(q, k1, v1, kc_s, vc_s, lens, table, host_lens)
        err = (ours.double() - ref.double()).abs().max().item()
        # (each repeat writes the same row again: the lengths stay those of the first step)
        t = measure({"ours": lambda: attention_ext.attention_kvcache(q, kc, vc, lens, k1, v1, block_table=table,
                                                                     is_causal=True),
                     "torch_mask": lambda: torch_masked(q, k1, v1, kc_m, vc_m, lens, table),
                     "torch_slices": lambda: torch_sliced(q, k1, v1, kc_s, vc_s, lens, table, host_lens)},
                    device, budget)
        unpacked = None
        if device == "cuda" and Hq != Hkv:
            # the CUDA glue packs a GQA group's query heads into one CTA's rows (ATTENTION_EXT_PACK_GQA, read at
            # each call): the same step with one CTA per query head, for the gain
            os.environ["ATTENTION_EXT_PACK_GQA"] = "0"
            try:
                unpacked = measure({"ours": lambda: attention_ext.attention_kvcache(
                    q, kc, vc, lens, k1, v1, block_table=table, is_causal=True)}, device, budget)["ours"]
            finally:
                del os.environ["ATTENTION_EXT_PACK_GQA"]
    best = min(t["torch_mask"], t["torch_slices"])
    kv_bytes = 2 * sum(host_lens) * Hkv * E * q.element_size()
    return {"B": B, "Hq": Hq, "Hkv": Hkv, "E": E, "S": S, "layout": layout, "dtype": str(dtype).replace("torch.", ""),
            "ours_s": t["ours"], "torch_mask_s": t["torch_mask"], "torch_slices_s": t["torch_slices"],
            "speedup": best / t["ours"], "ours_GBps": kv_bytes / t["ours"] / 1e9, "torch_GBps": kv_bytes / best / 1e9,
            "ours_unpacked_s": unpacked, "pack_gain": None if unpacked is None else unpacked / t["ours"],
            "max_abs_diff_vs_torch": err}


def main(argv=None):
    bench = Bench(argv, "one short point, few repeats")
    points = [(*p, lay) for p in (QUICK if bench.quick else POINTS) for lay in LAYOUTS]
    bench.header(["dtype", "B", "Hq / Hkv", "E", "S_max", "layout", "ours ms", "torch mask ms", "torch slices ms",
                  "ours GB/s", "best torch GB/s", "best torch / ours", "GQA packing gain"], left=6)
    rows = bench.run(points, run_point, lambda r: (
        r["dtype"], r["B"], f"{r['Hq']} / {r['Hkv']}", r["E"], r["S"], r["layout"], f"{r['ours_s'] * 1e3:.3f}",
        f"{r['torch_mask_s'] * 1e3:.3f}", f"{r['torch_slices_s'] * 1e3:.3f}", f"{r['ours_GBps']:.1f}",
        f"{r['torch_GBps']:.1f}", f"{r['speedup']:.2f}", "-" if r["pack_gain"] is None else f"{r['pack_gain']:.2f}"))
    bench.save("bench_kvcache", rows)
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
