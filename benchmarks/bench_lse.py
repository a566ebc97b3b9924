"""What a gradient through the log-sum-exp costs: attention_ext.attention(..., return_lse=True) and attention
sinks, forward + backward, as a ratio to plain attention in the same run.

    python benchmarks/bench_lse.py [--quick] [--device cpu|cuda] [--dtypes float32,bfloat16]

Per point (B, H, L = S, E, causal): plain attention (loss sum(g * out)); the same with lse returned and used
(loss sum(g * out) + sum(c * lse)); sinks (gpt-oss); and the eager sinks formula (scores, a sink column,
softmax, as transformers' eager gpt-oss attention computes it) as PyTorch's way of getting the same result.
The fused backward takes the lse cotangent itself (grad_logsumexp), so the lse and sinks columns should cost
about what plain attention costs. Medians of interleaved repeats (CUDA: device events); TFLOP/s counts the
plain attention's 3.5 * 4 * B * H * L * S * E (halved when causal) for every column; raw JSON into
benchmarks/results/<device>/bench_lse_<commit>.json.
"""
import sys

import torch

import attention_ext
from bench_decode import Bench, measure, point_row

POINTS = [(2, 8, 1024, 64, True), (2, 8, 1024, 64, False)]
CUDA_POINTS = [(8, 16, 2048, 128, True), (8, 16, 2048, 128, False), (4, 32, 4096, 64, True)]
QUICK = [(1, 4, 256, 64, True)]


def eager_sinks(q, k, v, sinks, is_causal):
    """transformers' eager gpt-oss attention: the sink as one more score column, dropped after the softmax."""
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if is_causal:
        L, S = s.shape[-2:]
        s = s.masked_fill(torch.ones(L, S, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    col = sinks.view(1, -1, 1, 1).expand(*s.shape[:-1], 1).to(s.dtype)
    p = torch.softmax(torch.cat([s, col], -1), -1)[..., :-1]
    return p @ v


def run_point(B, H, L, E, causal, dtype, device, budget):
    g = torch.Generator(device="cpu").manual_seed(L + E)
    q, k, v = (torch.randn(B, H, L, E, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
    sinks = torch.randn(H, generator=g).to(device).requires_grad_()
    go = torch.randn(B, H, L, E, generator=g).to(device, dtype)
    c = torch.randn(B, H, L, generator=g).to(device)

    def plain():
        out = attention_ext.attention(q, k, v, is_causal=causal)
        torch.autograd.grad(out, (q, k, v), go)

    def with_lse():
        out, lse = attention_ext.attention(q, k, v, is_causal=causal, return_lse=True)
        torch.autograd.grad((out, lse), (q, k, v), (go, c))

    def with_sinks():
        out = attention_ext.attention(q, k, v, is_causal=causal, sinks=sinks)
        torch.autograd.grad(out, (q, k, v, sinks), go)

    def eager():
        out = eager_sinks(q, k, v, sinks, causal)
        torch.autograd.grad(out, (q, k, v, sinks), go)

    fns = {"ours": plain, "lse": with_lse, "sinks": with_sinks, "eager_sinks": eager}
    t = measure(fns, device, budget)
    row = point_row(B, H, L, E, causal, dtype, t)
    row["lse_ratio"] = t["lse"] / t["ours"]
    row["sinks_ratio"] = t["sinks"] / t["ours"]
    row["eager_sinks_over_sinks"] = t["eager_sinks"] / t["sinks"]
    return row


def main(argv=None):
    bench = Bench(argv, "one small point, few repeats", budgets=(0.05, 2.0))
    points = QUICK if bench.quick else (CUDA_POINTS if bench.device == "cuda" else POINTS)
    bench.header(["dtype", "B", "H", "L = S", "E", "causal", "plain ms", "lse used ms", "sinks ms", "eager sinks ms",
                  "lse / plain", "sinks / plain", "eager / sinks"], left=6, note="; forward + backward")
    rows = []
    for dt in bench.dtypes:
        for (B, H, L, E, causal) in points:
            r = run_point(B, H, L, E, causal, dt, bench.device, bench.budget)
            rows.append(r)
            print(f"| {r['dtype']} | {B} | {H} | {L} | {E} | {causal} | {r['ours_s'] * 1e3:.1f} | "
                  f"{r['lse_s'] * 1e3:.1f} | {r['sinks_s'] * 1e3:.1f} | {r['eager_sinks_s'] * 1e3:.1f} | "
                  f"{r['lse_ratio']:.2f} | {r['sinks_ratio']:.2f} | {r['eager_sinks_over_sinks']:.2f} |", flush=True)
    bench.save("bench_lse", rows)
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
