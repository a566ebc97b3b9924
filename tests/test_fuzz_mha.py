"""Randomised cases: attention_ext.MultiheadAttention against torch.nn.MultiheadAttention on the same weights.

test_mha.py enumerates every option at one size (embed_dim 16, 4 heads); here each case draws the sizes
too, from its seed: heads and head dims from 1, kdim / vdim, bias, add_bias_kv, add_zero_attn, batch_first,
batched or not, self / key-is-value / cross attention, lengths from 1, key_padding_mask and attn_mask of
every kind PyTorch takes (bool or float, 2-D or 3-D, with the is_causal hint on a causal mask),
need_weights and average_attn_weights. Outputs, weights and the gradients of every input, float mask and
parameter must match PyTorch's: in float64 to 1e-10, in float32 to PyTorch's own float32 tolerance
(2x its error against the float64 module, plus 1e-5 scaled by the magnitude). Key 0 is never masked, so no
row is fully masked (PyTorch returns NaN there; test_mha.py checks the zeros this module gives).
A failure prints the case; its id reproduces it: `pytest tests/test_fuzz_mha.py -k "mha-7"`.
ATTENTION_EXT_FUZZ_CASES=n draws n cases instead of 40.
"""
import os
import random
import warnings

import pytest
import torch

from attention_ext import MultiheadAttention

_CASES = int(os.environ.get("ATTENTION_EXT_FUZZ_CASES", "40"))


def draw(seed):
    r = random.Random(f"mha-{seed}")
    c = dict(seed=seed)
    c["heads"] = r.choice((1, 1, 2, 3, 4, 6))
    c["embed_dim"] = c["heads"] * r.choice((1, 2, 3, 8, 16, 24, 40))
    cross_dims = r.random() < 0.35
    c["kdim"] = r.randint(1, 50) if cross_dims else None
    c["vdim"] = r.randint(1, 50) if cross_dims else None
    c["bias"] = r.random() < 0.8
    c["add_bias_kv"] = r.random() < 0.25
    c["add_zero_attn"] = r.random() < 0.25
    c["batch_first"] = r.random() < 0.5
    c["batched"] = r.random() < 0.8
    c["n"] = r.randint(1, 3)
    c["L"] = r.choice((1, 2, 5, 9, 17, 33))
    c["mode"] = "cross" if cross_dims else r.choice(("self", "kv", "cross"))
    c["causal"] = r.random() < 0.25
    c["S"] = c["L"] if (c["mode"] == "self" or c["causal"]) else r.choice((1, 3, 8, 20, 41))
    c["kpm"] = r.choice((None, None, "bool", "float"))
    c["attn_mask"] = r.choice((None, "2d", "3d")) if not c["causal"] else r.choice(("2d", "3d"))
    c["mask_kind"] = r.choice(("bool", "float"))
    c["keep"] = r.choice((0.9, 0.6, 0.2))
    c["need_weights"] = r.random() < 0.6
    c["average"] = r.random() < 0.5
    c["dtype"] = torch.float64 if r.random() < 0.7 else torch.float32
    return c


def _case_str(c):
    return ", ".join(f"{k}={v}" for k, v in c.items())


def _inputs(c, g):
    dt = c["dtype"]

    def t(length, dim):
        if c["batched"]:
            shape = (c["n"], length, dim) if c["batch_first"] else (length, c["n"], dim)
        else:
            shape = (length, dim)
        return torch.randn(shape, generator=g, dtype=torch.float64).to(dt).requires_grad_()

    E, L, S = c["embed_dim"], c["L"], c["S"]
    if c["mode"] == "self":
        x = t(L, E)
        return x, x, x
    if c["mode"] == "kv":
        kv = t(S, E)
        return t(L, E), kv, kv
    return t(L, E), t(S, c["kdim"] or E), t(S, c["vdim"] or E)


def _masks(c, g):
    """(key_padding_mask, attn_mask) in nn.MultiheadAttention's convention (bool True = ignore); key 0 is
    never ignored. A causal attn_mask goes with the is_causal hint (float: 0 / -inf, no gradient)."""
    dt, L, S, n, H = c["dtype"], c["L"], c["S"], c["n"], c["heads"]

    def float_of(ignore, grad=True):
        m = torch.randn(ignore.shape, generator=g, dtype=torch.float64).to(dt) * 0.5
        m = m.masked_fill(ignore, float("-inf"))
        return m.requires_grad_() if grad else m

    kpm = None
    if c["kpm"]:
        ignore = torch.rand((n, S) if c["batched"] else (S,), generator=g) > c["keep"]
        ignore[..., 0] = False
        kpm = ignore if c["kpm"] == "bool" else float_of(ignore)
    am = None
    if c["attn_mask"]:
        lead = (n * H if c["batched"] else H,) if c["attn_mask"] == "3d" else ()
        if c["causal"]:
            ignore = torch.ones(L, S, dtype=torch.bool).triu(1).expand(*lead, L, S).clone()
        else:
            ignore = torch.rand(*lead, L, S, generator=g) > c["keep"]
            ignore[..., 0] = False
        if c["mask_kind"] == "bool":
            am = ignore
        else:
            am = float_of(ignore, grad=not c["causal"]) if not c["causal"] else \
                torch.zeros(ignore.shape, dtype=dt).masked_fill(ignore, float("-inf"))
    return kpm, am


def _run(mod, c, q, k, v, kpm, am, seed):
    out, w = mod(q, k, v, key_padding_mask=kpm, need_weights=c["need_weights"], attn_mask=am,
                 average_attn_weights=c["average"], is_causal=c["causal"])
    g = torch.Generator().manual_seed(seed)
    loss = (out * torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)).sum()
    if w is not None:
        loss = loss + (w * torch.randn(w.shape, generator=g, dtype=torch.float64).to(w.dtype)).sum()
    leaves = []
    for x in (q, k, v, kpm, am):
        if x is not None and x.requires_grad and all(x is not y for y in leaves):
            leaves.append(x)
    grads = torch.autograd.grad(loss, leaves + list(mod.parameters()), allow_unused=True)
    return out, w, grads


def _close(name, ours, theirs, ref64, dtype, where):
    assert (ours is None) == (theirs is None), f"{name}: {ours is None} vs {theirs is None}{where}"
    if ours is None:
        return
    assert ours.shape == theirs.shape, f"{name}: shape {tuple(ours.shape)} vs {tuple(theirs.shape)}{where}"
    if dtype == torch.float64:
        torch.testing.assert_close(ours, theirs, atol=1e-10, rtol=1e-8, msg=lambda m: f"{name}: {m}{where}")
        return
    # float32: against the float64 module, at most 2x PyTorch's float32 error (+ a floor scaled by magnitude)
    ref = ref64.detach()
    err = (ours.detach().double() - ref).abs().max().item()
    base = (theirs.detach().double() - ref).abs().max().item()
    tol = 2 * base + 1e-5 * max(1.0, ref.abs().max().item())
    assert err <= tol, f"{name}: error {err:.3g} > {tol:.3g} (PyTorch float32: {base:.3g}){where}"


@pytest.mark.parametrize("seed", range(_CASES), ids=[f"mha-{s}" for s in range(_CASES)])
def test_fuzz_module(seed, one_thread):
    c = draw(seed)
    kw = dict(bias=c["bias"], add_bias_kv=c["add_bias_kv"], add_zero_attn=c["add_zero_attn"],
              batch_first=c["batch_first"], kdim=c["kdim"], vdim=c["vdim"])
    torch.manual_seed(seed)
    ref = torch.nn.MultiheadAttention(c["embed_dim"], c["heads"], dtype=torch.float64, **kw)
    mods = {}
    for name, cls in (("torch", torch.nn.MultiheadAttention), ("ours", MultiheadAttention)):
        mods[name] = cls(c["embed_dim"], c["heads"], dtype=c["dtype"], **kw)
        mods[name].load_state_dict({k: v.to(c["dtype"]) for k, v in ref.state_dict().items()})
    g = torch.Generator().manual_seed(seed)
    q, k, v = _inputs(c, g)
    kpm, am = _masks(c, g)
    results = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyTorch's "mismatched mask types" deprecation warning
        for name, mod in (("ref", ref), *mods.items()):
            dt = torch.float64 if name == "ref" else c["dtype"]
            args = [x if x is None or not x.is_floating_point() else x.detach().to(dt).requires_grad_(x.requires_grad)
                    for x in (q, k, v, kpm, am)]
            if c["mode"] != "cross":  # one tensor for query, key and value (self) or for key and value (kv)
                args[1] = args[0] if c["mode"] == "self" else args[1]
                args[2] = args[1]
            results[name] = _run(mod, c, *args, seed)
    where = f"\ncase {_case_str(c)}"
    (ro, rw, rg), (to, tw, tg), (oo, ow, og) = results["ref"], results["torch"], results["ours"]
    assert not torch.isnan(to).any(), "PyTorch's module gave NaN (a fully masked row)" + where
    _close("output", oo, to, ro, c["dtype"], where)
    _close("weights", ow, tw, rw, c["dtype"], where)
    assert len(og) == len(tg)
    for i, (a, b, r) in enumerate(zip(og, tg, rg)):
        _close(f"gradient {i}", a, b, r, c["dtype"], where)


def test_draws_cover_the_options():
    """The default draws reach every option the docstring names."""
    cs = [draw(s) for s in range(40)]
    seen = {
        "kdim": any(c["kdim"] for c in cs), "bias off": any(not c["bias"] for c in cs),
        "add_bias_kv": any(c["add_bias_kv"] for c in cs), "add_zero_attn": any(c["add_zero_attn"] for c in cs),
        "batch_first": any(c["batch_first"] for c in cs), "unbatched": any(not c["batched"] for c in cs),
        "self": any(c["mode"] == "self" for c in cs), "kv": any(c["mode"] == "kv" for c in cs),
        "causal": any(c["causal"] for c in cs), "kpm bool": any(c["kpm"] == "bool" for c in cs),
        "kpm float": any(c["kpm"] == "float" for c in cs), "3d mask": any(c["attn_mask"] == "3d" for c in cs),
        "float mask": any(c["attn_mask"] and c["mask_kind"] == "float" for c in cs),
        "head dim 1": any(c["embed_dim"] == c["heads"] for c in cs),
        "weights": any(c["need_weights"] for c in cs), "float32": any(c["dtype"] == torch.float32 for c in cs),
        "L = 1": any(c["L"] == 1 for c in cs),
    }
    assert all(seen.values()), [k for k, v in seen.items() if not v]
