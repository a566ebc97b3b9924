"""python -m benchmarks.run: the quick mode on a tiny grid writes JSON, markdown and PNGs."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # `benchmarks` is a package at the repository root

from benchmarks import report, run  # noqa: E402

mpimg = pytest.importorskip("matplotlib.image")


def _png_size(path):
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    return mpimg.imread(path).shape[:2]


def test_flops_formula():
    assert run.flops(2, 3, 5, 7, 11, False, "fwd") == 4 * 2 * 3 * 5 * 7 * 11
    assert run.flops(2, 3, 5, 7, 11, True, "fwd") == 2 * 2 * 3 * 5 * 7 * 11
    assert run.flops(1, 1, 4, 4, 4, False, "fwdbwd") == 3.5 * 4 * 64


def test_growth_exponent():
    assert report.growth_exponent([256, 512, 1024], [1.0, 2.0, 4.0]) == pytest.approx(1.0)
    assert report.growth_exponent([256, 512, 1024], [1.0, 4.0, 16.0]) == pytest.approx(2.0)
    assert report.growth_exponent([256], [1.0]) is None


def _run(*args):
    """The command itself, in a child process (its own thread count and allocator state)."""
    # one thread: on a busy shared machine, OpenMP barriers across preempted threads make tiny
    # calls take a scheduler quantum each
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "benchmarks.run", *args], cwd=REPO, capture_output=True, text=True,
                       timeout=300, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


def test_quick_tiny_grid(tmp_path):
    out = tmp_path / "res"
    text = _run("--quick", "--device", "cpu", "--out", str(out), "--lengths", "32,64", "--head-dims", "32",
                "--heads", "2", "--module-lengths", "32,64", "--no-progress", "--no-flex", "--budget", "0.01")
    for name in ("results.json", "results.md", "tflops.png", "memory.png", "module.png"):
        assert (out / name).stat().st_size > 0, name

    res = json.loads((out / "results.json").read_text())
    env = res["env"]
    for key in ("device", "driver", "torch", "cuda", "git_commit", "date", "cpu_threads"):
        assert key in env
    assert env["torch"]
    ops = res["op"]
    # 2 modes x 1 head dim x 3 mask kinds x 2 lengths, for every backend tried
    assert {r["backend"] for r in ops} == {"attention_ext", "torch-math", "torch-flash", "torch-efficient",
                                            "torch-cudnn", "torch-flex"}
    ours = [r for r in ops if r["backend"] == "attention_ext"]
    assert len(ours) == 12 and all(r["status"] == "ok" for r in ours)
    for r in ours:
        assert r["tflops"] > 0 and r["time_s"] > 0 and r["repeats"] >= 3 and r["peak_mem_bytes"] >= 0
        assert r["tflops"] == pytest.approx(run.flops(1, 2, r["L"], r["L"], 32, r["causal"], r["mode"])
                                            / r["time_s"] / 1e12)
    assert all(r["status"] == "ok" for r in ops if r["backend"] in ("torch-math", "torch-flash"))
    # backends that cannot run here are skipped with a reason, never silently dropped
    for r in ops:
        if r["backend"] in ("torch-efficient", "torch-cudnn", "torch-flex"):
            assert r["status"] == "skipped" and r["reason"]
    mods = res["module"]
    assert len(mods) == 2 * 2 * 2 * 2 and all(r["status"] == "ok" for r in mods)

    md = (out / "results.md").read_text()
    assert "#### forward: TFLOP/s" in md and "#### forward + backward: TFLOP/s" in md
    assert "| E | mask | L | attention_ext |" in md and "best PyTorch | ratio |" in md
    assert "Peak extra memory" in md and "exponent" in md
    assert "MultiheadAttention" in md and "Not measured" in md
    assert env["date"] in md
    assert "TFLOP/s" in text  # the tables are printed too

    # PNG sizes: tflops = 4 in per panel x (2 causal panels), 3.3 in per mode row + 0.5; memory 5 in per mode
    assert _png_size(out / "tflops.png") == (round((2 * 3.3 + 0.5) * 100), 2 * 4 * 100)
    assert _png_size(out / "memory.png") == (400, 2 * 5 * 100)
    assert _png_size(out / "module.png") == (380, 2 * 5 * 100)


def test_flex_one_point(tmp_path):
    """FlexAttention is compiled (or skipped with a reason) on one tiny point."""
    out = tmp_path / "flex"
    _run("--device", "cpu", "--out", str(out), "--lengths", "32", "--head-dims", "16", "--heads", "1",
         "--masks", "causal", "--backends", "attention_ext,flex", "--flex", "--no-module", "--no-plots",
         "--no-progress", "--budget", "0.01")
    rows = {(r["backend"], r["mode"]): r for r in json.loads((out / "results.json").read_text())["op"]}
    flex_fwd = rows[("torch-flex", "fwd")]
    assert flex_fwd["status"] in ("ok", "skipped")
    if flex_fwd["status"] == "ok":
        assert flex_fwd["tflops"] > 0
    else:
        assert flex_fwd["reason"]
    # FlexAttention has no CPU backward: recorded as skipped with PyTorch's reason
    assert rows[("torch-flex", "fwdbwd")]["status"] in ("ok", "skipped")
    assert rows[("attention_ext", "fwdbwd")]["status"] == "ok"


def _measured_bytes(code):
    p = subprocess.run([sys.executable, "-c", "import ctypes, torch; from benchmarks import memory\n" + code],
                       cwd=REPO, capture_output=True, text=True, check=True)
    rows = [line.split() for line in p.stdout.strip().splitlines()[-4:]]
    assert len(rows) == 4 and all(method in ("rss-hwm-trim", "torch-profiler") for _, method in rows), rows
    return [int(n) for n, _ in rows]


def test_cpu_memory_measure_sees_allocations():
    # a tensor allocated and freed within the call
    nbytes = _measured_bytes("for _ in range(4): print(*memory.peak_extra_bytes(lambda: torch.ones(2**20), "
                             "torch.device('cpu')))")
    assert all(4 * 2**20 <= n <= 6 * 2**20 for n in nbytes), nbytes


def test_cpu_memory_measure_sees_reused_scratch():
    """A kernel's scratch: malloc'ed, written, freed, call after call. With glibc's adaptive malloc
    (once a larger block was freed, 1 MiB comes from the heap) the second call reuses the block the
    first freed, already resident; the measurement must hand freed pages back first so that it
    counts every time (a mutant without the trim reports 0 for every call)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's malloc and /proc/self/clear_refs are Linux's")
    code = """
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
libc.free(libc.malloc(2 << 20))
def call():
    p = libc.malloc(1 << 20)
    ctypes.memset(p, 1, 1 << 20)
    libc.free(p)
call()
pin = libc.malloc(1 << 16)  # the freed block is not the heap's top (no automatic trim)
for _ in range(4): print(*memory.peak_extra_bytes(call, torch.device("cpu")))
"""
    nbytes = _measured_bytes(code)
    assert all(2**20 <= n <= 2 * 2**20 for n in nbytes), nbytes


def test_bench_cuda_tables_and_incremental_save(tmp_path, monkeypatch):
    """bench_cuda.py's bookkeeping without a GPU (a crash at the end of a GPU session
    would cost the session's numbers): save() after each point writes a JSON that
    holds every point so far and a markdown table with one row per point and mode,
    ratios = ours / baseline."""
    from benchmarks import bench_cuda
    import torch

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake GPU 90")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    args = type("A", (), {"out": str(tmp_path)})()
    results = []
    for L in (1024, 2048):
        results.append({"B": 16, "H": 16, "L": L, "S": L, "E": 128, "dtype": "bfloat16", "causal": False,
                        "masked": False, "ms": {}, "kernels": [],
                        "tflops": {"attention_ext/fwd": 500.0, "attention_ext/bwd": 300.0,
                                   "ours_sm80/fwd": 250.0, "ours_sm80/bwd": 150.0,
                                   "CUDNN_ATTENTION/fwd": 400.0, "CUDNN_ATTENTION/bwd": None}})
        path = bench_cuda.save(results, args, 7, ["ours_sm80"], ["CUDNN_ATTENTION"])
        saved = json.load(open(path))
        assert saved["meta"]["device"] == "Fake GPU 90" and len(saved["results"]) == len(results)
    md = open(path[:-5] + ".md").read()
    rows = [ln for ln in md.splitlines() if ln.startswith("| bfloat16")]
    assert len(rows) == 4, md  # 2 lengths x fwd / bwd
    assert "| 500.0 | 250.0 | 2.00 | 400.0 | 1.25 |" in rows[0], rows[0]
    assert rows[1].endswith("| n/a | n/a |"), rows[1]  # cuDNN rejected the backward
    # a key-padding point goes to its own table, against EFFICIENT and cuDNN
    results.append({"B": 4, "H": 16, "L": 4096, "S": 4096, "E": 128, "dtype": "bfloat16", "causal": False,
                    "masked": "pad", "ms": {}, "kernels": [],
                    "tflops": {"attention_ext/fwd": 600.0, "attention_ext/bwd": 400.0,
                               "EFFICIENT_ATTENTION/fwd": 200.0, "EFFICIENT_ATTENTION/bwd": 100.0,
                               "CUDNN_ATTENTION/fwd": 300.0, "CUDNN_ATTENTION/bwd": None}})
    md = open(bench_cuda.save(results, args, 7, [], ["CUDNN_ATTENTION"])[:-5] + ".md").read()
    pad_section = md.split("boolean key-padding mask")[1]
    pad_rows = [ln for ln in pad_section.splitlines() if ln.startswith("| bfloat16")]
    assert len(pad_rows) == 2 and "| bool padding |" in pad_rows[0], pad_section
    assert "| 600.0 | 200.0 | 3.00 | 300.0 | 2.00 |" in pad_rows[0], pad_rows[0]
    assert len([ln for ln in md.split("boolean key-padding mask")[0].splitlines() if "bool padding" in ln]) == 0


def test_bench_decode_quick(tmp_path):
    """benchmarks/bench_decode.py --quick: every point measured against PyTorch, outputs agreeing, JSON written."""
    out = tmp_path / "decode.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, os.path.join("benchmarks", "bench_decode.py"), "--quick", "--device", "cpu",
                        "--dtypes", "float32,bfloat16", "--budget", "0.001", "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    res = json.loads(out.read_text())
    for key in ("device", "threads", "torch", "commit", "date"):
        assert res[key] not in (None, ""), key
    rows = res["rows"]
    # 2 dtypes x 1 model x 2 cache lengths x 2 query lengths
    assert len(rows) == 8
    assert {(r["dtype"], r["S"], r["L"]) for r in rows} == {
        (d, s, l) for d in ("float32", "bfloat16") for s in (256, 1024) for l in (1, 4)}
    for r in rows:
        assert r["Hq"] == 32 and r["Hkv"] == 8
        assert r["ours_s"] > 0 and r["torch_s"] > 0 and r["ours_GBps"] > 0
        assert r["speedup"] == pytest.approx(r["torch_s"] / r["ours_s"])
        # the same attention as PyTorch's (values of order 1: an absolute bound per dtype)
        assert r["max_abs_diff_vs_torch"] < (1e-5 if r["dtype"] == "float32" else 2e-2), r
    assert "| bfloat16 | 1 | 32 / 8 | 128 | 1024 | 4 |" in p.stdout


def test_bench_varlen_quick(tmp_path):
    """benchmarks/bench_varlen.py --quick: every backend timed at every point, outputs agreeing, JSON written."""
    out = tmp_path / "varlen.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, os.path.join("benchmarks", "bench_varlen.py"), "--quick", "--device", "cpu",
                        "--dtypes", "float32,bfloat16", "--budget", "0.001", "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    res = json.loads(out.read_text())
    for key in ("device", "threads", "torch", "commit", "date"):
        assert res[key] not in (None, ""), key
    rows = res["rows"]
    # 2 dtypes x 2 modes x causal or not x 1 batch
    assert {(r["dtype"], r["mode"], r["causal"]) for r in rows} == {
        (d, m, c) for d in ("float32", "bfloat16") for m in ("fwd", "fwd+bwd") for c in (False, True)}
    assert len(rows) == 8
    for r in rows:
        names = ["ours", "torch-padded", "torch-loop"] + ([] if r["causal"] else ["torch-nested"])
        for name in names:
            assert r[name + "_s"] > 0 and r[name + "_TFLOPs"] > 0, (name, r)
        best = min(names[1:], key=lambda n: r[n + "_s"])
        assert r["best_torch"] == best and r["speedup_vs_best"] == pytest.approx(r[best + "_s"] / r["ours_s"])
        assert r["max_abs_diff_vs_torch"] < (1e-5 if r["dtype"] == "float32" else 2e-2), r


@pytest.mark.parametrize("script,columns,ratio,diff", [
    ("bench_softcap", ("ours", "softcap", "fwd", "fwd_softcap", "eager"), "softcap", "max_abs_diff_vs_eager"),
    ("bench_alibi", ("fwd", "fwd_alibi", "fwd_sdpa_mask", "fwd_ours_mask", "ours", "alibi", "sdpa_mask", "ours_mask"),
     "alibi", "max_abs_diff_vs_sdpa")])
def test_bench_feature_quick(tmp_path, script, columns, ratio, diff):
    """benchmarks/bench_softcap.py and bench_alibi.py --quick: every column timed, the feature's output agreeing
    with PyTorch's way of computing it (Gemma 2's eager formula; SDPA given the ALiBi bias as a float mask), JSON
    written."""
    out = tmp_path / "bench.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, os.path.join("benchmarks", script + ".py"), "--quick", "--device", "cpu",
                        "--dtypes", "float32,bfloat16", "--budget", "0.001", "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [r["dtype"] for r in rows] == ["float32", "bfloat16"]
    for r in rows:
        for name in columns:
            assert r[name + "_s"] > 0 and r[name + "_TFLOPs"] > 0, (name, r)
        assert r[ratio + "_ratio"] == pytest.approx(r[ratio + "_s"] / r["ours_s"])
        assert r[diff] < (1e-5 if r["dtype"] == "float32" else 3e-2), r
