"""Invalid inputs raise a Python exception of the right type whose message names
the argument and the expectation (wording of csrc/glue.cpp). The Meta (fake)
kernels used by torch.compile must raise the very same errors."""
import math
import re

import pytest
import torch

import attention_ext
from conftest import cuda_marks

ops = torch.ops.attention_ext
f32, f16, bf16, f64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
W = [-1, -1]


def _r(*shape, dtype=f32, device="cpu"):
    return torch.randn(*shape, device=device).to(dtype)


def fwd(q, k, v, mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, window=W):
    return ops._attention_forward(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa, window)


def att(q, k, v, mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, window=W):
    return ops.attention(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa, window)


def Q(dtype=f32, dev="cpu"):
    return _r(2, 2, 5, 8, dtype=dtype, device=dev)


def K(dtype=f32, dev="cpu"):
    return _r(2, 2, 6, 8, dtype=dtype, device=dev)


# (id, call(dev) -> raises, exception type, regex of the message); `dev` is where every
# tensor lives ('cpu' for the real kernels, 'meta' for the fake ones).
CASES = [
    # rank
    ("rank_query_2d", lambda d: fwd(_r(5, 8, device=d), _r(6, 8, device=d), _r(6, 8, device=d)), ValueError,
     r"query must have at least 3 dimensions \(\.\.\., heads, L, E\), got 2 with shape \[5, 8\]"),
    ("rank_key", lambda d: fwd(Q(dev=d), _r(2, 6, 8, device=d), K(dev=d)), ValueError,
     r"key must have the same number of dimensions as query \(4\), got 3 with shape \[2, 6, 8\]"),
    ("rank_value", lambda d: fwd(Q(dev=d), K(dev=d), _r(2, 2, 1, 6, 8, device=d)), ValueError,
     r"value must have the same number of dimensions as query \(4\), got 5"),
    # dtypes
    ("int_inputs", lambda d: fwd(Q(dev=d).long(), K(dev=d).long(), K(dev=d).long()), TypeError,
     r"query must be float32, float16, bfloat16 or float64, got Long"),
    ("int32_query", lambda d: att(Q(dev=d).int(), K(dev=d), K(dev=d)), TypeError,
     r"query must be float32, float16, bfloat16 or float64, got Int"),
    ("bool_query", lambda d: att(Q(dev=d) > 0, K(dev=d), K(dev=d)), TypeError,
     r"query must be float32, float16, bfloat16 or float64, got Bool"),
    ("dtype_key", lambda d: fwd(Q(dev=d), K(f16, d), K(dev=d)), TypeError,
     r"key dtype \(Half\) must match query dtype \(Float\)"),
    ("dtype_value", lambda d: att(Q(bf16, d), K(bf16, d), K(f32, d)), TypeError,
     r"value dtype \(Float\) must match query dtype \(BFloat16\)"),
    ("dtype_key_int", lambda d: att(Q(dev=d), K(dev=d).long(), K(dev=d)), TypeError,
     r"key dtype \(Long\) must match query dtype \(Float\)"),
    # batch / heads / lengths / dims
    ("batch_mismatch", lambda d: fwd(Q(dev=d), _r(3, 2, 6, 8, device=d), _r(3, 2, 6, 8, device=d)), ValueError,
     r"query, key and value must have the same batch dimensions, got query \[2, 2, 5, 8\], "
     r"key \[3, 2, 6, 8\], value \[3, 2, 6, 8\]"),
    ("batch_mismatch_value_5d", lambda d: fwd(_r(2, 3, 2, 5, 8, device=d), _r(2, 3, 2, 6, 8, device=d),
                                              _r(2, 1, 2, 6, 8, device=d)), ValueError,
     r"query, key and value must have the same batch dimensions"),
    ("value_heads", lambda d: fwd(Q(dev=d), K(dev=d), _r(2, 3, 6, 8, device=d)), ValueError,
     r"value has 3 heads but key has 2 \(shapes: key \[2, 2, 6, 8\], value \[2, 3, 6, 8\]\)"),
    ("value_length", lambda d: fwd(Q(dev=d), K(dev=d), _r(2, 2, 7, 8, device=d)), ValueError,
     r"value length \(7\) must match key length \(6\)"),
    ("key_head_dim", lambda d: fwd(Q(dev=d), _r(2, 2, 6, 16, device=d), K(dev=d)), ValueError,
     r"key head dim \(16\) must match query head dim \(8\)"),
    ("head_dim_257", lambda d: fwd(_r(1, 1, 2, 257, device=d), _r(1, 1, 3, 257, device=d), _r(1, 1, 3, 8, device=d)),
     ValueError, r"query head dim \(size of the last dimension\) must be in \[0, 256\], got 257"),
    ("head_dim_320", lambda d: att(_r(1, 1, 2, 320, device=d), _r(1, 1, 3, 320, device=d), _r(1, 1, 3, 8, device=d)),
     ValueError, r"query head dim \(size of the last dimension\) must be in \[0, 256\], got 320"),
    ("value_dim_257", lambda d: fwd(Q(dev=d), K(dev=d), _r(2, 2, 6, 257, device=d)), ValueError,
     r"value head dim \(size of the last dimension\) must be in \[0, 256\], got 257"),
    # heads / GQA
    ("gqa_not_multiple", lambda d: fwd(_r(2, 6, 5, 8, device=d), _r(2, 4, 6, 8, device=d), _r(2, 4, 6, 8, device=d),
                                       enable_gqa=True), ValueError,
     r"enable_gqa=True needs the number of query heads \(6\) to be a multiple of the number of key/value heads \(4\)"),
    ("gqa_kv_more_heads", lambda d: fwd(_r(2, 2, 5, 8, device=d), _r(2, 4, 6, 8, device=d),
                                        _r(2, 4, 6, 8, device=d), enable_gqa=True), ValueError,
     r"enable_gqa=True needs the number of query heads \(2\) to be a multiple of the number of key/value heads \(4\)"),
    ("heads_without_gqa", lambda d: att(_r(2, 4, 5, 8, device=d), K(dev=d), K(dev=d)), ValueError,
     r"query has 4 heads but key/value have 2; pass enable_gqa=True for grouped-query attention"),
    # options
    ("dropout_negative", lambda d: fwd(Q(dev=d), K(dev=d), K(dev=d), dropout_p=-0.1), ValueError,
     r"dropout_p must be in \[0, 1\], got -0\.1"),
    ("dropout_1_5", lambda d: fwd(Q(dev=d), K(dev=d), K(dev=d), dropout_p=1.5), ValueError,
     r"dropout_p must be in \[0, 1\], got 1\.5"),
    ("dropout_above_one", lambda d: att(Q(dev=d), K(dev=d), K(dev=d), dropout_p=1.0000001), ValueError,
     r"dropout_p must be in \[0, 1\], got 1"),
    ("dropout_nan", lambda d: fwd(Q(dev=d), K(dev=d), K(dev=d), dropout_p=math.nan), ValueError,
     r"dropout_p must be in \[0, 1\], got nan"),
    ("scale_nan", lambda d: fwd(Q(dev=d), K(dev=d), K(dev=d), scale=math.nan), ValueError,
     r"scale must be a finite number or None, got nan"),
    ("scale_inf", lambda d: att(Q(dev=d), K(dev=d), K(dev=d), scale=math.inf), ValueError,
     r"scale must be a finite number or None, got inf"),
    ("window_minus2", lambda d: fwd(Q(dev=d), K(dev=d), K(dev=d), window=[-2, 0]), ValueError,
     r"window_size must be \(left, right\) with each >= 0, or -1 for unbounded, got \(-2, 0\)"),
    ("window_right_minus3", lambda d: att(Q(dev=d), K(dev=d), K(dev=d), window=[0, -3]), ValueError,
     r"window_size must be \(left, right\) with each >= 0, or -1 for unbounded, got \(0, -3\)"),
    ("window_three_values", lambda d: fwd(Q(dev=d), K(dev=d), K(dev=d), window=[1, 2, 3]), ValueError,
     r"window_size must be a pair \(left, right\), got 3 values"),
    # masks
    ("mask_int", lambda d: fwd(Q(dev=d), K(dev=d), K(dev=d), mask=torch.ones(5, 6, dtype=torch.int32, device=d)),
     TypeError, r"attn_mask must be bool, float32 or the query's dtype \(Float\), got Int"),
    ("mask_uint8", lambda d: att(Q(dev=d), K(dev=d), K(dev=d), mask=torch.ones(5, 6, dtype=torch.uint8, device=d)),
     TypeError, r"attn_mask must be bool, float32 or the query's dtype \(Float\), got Byte"),
    ("mask_f64_for_f32", lambda d: fwd(Q(dev=d), K(dev=d), K(dev=d), mask=_r(5, 6, dtype=f64, device=d)),
     TypeError, r"attn_mask must be bool, float32 or the query's dtype \(Float\), got Double"),
    ("mask_f16_for_bf16", lambda d: fwd(Q(bf16, d), K(bf16, d), K(bf16, d), mask=_r(5, 6, dtype=f16, device=d)),
     TypeError, r"attn_mask must be bool, float32 or the query's dtype \(BFloat16\), got Half"),
    ("mask_not_broadcastable_S", lambda d: fwd(Q(dev=d), K(dev=d), K(dev=d), mask=_r(5, 7, device=d)), ValueError,
     r"attn_mask of shape \[5, 7\] is not broadcastable to \(\.\.\., heads, L, S\) = \[2, 2, 5, 6\]"),
    ("mask_not_broadcastable_L", lambda d: att(Q(dev=d), K(dev=d), K(dev=d), mask=_r(4, 6, device=d) > 0),
     ValueError, r"attn_mask of shape \[4, 6\] is not broadcastable to \(\.\.\., heads, L, S\) = \[2, 2, 5, 6\]"),
    ("mask_not_broadcastable_heads", lambda d: fwd(Q(dev=d), K(dev=d), K(dev=d), mask=_r(2, 3, 5, 6, device=d)),
     ValueError, r"attn_mask of shape \[2, 3, 5, 6\] is not broadcastable"),
    ("mask_too_many_dims", lambda d: fwd(Q(dev=d), K(dev=d), K(dev=d), mask=_r(1, 2, 2, 5, 6, device=d)),
     ValueError, r"attn_mask of shape \[1, 2, 2, 5, 6\] is not broadcastable to \(\.\.\., heads, L, S\) = \[2, 2, 5, 6\]"),
    ("mask_key_padding_wrong_batch", lambda d: fwd(Q(dev=d), K(dev=d), K(dev=d), mask=_r(3, 1, 1, 6, device=d) > 0),
     ValueError, r"attn_mask of shape \[3, 1, 1, 6\] is not broadcastable"),
]


@pytest.mark.parametrize("call,exc,pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_invalid_input_raises(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call("cpu")


@pytest.mark.parametrize("average_heads", [False, True], ids=["heads", "mean"])
@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("call,exc,pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_forward_weights_raises_the_same(call, exc, pattern, device, average_heads, monkeypatch):
    """_attention_forward_weights (need_weights=True) validates exactly like _attention_forward: every case
    above, with the forward swapped for it (on the CPU the weights are allocated only after validation)."""
    def fwd_weights(q, k, v, mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, window=W):
        return ops._attention_forward_weights(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa, window,
                                              average_heads)

    monkeypatch.setitem(globals(), "fwd", fwd_weights)
    with pytest.raises(exc, match=pattern):
        call(device)


@pytest.mark.parametrize("call,exc,pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_meta_kernels_raise_the_same(call, exc, pattern):
    """Meta (fake) kernels, used by torch.compile, validate exactly like the real ones."""
    with pytest.raises(exc, match=pattern):
        call("meta")


def test_python_wrapper_errors():
    q, k = Q(), K()
    with pytest.raises(ValueError, match=r"window_size must be a pair \(left, right\) or None, got 5"):
        attention_ext.attention(q, k, k, window_size=5)
    with pytest.raises(ValueError, match=r"window_size must be a pair \(left, right\) or None, got \(1, 2, 3\)"):
        attention_ext.attention(q, k, k, window_size=(1, 2, 3))
    for bad in ((1.5, 0), (True, -1), (2, torch.tensor(1.0))):
        with pytest.raises(TypeError, match=r"window_size must hold two ints \(left, right\), got \("):
            attention_ext.attention(q, k, k, window_size=bad)
    assert torch.equal(attention_ext.attention(q, k, k, window_size=(2, torch.tensor(1))),
                       attention_ext.attention(q, k, k, window_size=(2, 1)))
    with pytest.raises(ValueError, match=r"query has 4 heads but key/value have 2"):
        attention_ext.attention(_r(2, 4, 5, 8), k, k)
    _, lse, _ = fwd(q, k, k)
    with pytest.raises(ValueError, match=r"attention_probs: dropout_p > 0 needs the rng_state returned by the forward"):
        attention_ext.attention_probs(q, k, lse, dropout_p=0.2)


def test_layouts_other_than_strided_name_the_argument():
    """Sparse and MKL-DNN tensors have no kernel: an error naming the argument and the expected layout (not the
    dispatcher's "could not run ... 'SparseCPU' backend"), from the op, its Python wrappers and the drop-in."""
    q, k = Q(), K()
    mask = torch.rand(2, 2, 5, 7) > 0.5
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    calls = [
        ("attn_mask", "sparse_coo", lambda: att(q, k, k, mask.to_sparse())),
        ("attn_mask", "sparse_csr", lambda: attention_ext.attention(q, k, k, torch.randn(5, 7).to_sparse_csr())),
        ("attn_mask", "sparse_coo", lambda: attention_ext.scaled_dot_product_attention(q, k, k, mask.to_sparse())),
        ("query", "_mkldnn", lambda: att(q.to_mkldnn(), k, k)),
        ("key", "sparse_coo", lambda: att(q, k.to_sparse(), k)),
        ("value", "sparse_coo", lambda: att(q, k, k.to_sparse())),
        ("query", "sparse_coo", lambda: ops.attention_varlen(_r(5, 2, 8).to_sparse(), _r(5, 2, 8), _r(5, 2, 8), cu, cu,
                                                             None, None, 0.0, False, None, False, W)),
        ("cu_seqlens_k", "sparse_coo", lambda: ops.attention_varlen(_r(5, 2, 8), _r(5, 2, 8), _r(5, 2, 8), cu,
                                                                    cu.to_sparse(), None, None, 0.0, False, None,
                                                                    False, W)),
    ]
    for name, layout, call in calls:
        with pytest.raises(ValueError, match=rf"^{name} must be a dense \(strided\) tensor, got layout "
                                             rf"torch\.{layout}"):
            call()


# --------------------------------------------------------------------------------------------
# devices

def test_device_mismatch():
    q, k = Q(), K()
    with pytest.raises(RuntimeError, match=r"key is on meta but query is on cpu; query, key and value must be on "
                                           r"the same device"):
        fwd(q, k.to("meta"), k)
    with pytest.raises(RuntimeError, match=r"value is on meta but query is on cpu; query, key and value must be on "
                                           r"the same device"):
        att(q, k, k.to("meta"))
    with pytest.raises(RuntimeError, match=r"key is on cpu but query is on meta"):
        fwd(q.to("meta"), k, k.to("meta"))
    with pytest.raises(RuntimeError, match=r"attn_mask is on meta but query is on cpu"):
        fwd(q, k, k, mask=torch.ones(5, 6, device="meta"))


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_marks())])
def test_cuda_cpu_mismatch(device):
    q = torch.randn(1, 2, 5, 8, device=device)
    with pytest.raises(RuntimeError, match=r"key is on cpu but query is on cuda"):
        fwd(q, q.cpu(), q)
    with pytest.raises(RuntimeError, match=r"attn_mask is on cpu but query is on cuda"):
        fwd(q, q, q, mask=torch.ones(5, 5, dtype=torch.bool))


# --------------------------------------------------------------------------------------------
# backward / probs / dropout-mask ops: the saved tensors are validated too

def _saved(dev="cpu", dropout_p=0.0):
    torch.manual_seed(0)
    q, k, v = Q(), K(), _r(2, 2, 6, 4)
    out, lse, rng = fwd(q, k, v, dropout_p=dropout_p)
    g = torch.randn_like(out)
    return tuple(t.to(dev) for t in (g, q, k, v, out, lse, rng))


def bwd(g, q, k, v, out, lse, rng, mask=None, dropout_p=0.0, mask_grad=False):
    return ops._attention_backward(g, q, k, v, mask, out, lse, rng, dropout_p, False, None, False, W, mask_grad)


BWD_CASES = [
    ("grad_output_shape", lambda g, q, k, v, o, l, r: bwd(g[..., :3], q, k, v, o, l, r), ValueError,
     r"grad_output must have shape \[2, 2, 5, 4\], got \[2, 2, 5, 3\]"),
    ("grad_output_dtype", lambda g, q, k, v, o, l, r: bwd(g.to(f16), q, k, v, o, l, r), TypeError,
     r"grad_output dtype \(Half\) must match query dtype \(Float\)"),
    # (a smaller `output` is not tried: unvalidated, the kernel would read past its end)
    ("output_shape_larger", lambda g, q, k, v, o, l, r: bwd(torch.randn(2, 2, 5, 6, device=g.device), q, k, v,
                                                             torch.randn(2, 2, 5, 6, device=g.device), l, r), ValueError,
     r"output must have shape \[2, 2, 5, 4\], got \[2, 2, 5, 6\]"),
    ("output_dtype", lambda g, q, k, v, o, l, r: bwd(g, q, k, v, o.to(f64), l, r), TypeError,
     r"(?<!grad_)output dtype \(Double\) must match query dtype \(Float\)"),
    ("lse_shape", lambda g, q, k, v, o, l, r: bwd(g, q, k, v, o, l[..., :4], r), ValueError,
     r"logsumexp must have shape \[2, 2, 5\], got \[2, 2, 4\]"),
    ("lse_dtype", lambda g, q, k, v, o, l, r: bwd(g, q, k, v, o, l.to(f64), r), TypeError,
     r"logsumexp must be Float \(as returned by the forward\), got Double"),
    ("rng_state_bad", lambda g, q, k, v, o, l, r: bwd(g, q, k, v, o, l, torch.zeros(3, device=g.device),
                                                       dropout_p=0.3), ValueError,
     r"rng_state must be the int64 tensor of 2 elements returned by the forward"),
    ("bad_mask", lambda g, q, k, v, o, l, r: bwd(g, q, k, v, o, l, r, mask=torch.zeros(5, 7, device=g.device)),
     ValueError, r"attn_mask of shape \[5, 7\] is not broadcastable"),
    ("bad_dropout", lambda g, q, k, v, o, l, r: bwd(g, q, k, v, o, l, r, dropout_p=2.0), ValueError,
     r"dropout_p must be in \[0, 1\], got 2"),
    ("probs_lse_dtype", lambda g, q, k, v, o, l, r: ops.attention_probs(q, k, None, l.to(f16), r), TypeError,
     r"logsumexp must be Float \(as returned by the forward\), got Half"),
    ("probs_lse_shape", lambda g, q, k, v, o, l, r: ops.attention_probs(q, k, None, l[:1], r), ValueError,
     r"logsumexp must have shape \[2, 2, 5\], got \[1, 2, 5\]"),
    ("probs_rng_state_bad", lambda g, q, k, v, o, l, r: ops.attention_probs(q, k, None, l, r.float(), 0.2), ValueError,
     r"rng_state must be the int64 tensor of 2 elements returned by the forward"),
    ("probs_bad_window", lambda g, q, k, v, o, l, r: ops.attention_probs(q, k, None, l, r, 0.0, False, None, False,
                                                                          [-5, 1]), ValueError,
     r"window_size must be \(left, right\) with each >= 0, or -1 for unbounded, got \(-5, 1\)"),
    ("dropout_mask_p0", lambda g, q, k, v, o, l, r: ops._dropout_mask(r, 1, 2, 3, 4, 0.0), ValueError,
     r"dropout_p must be in \(0, 1\], got 0"),
    ("dropout_mask_p2", lambda g, q, k, v, o, l, r: ops._dropout_mask(r, 1, 2, 3, 4, 2.0), ValueError,
     r"dropout_p must be in \(0, 1\], got 2"),
    ("dropout_mask_rng_bad", lambda g, q, k, v, o, l, r: ops._dropout_mask(r[:1], 1, 2, 3, 4, 0.5), ValueError,
     r"rng_state must be the int64 tensor of 2 elements returned by the forward"),
]


@pytest.mark.parametrize("dev", ["cpu", "meta"])
@pytest.mark.parametrize("call,exc,pattern", [c[1:] for c in BWD_CASES], ids=[c[0] for c in BWD_CASES])
def test_backward_probs_mask_ops_validate(call, exc, pattern, dev):
    with pytest.raises(exc, match=pattern):
        call(*_saved(dev))


def test_error_messages_name_argument_and_expectation():
    """Every expected message names an argument and says what was expected / got."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "scale", "window_size", "enable_gqa", "grad_output",
             "output", "logsumexp", "rng_state")
    for cid, _, _, pattern in CASES + BWD_CASES:
        text = pattern.replace("\\", "")
        assert any(n in text for n in names), cid
        assert re.search(r"must|got|needs|but|pass|not broadcastable", text), cid
