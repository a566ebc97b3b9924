"""What logit soft-capping costs: attention_ext.attention(..., softcap=c) against plain attention in the same run,
forward only and forward + backward, and Gemma 2's eager formula (scores, tanh, mask, softmax in float32, as
transformers' eager attention computes it) as PyTorch's way of getting the same result.

    python benchmarks/bench_softcap.py [--quick] [--device cpu|cuda] [--dtypes float32,bfloat16]

The CPU kernels and the CUDA kernels (sm80 and Hopper) fuse the cap in the forward and the backward (one tanh per
score, and its derivative in the backward). Medians of interleaved repeats (CUDA: device
events); TFLOP/s counts 4 * B * H * L * S * E forward, 3.5x that forward + backward (halved when causal); raw
JSON into benchmarks/results/<device>/bench_softcap_<commit>.json.
"""
import sys

import torch

import attention_ext
from bench_decode import Bench, measure, point_row

POINTS = [(2, 8, 1024, 64, True), (2, 8, 1024, 64, False)]
CUDA_POINTS = [(8, 16, 2048, 128, True), (4, 16, 4096, 64, True)]
QUICK = [(1, 4, 256, 64, True)]
CAP = 50.0  # Gemma 2's attn_logit_softcapping


def eager_gemma2(q, k, v, cap, is_causal):
    """transformers' eager Gemma 2 attention: scaled scores, tanh cap, causal mask, softmax in float32."""
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    s = torch.tanh(s / cap) * cap
    if is_causal:
        L, S = s.shape[-2:]
        s = s.masked_fill(torch.ones(L, S, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return torch.softmax(s, -1, dtype=torch.float32).to(q.dtype) @ v


def run_point(B, H, L, E, causal, dtype, device, budget):
    g = torch.Generator(device="cpu").manual_seed(L + E)
    q, k, v = (torch.randn(B, H, L, E, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
    go = torch.randn(B, H, L, E, generator=g).to(device, dtype)

    def train(cap):
        def fn():
            out = attention_ext.attention(q, k, v, is_causal=causal, softcap=cap)
            torch.autograd.grad(out, (q, k, v), go)
        return fn

    def infer(cap):
        def fn():
            with torch.no_grad():
                attention_ext.attention(q, k, v, is_causal=causal, softcap=cap)
        return fn

    def eager():
        out = eager_gemma2(q, k, v, CAP, causal)
        torch.autograd.grad(out, (q, k, v), go)

    fns = {"ours": train(0.0), "softcap": train(CAP), "fwd": infer(0.0), "fwd_softcap": infer(CAP), "eager": eager}
    t = measure(fns, device, budget)
    row = point_row(B, H, L, E, causal, dtype, t, cap=CAP)
    with torch.no_grad():  # the same attention as the eager formula's
        ours = attention_ext.attention(q, k, v, is_causal=causal, softcap=CAP).float()
        row["max_abs_diff_vs_eager"] = (ours - eager_gemma2(q, k, v, CAP, causal).float()).abs().max().item()
    row["softcap_ratio"] = t["softcap"] / t["ours"]
    row["fwd_softcap_ratio"] = t["fwd_softcap"] / t["fwd"]
    row["eager_over_softcap"] = t["eager"] / t["softcap"]
    return row


def main(argv=None):
    bench = Bench(argv, "one small point, few repeats", budgets=(0.05, 2.0))
    points = QUICK if bench.quick else (CUDA_POINTS if bench.device == "cuda" else POINTS)
    bench.header(["dtype", "B", "H", "L = S", "E", "causal", "fwd ms", "fwd capped ms", "fwd+bwd ms",
                  "fwd+bwd capped ms", "eager Gemma 2 ms", "fwd capped / plain", "fwd+bwd capped / plain",
                  "eager / capped"], left=6, note=f"; softcap {CAP}")
    ms = ("fwd", "fwd_softcap", "ours", "softcap", "eager")
    ratios = ("fwd_softcap_ratio", "softcap_ratio", "eager_over_softcap")
    rows = bench.run(points, run_point, lambda r: [r[c] for c in ("dtype", "B", "H", "L", "E", "causal")]
                     + [f"{r[c + '_s'] * 1e3:.1f}" for c in ms] + [f"{r[c]:.2f}" for c in ratios])
    bench.save("bench_softcap", rows)
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
