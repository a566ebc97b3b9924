"""Independent float64 reference of attention_ext's operators, in plain PyTorch.

Everything is spelled out with explicit matmul / masking / softmax (no
F.scaled_dot_product_attention), in float64, and is differentiable with
torch.autograd: the gradients of the reference are the expected gradients.

Semantics (those of attention_ext and F.scaled_dot_product_attention):
  q (..., Hq, L, E), k (..., Hkv, S, E), v (..., Hkv, S, Ev)
  scores = q @ k^T * scale (+ float mask), scale defaults to 1/sqrt(E)
  a key j is visible to query i iff
      the bool mask is True (when a bool mask is given) and the float mask is not -inf,
      j <= i (is_causal, top-left aligned) and i - left <= j <= i + right (window, -1 = unbounded)
  probs = softmax over the visible keys; a row that sees no key has probs 0,
  output 0 and log-sum-exp -inf (and zero gradients, never NaN).
  enable_gqa: query head h uses kv head h // (Hq // Hkv) (repeat_interleave).
  dropout: probs * keep_mask / (1 - p) multiplies v.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass
class RefResult:
    out: torch.Tensor     # (..., Hq, L, Ev) float64 (differentiable)
    lse: torch.Tensor     # (..., Hq, L) float64, -inf for rows that see no key (detached)
    probs: torch.Tensor   # (..., Hq, L, S) float64 softmax probabilities, before dropout (differentiable)
    probs_dropped: torch.Tensor  # probs * keep / (1 - p) (== probs without dropout)
    visible: torch.Tensor  # (..., Hq, L, S) bool: which keys each query row sees


def window_visibility(L: int, S: int, is_causal: bool = False, window_size: Optional[Sequence[int]] = None,
                      device=None) -> torch.Tensor:
    """(L, S) bool: key j visible to query i from is_causal and the window alone."""
    i = torch.arange(L, device=device).unsqueeze(1)
    j = torch.arange(S, device=device).unsqueeze(0)
    vis = torch.ones(L, S, dtype=torch.bool, device=device)
    if is_causal:
        vis = vis & (j <= i)
    if window_size is not None:
        left, right = int(window_size[0]), int(window_size[1])
        if left >= 0:
            vis = vis & (j >= i - left)
        if right >= 0:
            vis = vis & (j <= i + right)
    return vis


def expand_kv(t: torch.Tensor, heads_q: int) -> torch.Tensor:
    """(..., Hkv, S, D) -> (..., Hq, S, D) with repeat_interleave semantics (head h -> h // group)."""
    hkv = t.shape[-3]
    assert heads_q % hkv == 0, (heads_q, hkv)
    return t.repeat_interleave(heads_q // hkv, dim=-3)


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    *,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    window_size: Optional[Sequence[int]] = None,
    dropout_p: float = 0.0,
    dropout_mask: Optional[torch.Tensor] = None,
    softcap: float = 0.0,
    bias: Optional[torch.Tensor] = None,
) -> RefResult:
    """Float64 attention (see the module docstring). The inputs may have any float
    dtype; they are converted to float64 (differentiably: gradients flow back to them).

    dropout_mask: bool keep-mask broadcastable to (..., Hq, L, S) (e.g. from
    torch.ops.attention_ext._dropout_mask, reshaped), used with dropout_p.
    softcap: when > 0, each scaled score x becomes softcap * tanh(x / softcap) (Gemma 2's logit soft-capping).
    bias: a constant added to the scores after the soft cap and before the mask, broadcastable to
    (..., Hq, L, S) (ALiBi's -m |i + S - L - j|, built by the caller).
    """
    f64 = torch.float64
    q64, k64, v64 = q.to(f64), k.to(f64), v.to(f64)
    Hq, L, E = q.shape[-3], q.shape[-2], q.shape[-1]
    S = k.shape[-2]
    if k.shape[-3] != Hq:
        assert enable_gqa, "Hq != Hkv needs enable_gqa"
        k64, v64 = expand_kv(k64, Hq), expand_kv(v64, Hq)
    # E = 0: every score is an empty sum, 0 whatever the scale (1 / sqrt(0) would make it 0 * inf)
    sc = float(scale) if scale is not None else (1.0 / math.sqrt(E) if E > 0 else 1.0)

    scores = torch.matmul(q64, k64.transpose(-1, -2)) * sc  # (..., Hq, L, S)
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    if bias is not None:
        scores = scores + bias.detach().to(f64)
    visible = window_visibility(L, S, is_causal, window_size, device=q.device)
    visible = visible.expand(scores.shape)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            visible = visible & attn_mask
        else:
            scores = scores + attn_mask.to(f64)
            visible = visible & (attn_mask.to(f64) != -math.inf).expand(scores.shape)
    visible = visible & (scores != -math.inf)
    row_any = visible.any(dim=-1, keepdim=True)

    ninf = torch.tensor(-math.inf, dtype=f64, device=q.device)
    masked = torch.where(visible, scores, ninf)
    # rows with no visible key: softmax of zeros (finite, no NaN in forward or
    # backward), then zeroed, so they contribute exactly 0 and get 0 gradient
    safe = torch.where(row_any, masked, torch.zeros((), dtype=f64, device=q.device))
    probs = torch.softmax(safe, dim=-1) * row_any
    with torch.no_grad():
        lse = torch.logsumexp(masked, dim=-1)  # -inf for fully masked rows
        lse = torch.where(row_any.squeeze(-1), lse, ninf)

    if dropout_p > 0.0:
        assert dropout_mask is not None, "dropout_p > 0 needs the keep mask"
        probs_dropped = probs * dropout_mask.to(f64) / (1.0 - dropout_p)
    else:
        probs_dropped = probs
    out = torch.matmul(probs_dropped, v64)
    return RefResult(out=out, lse=lse, probs=probs, probs_dropped=probs_dropped, visible=visible)


def reference_grads(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grad_out: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    mask_requires_grad: bool = False,
    **kwargs,
):
    """(out, lse, dq, dk, dv, dmask) in float64 from autograd on the reference.

    q/k/v/attn_mask are copied into float64 leaves; dmask has the mask's own
    (broadcast) shape, or is None when the mask is absent, boolean or not requested.
    """
    f64 = torch.float64
    q64 = q.detach().to(f64).requires_grad_()
    k64 = k.detach().to(f64).requires_grad_()
    v64 = v.detach().to(f64).requires_grad_()
    m64 = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            m64 = attn_mask.detach()
        else:
            m64 = attn_mask.detach().to(f64).requires_grad_(mask_requires_grad)
    r = reference_attention(q64, k64, v64, m64, **kwargs)
    inputs = [q64, k64, v64] + ([m64] if (m64 is not None and m64.requires_grad) else [])
    grads = torch.autograd.grad(r.out, inputs, grad_out.detach().to(f64))
    dmask = grads[3] if len(grads) > 3 else None
    return r.out.detach(), r.lse, grads[0], grads[1], grads[2], dmask


def dropout_keep_mask(rng_state: torch.Tensor, q: torch.Tensor, S: int, dropout_p: float) -> torch.Tensor:
    """The keep-mask the forward used, from _dropout_mask, reshaped to (..., Hq, L, S)."""
    batch = math.prod(q.shape[:-3])
    Hq, L = q.shape[-3], q.shape[-2]
    m = torch.ops.attention_ext._dropout_mask(rng_state, batch, Hq, L, S, dropout_p)
    return m.reshape(*q.shape[:-3], Hq, L, S)


def flash2_rounding(q, k, v, do, bmask=None, scale=None, dropout_p=0.0, keep=None, mask_shape=None, softcap=0.0,
                    out=None):
    """(out, dq, dk, dv, dmask) in the input dtype, computed in float32 with the 16-bit roundings of PyTorch's
    CUDA FLASH backend (FlashAttention-2): P~ = P * keep / (1 - p) rounded to the input dtype before P~ V and
    P~^T dO, dS rounded before the products that use it, D = rowsum(dO o O) from the rounded output (with
    dropout it then no longer equals dP~ even in a row with a single key), the gradients rounded per head
    and again after the GQA sum. dmask (mask_shape given: a float mask's shape) is dS summed where the mask
    broadcasts. bmask: bool or float, broadcastable to the scores, or None. Without a GPU that backend
    cannot run, and PyTorch's CPU backward keeps P and dS in float32, which no tensor-core kernel does; this
    model is the yardstick of the GPU kernels' rounding. softcap > 0: the scores capped (softcap * tanh(x /
    softcap)) before the mask, and dS carries the cap's derivative 1 - tanh^2 before it is rounded. out: the
    forward output the backward is given, as PyTorch's flash backward takes it (D from it; default the model's
    own rounded output): in rows whose weights are nearly one-hot, D's rounding decides dQ's and dK's error, and
    two outputs equally close to float64 can round it quite differently."""
    dt, f = q.dtype, torch.float32
    G = q.shape[-3] // k.shape[-3]
    kk, vv = (t.detach().repeat_interleave(G, dim=-3).to(f) for t in (k, v))
    qf, dof = q.detach().to(f), do.detach().to(f)
    sc = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    s = qf @ kk.transpose(-1, -2) * sc
    if softcap > 0:
        t = torch.tanh(s / softcap)
        s = softcap * t
    if bmask is not None:
        s = s.masked_fill(~bmask, -math.inf) if bmask.dtype == torch.bool else s + bmask.detach().to(f)
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    drop = 1.0 if keep is None else keep.to(f) / (1.0 - dropout_p)
    pd = p * drop
    o = (pd.to(dt).to(f) @ vv).to(dt)
    o_d = o if out is None else out.detach()
    ds = p * ((dof @ vv.transpose(-1, -2)) * drop - (dof * o_d.to(f)).sum(-1, keepdim=True))
    if softcap > 0:
        ds = ds * (1 - t * t)
    dq = (ds.to(dt).to(f) @ kk * sc).to(dt)
    # per expanded head in the input dtype, then summed over the GQA group (as SDPA does for enable_gqa), and
    # rounded again
    dk = (ds.to(dt).to(f).transpose(-1, -2) @ qf * sc).to(dt).to(f).unflatten(-3, (-1, G)).sum(-3).to(dt)
    dv = (pd.to(dt).to(f).transpose(-1, -2) @ dof).to(dt).to(f).unflatten(-3, (-1, G)).sum(-3).to(dt)
    dmask = ds.sum_to_size(mask_shape) if mask_shape is not None else None
    return o, dq, dk, dv, dmask


def flash2_rounding_grads(q, k, v, do, bmask, scale=None):
    """(dq, dk, dv) of flash2_rounding."""
    return flash2_rounding(q, k, v, do, bmask, scale)[1:4]


# ---------------------------------------------------------------------------
# Comparison helpers: the error of the op under test against the float64
# reference must be at most twice the error of PyTorch's own implementation in
# the same dtype on the same inputs, plus a small absolute floor.

ABS_FLOOR = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 1e-3,
}


def max_abs_error(x: torch.Tensor, ref: torch.Tensor, ignore_nan: bool = False) -> float:
    """max |x - ref| over every element (in float64). Infinite entries of ref must be
    matched exactly by x (else the error is inf); NaN in x gives inf unless ignore_nan,
    in which case NaN entries of x are skipped (for the PyTorch baseline only)."""
    assert tuple(x.shape) == tuple(ref.shape), f"shape {tuple(x.shape)} != reference shape {tuple(ref.shape)}"
    x = x.detach().to(torch.float64)
    ref = ref.detach().to(torch.float64)
    keep = torch.ones_like(ref, dtype=torch.bool)
    if ignore_nan:
        keep = ~torch.isnan(x)
    inf = torch.isinf(ref)
    if bool((inf & keep).any()) and not torch.equal(x[inf & keep], ref[inf & keep]):
        return math.inf
    fin = keep & ~inf
    if not bool(fin.any()):
        return 0.0
    d = (x[fin] - ref[fin]).abs()
    if bool(torch.isnan(d).any()) or bool(torch.isinf(d).any()):
        return math.inf
    return float(d.max())


def assert_close_vs_baseline(name: str, ours: torch.Tensor, ref: torch.Tensor, baseline: Optional[torch.Tensor],
                             dtype: torch.dtype, factor: float = 2.0, floor: Optional[float] = None) -> None:
    """Asserts that ours matches the float64 reference at least about as well as
    the PyTorch baseline (same dtype, same inputs): err <= factor * err_baseline + floor."""
    assert ours is not None, f"{name}: missing (None)"
    assert tuple(ours.shape) == tuple(ref.shape), f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    nan = torch.isnan(ours.detach())
    if bool(nan.any()):
        first = tuple(int(i) for i in nan.nonzero()[0])
        raise AssertionError(f"{name}: {int(nan.sum())} of {nan.numel()} elements are NaN (first at {first}), "
                             f"shape {tuple(ours.shape)}")
    err = max_abs_error(ours, ref)
    base_err = 0.0 if baseline is None else max_abs_error(baseline, ref, ignore_nan=True)
    if not math.isfinite(base_err):
        base_err = 0.0  # a baseline that gets infinities wrong sets no tolerance
    fl = ABS_FLOOR[dtype] if floor is None else floor
    tol = factor * base_err + fl
    if not err <= tol:
        diff = (ours.detach().to(torch.float64) - ref.detach().to(torch.float64)).abs().nan_to_num(math.inf)
        idx = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape)) if diff.numel() else ()
        raise AssertionError(
            f"{name}: max abs error {err:.3g} > tolerance {tol:.3g} "
            f"(= {factor} x PyTorch's error {base_err:.3g} + {fl:g}); worst element {idx}: "
            f"got {ours.detach()[idx].item() if idx else None!r}, expected {ref[idx].item() if idx else None!r}"
        )


def assert_close_vs_baselines(name: str, ours: torch.Tensor, ref: torch.Tensor, baselines, dtype: torch.dtype,
                              floor: Optional[float] = None) -> None:
    """assert_close_vs_baseline against the baseline with the larger error among several of PyTorch's ways of
    computing the same thing in the same dtype (None entries skipped): e.g. its CPU SDPA and the model of its
    CUDA FLASH backend's roundings (flash2_rounding)."""
    errs = [(max_abs_error(b, ref, ignore_nan=True), b) for b in baselines if b is not None]
    errs = [(e, b) for e, b in errs if math.isfinite(e)]
    worst = max(errs, key=lambda eb: eb[0])[1] if errs else None
    assert_close_vs_baseline(name, ours, ref, worst, dtype, floor=floor)
