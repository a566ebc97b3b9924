"""What ALiBi costs: attention_ext.attention(..., alibi_slopes=m) against plain attention in the same run, forward
only and forward + backward, and PyTorch's way of getting the same result: F.scaled_dot_product_attention with the
bias materialised as a (batch, heads, L, S) float mask (as Hugging Face's SDPA attention takes ALiBi), and this
project's op given that same float mask.

    python benchmarks/bench_alibi.py [--quick] [--device cpu|cuda] [--dtypes float32,bfloat16]

The CPU kernels fuse the bias (-m |i + S - L - j| per score, no mask in memory); the CUDA ops run ALiBi calls in
ATen operations for now. Medians of interleaved repeats (CUDA: device events); TFLOP/s counts 4 * B * H * L * S * E
forward, 3.5x that forward + backward (halved when causal); raw JSON into
benchmarks/results/<device>/bench_alibi_<commit>.json.
"""
import math
import sys

import torch
import torch.nn.functional as F

import attention_ext
from bench_decode import Bench, measure, point_row

POINTS = [(2, 8, 1024, 64, True), (2, 8, 1024, 64, False)]
CUDA_POINTS = [(8, 16, 2048, 128, True), (4, 16, 4096, 64, True)]
QUICK = [(1, 4, 256, 64, True)]


def alibi_mask(m, B, L, S, causal, dtype, device):
    """The ALiBi bias as a float mask (B, H, L, S), -inf above the diagonal when causal."""
    i = torch.arange(S - L, S, device=device)[:, None]
    j = torch.arange(S, device=device)[None, :]
    bias = -m.to(device)[:, None, None] * (i - j).abs().float()
    if causal:
        bias = bias.masked_fill(j > i, -math.inf)
    return bias.to(dtype).expand(B, *bias.shape).contiguous()


def run_point(B, H, L, E, causal, dtype, device, budget):
    g = torch.Generator(device="cpu").manual_seed(L + E)
    q, k, v = (torch.randn(B, H, L, E, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
    go = torch.randn(B, H, L, E, generator=g).to(device, dtype)
    m = torch.tensor([2.0 ** (-8.0 * h / H) for h in range(1, H + 1)], device=device)
    mask = alibi_mask(m, B, L, L, causal, dtype, device)

    def ours(alibi, train):
        def fn():
            with torch.set_grad_enabled(train):
                out = attention_ext.attention(q, k, v, is_causal=causal, alibi_slopes=m if alibi else None)
                if train:
                    torch.autograd.grad(out, (q, k, v), go)
        return fn

    def with_mask(f, train):
        def fn():
            with torch.set_grad_enabled(train):
                out = f(q, k, v, mask)
                if train:
                    torch.autograd.grad(out, (q, k, v), go)
        return fn

    sdpa = lambda q, k, v, mask: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # noqa: E731
    fns = {"fwd": ours(False, False), "fwd_alibi": ours(True, False), "fwd_sdpa_mask": with_mask(sdpa, False),
           "fwd_ours_mask": with_mask(attention_ext.attention, False),
           "ours": ours(False, True), "alibi": ours(True, True), "sdpa_mask": with_mask(sdpa, True),
           "ours_mask": with_mask(attention_ext.attention, True)}
    t = measure(fns, device, budget)
    row = point_row(B, H, L, E, causal, dtype, t, mask_MB=mask.numel() * mask.element_size() / 2**20)
    with torch.no_grad():  # the same attention as SDPA's with the bias as a mask
        ours_out = attention_ext.attention(q, k, v, is_causal=causal, alibi_slopes=m).float()
        row["max_abs_diff_vs_sdpa"] = (ours_out - sdpa(q, k, v, mask).float()).abs().max().item()
    row["fwd_alibi_ratio"] = t["fwd_alibi"] / t["fwd"]
    row["alibi_ratio"] = t["alibi"] / t["ours"]
    row["fwd_sdpa_over_alibi"] = t["fwd_sdpa_mask"] / t["fwd_alibi"]
    row["sdpa_over_alibi"] = t["sdpa_mask"] / t["alibi"]
    return row


def main(argv=None):
    bench = Bench(argv, "one small point, few repeats", budgets=(0.05, 2.0))
    points = QUICK if bench.quick else (CUDA_POINTS if bench.device == "cuda" else POINTS)
    bench.header(["dtype", "B", "H", "L = S", "E", "causal", "fwd ms", "fwd ALiBi ms", "fwd SDPA + mask ms",
                  "fwd+bwd ms", "fwd+bwd ALiBi ms", "fwd+bwd SDPA + mask ms", "fwd+bwd ours + mask ms",
                  "ALiBi / plain fwd", "ALiBi / plain fwd+bwd", "SDPA + mask / ALiBi fwd",
                  "SDPA + mask / ALiBi fwd+bwd"], left=6, note="; the mask is the bias as a (B, H, L, S) tensor")
    ms = ("fwd", "fwd_alibi", "fwd_sdpa_mask", "ours", "alibi", "sdpa_mask", "ours_mask")
    ratios = ("fwd_alibi_ratio", "alibi_ratio", "fwd_sdpa_over_alibi", "sdpa_over_alibi")
    rows = bench.run(points, run_point, lambda r: [r[c] for c in ("dtype", "B", "H", "L", "E", "causal")]
                     + [f"{r[c + '_s'] * 1e3:.1f}" for c in ms] + [f"{r[c]:.2f}" for c in ratios])
    bench.save("bench_alibi", rows)
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
