"""attention_ext.scaled_dot_product_attention (drop-in for F.scaled_dot_product_attention) and the
use_attention_ext() context manager that routes a model's calls of the PyTorch function through it."""

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attention_ext
from attention_ext import scaled_dot_product_attention as sdpa, use_attention_ext
from op_counter import OpCounter

ORIG = F.scaled_dot_product_attention



pytestmark = pytest.mark.usefixtures("one_thread")


def _t(*shape, dtype=torch.float64):
    return torch.randn(*shape, dtype=dtype, requires_grad=True)


CASES = {
    "plain": lambda: ((_t(2, 3, 5, 8), _t(2, 3, 7, 8), _t(2, 3, 7, 6)), {}),
    "causal": lambda: ((_t(2, 3, 6, 8), _t(2, 3, 6, 8), _t(2, 3, 6, 8)), dict(is_causal=True)),
    "causal_rect": lambda: ((_t(2, 3, 4, 8), _t(2, 3, 6, 8), _t(2, 3, 6, 8)), dict(is_causal=True)),
    "bool_mask": lambda: ((_t(2, 3, 5, 8), _t(2, 3, 7, 8), _t(2, 3, 7, 8)),
                          dict(attn_mask=torch.rand(2, 1, 5, 7).index_fill(-1, torch.tensor([0]), 0) > 0.3)),
    "float_mask_grad": lambda: ((_t(2, 3, 5, 8), _t(2, 3, 7, 8), _t(2, 3, 7, 8)), dict(attn_mask=_t(5, 7))),
    "scale": lambda: ((_t(1, 2, 5, 8), _t(1, 2, 5, 8), _t(1, 2, 5, 8)), dict(scale=0.3)),
    "gqa": lambda: ((_t(2, 6, 5, 8), _t(2, 2, 7, 8), _t(2, 2, 7, 8)), dict(enable_gqa=True)),
    "3d": lambda: ((_t(3, 5, 8), _t(3, 7, 8), _t(3, 7, 8)), {}),
    "2d": lambda: ((_t(5, 8), _t(7, 8), _t(7, 8)), {}),
    "5d": lambda: ((_t(2, 2, 3, 5, 8), _t(2, 2, 3, 7, 8), _t(2, 2, 3, 7, 8)), {}),
    "broadcast_batch": lambda: ((_t(2, 3, 5, 8), _t(1, 3, 7, 8), _t(1, 3, 7, 8)), {}),
    "strided": lambda: ((_t(2, 5, 3, 8).transpose(1, 2), _t(2, 7, 3, 8).transpose(1, 2),
                         _t(2, 7, 3, 8).transpose(1, 2)), {}),
    # SDPA broadcasts the heads dim too: one key / value head for every query head (without enable_gqa),
    # a one-head query against every key head; under enable_gqa key and value heads repeat by their own factors
    "heads_broadcast_kv": lambda: ((_t(2, 4, 5, 8), _t(2, 1, 7, 8), _t(2, 1, 7, 8)), {}),
    "heads_broadcast_query": lambda: ((_t(2, 1, 5, 8), _t(2, 3, 7, 8), _t(2, 3, 7, 6)), {}),
    "gqa_kv_heads_differ": lambda: ((_t(2, 4, 5, 8), _t(2, 2, 7, 8), _t(2, 1, 7, 6)), dict(enable_gqa=True)),
    # a mask with a (singleton) leading dim more than 3-D inputs: the result keeps the inputs' rank
    "mask_extra_dim": lambda: ((_t(3, 5, 8), _t(3, 7, 8), _t(3, 7, 8)),
                               dict(attn_mask=torch.rand(1, 3, 5, 7).index_fill(-1, torch.tensor([0]), 0) > 0.3)),
    # every weight dropped: zeros and zero gradients, as PyTorch
    "dropout_one": lambda: ((_t(2, 3, 5, 8), _t(2, 3, 7, 8), _t(2, 3, 7, 8)), dict(dropout_p=1.0)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sdpa_matches_torch(case):
    torch.manual_seed(0)
    (q, k, v), kw = CASES[case]()
    leaves = [t for t in (q, k, v, kw.get("attn_mask")) if t is not None and t.requires_grad]
    with OpCounter() as c:
        out = sdpa(q, k, v, **kw)
    assert c.ext == 1
    try:
        ref = ORIG(q, k, v, **kw)
    except RuntimeError as e:
        # torch 2.11's SDPA refuses a mask of more dims than 3-D inputs (its in-place add cannot grow the
        # output); later versions return the scores' rank, as the drop-in does: theirs on the squeezed mask
        if case != "mask_extra_dim" or "doesn't match the broadcast shape" not in str(e):
            raise
        ref = ORIG(q, k, v, **dict(kw, attn_mask=kw["attn_mask"].squeeze(0)))
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(ref)
    ga = torch.autograd.grad((out * g).sum(), leaves)
    gb = torch.autograd.grad((ref * g).sum(), leaves)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b)


def test_sdpa_float32_and_dropout():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 16) for _ in range(3))
    torch.testing.assert_close(sdpa(q, k, v, is_causal=True), ORIG(q, k, v, is_causal=True), atol=1e-5, rtol=1e-4)
    torch.manual_seed(3)
    a = sdpa(q, k, v, dropout_p=0.5)
    torch.manual_seed(3)
    b = sdpa(q, k, v, dropout_p=0.5)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, sdpa(q, k, v))


def test_sdpa_errors_and_fallback():
    q = torch.randn(1, 2, 4, 8)
    m = torch.rand(4, 4) > 0.3
    m[:, 0] = True
    try:  # PyTorch 2.14 rejects a mask with is_causal; 2.11 applies both: the drop-in does the same
        expected = ORIG(q, q, q, attn_mask=m, is_causal=True)
    except RuntimeError:
        with pytest.raises(RuntimeError):
            sdpa(q, q, q, attn_mask=m, is_causal=True)
    else:
        torch.testing.assert_close(sdpa(q, q, q, attn_mask=m, is_causal=True), expected)
    # what PyTorch refuses the drop-in refuses with PyTorch's own error: a float16 mask on a float32 query
    # (not converted), heads that neither match nor broadcast
    for args, kw in (((q, q, q), dict(attn_mask=torch.zeros(4, 4, dtype=torch.float16))),
                     ((q, torch.randn(1, 3, 4, 8), torch.randn(1, 3, 4, 8)), {})):
        with pytest.raises(RuntimeError) as theirs:
            ORIG(*args, **kw)
        with pytest.raises(RuntimeError, match=re.escape(str(theirs.value))):
            sdpa(*args, **kw)
    big = torch.randn(1, 2, 4, 300)  # head dim above the kernels' 256: PyTorch computes it
    with OpCounter() as c:
        out = sdpa(big, big, big)
    assert c.ext == 0
    torch.testing.assert_close(out, ORIG(big, big, big))


class CallsFunctional(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 48)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, 4, 4).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_context_manager_patches_and_restores():
    torch.manual_seed(0)
    m = CallsFunctional()
    x = torch.randn(2, 5, 16)
    with OpCounter() as c:
        ref = m(x)
    assert c.ext == 0
    with use_attention_ext():
        assert F.scaled_dot_product_attention is sdpa
        with use_attention_ext():  # re-entrant
            pass
        assert F.scaled_dot_product_attention is sdpa
        with OpCounter() as c:
            out = m(x)
        assert c.ext == 1
    assert F.scaled_dot_product_attention is ORIG
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    with pytest.raises(ZeroDivisionError):
        with use_attention_ext():
            1 / 0
    assert F.scaled_dot_product_attention is ORIG


def test_context_manager_routes_torch_multihead_attention():
    # torch.nn.MultiheadAttention(need_weights=False) itself calls the patched function
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4)
    x = torch.randn(5, 2, 16)
    ref = mha(x, x, x, need_weights=False)[0]
    with use_attention_ext(), OpCounter() as c:
        out = mha(x, x, x, need_weights=False)[0]
    assert c.ext == 1
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_timm_vit_under_context_manager():
    timm = pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=5)
    assert model.blocks[0].attn.fused_attn, "timm does not call F.scaled_dot_product_attention here"
    x = torch.randn(2, 3, 32, 32)
    y = torch.randint(0, 5, (2,))
    ref_loss = F.cross_entropy(model(x), y)
    ref_grads = torch.autograd.grad(ref_loss, list(model.parameters()))
    with use_attention_ext(), OpCounter() as c:
        loss = F.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, list(model.parameters()))
    assert c.counts["attention_ext._attention_forward"] == 2  # one per block
    assert c.counts["attention_ext._attention_backward"] == 2
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-4)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_attention_with_weights_gqa_gradients(mask_kind):
    torch.manual_seed(0)
    q = _t(2, 4, 5, 8)
    k, v = _t(2, 2, 6, 8), _t(2, 2, 6, 8)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(2, 1, 5, 6) > 0.3
        mask[..., 0] = True
    elif mask_kind == "float":
        mask = _t(5, 6)
    out, w = attention_ext.attention_with_weights(q, k, v, mask, scale=0.4, enable_gqa=True)
    kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    s = q @ kk.transpose(-1, -2) * 0.4
    if mask_kind == "bool":
        s = s.masked_fill(~mask, float("-inf"))
    elif mask_kind == "float":
        s = s + mask
    p = torch.softmax(s, -1)
    torch.testing.assert_close(w, p)
    torch.testing.assert_close(out, p @ vv)
    go, gw = torch.randn_like(out), torch.randn_like(w)
    leaves = [t for t in (q, k, v, mask) if t is not None and t.requires_grad]
    g1 = torch.autograd.grad((out * go).sum() + (w * gw).sum(), leaves)
    g2 = torch.autograd.grad((p @ vv * go).sum() + (p * gw).sum(), leaves)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("which", ["no_grad", "inference_mode", "no_input_requires_grad"])
def test_forward_without_graph_matches_and_records_nothing(which):
    """Without anything to differentiate the op runs its forward alone (no autograd node): same bits as
    with a graph, no grad_fn, and the varlen op alike."""
    from reference import reference_attention

    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 3, 9, 16, generator=g) for _ in range(3))
    mask = torch.randn(9, 9, generator=g)
    with_graph = attention_ext.attention(q.requires_grad_(), k, v, attn_mask=mask, is_causal=True).detach()
    q = q.detach()
    ctx = {"no_grad": torch.no_grad(), "inference_mode": torch.inference_mode()}.get(which)
    qq = q.clone().requires_grad_(which != "no_input_requires_grad")
    with ctx if ctx is not None else torch.enable_grad():
        out = attention_ext.attention(qq, k, v, attn_mask=mask, is_causal=True)
        cu = torch.tensor([0, 4, 9], dtype=torch.int32)
        packed = attention_ext.attention_varlen(qq[0].transpose(0, 1).reshape(9, 3, 16).contiguous().requires_grad_(
            which != "no_input_requires_grad"), k[0].transpose(0, 1).contiguous(), v[0].transpose(0, 1).contiguous(),
            cu, cu)
    assert out.grad_fn is None and not out.requires_grad
    assert packed.grad_fn is None and not packed.requires_grad
    assert torch.equal(out, with_graph)
    ref = reference_attention(q, k, v, mask, is_causal=True).out
    assert (out.double() - ref).abs().max() < 1e-5


def test_only_the_mask_requires_grad():
    """A float mask is an input of the graph too: with only the mask requiring grad the op still records its
    node, and the mask's gradient matches the float64 reference."""
    from reference import reference_grads

    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(2, 2, 7, 8, generator=g) for _ in range(3))
    mask = torch.randn(2, 1, 7, 7, generator=g).requires_grad_()
    go = torch.randn(2, 2, 7, 8, generator=g)
    out = attention_ext.attention(q, k, v, attn_mask=mask)
    assert out.grad_fn is not None
    (dmask,) = torch.autograd.grad(out, mask, go)
    ref = reference_grads(q, k, v, go, mask, mask_requires_grad=True)[5]
    assert (dmask.double() - ref).abs().max() < 1e-5


def test_attention_with_weights_without_graph():
    """attention_with_weights with nothing to differentiate runs the op alone: the same bits as with a graph
    (output and averaged weights), and no grad_fn."""
    from attention_ext.functional import attention_with_weights

    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(2, 4, 10, 16, generator=g) for _ in range(3))
    mask = torch.rand(2, 1, 10, 10, generator=g) > 0.2
    o1, w1 = attention_with_weights(q.clone().requires_grad_(), k, v, mask, average_heads=True)
    with torch.no_grad():
        o2, w2 = attention_with_weights(q, k, v, mask, average_heads=True)
    o3, w3 = attention_with_weights(q, k, v, mask, average_heads=True)
    for o, w in ((o2, w2), (o3, w3)):
        assert o.grad_fn is None and w.grad_fn is None
        assert torch.equal(o, o1.detach()) and torch.equal(w, w1.detach())
    assert w1.grad_fn is not None


# ----------------------------------------------------------------------------- PyTorch's causal biases
def _lower_right_visible(L, S):
    """Key j visible to query i when j <= i + S - L (bottom-right aligned), written out independently."""
    i, j = torch.arange(L)[:, None], torch.arange(S)[None, :]
    return j <= i + (S - L)


@pytest.mark.parametrize("variant", ["upper_left", "lower_right"])
@pytest.mark.parametrize("L,S", [(4, 9), (9, 4), (6, 6), (1, 7)])
@pytest.mark.parametrize("entry", ["dropin", "routed", "op", "op_window"])
def test_causal_bias_masks(variant, L, S, entry):
    """torch.nn.attention.bias.causal_upper_left / causal_lower_right as attn_mask, as F.scaled_dot_product_attention
    takes them. Such a bias is not a mask (uninitialised storage): read as one, it gave garbage (upper-left, error
    5.2) or an error (lower-right). Output and gradients against the float64 reference with the visibility written
    out; PyTorch's SDPA with the bias, float32, is the yardstick."""
    from torch.nn.attention.bias import causal_lower_right, causal_upper_left
    from reference import assert_close_vs_baseline, reference_grads

    make = causal_upper_left if variant == "upper_left" else causal_lower_right
    g = torch.Generator().manual_seed(L * 100 + S)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g) for n in (L, S, S))
    do = torch.randn(2, 3, L, 16, generator=g)
    visible = torch.ones(L, S, dtype=torch.bool).tril() if variant == "upper_left" else _lower_right_visible(L, S)
    window = None
    if entry == "op_window":  # a window's left bound as well: both apply
        window = [2, -1]
        i, j = torch.arange(L)[:, None], torch.arange(S)[None, :]
        visible = visible & (j >= i - 2)
    _, _, *ref_grads = reference_grads(q, k, v, do, visible)
    ref_out = reference_grads(q, k, v, do, visible)[0]
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    if entry == "dropin":
        out = sdpa(*leaves, attn_mask=make(L, S))
    elif entry == "routed":
        bias = make(L, S)  # (made outside the dispatch mode, where PyTorch cannot make one)
        with use_attention_ext(), OpCounter() as c:
            out = F.scaled_dot_product_attention(*leaves, attn_mask=bias)
        assert c.counts.get("attention_ext.attention", 0) + c.counts.get("attention_ext._attention_forward", 0) >= 1
    else:
        out = attention_ext.attention(*leaves, attn_mask=make(L, S), window_size=window)
    assert type(out) is torch.Tensor, type(out)  # not a CausalBias
    out.backward(do)
    base_leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    if window is None:
        base = ORIG(*base_leaves, attn_mask=make(L, S))
    else:
        base = ORIG(*base_leaves, attn_mask=visible)
    base.backward(do)
    name = f"{variant} {L}x{S} {entry}"
    assert_close_vs_baseline(f"{name} output", out, ref_out, base, torch.float32)
    for what, t, b, r in zip(("dq", "dk", "dv"), leaves, base_leaves, ref_grads):
        assert_close_vs_baseline(f"{name} {what}", t.grad, r, b.grad, torch.float32)


def test_causal_bias_fallback_and_errors():
    """Inputs the kernels do not take (head dim 300) go to PyTorch with the bias as PyTorch reads it, also while
    use_attention_ext() has replaced F.scaled_dot_product_attention (where the bias's own dispatch no longer
    recognises the function); a bias with is_causal=True, or for other lengths, raises."""
    from torch.nn.attention.bias import causal_lower_right, causal_upper_left

    q, k, v = torch.randn(1, 2, 4, 300), torch.randn(1, 2, 9, 300), torch.randn(1, 2, 9, 300)
    for make in (causal_upper_left, causal_lower_right):
        expected = ORIG(q, k, v, attn_mask=make(4, 9))
        with use_attention_ext():
            torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v, attn_mask=make(4, 9)), expected)
        torch.testing.assert_close(sdpa(q, k, v, attn_mask=make(4, 9)), expected)
    q, k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8)
    for call in (sdpa, attention_ext.attention):
        with pytest.raises(ValueError, match="CausalBias should not be used with causal=True"):
            call(q, k, v, attn_mask=causal_lower_right(4, 9), is_causal=True)
        with pytest.raises(ValueError, match="causal bias for 5 queries and 9 keys, but query has length 4 and key 9"):
            call(q, k, v, attn_mask=causal_lower_right(5, 9))
