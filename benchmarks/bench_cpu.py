"""CPU benchmark: attention_ext vs F.scaled_dot_product_attention in the same run.

    python benchmarks/bench_cpu.py [--quick] [--repeats N]

Forward and forward+backward, fp32 and bf16, causal and not (B=4, H=8, L=S=1024,
E=64 by default). Reports median times, TFLOP/s (forward 4*B*H*L*S*E, halved for
causal; backward 2.5x forward) and the ratio torch/ours (> 1: ours is faster).
Raw JSON goes to benchmarks/results/cpu/.

bfloat16 runs on one of four product paths, chosen once per process
(ATTENTION_EXT_CPU_BF16=amx|dot|mkl|blas|auto, default auto: timed at the first bf16
call); the header and the JSON say which one this run used. To compare them,
run the script once per value of the variable.
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


_BF16_PATHS = {"AMX tiles": "amx", "AVX512-BF16 dot-product tiles": "dot", "BLAS bf16 GEMM tiles": "mkl", "fp32 BLAS tiles": "blas"}


def bf16_path_in_use():
    """'amx', 'dot', 'mkl' or 'blas': the bf16 path of this process, named by the kernel log of one call."""
    q = torch.randn(1, 1, 8, 16).to(torch.bfloat16)
    with attention_ext.debug.kernel_log() as lines:
        attention_ext.attention(q, q, q)
    for line in lines:
        for name, path in _BF16_PATHS.items():
            if f"bf16 ({name})" in line:
                return path
    return "unknown"


def median_time(fn, repeats, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def flops(B, H, L, S, E, causal, mode):
    f = 4.0 * B * H * L * S * E * (0.5 if causal else 1.0)
    return f if mode == "fwd" else f * 3.5  # fwd + bwd = 1 + 2.5


def run_case(B, H, L, S, E, dtype, causal, mode, repeats):
    torch.manual_seed(0)
    q = torch.randn(B, H, L, E, dtype=dtype, requires_grad=(mode != "fwd"))
    k = torch.randn(B, H, S, E, dtype=dtype, requires_grad=(mode != "fwd"))
    v = torch.randn(B, H, S, E, dtype=dtype, requires_grad=(mode != "fwd"))
    g = torch.randn(B, H, L, E, dtype=dtype)

    def make(fn):
        if mode == "fwd":
            def f():
                with torch.no_grad():
                    fn(q, k, v, is_causal=causal)
        else:
            def f():
                q.grad = k.grad = v.grad = None
                fn(q, k, v, is_causal=causal).backward(g)
        return f

    ours, theirs = make(attention_ext.attention), make(F.scaled_dot_product_attention)
    # interleave to share any machine noise fairly
    t_ours, t_torch = [], []
    for _ in range(3):
        t_ours.append(median_time(ours, max(1, repeats // 3)))
        t_torch.append(median_time(theirs, max(1, repeats // 3)))
    t_o, t_t = min(t_ours), min(t_torch)
    fl = flops(B, H, L, S, E, causal, mode)
    return {"B": B, "H": H, "L": L, "S": S, "E": E, "dtype": str(dtype).replace("torch.", ""), "causal": causal,
            "mode": mode, "ours_s": t_o, "torch_s": t_t, "ours_tflops": fl / t_o / 1e12,
            "torch_tflops": fl / t_t / 1e12, "speedup": t_t / t_o}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--B", type=int, default=4)
    ap.add_argument("--H", type=int, default=8)
    ap.add_argument("--L", type=int, default=1024)
    ap.add_argument("--E", type=int, default=64)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--modes", default="fwd,fwdbwd")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    L = 256 if args.quick else args.L
    rows = []
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}")
    bf16_requested = os.environ.get("ATTENTION_EXT_CPU_BF16") or "auto"
    bf16_used = bf16_path_in_use() if "bfloat16" in args.dtypes.split(",") else None
    if bf16_used is not None:
        print(f"bf16 path: ATTENTION_EXT_CPU_BF16={bf16_requested} -> {bf16_used}")
    print("| dtype | causal | mode | ours ms | torch ms | ours TFLOP/s | torch TFLOP/s | torch/ours |")
    print("|---|---|---|---|---|---|---|---|")
    for dt in args.dtypes.split(","):
        for causal in (False, True):
            for mode in args.modes.split(","):
                r = run_case(args.B, args.H, L, L, args.E, getattr(torch, dt), causal, mode, 3 if args.quick else args.repeats)
                rows.append(r)
                print(f"| {r['dtype']} | {causal} | {mode} | {r['ours_s']*1e3:.1f} | {r['torch_s']*1e3:.1f} | "
                      f"{r['ours_tflops']:.3f} | {r['torch_tflops']:.3f} | {r['speedup']:.2f} |", flush=True)
    try:
        commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except Exception:
        commit = "unknown"
    out = args.out or os.path.join(os.path.dirname(__file__), "results", "cpu", f"bench_cpu_{commit}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    cpu = ""
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except Exception:
        pass
    with open(out, "w") as f:
        json.dump({"device": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__, "commit": commit,
                   "date": time.strftime("%Y-%m-%d"), "bf16_path_requested": bf16_requested,
                   "bf16_path_in_use": bf16_used, "rows": rows}, f, indent=1)
    print("saved", out)


if __name__ == "__main__":
    main()
