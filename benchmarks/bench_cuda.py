"""CUDA benchmark of issue 4: attention_ext vs F.scaled_dot_product_attention
forced to each of its CUDA backends, in the same run.

    python benchmarks/bench_cuda.py                 # the full matrix (about 10 minutes on an H100)
    python benchmarks/bench_cuda.py --quick         # L in {512, 4096}, fewer repeats
    python benchmarks/bench_cuda.py --issue         # the Hopper issue's grid only: bf16, L 1k-16k, vs cuDNN and FLASH
    python benchmarks/bench_cuda.py --out DIR       # raw JSON + table into DIR

Matrix (bf16 unless said): B*L = 16k tokens, H*E = 2048, L in {512, 1k, 2k,
4k, 8k, 16k}, E in {64, 128}, causal and not; forward and backward timed
separately (the backward alone, from saved forward outputs), against FLASH_ATTENTION,
EFFICIENT_ATTENTION and CUDNN_ATTENTION. Then the inputs only EFFICIENT accepts
among the fused backends: fp32 (E = 64, 128) and a float additive mask
(B, 1, L, S) in bf16 (non-causal: SDPA takes no mask with is_causal), for
L up to 4k, against EFFICIENT_ATTENTION; and a boolean key-padding mask
(B, 1, 1, L; batch element b keeps its first L - b L / (2 B) keys) in bf16,
L = 1k and 4k, against EFFICIENT_ATTENTION and CUDNN_ATTENTION (FLOPs counted
dense, so skipped padding shows as a higher rate).

TFLOP/s: forward 4*B*H*L*S*E (halved when causal), backward 2.5x that (the
FlashAttention convention). Times are medians of CUDA-event timings of
alternating calls (ours, then each baseline, repeated), after warm-up.
A backend that rejects an input is reported as "n/a".

On an sm_90 GPU (H100 / H200) "attention_ext" is the Hopper kernel wherever it
covers the input (csrc/cuda/hopper/), and a second column, "ours_sm80",
times the same op with ATTENTION_EXT_DISABLE_SM90=1 (the sm80 mma.sync
kernels), so each run shows what the Hopper kernels add. Every row records
which kernel ran (the ATTENTION_EXT_LOG_KERNEL line of its first call).

Raw results (device, torch, CUDA, commit, every timing) go to
benchmarks/results/<device>/cuda_<date>.json and a markdown table of TFLOP/s
and ratios (ours / baseline, > 1: ours faster) to the .md beside it; both are
rewritten after every point, so a run stopped by a time limit keeps what it
measured.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import attention_ext  # noqa: E402,F401

ops = torch.ops.attention_ext
HERE = os.path.dirname(os.path.abspath(__file__))
BACKENDS = ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"]


def commit():
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=HERE, text=True).strip()
    except Exception:
        return "unknown"


def flops(B, H, L, S, E, causal, mode):
    f = 4.0 * B * H * L * S * E * (0.5 if causal else 1.0)
    return f if mode == "fwd" else 2.5 * f


def cuda_time(fn, reps):
    """Median milliseconds of fn over reps timed calls (CUDA events)."""
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def sdpa_fns(backend, q, k, v, mask, causal, g):
    """(forward fn, backward fn) for SDPA forced to one backend, or None if it rejects the input."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    be = getattr(SDPBackend, backend)
    qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))

    def fwd():
        with sdpa_kernel(be), torch.no_grad():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)

    try:
        with sdpa_kernel(be):
            out = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, is_causal=causal)
        out.backward(g, retain_graph=True)
        torch.cuda.synchronize()
    except RuntimeError:
        return None

    def bwd():
        qq.grad = kk.grad = vv.grad = None
        out.backward(g, retain_graph=True)

    return fwd, bwd


class _Env:
    """Sets environment variables around a call (the ops read them at every call)."""

    def __init__(self, **env):
        self.env = env

    def __enter__(self):
        self.old = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)

    def __exit__(self, *exc):
        for k, v in self.old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def ours_fns(q, k, v, mask, causal, g, sm80=False):
    env = {"ATTENTION_EXT_DISABLE_SM90": "1"} if sm80 else {}

    def fwd():
        with _Env(**env):
            return ops._attention_forward(q, k, v, mask, 0.0, causal, None, False, [-1, -1])

    out, lse, rng = fwd()

    def bwd():
        with _Env(**env):
            return ops._attention_backward(g, q, k, v, mask, out, lse, rng, 0.0, causal, None, False, [-1, -1],
                                           False)

    return fwd, bwd


def kernel_names(q, k, v, mask, causal, g):
    """The kernel-log lines of one forward and one backward (attention_ext.debug.kernel_log)."""
    fwd, bwd = ours_fns(q, k, v, mask, causal, g)
    with attention_ext.debug.kernel_log() as lines:
        fwd()
        bwd()
        torch.cuda.synchronize()
    return lines


def run_point(L, E, dtype, causal, masked, backends, reps, tokens=16384, hidden=2048):
    B, H = max(1, tokens // L), hidden // E
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, L, E, device="cuda", dtype=dtype) for _ in range(3))
    g = torch.randn(B, H, L, E, device="cuda", dtype=dtype)
    mask = None
    if masked == "pad":  # key padding: batch element b sees its first L - b L / (2 B) keys
        keep = L - torch.arange(B, device="cuda") * L // (2 * B)
        mask = (torch.arange(L, device="cuda")[None, :] < keep[:, None]).view(B, 1, 1, L)
    elif masked:
        mask = torch.randn(B, 1, L, L, device="cuda", dtype=dtype)
    fns = {"attention_ext": ours_fns(q, k, v, mask, causal, g)}
    if torch.cuda.get_device_capability() == (9, 0):
        fns["ours_sm80"] = ours_fns(q, k, v, mask, causal, g, sm80=True)
    for be in backends:
        fns[be] = sdpa_fns(be, q, k, v, mask, causal, g)
    res = {"B": B, "H": H, "L": L, "S": L, "E": E, "dtype": str(dtype).replace("torch.", ""), "causal": causal,
           "masked": masked, "ms": {}, "tflops": {}, "kernels": kernel_names(q, k, v, mask, causal, g)}
    for mode in ("fwd", "bwd"):
        idx = 0 if mode == "fwd" else 1
        live = {name: f[idx] for name, f in fns.items() if f is not None}
        for f in live.values():  # warm-up
            for _ in range(3):
                f()
        torch.cuda.synchronize()
        times = {name: [] for name in live}
        for _ in range(reps):  # alternate the implementations
            for name, f in live.items():
                times[name].append(cuda_time(f, 1))
        for name in fns:
            key = f"{name}/{mode}"
            if name not in live:
                res["ms"][key] = None
                res["tflops"][key] = None
                continue
            ms = statistics.median(times[name])
            res["ms"][key] = ms
            res["tflops"][key] = flops(B, H, L, L, E, causal, mode) / (ms * 1e-3) / 1e12
    del q, k, v, g, mask, fns
    torch.cuda.empty_cache()
    return res


def label(backend):
    return "our sm80" if backend == "ours_sm80" else backend.split("_")[0]


def mask_label(masked):
    return {False: "-", True: "float", "float": "float", "pad": "bool padding"}[masked]


def table(results, backends):
    lines = []
    head = "| dtype | mask | E | L | causal | mode | ours TFLOP/s | " + " | ".join(
        f"{label(b)} TFLOP/s | ours/{label(b)}" for b in backends) + " |"
    lines.append(head)
    lines.append("|" + "---|" * (6 + 1 + 2 * len(backends)))
    for r in results:
        for mode in ("fwd", "bwd"):
            ours = r["tflops"].get(f"attention_ext/{mode}")
            cells = [r["dtype"], mask_label(r["masked"]), str(r["E"]), str(r["L"]), str(r["causal"]), mode,
                     f"{ours:.1f}" if ours else "n/a"]
            for b in backends:
                t = r["tflops"].get(f"{b}/{mode}")
                cells.append(f"{t:.1f}" if t else "n/a")
                cells.append(f"{ours / t:.2f}" if (t and ours) else "n/a")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--issue", action="store_true",
                    help="the Hopper issue's grid only (bf16, L 1k..16k, E 64 / 128, causal and not; cuDNN, FLASH)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results/<device>)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_cuda.py needs a CUDA GPU")
    reps = args.reps or (5 if args.quick else 7 if args.issue else 15)
    lengths = ([512, 4096] if args.quick else [1024, 2048, 4096, 8192, 16384] if args.issue else
               [512, 1024, 2048, 4096, 8192, 16384])
    backends = ["CUDNN_ATTENTION", "FLASH_ATTENTION"] if args.issue else BACKENDS
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    sm80 = ["ours_sm80"] if torch.cuda.get_device_capability() == (9, 0) else []
    points = [(L, E, torch.bfloat16, causal, False, backends) for E in (128, 64) for causal in (False, True)
              for L in lengths]
    if not args.issue:
        # inputs only EFFICIENT accepts among the fused backends; SDPA takes no
        # attn_mask together with is_causal: masked points are non-causal
        for dtype, masked in ((torch.float32, False), (torch.bfloat16, "float")):
            for E in (64, 128):
                for causal in ((False,) if masked else (False, True)):
                    for L in lengths[:4] if not args.quick else lengths:
                        points.append((L, E, dtype, causal, masked, ["EFFICIENT_ATTENTION"]))
        # a boolean key-padding mask (B, 1, 1, L), as padded batches bring: the tiles it hides are skipped
        # (the FLOP count stays dense); EFFICIENT and cuDNN take it
        for E in (64, 128):
            for L in (1024, 4096):
                points.append((L, E, torch.bfloat16, False, "pad", ["EFFICIENT_ATTENTION", "CUDNN_ATTENTION"]))

    results = []
    for L, E, dtype, causal, masked, bes in points:
        r = run_point(L, E, dtype, causal, masked, bes, reps)
        results.append(r)
        print(json.dumps({k: r[k] for k in ("dtype", "masked", "E", "L", "causal")}), {
            k: (round(v, 1) if v else None) for k, v in r["tflops"].items()}, flush=True)
        path = save(results, args, reps, sm80, backends)
    print(open(path[:-5] + ".md").read())
    print(f"raw results: {path}")


_STAMP = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")


def save(results, args, reps, sm80, backends):
    """Writes the raw JSON and the markdown tables of the points measured so far."""
    dev = torch.cuda.get_device_name()
    slug = re.sub(r"[^A-Za-z0-9]+", "_", dev).strip("_").lower()
    out_dir = args.out or os.path.join(HERE, "results", slug)
    os.makedirs(out_dir, exist_ok=True)
    stamp = _STAMP
    meta = {"device": dev, "capability": list(torch.cuda.get_device_capability()), "torch": torch.__version__,
            "cuda": torch.version.cuda, "commit": commit(), "date": stamp, "reps": reps,
            "tokens": 16384, "hidden": 2048}
    path = os.path.join(out_dir, f"cuda_{stamp}.json")
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    md = [f"# attention_ext CUDA benchmark on {dev}", "",
          f"torch {torch.__version__}, CUDA {torch.version.cuda}, commit {meta['commit'][:12]}, "
          f"B*L = 16k tokens, H*E = 2048, median of {reps}; ratio = ours / baseline (> 1: ours faster).", "",
          "## bf16 vs every SDPA backend", "",
          table([r for r in results if r["dtype"] == "bfloat16" and not r["masked"]], sm80 + backends), "",
          "## fp32 and float-masked bf16 vs EFFICIENT_ATTENTION", "",
          table([r for r in results if r["dtype"] == "float32" or r["masked"] in (True, "float")],
                sm80 + ["EFFICIENT_ATTENTION"]), "",
          "## bf16 with a boolean key-padding mask vs EFFICIENT_ATTENTION and CUDNN_ATTENTION", "",
          table([r for r in results if r["masked"] == "pad"], sm80 + ["EFFICIENT_ATTENTION", "CUDNN_ATTENTION"]), ""]
    with open(path[:-5] + ".md", "w") as f:
        f.write("\n".join(md))
    return path


if __name__ == "__main__":
    main()
