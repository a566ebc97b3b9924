"""attention_ext.MultiheadAttention vs torch.nn.MultiheadAttention, in the same run.

    python benchmarks/bench_mha.py [--quick] [--device cpu|cuda] [--N 4 --L 512 --E 512 --H 8]

Self-attention (batch_first, the same weights in both modules), three mask settings (none;
key_padding_mask with a quarter of the keys padded; causal attn_mask with the is_causal hint),
need_weights False / True, and two modes:

* fwd       -- eval + no_grad: what inference gets (PyTorch takes its native fast path where it can)
* fwdbwd    -- train mode (dropout 0): forward + backward of the output
* persample -- per-sample gradients of the parameters, torch.func.vmap(torch.func.grad(...)) over
               torch.func.functional_call (what differentially private training computes)
* script    -- both modules through torch.jit.script, no_grad (a TorchScript deployment; not in the
               default list). Train mode (dropout 0: the same math as eval): PyTorch's scripted module
               raises in eval mode on its fast path ("strides() called on an undefined Tensor", torch
               2.11 and 2.14), which the converted module does not take.

Median times over strictly alternating calls (noise on a shared machine hits both alike); ratio = torch / ours (> 1: attention_ext is faster). A
markdown table is printed; the raw JSON (torch version, device name, git commit) goes to
benchmarks/results/<device>/bench_mha_<commit>.json. Runs on CUDA when --device cuda (default:
cuda when available).
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import time
import warnings

import torch

import attention_ext


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def alternate(f_ours, f_torch, repeats, device, warmup=2):
    """Strictly alternating single calls (machine noise hits both alike): per-implementation times."""
    for _ in range(warmup):
        f_ours()
        f_torch()
    t_ours, t_torch = [], []
    for i in range(repeats):
        if i % 2:
            t_ours.append(timed(f_ours, device))
            t_torch.append(timed(f_torch, device))
        else:
            t_torch.append(timed(f_torch, device))
            t_ours.append(timed(f_ours, device))
    return t_ours, t_torch


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        return next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except Exception:
        return platform.processor() or platform.machine()


def run_case(args, device, dtype, masks, need_weights, mode):
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(args.E, args.H, batch_first=True, device=device, dtype=dtype)
    ours = attention_ext.MultiheadAttention(args.E, args.H, batch_first=True, device=device, dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    N, L = args.N, args.L
    x = torch.randn(N, L, args.E, device=device, dtype=dtype, requires_grad=(mode == "fwdbwd"))
    g = torch.randn(N, L, args.E, device=device, dtype=dtype)
    kw = {}
    if masks == "padding":
        kpm = torch.zeros(N, L, dtype=torch.bool, device=device)
        kpm[:, L - L // 4:] = True
        kw["key_padding_mask"] = kpm
    elif masks == "causal":
        kw["attn_mask"] = torch.nn.Transformer.generate_square_subsequent_mask(L, device=device, dtype=dtype)
        kw["is_causal"] = True

    def make(m):
        if mode == "persample":
            m.train()
            params = {n: p.detach() for n, p in m.named_parameters()}
            kpm = kw.get("key_padding_mask")
            shared = {k: val for k, val in kw.items() if k != "key_padding_mask"}

            def loss(p, xi, gi, mi):
                extra = dict(shared, key_padding_mask=mi) if mi is not None else shared
                out = torch.func.functional_call(m, p, (xi, xi, xi), dict(need_weights=need_weights, **extra))[0]
                return (out * gi).sum()

            per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0, 0 if kpm is not None else None))
            xd = x.detach()

            def f():
                per_sample(params, xd, g, kpm)
            return f
        if mode == "script":
            m.train()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.jit is deprecated, not removed
                s = torch.jit.script(m)

            def f():
                with torch.no_grad():
                    s(x, x, x, need_weights=need_weights, **kw)
            return f
        if mode == "fwd":
            m.eval()

            def f():
                with torch.no_grad():
                    m(x, x, x, need_weights=need_weights, **kw)
        else:
            m.train()

            def f():
                x.grad = None
                for p in m.parameters():
                    p.grad = None
                m(x, x, x, need_weights=need_weights, **kw)[0].backward(g)
        return f

    f_ours, f_torch = make(ours), make(ref)
    t_ours, t_torch = alternate(f_ours, f_torch, args.repeats, device)
    t_o, t_t = statistics.median(t_ours), statistics.median(t_torch)
    return {"N": N, "L": L, "E": args.E, "H": args.H, "dtype": str(dtype).replace("torch.", ""), "masks": masks,
            "need_weights": need_weights, "mode": mode, "ours_s": t_o, "torch_s": t_t, "ratio": t_t / t_o, "ours_min_s": min(t_ours),
            "torch_min_s": min(t_torch), "ours_all_s": t_ours, "torch_all_s": t_torch}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small sizes, few repeats (smoke test)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16/float16 (CUDA default fp16)")
    ap.add_argument("--N", type=int, default=4)
    ap.add_argument("--L", type=int, default=512)
    ap.add_argument("--E", type=int, default=512)
    ap.add_argument("--H", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--modes", default="fwd,fwdbwd,persample", help="comma-separated: fwd, fwdbwd, persample, script")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    if args.quick:
        args.N, args.L, args.repeats = 2, 128, 3
    name = device_name(device)
    print(f"torch {torch.__version__}, {name}, threads {torch.get_num_threads()}, N={args.N} L={args.L} "
          f"E={args.E} H={args.H} {str(dtype).replace('torch.', '')}")
    print("| masks | need_weights | mode | attention_ext ms | torch ms | torch / ours |")
    print("|---|---|---|---|---|---|")
    rows = []
    for masks in ("none", "padding", "causal"):
        for need_weights in (False, True):
            for mode in args.modes.split(","):
                r = run_case(args, device, dtype, masks, need_weights, mode)
                rows.append(r)
                print(f"| {masks} | {need_weights} | {mode} | {r['ours_s'] * 1e3:.1f} | {r['torch_s'] * 1e3:.1f} | "
                      f"{r['ratio']:.2f} |", flush=True)
    try:
        commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                         cwd=os.path.dirname(os.path.abspath(__file__))).strip()
    except Exception:
        commit = "unknown"
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", device.type,
                                   f"bench_mha_{commit}{'_quick' if args.quick else ''}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"benchmark": "bench_mha", "device": name, "device_type": device.type,
                   "threads": torch.get_num_threads(), "torch": torch.__version__, "commit": commit,
                   "date": time.strftime("%Y-%m-%d"), "rows": rows}, f, indent=1)
    print("saved", out)


if __name__ == "__main__":
    main()
