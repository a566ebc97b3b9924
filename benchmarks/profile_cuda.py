"""Where the time of one attention call goes on the GPU, kernel by kernel.

    python benchmarks/profile_cuda.py                 # bf16, E = 128 and 64, L = 4k, causal and not
    python benchmarks/profile_cuda.py --L 2048 --E 64 --causal

For each point, torch.profiler records one forward and one backward of this
project's op (after warm-up) and of SDPA forced to CUDNN_ATTENTION, and prints
the CUDA time of every kernel that ran: for ours the attention kernel itself,
and around it the backward's row-statistics pre-pass and dQ conversion, so a
GPU session sees at once whether the main kernel or its helpers are the gap to
cuDNN. Shapes as in bench_cuda.py: B*L = 16k tokens, H*E = 2048.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import attention_ext  # noqa: E402,F401

ops = torch.ops.attention_ext


def kernel_times(fn, reps=5):
    """{kernel name: mean CUDA microseconds per call} of fn, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    times = collections.defaultdict(float)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            us = getattr(ev, "device_time", None)
            times[ev.name] += (us if us is not None else ev.cuda_time) / reps
    return dict(times)


def point(L, E, causal):
    B, H = max(1, 16384 // L), 2048 // E
    torch.manual_seed(0)
    q, k, v, g = (torch.randn(B, H, L, E, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    w = [-1, -1]
    out, lse, rng = ops._attention_forward(q, k, v, None, 0.0, causal, None, False, w)
    rows = {
        "ours fwd": kernel_times(lambda: ops._attention_forward(q, k, v, None, 0.0, causal, None, False, w)),
        "ours bwd": kernel_times(lambda: ops._attention_backward(g, q, k, v, None, out, lse, rng, 0.0, causal, None,
                                                                 False, w, False)),
    }
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=causal)

            def cudnn_fwd():
                with torch.no_grad():
                    F.scaled_dot_product_attention(q, k, v, is_causal=causal)

            rows["cuDNN fwd"] = kernel_times(cudnn_fwd)
            rows["cuDNN bwd"] = kernel_times(lambda: torch.autograd.grad(o, (qq, kk, vv), g, retain_graph=True))
    except RuntimeError as e:  # cuDNN rejected the input
        print(f"  cuDNN: {str(e).splitlines()[0]}")
    fwd_flops = 4.0 * B * H * L * L * E * (0.5 if causal else 1.0)
    print(f"\n## bf16 B={B} H={H} L={L} E={E} causal={causal}")
    for name, times in rows.items():
        total = sum(times.values())
        flops = fwd_flops * (2.5 if name.endswith("bwd") else 1.0)
        print(f"{name}: {total:9.1f} us in all, {flops / (total * 1e-6) / 1e12:6.1f} TFLOP/s")
        for kname, us in sorted(times.items(), key=lambda kv: -kv[1]):
            print(f"    {us:9.1f} us  {100 * us / total:5.1f}%  {kname[:110]}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--L", type=int, default=None)
    ap.add_argument("--E", type=int, default=None)
    ap.add_argument("--causal", action="store_true", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_cuda.py needs a CUDA GPU")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    Ls = [args.L] if args.L else [4096]
    Es = [args.E] if args.E else [128, 64]
    causals = [args.causal] if args.causal is not None else [False, True]
    for E in Es:
        for L in Ls:
            for causal in causals:
                point(L, E, causal)


if __name__ == "__main__":
    main()
