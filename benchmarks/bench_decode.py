"""Decoding benchmark: a few query rows against a long key / value cache, attention_ext vs PyTorch.

    python benchmarks/bench_decode.py [--quick] [--device cpu|cuda] [--dtypes float32,bfloat16,float16]

LLM-style shapes (32 query heads of dim 128; 32 key / value heads, or 8 with grouped-query attention;
cache lengths 1k-8k; 1 or 4 query rows) in the same run as F.scaled_dot_product_attention
(enable_gqa=True where the heads differ; PyTorch picks its backend). Such a call is bound by
reading K and V, so besides the times and the ratio (torch / ours, > 1: ours is faster) it reports the
bandwidth each achieves, counting the bytes of K and V once. Forward only, no gradient.
Medians of interleaved repeats (CUDA: device events); raw JSON into
benchmarks/results/<device>/bench_decode_<commit>.json.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import attention_ext

# (batch, query heads, key / value heads, head dim)
MODELS = [(1, 32, 32, 128), (1, 32, 8, 128), (4, 32, 8, 128)]
CACHE = [1024, 4096, 8192]
ROWS = [1, 4]


def timer(device):
    if device == "cuda":
        def run(fn, n):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(n):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / n
    else:
        def run(fn, n):
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            return (time.perf_counter() - t0) / n
    return run


def measure(fns, device, budget):
    """Median seconds per call of each function, rounds interleaving them."""
    run = timer(device)
    for fn in fns.values():
        fn()
    one = max(run(fns["ours"], 1), 1e-6)
    n = max(1, int(budget / 10 / one))
    times = {name: [] for name in fns}
    for _ in range(7):
        for name, fn in fns.items():
            times[name].append(run(fn, n))
    return {name: statistics.median(t) for name, t in times.items()}


def run_point(B, Hq, Hkv, E, S, L, dtype, device, budget):
    g = torch.Generator(device="cpu").manual_seed(S + L + Hkv)
    q = torch.randn(B, Hq, L, E, generator=g).to(device, dtype)
    k = torch.randn(B, Hkv, S, E, generator=g).to(device, dtype)
    v = torch.randn(B, Hkv, S, E, generator=g).to(device, dtype)
    gqa = Hq != Hkv
    with torch.no_grad():
        ours = attention_ext.attention(q, k, v, enable_gqa=gqa)
        ref = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        err = (ours.double() - ref.double()).abs().max().item()
        t = measure({"ours": lambda: attention_ext.attention(q, k, v, enable_gqa=gqa),
                     "torch": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)}, device, budget)
        unpacked = None
        if device == "cuda" and gqa and L == 1:
            # the CUDA kernels pack a GQA group's query heads into one CTA's rows (ATTENTION_EXT_PACK_GQA,
            # read at each call): the same point with one CTA per query head, for the gain
            os.environ["ATTENTION_EXT_PACK_GQA"] = "0"
            try:
                unpacked = measure({"ours": lambda: attention_ext.attention(q, k, v, enable_gqa=gqa)}, device,
                                   budget)["ours"]
            finally:
                del os.environ["ATTENTION_EXT_PACK_GQA"]
    kv_bytes = 2 * k.numel() * k.element_size()
    return {"B": B, "Hq": Hq, "Hkv": Hkv, "E": E, "S": S, "L": L, "dtype": str(dtype).replace("torch.", ""),
            "ours_s": t["ours"], "torch_s": t["torch"], "speedup": t["torch"] / t["ours"],
            "ours_GBps": kv_bytes / t["ours"] / 1e9, "torch_GBps": kv_bytes / t["torch"] / 1e9,
            "ours_unpacked_s": unpacked, "pack_gain": None if unpacked is None else unpacked / t["ours"],
            "max_abs_diff_vs_torch": err}


def device_name(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        return next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def point_row(B, H, L, E, causal, dtype, times, **extra):
    """The row of one (B, H, L = S, E, causal, dtype) point of a column benchmark: its coordinates, extra, and for
    each column of times (seconds) its time and TFLOP/s: 4 B H L^2 E (halved when causal) for the columns named
    fwd*, forward only, 3.5x that for the others, forward + backward."""
    fwd_flops = 4 * B * H * L * L * E / (2 if causal else 1)
    row = {"B": B, "H": H, "L": L, "E": E, "causal": causal, "dtype": str(dtype).replace("torch.", ""), **extra}
    for name, sec in times.items():
        row[name + "_s"] = sec
        row[name + "_TFLOPs"] = (fwd_flops if name.startswith("fwd") else 3.5 * fwd_flops) / sec / 1e12
    return row


class Bench:
    """What the small benchmarks (this one, bench_lse, bench_softcap, bench_varlen) share: their command line
    (--quick, --device, --dtypes, --budget, --out), the device (cuda when available), the time budget per point
    and column (quick or not), the machine's line and the markdown table's header."""

    def __init__(self, argv, quick_help, dtypes="float32,bfloat16", budgets=(0.02, 0.5)):
        ap = argparse.ArgumentParser()
        ap.add_argument("--quick", action="store_true", help=quick_help)
        ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
        ap.add_argument("--dtypes", default=dtypes)
        ap.add_argument("--budget", type=float, default=None, help="seconds of repeats per point and column")
        ap.add_argument("--out", default=None)
        args = ap.parse_args(argv)
        self.quick, self.out = args.quick, args.out
        self.dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
        self.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.budget = args.budget if args.budget is not None else budgets[0 if args.quick else 1]
        self.name = device_name(self.device)

    def header(self, columns, left=1, note=""):
        """Prints the machine's line and the table's header: `left` columns of text, the rest numbers."""
        print(f"{self.name}, torch {torch.__version__}, threads {torch.get_num_threads()}{note}")
        print("| " + " | ".join(columns) + " |")
        print("|" + "---|" * left + "---:|" * (len(columns) - left))

    def save(self, stem, rows, **extra):
        save_results(self.device, self.name, stem, rows, self.out, **extra)

    def run(self, points, run_point, cells):
        """run_point(*point, dtype, device, budget) for every dtype and point, each row printed as the table's
        line of cells(row); returns the rows."""
        rows = []
        for dt in self.dtypes:
            for point in points:
                r = run_point(*point, dt, self.device, self.budget)
                rows.append(r)
                print("| " + " | ".join(str(c) for c in cells(r)) + " |", flush=True)
        return rows


def main(argv=None):
    bench = Bench(argv, "one model, short caches, few repeats", "float32,bfloat16,float16")
    models, caches = (MODELS[1:2], [256, 1024]) if bench.quick else (MODELS, CACHE)
    bench.header(["dtype", "B", "Hq / Hkv", "E", "S", "L", "ours ms", "torch ms", "ours GB/s", "torch GB/s",
                  "torch/ours", "GQA packing gain"], left=6)
    rows = []
    for dt in bench.dtypes:
        for (B, Hq, Hkv, E) in models:
            for S in caches:
                for L in ROWS:
                    r = run_point(B, Hq, Hkv, E, S, L, dt, bench.device, bench.budget)
                    rows.append(r)
                    gain = "—" if r["pack_gain"] is None else f"{r['pack_gain']:.2f}"
                    print(f"| {r['dtype']} | {B} | {Hq} / {Hkv} | {E} | {S} | {L} | {r['ours_s'] * 1e3:.3f} | "
                          f"{r['torch_s'] * 1e3:.3f} | {r['ours_GBps']:.1f} | {r['torch_GBps']:.1f} | "
                          f"{r['speedup']:.2f} | {gain} |", flush=True)
    bench.save("bench_decode", rows)
    return rows


def save_results(device, name, stem, rows, out=None, **extra):
    """Raw JSON (device, threads, torch, commit, date, rows, extra) into `out`, or by default into
    benchmarks/results/<cpu or GPU name>/<stem>_<commit>.json."""
    try:
        commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                         cwd=os.path.dirname(os.path.abspath(__file__))).strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    folder = "cpu" if device == "cpu" else name.replace(" ", "_")
    out = out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", folder, f"{stem}_{commit}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"device": name, "threads": torch.get_num_threads(), "torch": torch.__version__, "commit": commit,
                   "date": time.strftime("%Y-%m-%d"), **extra, "rows": rows}, f, indent=1)
    print("saved", out)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
