"""The fused ops on DTensors (attention_ext/_dtensor.py): tensor parallelism over heads, sharded batches,
sharded query lengths, 1-D and 2-D meshes (CPU, gloo, 4 processes).

Each case builds float32 inputs from its own seed (the same on every rank), distributes them with the
case's placements, runs the forward and the backward through the DTensors, and gathers the output and
the gradients. The test compares them with the float64 reference (tests/reference.py), at most twice
PyTorch's own float32 error (its SDPA, or its softmax for the weights) plus the float32 floor, and checks
where DTensor ran the op: a case whose rule keeps the shards must produce sharded outputs with no
collective between the inputs and the outputs (CommDebugMode), so a rule that silently fell back to
all-gathering fails. Cases no rule can keep sharded (a causal mask on a sharded query length, key heads
that do not split) must still be right, through the collectives DTensor adds.

A cache case runs a query-length-sharded call first and then the same shapes with is_causal=True: the
sharding decision must not be reused (register_sharding alone keys DTensor's cache on int arguments only;
_dtensor.py keys it on every non-tensor argument).

Dropout: each rank's local output and gradients equal the local op's on its shards, drawn from the same
seed (the kernels' dropout itself is tested against the reference elsewhere). Attention sinks (sharded with
the heads): equal to the op on the whole tensors, itself tested against float64 in test_sinks.py.

The ranks are processes started by tests/test_distributed.py's launcher (this file run with --worker).
"""
import contextlib
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from reference import assert_close_vs_baseline, reference_attention, window_visibility  # noqa: E402
from test_distributed import run_ranks  # noqa: E402

WORLD = 4
f32 = torch.float32

# name: mesh shape, q / k / v shapes, placements of q and of k, v (one per mesh dim; "S<d>" / "R"), mask
# (kind, shape, requires grad, placement) or None, options, what runs ("attention", "weights_avg",
# "weights_heads", "probs", "sdpa", "compiled", "varlen", "dropout"), whether the rule keeps the shards (no collective)
CASES = {
    "heads": dict(mesh=(4,), q=(2, 8, 12, 16), k=(2, 8, 10, 16), v=(2, 8, 10, 8), pq=["S1"], pkv=["S1"],
                  mask=("float", (2, 8, 12, 10), True, ["S1"]), local=True),
    "heads_uneven_broadcast_mask": dict(mesh=(4,), q=(2, 6, 12, 16), k=(2, 6, 10, 16), v=(2, 6, 10, 16),
                                        pq=["S1"], pkv=["S1"], mask=("float", (12, 10), True, ["R"]), local=True),
    "batch_uneven_bool_mask": dict(mesh=(4,), q=(6, 2, 12, 16), k=(6, 2, 10, 16), v=(6, 2, 10, 16), pq=["S0"],
                                   pkv=["S0"], mask=("bool", (6, 1, 12, 10), False, ["S0"]), local=True),
    "gqa_heads": dict(mesh=(4,), q=(2, 8, 12, 16), k=(2, 4, 10, 16), v=(2, 4, 10, 16), pq=["S1"], pkv=["S1"],
                      opts=dict(enable_gqa=True), local=True),
    "gqa_heads_do_not_split": dict(mesh=(4,), q=(2, 8, 12, 16), k=(2, 2, 10, 16), v=(2, 2, 10, 16), pq=["S1"],
                                   pkv=["S1"], opts=dict(enable_gqa=True), local=False),
    "query_length": dict(mesh=(4,), q=(2, 2, 16, 16), k=(2, 2, 10, 16), v=(2, 2, 10, 16), pq=["S2"], pkv=["R"],
                         mask=("float", (1, 1, 16, 10), True, ["R"]), local=True),
    "query_length_then_causal": dict(mesh=(4,), q=(2, 2, 16, 16), k=(2, 2, 16, 16), v=(2, 2, 16, 16), pq=["S2"],
                                     pkv=["R"], opts=dict(is_causal=True), warm=True, local=False),
    "query_length_window": dict(mesh=(4,), q=(2, 2, 16, 16), k=(2, 2, 16, 16), v=(2, 2, 16, 16), pq=["S2"],
                                pkv=["R"], opts=dict(window_size=[3, 2]), local=False),
    "dp_tp_2d_mesh": dict(mesh=(2, 2), q=(2, 8, 12, 16), k=(2, 8, 10, 16), v=(2, 8, 10, 16), pq=["S0", "S1"],
                          pkv=["S0", "S1"], mask=("float", (2, 1, 12, 10), True, ["S0", "R"]),
                          opts=dict(scale=0.3), local=True),
    "unbatched_heads_causal": dict(mesh=(4,), q=(8, 12, 16), k=(8, 12, 16), v=(8, 12, 16), pq=["S0"], pkv=["S0"],
                                   opts=dict(is_causal=True), local=True),
    "weights_avg_heads": dict(mesh=(4,), q=(2, 8, 12, 16), k=(2, 8, 10, 16), v=(2, 8, 10, 16), pq=["S1"],
                              pkv=["S1"], run="weights_avg", local=True),
    "weights_per_head_query_length": dict(mesh=(4,), q=(2, 2, 16, 16), k=(2, 2, 10, 16), v=(2, 2, 10, 16),
                                          pq=["S2"], pkv=["R"], run="weights_heads", local=True),
    "probs_heads": dict(mesh=(4,), q=(2, 8, 12, 16), k=(2, 8, 10, 16), v=(2, 8, 10, 16), pq=["S1"], pkv=["S1"],
                        mask=("bool", (12, 10), False, ["R"]), run="probs", local=True),
    "sdpa_dropin_heads_causal": dict(mesh=(4,), q=(2, 8, 12, 16), k=(2, 8, 12, 16), v=(2, 8, 12, 16), pq=["S1"],
                                     pkv=["S1"], opts=dict(is_causal=True), run="sdpa", local=True),
    "compiled_heads_causal": dict(mesh=(4,), q=(2, 8, 12, 16), k=(2, 8, 12, 16), v=(2, 8, 12, 16), pq=["S1"],
                                  pkv=["S1"], mask=("float", (8, 1, 12), True, ["S0"]), opts=dict(is_causal=True),
                                  run="compiled", local=True),
    "varlen_replicated": dict(mesh=(4,), q=(20, 4, 16), k=(20, 4, 16), v=(20, 4, 16), pq=["S1"], pkv=["S1"],
                              run="varlen", local=False),
    "sinks_heads": dict(mesh=(4,), q=(2, 8, 12, 16), k=(2, 4, 12, 16), v=(2, 4, 12, 16), pq=["S1"], pkv=["S1"],
                        opts=dict(is_causal=True, enable_gqa=True), run="sinks", local=True),
    "alibi_heads": dict(mesh=(4,), q=(2, 8, 12, 16), k=(2, 4, 12, 16), v=(2, 4, 12, 16), pq=["S1"], pkv=["S1"],
                        opts=dict(is_causal=True, enable_gqa=True), alibi=((8,), ["S0"]), run="alibi", local=True),
    "alibi_batch": dict(mesh=(4,), q=(4, 2, 12, 16), k=(4, 2, 10, 16), v=(4, 2, 10, 16), pq=["S0"], pkv=["S0"],
                        mask=("bool", (4, 1, 1, 10), False, ["S0"]), alibi=((4, 2), ["S0"]), run="alibi",
                        local=True),
    "dropout_heads": dict(mesh=(4,), q=(2, 8, 12, 16), k=(2, 8, 10, 16), v=(2, 8, 10, 16), pq=["S1"], pkv=["S1"],
                          opts=dict(dropout_p=0.3), run="dropout", local=True),
}
VARLEN_CU = [0, 7, 7, 20]  # three sequences of 7, 0 and 13 tokens (queries and keys alike)


def inputs(name):
    """The case's float32 inputs (q, k, v, mask), fresh from its own seed."""
    c = CASES[name]
    g = torch.Generator().manual_seed(sorted(CASES).index(name) + 100)
    q, k, v = (torch.randn(c[t], generator=g) for t in ("q", "k", "v"))
    mask = None
    if c.get("mask"):
        kind, shape, _, _ = c["mask"]
        mask = torch.rand(shape, generator=g) > 0.3 if kind == "bool" else torch.randn(shape, generator=g)
    return q, k, v, mask


def _placements(spec):
    from torch.distributed.tensor import Replicate, Shard
    return [Replicate() if p == "R" else Shard(int(p[1:])) for p in spec]


# ---------------------------------------------------------------------------------------------- the ranks
def _cotangent(out):
    """The placements of out's gradient: out's own, replicated where out is a partial result."""
    from torch.distributed.tensor import Partial, Replicate
    return [Replicate() if isinstance(p, Partial) else p for p in out.placements]


def _run_case(name, meshes):
    import attention_ext
    from torch.distributed.tensor import distribute_tensor
    from torch.distributed.tensor.debug import CommDebugMode

    c = CASES[name]
    mesh = meshes[c["mesh"]]
    q, k, v, mask = inputs(name)
    opts = dict(c.get("opts", {}))
    pq, pkv = _placements(c["pq"]), _placements(c["pkv"])
    dq, dk, dv = (distribute_tensor(t, mesh, p).requires_grad_() for t, p in ((q, pq), (k, pkv), (v, pkv)))
    dmask = None
    if mask is not None:
        dmask = distribute_tensor(mask, mesh, _placements(c["mask"][3])).requires_grad_(c["mask"][2])
    run = c.get("run", "attention")
    if run == "sinks":  # one logit per query head, sharded as the heads
        sinks = torch.randn(q.shape[-3], generator=torch.Generator().manual_seed(3))
        dsinks = distribute_tensor(sinks, mesh, _placements(["S0"])).requires_grad_()
        opts["sinks"] = dsinks
    if run == "alibi":  # ALiBi slopes (..., heads), sharded as the heads or the batch
        shape, placement = c["alibi"]
        slopes = torch.rand(shape, generator=torch.Generator().manual_seed(4))
        opts["alibi_slopes"] = distribute_tensor(slopes, mesh, _placements(placement))
    leaves = [t for t in (dq, dk, dv, dmask) if t is not None and t.requires_grad]
    if run == "varlen":
        cu = distribute_tensor(torch.tensor(VARLEN_CU, dtype=torch.int32), mesh, _placements(["R"]))
    res = {}
    if c.get("warm"):  # the same shapes, no causal mask: a rule that keeps the query length sharded
        torch.ops.attention_ext.attention(dq, dk, dv).sum().backward()
        for t in leaves:
            t.grad = None
    # (CommDebugMode is a dispatch mode, which torch.compile refuses to trace under: compiled cases are checked
    # by their placements alone)
    counting = run != "compiled"
    with (CommDebugMode() if counting else contextlib.nullcontext()) as fwd_comms:
        if run in ("attention", "dropout", "sinks", "alibi"):
            if run == "dropout":
                torch.manual_seed(1234)
            outs = [attention_ext.attention(dq, dk, dv, dmask, **opts)]
        elif run == "compiled":  # AOTAutograd, graphs run eagerly (inductor's C++ compile is slow here)
            fn = torch.compile(attention_ext.attention, backend="aot_eager", fullgraph=True)
            outs = [fn(dq, dk, dv, dmask, **opts)]
        elif run == "sdpa":
            outs = [attention_ext.scaled_dot_product_attention(dq, dk, dv, dmask, **opts)]
        elif run in ("weights_avg", "weights_heads"):
            outs = list(attention_ext.attention_with_weights(dq, dk, dv, dmask, average_heads=run == "weights_avg"))
        elif run == "probs":
            _, lse, rng = attention_ext.attention_forward(dq, dk, dv, dmask)
            outs = [attention_ext.attention_probs(dq, dk, lse, dmask, rng)]
        elif run == "varlen":
            outs = [attention_ext.attention_varlen(dq, dk, dv, cu, cu, is_causal=True)]
        else:
            raise ValueError(run)
    res["placements"] = [str(tuple(o.placements)) for o in outs]
    cot = [torch.randn(o.shape, generator=torch.Generator().manual_seed(7 + i)) for i, o in enumerate(outs)]
    dcot = [distribute_tensor(g, mesh, _cotangent(o)) for g, o in zip(cot, outs) if o.requires_grad]
    with (CommDebugMode() if counting else contextlib.nullcontext()) as bwd_comms:
        if leaves and dcot:
            torch.autograd.backward([o for o in outs if o.requires_grad], dcot)
    counts = list(fwd_comms.get_comm_counts().items()) + list(bwd_comms.get_comm_counts().items()) if counting else []
    res["comms"] = {str(op): n for op, n in counts if n} if counting else None
    res["fwd_comms"] = {str(op): n for op, n in fwd_comms.get_comm_counts().items() if n} if counting else None
    res["outs"] = [o.full_tensor().detach() for o in outs]
    res["grads"] = [t.grad.full_tensor() if t is not None and t.grad is not None else None for t in (dq, dk, dv, dmask)]
    res["grad_placements"] = [str(tuple(t.grad.placements)) if t is not None and t.grad is not None else None
                              for t in (dq, dk, dv, dmask)]
    if run == "sinks":  # the op on the whole tensors, in this process (tested against float64 in test_sinks.py)
        res["sinks_grad"] = dsinks.grad.full_tensor()
        whole = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
        o = attention_ext.attention(*whole[:3], **dict(opts, sinks=whole[3]))
        o.backward(cot[0])
        res["unsharded"] = [o.detach()] + [t.grad for t in whole]
    if run == "alibi":  # the op on the whole tensors, in this process (tested against float64 in test_alibi.py)
        whole = [t.clone().requires_grad_() for t in (q, k, v)]
        o = attention_ext.attention(*whole, mask, **dict(opts, alibi_slopes=slopes))
        o.backward(cot[0])
        res["unsharded"] = [o.detach()] + [t.grad for t in whole]
    if run == "dropout":  # the local op on this rank's shards, the same seed
        lq, lk, lv = (t.to_local().detach().requires_grad_() for t in (dq, dk, dv))
        torch.manual_seed(1234)
        lo = attention_ext.attention(lq, lk, lv, **opts)
        lo.backward(distribute_tensor(cot[0], mesh, outs[0].placements).to_local())
        res["local_equal"] = [torch.equal(outs[0].to_local(), lo)] + [
            torch.equal(t.grad.to_local(), lt.grad) for t, lt in ((dq, lq), (dk, lk), (dv, lv))]
        # dropout did drop: the output is not the dropout-free one
        res["dropped"] = not torch.allclose(lo, attention_ext.attention(lq, lk, lv), atol=1e-3)
    return res


BAD_INPUTS = [  # (q, k / v shapes, options, what the error must say)
    ((8, 16), (8, 16), {}, "query must have at least 3 dimensions"),
    ((4, 4, 8, 16), (8, 4, 8, 16), {}, "same batch dimensions"),
    ((4, 4, 8, 16), (4, 3, 8, 16), dict(enable_gqa=True), "to be a multiple of the number of key/value heads"),
    ((4, 4, 8, 16), (4, 4, 8, 16), dict(dropout_p=1.5), "dropout_p must be in [0, 1]"),
]


def _bad_inputs(mesh):
    """The op's own messages, through DTensor's sharding propagation (which runs the meta kernels)."""
    import attention_ext
    from torch.distributed.tensor import distribute_tensor

    said = []
    for qs, ks, opts, _ in BAD_INPUTS:
        q, k, v = (distribute_tensor(torch.randn(s), mesh, _placements(["S0"])) for s in (qs, ks, ks))
        try:
            attention_ext.attention(q, k, v, **opts)
            said.append(None)
        except Exception as e:
            said.append(f"{type(e).__name__}: {e}")
    return said


def worker(scenario, rank, world, port, out_dir):
    import datetime

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        from torch.distributed.tensor import init_device_mesh

        import attention_ext  # noqa: F401  (the rules register when torch.distributed.tensor is imported)

        meshes = {(4,): init_device_mesh("cpu", (4,)), (2, 2): init_device_mesh("cpu", (2, 2))}
        results = {}
        for name in CASES:
            try:
                results[name] = _run_case(name, meshes)
            except Exception as e:  # reported by the case's test, the other cases still run
                results[name] = {"error": f"{type(e).__name__}: {e}"}
        results["errors"] = _bad_inputs(meshes[(4,)])
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- the tests
@pytest.fixture(scope="module")
def ranks():
    return run_ranks("dtensor", script=__file__, world=WORLD)


def _sdpa_mask(q, k, mask, opts):
    """The case's mask, causal mask and window as one mask for PyTorch's SDPA."""
    L, S = q.shape[-2], k.shape[-2]
    if not opts.get("is_causal") and not opts.get("window_size"):
        return mask
    vis = window_visibility(L, S, opts.get("is_causal", False), opts.get("window_size"))
    if mask is None:
        return vis
    if mask.dtype == torch.bool:
        return mask & vis
    return mask + torch.zeros(L, S).masked_fill(~vis, -math.inf)


def _varlen_reference(q, k, v, grad):
    """Per-sequence causal attention in float64 (reference) and in PyTorch's float32 SDPA (baseline)."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    base = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    outs, bouts = [], []
    for a, b in zip(VARLEN_CU[:-1], VARLEN_CU[1:]):
        seq = [t[a:b].transpose(0, 1) for t in leaves]
        outs.append(reference_attention(*seq, is_causal=True).out.transpose(0, 1))
        bseq = [t[a:b].transpose(0, 1) for t in base]
        bouts.append(F.scaled_dot_product_attention(*bseq, is_causal=True).transpose(0, 1) if b > a
                     else torch.zeros(0, *q.shape[1:]))
    out, bout = torch.cat(outs), torch.cat(bouts)
    out.backward(grad.double())
    bout.backward(grad)
    return [out] + [t.grad for t in leaves], [bout] + [t.grad for t in base]


def _reference(name):
    """[(what, float64 reference, PyTorch float32 baseline)] for the case's outputs and gradients."""
    c = CASES[name]
    q, k, v, mask = inputs(name)
    opts = dict(c.get("opts", {}))
    run = c.get("run", "attention")
    grads = [torch.randn(o, generator=torch.Generator().manual_seed(7 + i))
             for i, o in enumerate(_out_shapes(name))]
    if run == "varlen":
        ref, base = _varlen_reference(q, k, v, grads[0])
        return list(zip(("output", "dq", "dk", "dv"), ref, base))
    mask_grad = bool(c.get("mask") and c["mask"][2])
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    bleaves = [t.clone().requires_grad_() for t in (q, k, v)]
    m64 = bm = None
    if mask is not None:
        m64 = mask if mask.dtype == torch.bool else mask.double().requires_grad_(mask_grad)
        bm = mask if mask.dtype == torch.bool else mask.clone().requires_grad_(mask_grad)
    r = reference_attention(*leaves, m64, **opts)
    smask = _sdpa_mask(q, k, bm, opts)
    gqa = opts.get("enable_gqa", False)
    scale = opts.get("scale")
    bq, bk, bv = bleaves
    if run in ("weights_avg", "weights_heads", "probs"):
        kk = bk.repeat_interleave(q.shape[-3] // k.shape[-3], -3) if gqa else bk
        sc = bq @ kk.transpose(-1, -2) * (scale if scale is not None else q.shape[-1] ** -0.5)
        if smask is not None:
            sc = sc.masked_fill(~smask, -math.inf) if smask.dtype == torch.bool else sc + smask
        bprobs = torch.softmax(sc, -1)
    if run == "probs":
        return [("probs", r.probs.detach(), bprobs.detach())]
    bout = F.scaled_dot_product_attention(bq, bk, bv, smask, scale=scale, enable_gqa=gqa)
    ys, bys = [r.out], [bout]
    if run == "weights_avg":
        ys, bys = ys + [r.probs.mean(-3)], bys + [bprobs.mean(-3)]
    elif run == "weights_heads":
        ys, bys = ys + [r.probs], bys + [bprobs]
    wrt = leaves + ([m64] if mask_grad else [])
    bwrt = bleaves + ([bm] if mask_grad else [])
    ref = torch.autograd.grad(ys, wrt, [g.double() for g in grads])
    base = torch.autograd.grad(bys, bwrt, grads)
    names = ["output", "weights"][:len(ys)] + ["dq", "dk", "dv", "dmask"][:len(wrt)]
    return list(zip(names, [y.detach() for y in ys] + list(ref), [y.detach() for y in bys] + list(base)))


def _out_shapes(name):
    c = CASES[name]
    q, v = c["q"], c["v"]
    out = (*q[:-1], v[-1])
    run = c.get("run", "attention")
    if run == "probs":
        return [(*q[:-1], c["k"][-2])]
    if run == "weights_avg":
        return [out, (*q[:-3], q[-2], c["k"][-2])]
    if run == "weights_heads":
        return [out, (*q[:-1], c["k"][-2])]
    return [out]


def _expected_placements(name):
    c = CASES[name]
    run = c.get("run", "attention")
    out = "(" + ", ".join(repr(p) for p in _placements(c["pq"])) + ("," if len(c["pq"]) == 1 else "") + ")"
    if run == "weights_avg":
        return [out, "(Partial(avg),)"]
    return [out] * len(_out_shapes(name))


@pytest.mark.parametrize("name", [n for n in CASES if CASES[n].get("run") not in ("dropout", "sinks", "alibi")])
def test_dtensor_matches_reference(ranks, name):
    res = [r[name] for r in ranks]
    for r, rr in enumerate(res):
        assert "error" not in rr, f"rank {r}: {rr['error']}"
    rr = res[0]
    got = {"output": rr["outs"][0]}
    if len(rr["outs"]) > 1:
        got["weights"] = rr["outs"][1]
    got.update(zip(("dq", "dk", "dv", "dmask"), rr["grads"]))
    if CASES[name].get("run") == "probs":
        got = {"probs": rr["outs"][0]}
    checks = _reference(name)
    for what, ref, base in checks:
        assert_close_vs_baseline(f"{name} {what}", got[what], ref, base, f32)
    # every rank gathered the same tensors
    for r in range(1, WORLD):
        for a, b in zip(res[r]["outs"], rr["outs"]):
            assert torch.equal(a, b), f"rank {r} gathered another output"
    if CASES[name]["local"]:
        # the rule kept the shards: sharded outputs, no collective between inputs and outputs
        assert rr["placements"] == _expected_placements(name), rr["placements"]
        assert rr["comms"] is None or sum(rr["comms"].values()) == 0, f"collectives ran: {rr['comms']}"
    else:
        assert sum(rr["comms"].values()) > 0, "no rule should keep these shards, yet no collective ran"


def test_dtensor_dropout_is_the_local_op(ranks):
    for r, res in enumerate(ranks):
        rr = res["dropout_heads"]
        assert "error" not in rr, f"rank {r}: {rr['error']}"
        assert rr["local_equal"] == [True, True, True, True], (r, rr["local_equal"])
        assert rr["placements"] == ["(Shard(dim=1),)"] and sum(rr["comms"].values()) == 0, rr
        assert rr["dropped"], f"rank {r}: dropout_p=0.3 left the output as it was"


def test_dtensor_sinks_keep_the_heads_sharded(ranks):
    """Attention sinks (attention_ext/_sinks.py) on head-sharded DTensors, sinks sharded alike: the output stays
    sharded with no collective in the forward, and the output and every gradient (sinks included) equal the op
    on the whole tensors."""
    for r, res in enumerate(ranks):
        assert "error" not in res["sinks_heads"], f"rank {r}: {res['sinks_heads']['error']}"
    rr = ranks[0]["sinks_heads"]
    assert rr["placements"] == ["(Shard(dim=1),)"] and sum(rr["fwd_comms"].values()) == 0, rr["fwd_comms"]
    got = [rr["outs"][0]] + rr["grads"][:3] + [rr["sinks_grad"]]
    for what, a, b in zip(("output", "dq", "dk", "dv", "dsinks"), got, rr["unsharded"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, w=what: f"{w}: {m}")


@pytest.mark.parametrize("name", ["alibi_heads", "alibi_batch"])
def test_dtensor_alibi_keeps_the_shards(ranks, name):
    """ALiBi slopes sharded with the heads (GQA, causal) or the batch (key padding): the output stays sharded with
    no collective in the forward, and the output and the gradients equal the op on the whole tensors."""
    for r, res in enumerate(ranks):
        assert "error" not in res[name], f"rank {r}: {res[name]['error']}"
    rr = ranks[0][name]
    dim = 1 if name == "alibi_heads" else 0
    assert rr["placements"] == [f"(Shard(dim={dim}),)"] and sum(rr["fwd_comms"].values()) == 0, rr
    got = [rr["outs"][0]] + rr["grads"][:3]
    for what, a, b in zip(("output", "dq", "dk", "dv"), got, rr["unsharded"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, w=what: f"{w}: {m}")


def test_dtensor_bad_inputs_raise_the_ops_errors(ranks):
    for (qs, ks, opts, expected), said in zip(BAD_INPUTS, ranks[0]["errors"]):
        assert said is not None, f"no error for query {qs}, key {ks}, {opts}"
        assert expected in said, (expected, said)


def test_the_rules_register_only_when_dtensor_is_imported():
    """Importing attention_ext does not import torch.distributed.tensor (about a second); importing it later
    registers the rules."""
    import subprocess
    code = ("import sys, attention_ext; assert 'torch.distributed.tensor' not in sys.modules; "
            "import torch.distributed.tensor as dt; import torch; "
            "p = dt.DTensor._op_dispatcher.sharding_propagator; "
            "assert torch.ops.attention_ext._attention_forward.default in p.op_strategy_funcs; "
            "assert p.op_to_schema_info[torch.ops.attention_ext._attention_forward.default].static_argnum == 4")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE)] + sys.path))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


if __name__ == "__main__" and len(sys.argv) == 7 and sys.argv[1] == "--worker":
    worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
