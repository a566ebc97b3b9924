"""The benchmark matrix of this machine, in one command:

    python -m benchmarks.run            # full matrix (a few minutes on 2 CPU cores)
    python -m benchmarks.run --quick    # small grid, under a minute

attention_ext's op against every PyTorch attention backend that accepts the input -- SDPA's math,
flash, memory-efficient and cuDNN kernels (each forced with ``torch.nn.attention.sdpa_kernel``;
on the CPU only flash and math exist) and FlexAttention compiled with ``torch.compile`` -- in
forward and forward + backward, across sequence lengths, head dims, and mask kinds (none,
``is_causal``, a boolean key-padding mask); and ``attention_ext.MultiheadAttention`` against
``torch.nn.MultiheadAttention``. A backend that refuses an input is recorded as skipped, with
PyTorch's reason.

Timing: CUDA events on a GPU, ``time.perf_counter`` on the CPU; after warm-up (and after
compiling, for FlexAttention), repeated calls (as many as fit a time budget, between a minimum
and a maximum count) in 3 rounds, the backends of one point interleaved round by round; the
time of a backend is the median of its best round (all samples are in the JSON). TFLOP/s: forward 4·B·H·L·S·E, halved for causal
(the padding mask is counted dense); forward + backward 3.5x the forward (backward = 2.5x).
Peak memory: see benchmarks/memory.py (CUDA: max_memory_allocated; CPU: RSS high-water mark).

Writes into ``benchmarks/results/<device>/`` (or ``--out``): ``results.json`` (raw numbers,
device, driver, torch/CUDA versions, git commit), ``results.md`` (the tables), ``tflops.png``,
``memory.png`` and ``module.png``.
"""
import argparse
import contextlib
import datetime
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import warnings
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Tuple

os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # the profiler fallback of memory.py is chatty

import torch
import torch.nn.functional as F

import attention_ext

from . import memory, report

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TORCH_BACKENDS = ("math", "flash", "efficient", "cudnn")
MASKS = ("none", "causal", "padding")


class Skip(Exception):
    """A backend does not accept an input (or cannot run it here)."""


def _first_line(msg: str, limit: int = 240) -> str:
    msg = " ".join(str(msg).split())
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


# ---------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------
class Timer:
    """Medians of repeated calls. Several functions measured at one point are interleaved: the
    repeats run in rounds (all of a's share of round 1, then b's, c's, then round 2, ...), so a
    burst of load from elsewhere on the machine hits every backend alike instead of whichever
    ran at that moment; each backend's time is the median of its best round."""

    def __init__(self, device: torch.device, budget_s: float, min_repeats: int, max_repeats: int, warmup: int,
                 rounds: int = 3):
        self.device, self.budget, self.min_r, self.max_r, self.warmup = device, budget_s, min_repeats, max_repeats, warmup
        self.rounds = rounds

    def once(self, fn) -> float:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def medians(self, fns: Dict[str, Callable[[], object]], contexts: Optional[Dict[str, Callable]] = None
                ) -> Tuple[Dict[str, Dict[str, float]], Dict[str, BaseException]]:
        """({name: {"time_s", "median_all_s", "min_s", "round_medians_s", "repeats"}},
        {name: exception} for functions that raised)."""
        contexts = contexts or {}
        ctx = lambda name: contexts.get(name, contextlib.nullcontext)()
        plan, times, errors = {}, {}, {}
        for name, fn in fns.items():
            try:
                with ctx(name):
                    first = min(self.once(fn) for _ in range(max(1, self.warmup)))
            except Exception as e:  # noqa: BLE001 - e.g. out of memory: this backend only
                errors[name] = e
                continue
            plan[name] = int(min(self.max_r, max(self.min_r, self.budget / max(first, 1e-6))))
            times[name] = []
        for r in range(self.rounds):
            for name, fn in fns.items():
                if name not in plan or name in errors:
                    continue
                k = plan[name] // self.rounds + (1 if r < plan[name] % self.rounds else 0)
                try:
                    with ctx(name):
                        times[name] += [self.once(fn) for _ in range(k)]
                except Exception as e:  # noqa: BLE001
                    errors[name] = e
        timed = {}
        for name, ts in times.items():
            if not ts or name in errors:
                continue
            # ts holds the rounds one after the other: the reported time is the best round's median
            # (a round that coincided with load from elsewhere does not count), all samples kept too
            per_round, i = [], 0
            for r in range(self.rounds):
                k = plan[name] // self.rounds + (1 if r < plan[name] % self.rounds else 0)
                if k:
                    per_round.append(statistics.median(ts[i:i + k]))
                i += k
            timed[name] = {"time_s": min(per_round), "median_all_s": statistics.median(ts), "min_s": min(ts),
                           "round_medians_s": per_round, "repeats": len(ts)}
        return timed, errors


# ---------------------------------------------------------------------------
# inputs and backends
# ---------------------------------------------------------------------------
def make_inputs(B, H, L, S, E, dtype, device, mask_kind, grad, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, E, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
               for n in (L, S, S))
    for t in (q, k, v):
        t.requires_grad_(grad)
    lengths = None
    mask = None
    if mask_kind == "padding":
        # batch element b sees its first S - b*S/(2B) keys (the first one all of them)
        lengths = torch.tensor([S - (b * S) // (2 * B) for b in range(B)], device=device)
        mask = (torch.arange(S, device=device)[None, :] < lengths[:, None]).view(B, 1, 1, S)  # True = attend
    return q, k, v, mask, lengths


def flops(B, H, L, S, E, causal, mode):
    f = 4.0 * B * H * L * S * E * (0.5 if causal else 1.0)
    return f if mode == "fwd" else 3.5 * f


class Backend:
    name = "?"
    torch_side = True  # a PyTorch backend (the ratio's denominator)

    def prepare(self, q, k, v, mask, lengths, causal) -> Callable[[], torch.Tensor]:
        """A function computing the attention output for these inputs; raises Skip if unsupported."""
        raise NotImplementedError

    def context(self):
        return contextlib.nullcontext()


class Ours(Backend):
    name = "attention_ext"
    torch_side = False

    def prepare(self, q, k, v, mask, lengths, causal):
        return lambda: attention_ext.attention(q, k, v, attn_mask=mask, is_causal=causal)


class SDPA(Backend):
    def __init__(self, which: str):
        from torch.nn.attention import SDPBackend

        self.which = which
        self.name = f"torch-{which}"
        self.enum = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION,
                     "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[which]

    def context(self):
        from torch.nn.attention import sdpa_kernel

        return sdpa_kernel([self.enum])

    def prepare(self, q, k, v, mask, lengths, causal):
        fn = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
        # probe: PyTorch raises "No available kernel" when this backend refuses the input and says
        # why in warnings
        with warnings.catch_warnings(record=True) as caught, self.context():
            warnings.simplefilter("always")
            try:
                with torch.no_grad():
                    fn()
            except RuntimeError as e:
                # the warnings say why each kernel was not used; the error only that none was
                reasons = list(OrderedDict.fromkeys(" ".join(str(w.message).split()) for w in caught))
                raise Skip(_first_line("; ".join(reasons) if reasons else str(e), 400)) from None
        return fn


class Flex(Backend):
    name = "torch-flex"
    _compiled = None

    def __init__(self, enabled: bool, why_not: str = ""):
        self.enabled, self.why_not = enabled, why_not

    def prepare(self, q, k, v, mask, lengths, causal):
        if not self.enabled:
            raise Skip(self.why_not)
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        except ImportError as e:
            raise Skip(f"FlexAttention is not available in torch {torch.__version__}: {e}") from None
        if Flex._compiled is None:
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            Flex._compiled = torch.compile(flex_attention, dynamic=True)
        B, _, L, _ = q.shape
        S = k.shape[2]
        block_mask = None
        if causal:
            block_mask = create_block_mask(lambda b, h, i, j: i >= j, None, None, L, S, device=q.device)
        elif lengths is not None:
            block_mask = create_block_mask(lambda b, h, i, j: j < lengths[b], B, None, L, S, device=q.device)
        fn = lambda: Flex._compiled(q, k, v, block_mask=block_mask)
        try:  # compile (outside the timing); CPU: no backward, some dtypes unsupported, ...
            out = fn()
            if q.requires_grad:
                out.sum().backward()
        except Exception as e:
            raise Skip(_first_line(f"{type(e).__name__}: {e}")) from None
        finally:
            for t in (q, k, v):
                t.grad = None
        return fn


# ---------------------------------------------------------------------------
# environment
# ---------------------------------------------------------------------------
def _git(*args) -> Optional[str]:
    try:
        return subprocess.check_output(["git", *args], cwd=REPO, text=True, stderr=subprocess.DEVNULL).strip()
    except Exception:
        return None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    commit = _git("rev-parse", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    env = {
        "date": datetime.date.today().isoformat(),
        "time": datetime.datetime.now().isoformat(timespec="seconds"),
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "attention_ext": attention_ext.__version__,
        "git_commit": commit,
        "git_dirty": dirty,
        "cpu": cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["device"] = props.name
        env["compute_capability"] = f"{props.major}.{props.minor}"
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        try:
            env["driver"] = subprocess.check_output(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", f"--id={device.index or 0}"],
                text=True, stderr=subprocess.DEVNULL).strip()
        except Exception:
            env["driver"] = None
    else:
        env["device"] = f"{env['cpu']} ({env['cpu_threads']} threads)"
        env["driver"] = None
    return env


def device_slug(device: torch.device) -> str:
    if device.type == "cpu":
        return "cpu"
    name = torch.cuda.get_device_name(device)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "cuda"


# ---------------------------------------------------------------------------
# the matrix
# ---------------------------------------------------------------------------
def _ints(s: str) -> List[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def _strs(s: str) -> List[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def defaults(device: torch.device, quick: bool) -> dict:
    if device.type == "cuda":
        if quick:
            return dict(batch=2, heads=8, lengths="512,2048", head_dims="64,128", module_lengths="512,2048",
                        dtype="bfloat16", budget=0.05, min_repeats=5, max_repeats=20, warmup=3)
        return dict(batch=2, heads=16, lengths="512,1024,2048,4096,8192,16384", head_dims="64,128",
                    module_lengths="512,2048,8192", dtype="bfloat16", budget=0.3, min_repeats=10, max_repeats=100,
                    warmup=5)
    if quick:
        return dict(batch=1, heads=4, lengths="128,512", head_dims="64", module_lengths="128,512", dtype="float32",
                    budget=0.05, min_repeats=3, max_repeats=10, warmup=1)
    return dict(batch=1, heads=8, lengths="256,512,1024,2048", head_dims="64,128", module_lengths="256,1024",
                dtype="float32", budget=0.4, min_repeats=3, max_repeats=30, warmup=1)


def _zero_grads(*ts):
    for t in ts:
        t.grad = None


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def _record_failure(row: dict, e: BaseException) -> None:
    if isinstance(e, Skip):
        row.update(status="skipped", reason=str(e))
    elif _is_oom(e):
        row.update(status="skipped", reason="out of memory")
    else:
        row.update(status="error", reason=_first_line(f"{type(e).__name__}: {e}"))


def run_op_matrix(args, device, dtype, backends, timer, progress) -> List[dict]:
    rows = []
    points = [(mode, E, mask_kind, L) for mode in args.modes for E in args.head_dims for mask_kind in args.masks
              for L in args.lengths]
    bar = progress(total=len(points), desc="attention op")
    for mode, E, mask_kind, L in points:
        B, H, S = args.batch, args.heads, L
        causal = mask_kind == "causal"
        grad = mode == "fwdbwd"
        bar.set_postfix_str(f"{mode} E={E} {mask_kind} L={L}", refresh=False)
        prow, calls, inputs = {}, {}, {}
        for be in backends:
            row = dict(kind="op", mode=mode, E=E, mask=mask_kind, causal=causal, L=L, S=S, B=B, H=H,
                       dtype=args.dtype, backend=be.name)
            prow[be.name] = row
            try:
                # every backend gets its own copy of the same inputs (gradients are per tensor)
                q, k, v, mask, lengths = make_inputs(B, H, L, S, E, dtype, device, mask_kind, grad)
                go = torch.randn_like(q) if grad else None
                fn = be.prepare(q, k, v, mask, lengths, causal)
                if grad:
                    def call(fn=fn, go=go, q=q, k=k, v=v):
                        _zero_grads(q, k, v)
                        fn().backward(go)
                else:
                    def call(fn=fn):
                        with torch.no_grad():
                            fn()
                with be.context():
                    call()  # the first call may raise (e.g. out of memory) before any timing
                calls[be.name] = call
                inputs[be.name] = (q, k, v)
            except Exception as e:  # noqa: BLE001 - recorded, the matrix goes on
                _record_failure(row, e)
        ctxs = {be.name: be.context for be in backends}
        timed, errors = timer.medians(calls, ctxs)
        for name, e in errors.items():
            _record_failure(prow[name], e)
        fl = flops(B, H, L, S, E, causal, mode)
        for name, t in timed.items():
            try:
                _zero_grads(*inputs[name])
                with ctxs[name]():
                    mem, method = memory.peak_extra_bytes(calls[name], device)
                prow[name].update(status="ok", **t, tflops=fl / t["time_s"] / 1e12, peak_mem_bytes=mem,
                                  mem_method=method)
            except Exception as e:  # noqa: BLE001
                _record_failure(prow[name], e)
        rows += list(prow.values())
        del calls, inputs
        if device.type == "cuda":
            torch.cuda.empty_cache()
        bar.update(1)
    bar.close()
    return rows


def run_module_matrix(args, device, dtype, timer, progress) -> List[dict]:
    rows = []
    E = 64
    D = args.heads * E
    torch.manual_seed(0)
    stock = torch.nn.MultiheadAttention(D, args.heads, batch_first=True, device=device, dtype=dtype)
    ours = attention_ext.MultiheadAttention(D, args.heads, batch_first=True, device=device, dtype=dtype)
    ours.load_state_dict(stock.state_dict())
    mods = {"torch.nn.MultiheadAttention": stock, "attention_ext.MultiheadAttention": ours}
    points = [(mode, nw, L) for mode in args.modes for nw in (False, True) for L in args.module_lengths]
    bar = progress(total=len(points), desc="MultiheadAttention")
    for mode, need_weights, L in points:
        grad = mode == "fwdbwd"
        bar.set_postfix_str(f"{mode} need_weights={need_weights} L={L}", refresh=False)
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(args.batch, L, D, generator=g).to(device=device, dtype=dtype).requires_grad_(grad)
        go = torch.randn_like(x) if grad else None
        prow, calls = {}, {}
        for name, mod in mods.items():
            mod.train(grad)
            prow[name] = dict(kind="module", mode=mode, need_weights=need_weights, L=L, B=args.batch, H=args.heads,
                              embed_dim=D, dtype=args.dtype, backend=name)

            def call(mod=mod):
                if grad:
                    _zero_grads(x, *mod.parameters())
                    out, _ = mod(x, x, x, need_weights=need_weights)
                    out.backward(go)
                else:
                    with torch.no_grad():
                        mod(x, x, x, need_weights=need_weights)
            try:
                call()
                calls[name] = call
            except Exception as e:  # noqa: BLE001
                _record_failure(prow[name], e)
        timed, errors = timer.medians(calls)
        for name, e in errors.items():
            _record_failure(prow[name], e)
        for name, t in timed.items():
            try:
                mem, method = memory.peak_extra_bytes(calls[name], device)
                prow[name].update(status="ok", **t, peak_mem_bytes=mem, mem_method=method)
            except Exception as e:  # noqa: BLE001
                _record_failure(prow[name], e)
        rows += list(prow.values())
        del x, calls
        if device.type == "cuda":
            torch.cuda.empty_cache()
        bar.update(1)
    bar.close()
    for mod in mods.values():
        _zero_grads(*mod.parameters())
        mod.eval()
    return rows


def _progress_factory(enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        tqdm = None

    class _Null:
        def __init__(self, total=None, desc=None):
            pass

        def update(self, n=1):
            pass

        def set_postfix_str(self, *a, **k):
            pass

        def close(self):
            pass

    if not enabled or tqdm is None:
        return _Null
    return lambda total, desc: tqdm(total=total, desc=desc, dynamic_ncols=True, disable=None)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small grid, few repeats (under a minute)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/results/<device>/)")
    ap.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: CPU float32, GPU bfloat16)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--heads", type=int, default=None)
    ap.add_argument("--lengths", default=None, help="comma-separated sequence lengths (L = S)")
    ap.add_argument("--head-dims", default=None, help="comma-separated head dims")
    ap.add_argument("--masks", default=",".join(MASKS), help="subset of none,causal,padding")
    ap.add_argument("--modes", default="fwd,fwdbwd", help="subset of fwd,fwdbwd")
    ap.add_argument("--backends", default=None,
                    help="subset of attention_ext,math,flash,efficient,cudnn,flex (default: all)")
    ap.add_argument("--module-lengths", default=None, help="sequence lengths of the MultiheadAttention benchmark")
    ap.add_argument("--no-module", action="store_true", help="skip the MultiheadAttention benchmark")
    ap.add_argument("--flex", dest="flex", action="store_true", default=None,
                    help="include FlexAttention (default: yes, except with --quick on the CPU)")
    ap.add_argument("--no-flex", dest="flex", action="store_false")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--budget", type=float, default=None, help="seconds of repeats per measurement")
    args = ap.parse_args(argv)
    return ap, args


def main(argv=None) -> int:
    ap, args = parse_args(argv)
    if args.device is None:
        cuda_ok = torch.cuda.is_available() and attention_ext._loader.has_cuda_kernels()
        args.device = "cuda" if cuda_ok else "cpu"
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA GPU available")
    d = defaults(device, args.quick)
    for key in ("batch", "heads", "dtype", "budget"):
        if getattr(args, key) is None:
            setattr(args, key, d[key])
    args.lengths = _ints(args.lengths or d["lengths"])
    args.head_dims = _ints(args.head_dims or d["head_dims"])
    args.module_lengths = _ints(args.module_lengths or d["module_lengths"])
    args.masks = _strs(args.masks)
    args.modes = _strs(args.modes)
    bad = [m for m in args.masks if m not in MASKS] + [m for m in args.modes if m not in ("fwd", "fwdbwd")]
    if bad:
        ap.error(f"unknown mask kind / mode: {bad}")
    dtype = getattr(torch, args.dtype)
    if args.flex is None:
        args.flex = not (args.quick and device.type == "cpu")
    wanted = set(_strs(args.backends)) if args.backends else {"attention_ext", "flex", *TORCH_BACKENDS}
    backends: List[Backend] = []
    if "attention_ext" in wanted:
        backends.append(Ours())
    backends += [SDPA(w) for w in TORCH_BACKENDS if w in wanted]
    if "flex" in wanted:
        why = "left out with --quick on the CPU (compiling takes seconds per variant); use --flex" if args.quick \
            else "left out with --no-flex"
        backends.append(Flex(bool(args.flex), why))

    out_dir = args.out or os.path.join(HERE, "results", device_slug(device))
    os.makedirs(out_dir, exist_ok=True)
    mem_method = "cuda-max-memory-allocated" if device.type == "cuda" else memory.cpu_method()
    env = environment(device)
    config = dict(quick=args.quick, dtype=args.dtype, batch=args.batch, heads=args.heads, lengths=args.lengths,
                  head_dims=args.head_dims, masks=args.masks, modes=args.modes, module_lengths=args.module_lengths,
                  module_head_dim=64, backends=[b.name for b in backends], budget_s=args.budget,
                  min_repeats=d["min_repeats"], max_repeats=d["max_repeats"], warmup=d["warmup"],
                  timer="cuda-events" if device.type == "cuda" else "perf_counter", memory_method=mem_method)
    print(f"benchmarks on {env['device']} | torch {env['torch']} (CUDA {env['cuda']}) | "
          f"commit {(env['git_commit'] or '?')[:10]}{'+dirty' if env['git_dirty'] else ''} | {args.dtype}, "
          f"B={args.batch}, H={args.heads}, L={args.lengths}, E={args.head_dims}", flush=True)
    t0 = time.perf_counter()
    timer = Timer(device, args.budget, d["min_repeats"], d["max_repeats"], d["warmup"])
    progress = _progress_factory(not args.no_progress)
    rows = run_op_matrix(args, device, dtype, backends, timer, progress)
    mod_rows = [] if args.no_module else run_module_matrix(args, device, dtype, timer, progress)
    elapsed = time.perf_counter() - t0
    result = {"env": env, "config": config, "elapsed_s": round(elapsed, 1), "op": rows, "module": mod_rows}
    paths = report.write_all(result, out_dir, plots=not args.no_plots)
    print(report.markdown(result, compact=True))
    print(f"finished in {elapsed:.0f} s; wrote " + ", ".join(os.path.relpath(p) for p in paths))
    errors = [r for r in rows + mod_rows if r["status"] == "error"]
    for r in errors:
        print(f"ERROR {r['backend']} {r.get('mode')} L={r['L']}: {r['reason']}", file=sys.stderr)
    return 1 if any(r["backend"].startswith("attention_ext") for r in errors) else 0


if __name__ == "__main__":
    sys.exit(main())
