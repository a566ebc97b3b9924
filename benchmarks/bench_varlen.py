"""Variable-length batches: attention_ext.attention_varlen on packed sequences vs what PyTorch offers.

    python benchmarks/bench_varlen.py [--quick] [--device cpu|cuda] [--dtypes float32,bfloat16]

A batch of sequences of random lengths (uniform in [max/8, max], a fixed seed), 8 heads of dim 64, self
attention, causal or not, forward (no grad) and forward + backward. In the same run:
- ours: attention_varlen on the packed (total, heads, 64) tensors;
- torch-nested: F.scaled_dot_product_attention on jagged nested tensors (what PyTorch takes for such
  batches; on CUDA its FlashAttention-2 varlen kernel; causal on CUDA only: PyTorch's CPU build refuses
  is_causal there);
- torch-padded: F.scaled_dot_product_attention on the batch padded to the longest sequence, with a boolean
  mask (key padding, and the causal triangle); the padding itself is not timed;
- torch-loop: F.scaled_dot_product_attention called once per sequence;
- on an H100 / H200 (fp16 / bf16), ours again with ATTENTION_EXT_PACKED_SM90=0: the packed sm80 kernels instead
  of the packed Hopper ones, for the gain of the latter (not a PyTorch backend: left out of "best torch").
FLOPs count only the real tokens (sum over sequences of 4 * heads * L_b^2 * E, halved for causal; 3.5x for
forward + backward). Medians of interleaved repeats; raw JSON into
benchmarks/results/<device>/bench_varlen_<commit>.json.
"""
import os
import sys
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import attention_ext  # noqa: E402
import statistics  # noqa: E402

from bench_decode import Bench, timer  # noqa: E402

warnings.filterwarnings("ignore", message="The PyTorch API of nested tensors")
H, E = 8, 64
# (number of sequences, longest sequence)
BATCHES = [(32, 256), (16, 1024), (8, 2048)]


def measure(fns, device, budget):
    """Median seconds per call of each function: rounds interleaving them, each function repeated as often as
    fits budget / 10 in a round (at least once; 3 rounds instead of 7 for one that takes longer than budget,
    PyTorch's nested-tensor path on the CPU)."""
    run = timer(device)
    one = {}
    for name, fn in fns.items():
        fn()
        one[name] = max(run(fn, 1), 1e-6)
    reps = {name: max(1, int(budget / 10 / t)) for name, t in one.items()}
    times = {name: [] for name in fns}
    for r in range(7):
        for name, fn in fns.items():
            if r < 3 or one[name] <= budget:
                times[name].append(run(fn, reps[name]))
    return {name: statistics.median(t) for name, t in times.items()}


def lengths(n, longest, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(max(1, longest // 8), longest + 1, (n,), generator=g).tolist()


def run_point(n, longest, causal, dtype, device, budget, mode):
    lens = lengths(n, longest, n * longest)
    total, Lmax = sum(lens), max(lens)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(total, H, E, generator=g).to(device, dtype) for _ in range(3))
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    cu_dev = cu.to(device)
    grad = mode == "fwd+bwd"
    # padded copies and the mask: (n, H, Lmax, E); key padding, and the causal triangle
    pad = torch.zeros(3, n, Lmax, H, E, device=device, dtype=dtype)
    for b, (s, L) in enumerate(zip(cu[:-1].tolist(), lens)):
        for i, t in enumerate((q, k, v)):
            pad[i, b, :L] = t[s:s + L]
    qp, kp, vp = (pad[i].transpose(1, 2) for i in range(3))
    keep = torch.arange(Lmax, device=device)[None, :] < torch.tensor(lens, device=device)[:, None]
    mask = keep[:, None, None, :]
    if causal:
        mask = mask & torch.ones(Lmax, Lmax, dtype=torch.bool, device=device).tril()
    nested = None
    if not causal or device != "cpu":
        nested = [torch.nested.nested_tensor_from_jagged(t, offsets=cu_dev.long()).transpose(1, 2)
                  for t in (q, k, v)]
    seqs = [[t[s:s + L].transpose(0, 1) for t in (q, k, v)] for s, L in zip(cu[:-1].tolist(), lens)]
    leaves = [q, k, v, qp, kp, vp] + ([] if nested is None else nested)
    for t in leaves:
        t.requires_grad_(grad)

    def call(fn, inputs):
        def run():
            if grad:
                out = fn()
                outs = out if isinstance(out, list) else [out]
                torch.autograd.backward([o.values() if o.is_nested else o for o in outs],
                                        [torch.ones_like(o.values() if o.is_nested else o) for o in outs])
                for t in inputs:
                    t.grad = None
            else:
                with torch.no_grad():
                    fn()
        return run

    fns = {"ours": call(lambda: attention_ext.attention_varlen(q, k, v, cu, cu, is_causal=causal), [q, k, v]),
           "torch-padded": call(lambda: F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask), [qp, kp, vp]),
           "torch-loop": call(lambda: [F.scaled_dot_product_attention(*s, is_causal=causal) for s in seqs],
                              [q, k, v])}
    if nested is not None:
        fns["torch-nested"] = call(lambda: F.scaled_dot_product_attention(*nested, is_causal=causal), nested)
    # outputs agree (padded rows left out)
    with torch.no_grad():
        ours = attention_ext.attention_varlen(q, k, v, cu, cu, is_causal=causal).double()
        ref = torch.cat([F.scaled_dot_product_attention(*s, is_causal=causal).transpose(0, 1) for s in seqs]).double()
        err = (ours - ref).abs().max().item()
    t = measure(fns, device, budget)
    sm80 = None
    if device == "cuda" and torch.cuda.get_device_capability() == (9, 0) and dtype != torch.float32:
        # ATTENTION_EXT_PACKED_SM90 is read at each call
        os.environ["ATTENTION_EXT_PACKED_SM90"] = "0"
        try:
            sm80 = measure({"ours": fns["ours"]}, device, budget)["ours"]
        finally:
            del os.environ["ATTENTION_EXT_PACKED_SM90"]
    flops = sum(4 * H * L * L * E for L in lens) / (2 if causal else 1) * (3.5 if grad else 1)
    row = {"n": n, "longest": longest, "tokens": total, "causal": causal, "mode": mode,
           "dtype": str(dtype).replace("torch.", ""), "max_abs_diff_vs_torch": err}
    for name, s in t.items():
        row[name + "_s"] = s
        row[name + "_TFLOPs"] = flops / s / 1e12
    best = min((s, name) for name, s in t.items() if name != "ours")
    row["best_torch"] = best[1]
    row["speedup_vs_best"] = best[0] / t["ours"]
    row["ours_packed_sm80_s"] = sm80
    row["packed_hopper_gain"] = None if sm80 is None else sm80 / t["ours"]
    return row


def main(argv=None):
    bench = Bench(argv, "one small batch, few repeats")
    batches = [(6, 64)] if bench.quick else BATCHES
    bench.header(["dtype", "mode", "causal", "sequences", "longest", "tokens", "ours ms", "torch-nested ms",
                  "torch-padded ms", "torch-loop ms", "best torch / ours", "packed sm80 / packed Hopper"], left=3)
    rows = []
    for dt in bench.dtypes:
        for mode in ("fwd", "fwd+bwd"):
            for causal in (False, True):
                for n, longest in batches:
                    r = run_point(n, longest, causal, dt, bench.device, bench.budget, mode)
                    rows.append(r)
                    ms = lambda key: f"{r[key] * 1e3:.2f}" if key in r else "—"  # noqa: E731
                    print(f"| {r['dtype']} | {mode} | {causal} | {n} | {longest} | {r['tokens']} | {ms('ours_s')} | "
                          f"{ms('torch-nested_s')} | {ms('torch-padded_s')} | {ms('torch-loop_s')} | "
                          f"{r['speedup_vs_best']:.2f} ({r['best_torch']}) | "
                          f"{'—' if r['packed_hopper_gain'] is None else format(r['packed_hopper_gain'], '.2f')} |",
                          flush=True)
    bench.save("bench_varlen", rows, heads=H, head_dim=E)
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
