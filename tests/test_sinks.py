"""Attention sinks (attention_ext/_sinks.py): ``attention_ext.attention(..., sinks=)`` and transformers'
``s_aux`` (gpt-oss), through the fused kernels.

The reference is float64 and written here: the sink's logit joins each row's softmax as one more column,
which is then dropped (dropout after, from the kernel's own keep mask). The yardstick is the same formula in
the test's dtype, as transformers' eager attention runs it: errors must stay within twice its error plus
the dtype's floor. Fresh random inputs, sinks of either sign and size, fully masked rows included.
"""
import math

import pytest
import torch

import attention_ext
from conftest import cuda_marks
from hf_compare import assert_matches_eager
from op_counter import OpCounter
from reference import assert_close_vs_baseline, window_visibility
from test_lse import scores

f32, f16, bf16, f64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
ops = torch.ops.attention_ext

pytestmark = pytest.mark.usefixtures("one_thread")


def sink_attention(q, k, v, sinks, visible=None, bias=None, keep=None, dropout_p=0.0, scale=None):
    """The formula in q's dtype: visible (bool, broadcast to the scores) and bias (added) as given."""
    s, v = scores(q, k, v, visible, bias, scale)
    col = sinks.to(s.dtype).reshape(-1, 1, 1).expand(*s.shape[:-1], 1)
    p = torch.softmax(torch.cat([s, col], -1), -1)[..., :-1]
    if keep is not None:
        p = p * keep / (1 - dropout_p)
    return p @ v


CASES = {
    # name: (q, k, v shapes, options)
    "plain": ((2, 4, 7, 16), (2, 4, 9, 16), (2, 4, 9, 16), {}),
    "gqa_causal": ((2, 4, 9, 32), (2, 2, 9, 32), (2, 2, 9, 8), dict(enable_gqa=True, is_causal=True)),
    "window": ((1, 3, 12, 16), (1, 3, 12, 16), (1, 3, 12, 16), dict(window_size=[3, 1])),
    "bool_mask_dead_rows": ((2, 2, 6, 16), (2, 2, 8, 16), (2, 2, 8, 16), dict(mask="bool")),
    "float_mask_grad": ((2, 2, 6, 16), (2, 2, 8, 16), (2, 2, 8, 16), dict(mask="float")),
    "unbatched_scale": ((3, 5, 8), (3, 4, 8), (3, 4, 8), dict(scale=0.7)),
    "extreme_sinks": ((1, 4, 5, 16), (1, 4, 5, 16), (1, 4, 5, 16), dict(sinks=[30.0, -30.0, 0.0, 5.0])),
}


def _inputs(name, dtype, device, seed=0):
    qs, ks, vs, opts = CASES[name]
    g = torch.Generator().manual_seed(seed + sorted(CASES).index(name))
    q, k, v = (torch.randn(s, generator=g, dtype=f64) for s in (qs, ks, vs))
    h = qs[-3]
    sinks = torch.tensor(opts["sinks"], dtype=f64) if "sinks" in opts else torch.randn(h, generator=g, dtype=f64) * 2
    mask = None
    L, S = qs[-2], ks[-2]
    if opts.get("mask") == "bool":
        mask = torch.rand(qs[0], 1, L, S, generator=g) > 0.4
        mask[0, 0, 1] = False  # a row that sees no key: 0 out, all weight to the sink
    elif opts.get("mask") == "float":
        mask = torch.randn(L, S, generator=g, dtype=f64)
    cast = [t.to(device=device, dtype=dtype) for t in (q, k, v, sinks)]
    if mask is not None:
        mask = mask.to(device) if mask.dtype == torch.bool else mask.to(device=device, dtype=dtype)
    return (*cast, mask, {k_: v_ for k_, v_ in opts.items() if k_ not in ("mask", "sinks")})


def _visible(q, k, opts, mask):
    vis = None
    if opts.get("is_causal") or opts.get("window_size"):
        vis = window_visibility(q.shape[-2], k.shape[-2], opts.get("is_causal", False), opts.get("window_size"),
                                device=q.device)
    if mask is not None and mask.dtype == torch.bool:
        vis = mask if vis is None else vis & mask
    return vis


def _run(name, dtype, device):
    q, k, v, sinks, mask, opts = _inputs(name, dtype, device)
    mask_grad = mask is not None and mask.is_floating_point()
    leaves = [t.clone().requires_grad_() for t in (q, k, v, sinks)] + ([mask.clone().requires_grad_()] if mask_grad
                                                                       else [])
    m = leaves[4] if mask_grad else mask
    out = attention_ext.attention(*leaves[:3], attn_mask=m, sinks=leaves[3], **opts)
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=f64).to(device=device, dtype=dtype)
    grads = torch.autograd.grad(out, leaves, do)
    return (q, k, v, sinks, mask, opts), do, out, grads


def _expected(inputs, do, dtype):
    """(float64 reference, same-dtype yardstick) of output and gradients."""
    q, k, v, sinks, mask, opts = inputs
    vis = _visible(q, k, opts, mask)
    bias = mask if mask is not None and mask.is_floating_point() else None
    res = []
    for dt in (f64, dtype):
        leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v, sinks)]
        b = bias.detach().to(dt).requires_grad_() if bias is not None else None
        out = sink_attention(*leaves, visible=vis, bias=b, scale=opts.get("scale"))
        wrt = leaves + ([b] if b is not None else [])
        res.append([out] + list(torch.autograd.grad(out, wrt, do.to(dt))))
    return res


def _check(name, dtype, device):
    inputs, do, out, grads = _run(name, dtype, device)
    ref, base = _expected(inputs, do, dtype)
    for what, ours, r, b in zip(("output", "dq", "dk", "dv", "dsinks", "dmask"), [out, *grads], ref, base):
        assert_close_vs_baseline(f"{name} {what}", ours, r, b, dtype)


@pytest.mark.parametrize("dtype", [f64, f32, bf16], ids=["f64", "f32", "bf16"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_sinks_match_reference(name, dtype):
    _check(name, dtype, "cpu")


@pytest.mark.parametrize("dtype", [f32, f16, bf16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_marks())])
def test_sinks_match_reference_cuda(name, dtype, device):
    _check(name, dtype, device)


def test_sinks_return_lse():
    """With sinks, return_lse gives log(sum_j exp(s_ij) + exp(sink)), the row's whole denominator, differentiable
    with the output (q, k, v and the sinks), against the float64 formula."""
    q, k, v, sinks, mask, opts = _inputs("bool_mask_dead_rows", f64, "cpu")
    leaves = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
    out, lse = attention_ext.attention(*leaves[:3], attn_mask=mask, sinks=leaves[3], return_lse=True)
    gen = torch.Generator().manual_seed(12)
    g, c = torch.randn(out.shape, generator=gen, dtype=f64), torch.randn(lse.shape, generator=gen, dtype=f64)
    grads = torch.autograd.grad([out, lse], leaves, [g, c])
    rl = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
    s, _ = scores(*rl[:3], visible=mask)
    rlse = torch.logsumexp(torch.cat([s, rl[3].reshape(-1, 1, 1).expand(*s.shape[:-1], 1)], -1), -1)
    rout = sink_attention(*rl, visible=mask)
    rgrads = torch.autograd.grad([rout, rlse], rl, [g, c])
    for what, a, b in zip(("output", "lse", "dq", "dk", "dv", "dsinks"), [out, lse, *grads], [rout, rlse, *rgrads]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m, w=what: f"{w}: {m}")


def test_sinks_with_dropout():
    """The kernel's keep mask (replayed from the same seed) in the reference: output and all gradients."""
    q, k, v, sinks, _, _ = _inputs("gqa_causal", f64, "cpu")
    opts = dict(enable_gqa=True, is_causal=True, dropout_p=0.3)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
    torch.manual_seed(11)
    out = attention_ext.attention(*leaves[:3], sinks=leaves[3], **opts)
    torch.manual_seed(11)
    _, _, rng = ops._attention_forward(q, k, v, None, 0.3, True, None, True, [-1, -1])
    keep = ops._dropout_mask(rng, q.shape[0], q.shape[1], q.shape[2], k.shape[2], 0.3)
    assert 0.4 < keep.float().mean() < 0.95
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, do)
    rl = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
    vis = window_visibility(q.shape[-2], k.shape[-2], True)
    ref = sink_attention(*rl, visible=vis, keep=keep, dropout_p=0.3)
    rgrads = torch.autograd.grad(ref, rl, do)
    for what, a, b in zip(("output", "dq", "dk", "dv", "dsinks"), [out, *grads], [ref, *rgrads]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m, w=what: f"{w}: {m}")


def test_sinks_gradcheck_and_gradgradcheck():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 4, 8, generator=g, dtype=f64, requires_grad=True) for _ in range(3))
    sinks = torch.randn(2, generator=g, dtype=f64, requires_grad=True)
    mask = torch.randn(4, 4, generator=g, dtype=f64)
    mask[1] = -math.inf  # a row that sees no key
    mask.requires_grad_()

    def fn(q, k, v, s, m):
        return attention_ext.attention(q, k, v, m, sinks=s)

    assert torch.autograd.gradcheck(fn, (q, k, v, sinks, mask))
    assert torch.autograd.gradgradcheck(lambda q, k, v, s: attention_ext.attention(q, k, v, is_causal=True, sinks=s),
                                        (q, k, v, sinks))


def test_sinks_under_compile_and_vmap():
    q, k, v, sinks, _, opts = _inputs("gqa_causal", f32, "cpu")
    expected = attention_ext.attention(q, k, v, sinks=sinks, **opts)
    fn = torch.compile(lambda q, k, v, s: attention_ext.attention(q, k, v, sinks=s, **opts), backend="aot_eager",
                       fullgraph=True)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
    out = fn(*leaves)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out.sum().backward()
    eager = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
    attention_ext.attention(*eager[:3], sinks=eager[3], **opts).sum().backward()
    for a, b in zip(leaves, eager):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-6)
    # per-sample gradients of the sinks (vmap over the batch, grad inside)
    def loss(q, k, v, s):
        return attention_ext.attention(q, k, v, sinks=s, **opts).square().sum()
    per = torch.func.vmap(torch.func.grad(loss, argnums=3), in_dims=(0, 0, 0, None))(q, k, v, sinks)
    for b in range(q.shape[0]):
        s = sinks.clone().requires_grad_()
        loss(q[b], k[b], v[b], s).backward()
        torch.testing.assert_close(per[b], s.grad, rtol=1e-5, atol=1e-6)


def test_sinks_errors():
    q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 5, 8)
    with pytest.raises(ValueError, match=r"sinks must be a 1-D tensor with one logit per query head \(4\), "
                                         r"got shape \(2,\)"):
        attention_ext.attention(q, k, k, sinks=torch.zeros(2))
    with pytest.raises(TypeError, match="sinks must be a floating-point tensor, got torch.int64"):
        attention_ext.attention(q, k, k, sinks=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="query has 4 heads but key/value have 2"):
        attention_ext.attention(q, torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8), sinks=torch.zeros(4))


def test_hf_s_aux_head_dim_above_256_falls_back():
    """Inputs the kernels do not take: transformers' eager formula, with the sinks."""
    class M(torch.nn.Module):
        is_causal = True
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, 2, 5, 300, generator=g) for _ in range(3))
    sinks = torch.randn(2, generator=g)
    out, _ = attention_ext.hf.attention_forward(M(), q, k, v, None, scaling=0.05, is_causal=True, s_aux=sinks)
    vis = window_visibility(5, 5, True)
    ref = sink_attention(q.double(), k.double(), v.double(), sinks.double(), visible=vis, scale=0.05)
    torch.testing.assert_close(out.transpose(1, 2).double(), ref, rtol=1e-5, atol=1e-6)


def _tiny_gpt_oss():
    """(transformers, a 2-layer random gpt-oss in float32: sliding and full layers, GQA, sinks ~ N(0, 2))."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "GptOssForCausalLM"):
        pytest.skip(f"transformers {transformers.__version__} has no gpt-oss")
    import warnings
    cfg = transformers.GptOssConfig(
        vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"], max_position_embeddings=64)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.GptOssForCausalLM(cfg).float()
    for mod in model.modules():
        if hasattr(mod, "sinks"):
            torch.nn.init.normal_(mod.sinks, std=2.0)
    return transformers, model


def test_hf_gpt_oss_matches_eager():
    """A small random gpt-oss (sliding and full layers, GQA, padding) with attn_implementation="attention_ext"
    against "eager": logits and the gradients of every attention parameter, sinks included; the fused
    forward and backward ran in every layer."""
    transformers, model = _tiny_gpt_oss()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    am = torch.ones(2, 12, dtype=torch.long)
    am[1, :3] = 0  # left padding
    names = assert_matches_eager(model, ids, am, ids)
    assert any("sinks" in n for n in names), names


# ----------------------------------------------------------------------------- packed sequences
LENS = [5, 0, 9, 3]


def _packed_inputs(dtype, hq=4, hkv=2, E=16):
    g = torch.Generator().manual_seed(21)
    total = sum(LENS)
    q = torch.randn(total, hq, E, generator=g, dtype=f64).to(dtype)
    k = torch.randn(total, hkv, E, generator=g, dtype=f64).to(dtype)
    v = torch.randn(total, hkv, 8, generator=g, dtype=f64).to(dtype)
    sinks = (torch.randn(hq, generator=g, dtype=f64) * 2).to(dtype)
    cu = torch.tensor([0] + torch.tensor(LENS).cumsum(0).tolist(), dtype=torch.int32)
    return q, k, v, sinks, cu


@pytest.mark.parametrize("dtype", [f64, f32, bf16], ids=["f64", "f32", "bf16"])
@pytest.mark.parametrize("opts", [dict(is_causal=True), dict(window_size=[2, 1])], ids=["causal", "window"])
def test_varlen_sinks_match_reference(dtype, opts):
    """attention_varlen(..., sinks=): every sequence against the float64 formula on that sequence alone (GQA,
    an empty sequence among them), output and gradients, sinks included; the yardstick is the formula in the
    test's dtype."""
    q, k, v, sinks, cu = _packed_inputs(dtype)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
    out = attention_ext.attention_varlen(*leaves[:3], cu, cu, enable_gqa=True, sinks=leaves[3], **opts)
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(4), dtype=f64).to(dtype)
    grads = torch.autograd.grad(out, leaves, do)
    res = []
    for dt in (f64, dtype):
        rl = [t.detach().to(dt).requires_grad_() for t in (q, k, v, sinks)]
        outs = []
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            seq = [t[a:b].transpose(0, 1) for t in rl[:3]]
            vis = window_visibility(b - a, b - a, opts.get("is_causal", False), opts.get("window_size"))
            outs.append(sink_attention(*seq, rl[3], visible=vis).transpose(0, 1))
        ro = torch.cat(outs)
        res.append([ro] + list(torch.autograd.grad(ro, rl, do.to(dt))))
    for what, ours, r, b in zip(("output", "dq", "dk", "dv", "dsinks"), [out, *grads], *res):
        assert_close_vs_baseline(f"varlen {what}", ours, r, b, dtype)


def test_hf_gpt_oss_packed_batch_matches_sequences_alone():
    """A padding-free packed batch (DataCollatorWithFlattening) through a small gpt-oss: attention_varlen with
    sinks runs (no dense mask), and the logits and gradients equal those of each sequence alone under eager."""
    transformers, model = _tiny_gpt_oss()
    model.eval()
    lens = [7, 12, 3]
    seqs = [torch.randint(1, 128, (1, n), generator=torch.Generator().manual_seed(n)) for n in lens]
    collator = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_position_ids=True)
    batch = collator([{"input_ids": s[0].tolist()} for s in seqs])
    kw = {n: batch[n] for n in ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")}
    w = torch.randn(1, sum(lens), 128, generator=torch.Generator().manual_seed(2))

    def run(impl, packed):
        model.config._attn_implementation = impl
        model.zero_grad()
        with OpCounter() as c:
            if packed:
                logits = model(input_ids=batch["input_ids"], **kw).logits
            else:
                logits = torch.cat([model(input_ids=s).logits for s in seqs], dim=1)
            (logits * w).sum().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if "self_attn" in n}, c
    lo_x, g_x, c = run("attention_ext", True)
    lo_e, g_e, _ = run("eager", False)
    assert c.counts["attention_ext._attention_varlen_forward"] >= 2 and c.fwd == 0, c.counts
    torch.testing.assert_close(lo_x, lo_e, rtol=1e-4, atol=1e-5)
    for n in g_e:
        scale = g_e[n].abs().max().item()
        torch.testing.assert_close(g_x[n], g_e[n], rtol=1e-4, atol=1e-5 * scale, msg=lambda m, n=n: f"{n}: {m}")


def test_varlen_sinks_double_backward_raises():
    """As attention_varlen without sinks: first-order gradients, and a clear error when they are differentiated
    (not a silently missing second-order term)."""
    q, k, v, sinks, cu = _packed_inputs(f64)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
    out = attention_ext.attention_varlen(*leaves[:3], cu, cu, enable_gqa=True, sinks=leaves[3])
    dq, = torch.autograd.grad(out.square().sum(), leaves[0], create_graph=True)
    with pytest.raises(RuntimeError, match="attention_varlen does not support double backward"):
        (dq.square().sum() + leaves[0].sum()).backward()


def test_nested_tensors_with_sinks():
    """Jagged nested tensors take sinks too: each sequence's output and gradients (sinks included) equal the
    dense call on that sequence alone (float64)."""
    g = torch.Generator().manual_seed(13)
    lens = [6, 3, 8]
    qs = [torch.randn(4, n, 8, generator=g, dtype=torch.float64) for n in lens]
    kvs = [torch.randn(2, n, 8, generator=g, dtype=torch.float64) for n in lens]
    sinks = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    nq, nkv = (torch.nested.nested_tensor(ts, layout=torch.jagged).requires_grad_() for ts in (qs, kvs))
    out = attention_ext.attention(nq, nkv, nkv, is_causal=True, enable_gqa=True, sinks=sinks)
    out.values().square().sum().backward()
    ref_sink_grad = torch.zeros(4, dtype=torch.float64)
    for b in range(len(lens)):
        q, kv = qs[b].clone().requires_grad_(), kvs[b].clone().requires_grad_()
        s = sinks.detach().clone().requires_grad_()
        ro = attention_ext.attention(q, kv, kv, is_causal=True, enable_gqa=True, sinks=s)
        ro.square().sum().backward()
        ref_sink_grad += s.grad
        torch.testing.assert_close(out[b], ro, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(nq.grad[b], q.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(nkv.grad[b], kv.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sinks.grad, ref_sink_grad, rtol=1e-10, atol=1e-12)
