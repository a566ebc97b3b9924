"""Converted models under data-parallel training: DDP and FSDP2 (CPU, gloo, 2 processes).

A small ``nn.TransformerEncoder`` (batch_first, d_model 32, 4 heads, 2 layers, dropout 0),
converted with ``attention_ext.replace_multihead_attention``, is trained for a few SGD steps
by two processes, each on its own shard of a fixed random batch (with a key-padding mask), and
the parameters it ends with are compared with

* the other rank's (exactly, for DDP; FSDP2's gathered full parameters, exactly),
* a single-process run of the same converted model on the full batch (mean loss) — data
  parallelism must not change the training, to fp32 round-off,
* the same model unconverted (stock ``nn.MultiheadAttention``) trained the same way in the same
  processes — the fused kernels must train like PyTorch's attention, to a looser tolerance,

and the ranks count the attention_ext ops that reached the dispatcher (tests/op_counter.py), so a
silent fallback to PyTorch's attention fails the test. A third test trains ``torch.compile`` of
the DDP-wrapped converted model (backend: AOTAutograd with eagerly run graphs) and checks that
the fused forward and backward are in its graphs.

The ranks are separate processes (this file run as a script: ``python test_distributed.py
--worker ...``), rendezvous over TCP on a free port, and write their results to a temporary
directory for the test to compare. Hangs fail instead of blocking CI: the process group has a
short collective timeout and the test kills the ranks after ``RANK_TIMEOUT_S``.

Legacy ``FullyShardedDataParallel`` is not tested: in torch 2.14 it refuses the CPU
(``RuntimeError: FSDP needs a non-CPU accelerator device, but no accelerator device is
detected.``); FSDP2 (``fully_shard``) runs on the CPU with gloo and is what is tested.
"""
import datetime
import os
import socket
import subprocess
import sys
import tempfile
from collections import Counter

import torch
import torch.nn as nn

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

WORLD = 2
D_MODEL, NHEAD, FFN, LAYERS = 32, 4, 64, 2
BATCH, SEQ, STEPS, LR = 8, 12, 3, 0.1
RANK_TIMEOUT_S = 100  # whole 2-rank run (start-up included); the collectives time out after 60 s
COLLECTIVE_TIMEOUT_S = 60

# Final parameters, element-wise. After 3 small steps they are mostly their initial values, so
# the training itself is also compared through the updates (final - initial): per parameter
# tensor, |update - reference update| / |reference update| (2-norms) must stay below *_UPDATE_TOL.
# Measured on this project's CPU: 6e-6 (data-parallel vs one process) and 4e-6 (converted vs
# stock); a 3e-4 relative error in the attention's output shows up as 2.9e-4.
# fp32: the converted model, data-parallel vs one process (only the summation order differs)
DP_TOL = dict(rtol=1e-5, atol=1e-6)
DP_UPDATE_TOL = 1e-4
# fp32: attention_ext's kernels vs PyTorch's attention (a different algorithm)
STOCK_TOL = dict(rtol=5e-5, atol=5e-6)
STOCK_UPDATE_TOL = 2e-4


# ---------------------------------------------------------------------------
# model, data, training: shared by the ranks and the single-process reference
# ---------------------------------------------------------------------------
def make_model(converted):
    import attention_ext

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D_MODEL, NHEAD, FFN, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
    if converted:
        attention_ext.replace_multihead_attention(model)
    return model


def make_batch():
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(BATCH, SEQ, D_MODEL, generator=g)
    y = torch.randn(BATCH, SEQ, D_MODEL, generator=g)
    # key-padding mask (True = padding): sample b pads its last b keys, so every rank's shard has padding
    kpm = torch.arange(SEQ).expand(BATCH, SEQ) >= (SEQ - torch.arange(BATCH)[:, None])
    return x, y, kpm


def shard(t, rank, world):
    n = t.shape[0] // world
    return t[rank * n:(rank + 1) * n]


def train(model, x, y, kpm):
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x, src_key_padding_mask=kpm), y)  # mean over the (shard's) batch
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def named_params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ---------------------------------------------------------------------------
# the rank processes
# ---------------------------------------------------------------------------
def _recording_aot_eager(graph_ops):
    """torch.compile backend: AOTAutograd, graphs run eagerly (as "aot_eager"), counting the
    attention_ext ops in the forward and backward graphs it compiles into `graph_ops`."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def record(gm, example_inputs):
        for node in gm.graph.nodes:
            target = node.target
            if node.op == "call_function" and isinstance(target, torch._ops.OpOverload) and \
                    target.namespace == "attention_ext":
                graph_ops[f"attention_ext.{target.overloadpacket.__name__}"] += 1
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=record, bw_compiler=record)


def worker(scenario, rank, world, port, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import attention_ext  # noqa: F401  (registers the ops)
    from op_counter import OpCounter

    torch.set_num_threads(1)  # two ranks on a 2-core machine
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        x, y, kpm = (shard(t, rank, world) for t in make_batch())
        results = {}
        for converted in ((True,) if scenario == "ddp_compile" else (True, False)):
            model = make_model(converted)
            info = {}
            if scenario == "ddp":
                wrapped = DDP(model)
            elif scenario == "ddp_compile":
                info["graph_ops"] = graph_ops = Counter()
                wrapped = torch.compile(DDP(model), backend=_recording_aot_eager(graph_ops))
            elif scenario == "fsdp2":
                from torch.distributed.fsdp import fully_shard
                from torch.distributed.tensor import DTensor

                for layer in model.layers:
                    fully_shard(layer)
                wrapped = fully_shard(model)
                local = {n: (type(p).__name__, tuple(p.to_local().shape) if isinstance(p, DTensor) else None,
                             tuple(p.shape)) for n, p in model.named_parameters()}
                info["sharding"] = local
            else:
                raise ValueError(scenario)
            if scenario == "ddp_compile":  # a dispatch mode would change what dynamo traces: graph_ops instead
                losses, counts = train(wrapped, x, y, kpm), {}
            else:
                with OpCounter() as c:
                    losses = train(wrapped, x, y, kpm)
                counts = dict(c.counts)
            if scenario == "fsdp2":
                params = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
            else:
                params = named_params(model)
            results["converted" if converted else "stock"] = dict(
                params=params, losses=losses, counts=counts, classes=sorted(
                    {type(m).__module__ + "." + type(m).__qualname__ for m in model.modules()
                     if isinstance(m, nn.MultiheadAttention)}), **info)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(scenario, out_dir, script, world):
    """Runs the `world` ranks of `script`; returns (returncodes, outputs). Kills every rank on a timeout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, HERE] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("ATTENTION_EXT_POISON", "1")  # as conftest.py: kernels poison their outputs
    env["OMP_NUM_THREADS"] = "1"
    port = _free_port()
    procs, logs = [], []
    for rank in range(world):
        log = tempfile.TemporaryFile(mode="w+")
        procs.append(subprocess.Popen(
            [sys.executable, os.path.abspath(script), "--worker", scenario, str(rank), str(world), str(port), out_dir],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
        logs.append(log)
    import time

    deadline = time.monotonic() + RANK_TIMEOUT_S
    timed_out = False
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            break
    if timed_out:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    return timed_out, [p.returncode for p in procs], outputs


def run_ranks(scenario, script=__file__, world=WORLD):
    """Runs the ranks of `scenario` (`script` run with --worker, which calls worker()) and returns their results
    (one dict per rank); fails on an error or hang."""
    import pytest

    for attempt in range(2):
        with tempfile.TemporaryDirectory() as out_dir:
            timed_out, codes, outputs = _launch(scenario, out_dir, script, world)
            log = "\n".join(f"----- rank {r} (exit {c}) -----\n{o[-6000:]}" for r, (c, o) in
                            enumerate(zip(codes, outputs)))
            if timed_out:
                pytest.fail(f"{scenario}: the ranks did not finish within {RANK_TIMEOUT_S} s (killed)\n{log}")
            if any(codes):
                # the free port can be taken between probing it and rank 0 binding it: retry once
                if attempt == 0 and ("EADDRINUSE" in log or "ddress already in use" in log):
                    continue
                pytest.fail(f"{scenario}: a rank failed\n{log}")
            return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------
# the tests
# ---------------------------------------------------------------------------
_REFERENCE = {}


def single_process(converted):
    """The same model trained by one process on the full batch (mean loss): params and losses."""
    if converted not in _REFERENCE:
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            model = make_model(converted)
            losses = train(model, *make_batch())
        finally:
            torch.set_num_threads(n)
        _REFERENCE[converted] = named_params(model), losses
    return _REFERENCE[converted]


def _check_ran_attention_ext(res):
    """attention_ext's forward and backward ran once per layer and step in the converted model,
    never in the stock one."""
    conv, stock = res["converted"], res["stock"]
    assert conv["classes"] == ["attention_ext.nn.MultiheadAttention"], conv["classes"]
    assert stock["classes"] == ["torch.nn.modules.activation.MultiheadAttention"], stock["classes"]
    counts = conv["counts"]
    fwd = counts.get("attention_ext._attention_forward", 0) + counts.get("attention_ext.attention", 0)
    bwd = counts.get("attention_ext._attention_backward", 0)
    assert fwd == LAYERS * STEPS and bwd == LAYERS * STEPS, {k: v for k, v in counts.items() if "attention" in k}
    assert not any(k.startswith("attention_ext.") for k in stock["counts"]), stock["counts"]


def _collectives(res, kind, name):
    return sum(n for k, n in res[kind]["counts"].items() if k.startswith("c10d.") and name in k)


def _check_updates(params, ref_params, initial, tol, what):
    for n, ref in ref_params.items():
        ref_update = ref - initial[n]
        err = ((params[n] - initial[n]) - ref_update).norm() / ref_update.norm()
        assert err <= tol, f"{what}: the update of {n} differs by {err:.2e} (relative, > {tol:.0e})"


def _check_training(ranks, scenario):
    initial = named_params(make_model(False))
    for kind in ("converted", "stock"):
        # (a) every rank ends with the very same parameters
        p0 = ranks[0][kind]["params"]
        for r in range(1, WORLD):
            pr = ranks[r][kind]["params"]
            assert list(pr) == list(p0)
            for n in p0:
                assert torch.equal(pr[n], p0[n]), f"{scenario} {kind}: rank {r} differs from rank 0 in {n}"
        # the mean of the shard losses is the full batch's loss of the single-process run (equal shards)
        ref_params, ref_losses = single_process(kind == "converted")
        mean_losses = [sum(rk[kind]["losses"][i] for rk in ranks) / WORLD for i in range(STEPS)]
        torch.testing.assert_close(torch.tensor(mean_losses), torch.tensor(ref_losses), **DP_TOL,
                                   msg=lambda m: f"{scenario} {kind} losses vs one process: {m}")
        # (b) the same parameters as one process training on the full batch
        assert list(ref_params) == list(p0)
        for n in p0:
            assert not torch.equal(p0[n], initial[n]), f"{scenario} {kind}: {n} did not train"
            torch.testing.assert_close(p0[n], ref_params[n], **DP_TOL,
                                       msg=lambda m, n=n: f"{scenario} {kind}: {n} vs one process: {m}")
        _check_updates(p0, ref_params, initial, DP_UPDATE_TOL, f"{scenario} {kind} vs one process")
    # (c) the converted model trains like the stock one
    conv, stock = ranks[0]["converted"]["params"], ranks[0]["stock"]["params"]
    for n in conv:
        torch.testing.assert_close(conv[n], stock[n], **STOCK_TOL,
                                   msg=lambda m, n=n: f"{scenario}: {n} converted vs stock: {m}")
    _check_updates(conv, stock, initial, STOCK_UPDATE_TOL, f"{scenario} converted vs stock")
    torch.testing.assert_close(torch.tensor(ranks[0]["converted"]["losses"]),
                               torch.tensor(ranks[0]["stock"]["losses"]), **STOCK_TOL)


def test_ddp_trains_like_one_process_and_like_pytorch():
    ranks = run_ranks("ddp")
    for res in ranks:
        _check_ran_attention_ext(res)
        for kind in ("converted", "stock"):  # the gradients were all-reduced at every step
            assert _collectives(res, kind, "allreduce") >= STEPS, res[kind]["counts"]
    _check_training(ranks, "ddp")


def test_fsdp2_trains_like_one_process_and_like_pytorch():
    ranks = run_ranks("fsdp2")
    for res in ranks:
        _check_ran_attention_ext(res)
        for kind in ("converted", "stock"):  # parameters all-gathered, gradients reduce-scattered
            assert _collectives(res, kind, "allgather") >= STEPS, res[kind]["counts"]
            assert _collectives(res, kind, "reduce_scatter") >= STEPS, res[kind]["counts"]
        # the parameters really were sharded: DTensors holding half of dim 0 on each rank
        for kind in ("converted", "stock"):
            for n, (cls, local, full) in res[kind]["sharding"].items():
                assert cls == "DTensor", (kind, n, cls)
                assert local[0] == (full[0] + WORLD - 1) // WORLD and local[1:] == full[1:], (kind, n, local, full)
    _check_training(ranks, "fsdp2")


def test_compiled_ddp_trains_like_one_process():
    """torch.compile (dynamo with its DDP graph splitting, AOTAutograd; graphs run eagerly as with
    backend="aot_eager": inductor's C++ compile takes ~50 s here and is tested single-process in
    test_compile_opcheck.py) of the DDP-wrapped converted model."""
    ranks = run_ranks("ddp_compile")
    for res in ranks:
        graph_ops = res["converted"]["graph_ops"]
        # the fused kernels are in the compiled forward and backward graphs, once per layer
        assert graph_ops["attention_ext._attention_forward"] == LAYERS, graph_ops
        assert graph_ops["attention_ext._attention_backward"] == LAYERS, graph_ops
    p0 = ranks[0]["converted"]["params"]
    for r in range(1, WORLD):
        for n in p0:
            assert torch.equal(ranks[r]["converted"]["params"][n], p0[n]), f"rank {r} differs from rank 0 in {n}"
    ref_params, ref_losses = single_process(True)
    mean_losses = [sum(rk["converted"]["losses"][i] for rk in ranks) / WORLD for i in range(STEPS)]
    torch.testing.assert_close(torch.tensor(mean_losses), torch.tensor(ref_losses), **DP_TOL)
    initial = named_params(make_model(False))
    for n in p0:
        assert not torch.equal(p0[n], initial[n]), f"{n} did not train"
        torch.testing.assert_close(p0[n], ref_params[n], **DP_TOL, msg=lambda m, n=n: f"{n} vs one process: {m}")
    _check_updates(p0, ref_params, initial, DP_UPDATE_TOL, "compiled ddp vs one process (eager)")


if __name__ == "__main__" and len(sys.argv) == 7 and sys.argv[1] == "--worker":
    sys.path.insert(0, HERE)
    worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
