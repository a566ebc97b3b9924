"""Reports of benchmarks/run.py: results.json, results.md and PNG plots."""
import json
import math
import os
from collections import OrderedDict
from typing import Dict, List, Optional

MiB = 2.0 ** 20
_COLORS = {"attention_ext": "#d62728", "torch-flash": "#1f77b4", "torch-math": "#7f7f7f", "torch-efficient": "#2ca02c",
           "torch-cudnn": "#9467bd", "torch-flex": "#ff7f0e"}
_MODE_NAMES = {"fwd": "forward", "fwdbwd": "forward + backward"}


def _ok(rows):
    return [r for r in rows if r["status"] == "ok"]


def _backends(rows) -> List[str]:
    """Backends with at least one measured point, attention_ext first, in first-seen order."""
    names = list(OrderedDict.fromkeys(r["backend"] for r in _ok(rows)))
    return sorted(names, key=lambda n: (not n.startswith("attention_ext"), names.index(n)))


def _fmt(x: Optional[float], digits: int = 3) -> str:
    if x is None:
        return "—"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.{digits}f}" if x >= 0.01 else f"{x:.2g}"


def _index(rows, *keys):
    out = OrderedDict()
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), {})[r["backend"]] = r
    return out


def best_torch(point: Dict[str, dict]):
    """(name, tflops) of the fastest PyTorch backend measured at a point, or (None, None)."""
    cands = [(r["tflops"], b) for b, r in point.items() if r["status"] == "ok" and not b.startswith("attention_ext")]
    if not cands:
        return None, None
    t, b = max(cands)
    return b, t


def growth_exponent(ls: List[int], mems: List[Optional[float]]) -> Optional[float]:
    """Slope of log(memory) against log(L) between the two longest lengths measured."""
    pts = [(l, m) for l, m in zip(ls, mems) if m]
    if len(pts) < 2:
        return None
    (l0, m0), (l1, m1) = pts[-2], pts[-1]
    return math.log(m1 / m0) / math.log(l1 / l0)


def header(result) -> List[str]:
    env, cfg = result["env"], result["config"]
    commit = (env.get("git_commit") or "unknown")[:10] + ("+dirty" if env.get("git_dirty") else "")
    lines = [f"**Device:** {env['device']}" + (f", driver {env['driver']}" if env.get("driver") else "")
             + f" · **date:** {env['date']} · torch {env['torch']}"
             + (f" (CUDA {env['cuda']})" if env.get("cuda") else "") + f" · attention_ext {env['attention_ext']}"
             + f" · commit `{commit}`",
             "",
             f"{cfg['dtype']}, batch {cfg['batch']}, {cfg['heads']} heads, L = S; "
             f"{'CUDA events' if cfg['timer'] == 'cuda-events' else 'wall clock'} after warm-up, "
             f"{cfg['min_repeats']}–{cfg['max_repeats']} repeats in 3 rounds interleaving the backends; "
             f"time = median of the best round"
             + (" (**--quick**)" if cfg.get("quick") else "") + ". "
             "TFLOP/s count 4·B·H·L·S·E per forward (halved when causal, dense for the padding mask) and "
             "3.5× that for forward + backward. *ratio* = attention_ext ÷ the best PyTorch backend at that "
             "point (> 1: attention_ext is faster). Masks: *none*; *causal* (`is_causal=True`); *padding*: "
             "a boolean key-padding mask (B, 1, 1, S), batch element b sees its first S − b·S/(2B) keys."]
    return lines


def op_tables(result) -> List[str]:
    rows = result["op"]
    names = _backends(rows)
    out = []
    for mode in result["config"]["modes"]:
        mrows = [r for r in rows if r["mode"] == mode]
        if not _ok(mrows):
            continue
        out += ["", f"#### {_MODE_NAMES[mode]}: TFLOP/s", "",
                "| E | mask | L | " + " | ".join(names) + " | best PyTorch | ratio |",
                "|---|---|---:|" + "---:|" * len(names) + "---|---:|"]
        for (E, mask, L), point in _index(mrows, "E", "mask", "L").items():
            cells = [_fmt(point[n]["tflops"]) if n in point and point[n]["status"] == "ok" else "—" for n in names]
            b, t = best_torch(point)
            ours = point.get("attention_ext")
            ratio = ours["tflops"] / t if (ours and ours["status"] == "ok" and t) else None
            ratio_s = "—" if ratio is None else (f"**{ratio:.2f}**" if ratio >= 1 else f"{ratio:.2f}")
            out.append(f"| {E} | {mask} | {L} | " + " | ".join(cells) + f" | {b or '—'} | {ratio_s} |")
    return out


def memory_tables(result, per_point: bool = True) -> List[str]:
    rows = result["op"]
    cfg = result["config"]
    names = _backends(rows)
    method = {"rss-hwm-trim": "CPU: peak resident memory (VmHWM) above the resident memory before the call, "
                              "freed blocks' pages handed back to the kernel (malloc_trim) just before it "
                              "(benchmarks/memory.py)",
              # results before 2026-11-30: the whole run, timings included, had malloc thresholds fixed
              "rss-hwm": "CPU: peak resident memory (VmHWM) above the resident memory before the call, "
                         "glibc malloc set to mmap blocks ≥ 64 KiB (benchmarks/memory.py)",
              "torch-profiler": "CPU: peak of torch's CPU allocator during the call (torch.profiler, tensors only)",
              "cuda-max-memory-allocated": "torch.cuda.max_memory_allocated() during the call minus the memory "
                                           "allocated before it"}.get(cfg["memory_method"], cfg["memory_method"])
    out = ["", "#### Peak extra memory (MiB) against sequence length", "",
           f"Measured: {method}. Inputs are allocated before the call; outputs, saved tensors, gradients and "
           f"scratch count. *exponent*: slope of log(memory) vs log(L) between the two longest lengths — "
           f"≈ 1 grows linearly, ≈ 2 quadratically.", ""]
    lengths = cfg["lengths"]
    E0 = cfg["head_dims"][0]
    for mode in cfg["modes"]:
        for mask in [m for m in ("none", "causal") if m in cfg["masks"]][:1]:
            idx = _index([r for r in rows if r["mode"] == mode and r["E"] == E0 and r["mask"] == mask], "L")
            out += [f"{_MODE_NAMES[mode]}, E = {E0}, mask {mask}:", "",
                    "| backend | " + " | ".join(f"L={L}" for L in lengths) + " | exponent |",
                    "|---|" + "---:|" * len(lengths) + "---:|"]
            for n in names:
                mems = []
                for L in lengths:
                    r = idx.get((L,), {}).get(n)
                    mems.append(r["peak_mem_bytes"] / MiB if r and r["status"] == "ok" else None)
                if not any(m is not None for m in mems):
                    continue
                ex = growth_exponent(lengths, mems)
                out.append(f"| {n} | " + " | ".join(_fmt(m, 2) for m in mems)
                           + f" | {'—' if ex is None else f'{ex:.2f}'} |")
            out.append("")
    if per_point:
        out += ["<details><summary>peak extra memory (MiB) at every point</summary>", "",
                "| mode | E | mask | L | " + " | ".join(names) + " |",
                "|---|---|---|---:|" + "---:|" * len(names)]
        for (mode, E, mask, L), point in _index(rows, "mode", "E", "mask", "L").items():
            cells = [_fmt(point[n]["peak_mem_bytes"] / MiB, 2) if n in point and point[n]["status"] == "ok" else "—"
                     for n in names]
            out.append(f"| {mode} | {E} | {mask} | {L} | " + " | ".join(cells) + " |")
        out += ["", "</details>"]
    return out


def module_table(result) -> List[str]:
    rows = result["module"]
    if not rows:
        return []
    cfg = result["config"]
    r0 = rows[0]
    out = ["", "#### `attention_ext.MultiheadAttention` vs `torch.nn.MultiheadAttention`", "",
           f"Self-attention, batch_first, embed_dim {r0['embed_dim']}, {r0['H']} heads, batch {r0['B']}, "
           f"{cfg['dtype']}; forward in eval mode under no_grad (PyTorch may take its native fast path), "
           f"forward + backward in train mode (dropout 0). *speedup* = torch time ÷ attention_ext time.", "",
           "| mode | need_weights | L | torch ms | attention_ext ms | speedup | torch MiB | attention_ext MiB |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
    for (mode, nw, L), p in _index(rows, "mode", "need_weights", "L").items():
        t = p.get("torch.nn.MultiheadAttention")
        o = p.get("attention_ext.MultiheadAttention")
        ok_t, ok_o = t and t["status"] == "ok", o and o["status"] == "ok"
        sp = f"{t['time_s'] / o['time_s']:.2f}" if ok_t and ok_o else "—"
        out.append(f"| {mode} | {nw} | {L} | {_fmt(t['time_s'] * 1e3, 2) if ok_t else '—'} | "
                   f"{_fmt(o['time_s'] * 1e3, 2) if ok_o else '—'} | {sp} | "
                   f"{_fmt(t['peak_mem_bytes'] / MiB, 2) if ok_t else '—'} | "
                   f"{_fmt(o['peak_mem_bytes'] / MiB, 2) if ok_o else '—'} |")
    return out


def skipped(result) -> List[str]:
    seen = OrderedDict()
    for r in result["op"] + result["module"]:
        if r["status"] != "ok":
            key = (r["backend"], r["status"], r.get("reason", ""))
            seen.setdefault(key, []).append(f"{r['mode']}" + (f"/{r['mask']}" if "mask" in r else ""))
    if not seen:
        return []
    out = ["", "#### Not measured", "", "| backend | status | points | reason |", "|---|---|---:|---|"]
    for (b, st, reason), pts in seen.items():
        kinds = ", ".join(OrderedDict.fromkeys(pts))
        out.append(f"| {b} | {st} | {len(pts)} ({kinds}) | {reason.replace('|', '/')} |")
    return out


def markdown(result, compact: bool = False) -> str:
    lines = header(result) + op_tables(result) + memory_tables(result, per_point=not compact) + module_table(result)
    lines += skipped(result)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------
def _style(name):
    return dict(color=_COLORS.get(name), linewidth=2.2 if name.startswith("attention_ext") else 1.4,
                marker="o", markersize=3)


def plot_tflops(result, path) -> str:
    from attention_ext import viz

    rows = _ok(result["op"])
    cfg = result["config"]
    names = _backends(result["op"])
    causals = [c for c in (False, True) if any(r["causal"] == c for r in rows)]
    panels = [(E, c) for E in cfg["head_dims"] for c in causals]
    modes = [m for m in cfg["modes"] if any(r["mode"] == m for r in rows)]
    fig = viz.new_figure((4.0 * max(len(panels), 1), 3.3 * max(len(modes), 1) + 0.5), dpi=100)
    axes = fig.subplots(max(len(modes), 1), max(len(panels), 1), squeeze=False)
    for i, mode in enumerate(modes):
        for j, (E, causal) in enumerate(panels):
            ax = axes[i][j]
            for n in names:
                for mask, ls in (("causal", "-"), ("none", "-"), ("padding", "--")):
                    if (mask == "causal") != causal:
                        continue
                    pts = sorted((r["L"], r["tflops"]) for r in rows
                                 if r["backend"] == n and r["mode"] == mode and r["E"] == E and r["mask"] == mask)
                    if pts:
                        st = _style(n)
                        ax.plot([p[0] for p in pts], [p[1] for p in pts], linestyle=ls,
                                label=n + (" (padding mask)" if mask == "padding" else ""), **st)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{_MODE_NAMES[mode]}, E={E}, {'causal' if causal else 'not causal'}", fontsize=9)
            ax.set_xlabel("sequence length L = S", fontsize=8)
            ax.set_ylabel("TFLOP/s", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=6)
    env = result["env"]
    fig.suptitle(f"attention TFLOP/s, {cfg['dtype']}, B={cfg['batch']}, H={cfg['heads']} — {env['device']}, "
                 f"{env['date']}", fontsize=10)
    return viz.save_figure(fig, path)


def plot_memory(result, path) -> str:
    from attention_ext import viz

    rows = _ok(result["op"])
    cfg = result["config"]
    names = _backends(result["op"])
    E0 = cfg["head_dims"][0]
    mask = "none" if "none" in cfg["masks"] else cfg["masks"][0]
    modes = [m for m in cfg["modes"] if any(r["mode"] == m for r in rows)]
    fig = viz.new_figure((5.0 * max(len(modes), 1), 4.0), dpi=100)
    axes = fig.subplots(1, max(len(modes), 1), squeeze=False)[0]
    for ax, mode in zip(axes, modes):
        ref = None
        for n in names:
            pts = sorted((r["L"], r["peak_mem_bytes"] / MiB) for r in rows
                         if r["backend"] == n and r["mode"] == mode and r["E"] == E0 and r["mask"] == mask
                         and r["peak_mem_bytes"] > 0)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=n, **_style(n))
                if n.startswith("attention_ext"):
                    ref = pts[0]
        if ref is not None:
            ls = sorted({r["L"] for r in rows})
            ax.plot(ls, [ref[1] * l / ref[0] for l in ls], ":", color="black", linewidth=0.8, label="∝ L")
            ax.plot(ls, [ref[1] * (l / ref[0]) ** 2 for l in ls], "-.", color="black", linewidth=0.8, label="∝ L²")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{_MODE_NAMES[mode]}, E={E0}, mask {mask}", fontsize=9)
        ax.set_xlabel("sequence length L = S", fontsize=8)
        ax.set_ylabel("peak extra memory (MiB)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3, which="both")
        ax.legend(fontsize=7)
    env = result["env"]
    fig.suptitle(f"peak memory of one call ({cfg['memory_method']}) — {env['device']}, {env['date']}", fontsize=9)
    return viz.save_figure(fig, path)


def plot_module(result, path) -> Optional[str]:
    from attention_ext import viz

    rows = _ok(result["module"])
    if not rows:
        return None
    modes = [m for m in result["config"]["modes"] if any(r["mode"] == m for r in rows)]
    fig = viz.new_figure((5.0 * len(modes), 3.8), dpi=100)
    axes = fig.subplots(1, len(modes), squeeze=False)[0]
    for ax, mode in zip(axes, modes):
        for name, color in (("torch.nn.MultiheadAttention", "#1f77b4"), ("attention_ext.MultiheadAttention",
                                                                           "#d62728")):
            for nw, ls in ((False, "-"), (True, "--")):
                pts = sorted((r["L"], r["time_s"] * 1e3) for r in rows
                             if r["backend"] == name and r["mode"] == mode and r["need_weights"] == nw)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], ls, color=color, marker="o", markersize=3,
                            label=f"{name.split('.')[0]} need_weights={nw}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"MultiheadAttention, {_MODE_NAMES[mode]}", fontsize=9)
        ax.set_xlabel("sequence length", fontsize=8)
        ax.set_ylabel("ms per call", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3, which="both")
        ax.legend(fontsize=7)
    return viz.save_figure(fig, path)


def write_all(result, out_dir: str, plots: bool = True) -> List[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    p = os.path.join(out_dir, "results.json")
    with open(p, "w") as f:
        json.dump(result, f, indent=1)
    paths.append(p)
    p = os.path.join(out_dir, "results.md")
    with open(p, "w") as f:
        f.write(f"### Attention benchmarks: {result['env']['device']}, {result['env']['date']}\n\n")
        f.write("Generated by `python -m benchmarks.run" + (" --quick" if result["config"].get("quick") else "")
                + "`.\n\n")
        f.write(markdown(result))
    paths.append(p)
    if plots:
        paths.append(plot_tflops(result, os.path.join(out_dir, "tflops.png")))
        paths.append(plot_memory(result, os.path.join(out_dir, "memory.png")))
        m = plot_module(result, os.path.join(out_dir, "module.png"))
        if m:
            paths.append(m)
    return paths
