"""The CUDA kernels on the CPU: attention through torch.ops.attention_ext_emu.

attention_ext/_C_emu*.so holds the kernels of csrc/cuda compiled as host C++
against the SIMT emulator of csrc/cuda/emu/ (every CUDA thread a fiber; mma,
ldmatrix, cp.async and shuffles emulated lane by lane). Its ops have the
schemas of attention_ext's internal ops and take CPU tensors; `attention`
below wires them into autograd the way csrc/ops.cpp does for the real ops.
"""
import os

import torch

from attention_ext import _loader

LOADED = _loader.load_emu()
# The build skips the emulator only when asked to (ATTENTION_EXT_EMU=0) or when
# the CUDA headers are missing; the tests say which.
SKIP_REASON = None if LOADED else (
    "attention_ext/_C_emu*.so was not built (ATTENTION_EXT_EMU=0, or no CUDA toolkit headers at build time)")
ops = torch.ops.attention_ext_emu if LOADED else None


def backend_ops(backend, monkeypatch):
    """The internal ops of a test backend: "cpu" / "cuda" the extension's own, "emu80" / "emu90" the emulated CUDA
    kernels with that architecture (ATTENTION_EXT_EMU_ARCH, through monkeypatch)."""
    if backend.startswith("emu"):
        monkeypatch.setenv("ATTENTION_EXT_EMU_ARCH", backend[3:])
        return ops
    return torch.ops.attention_ext


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, dropout_p, is_causal, scale, enable_gqa, window, softcap, alibi_slopes):
        out, lse, rng = ops._attention_forward(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa, window,
                                               softcap, alibi_slopes)
        ctx.save_for_backward(q, k, v, mask, out, lse, rng, alibi_slopes)
        ctx.args = (dropout_p, is_causal, scale, enable_gqa, window)
        ctx.softcap = softcap
        ctx.mask_grad = mask is not None and mask.requires_grad
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, mask, out, lse, rng, alibi_slopes = ctx.saved_tensors
        dropout_p, is_causal, scale, enable_gqa, window = ctx.args
        dq, dk, dv, dm = ops._attention_backward(grad_out, q, k, v, mask, out, lse, rng, dropout_p, is_causal, scale,
                                                 enable_gqa, window, ctx.mask_grad, None, ctx.softcap, alibi_slopes)
        return dq, dk, dv, (dm if ctx.mask_grad else None), None, None, None, None, None, None, None


def attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
              window_size=None, softcap=0.0, alibi_slopes=None):
    """attention_ext.attention, computed by the emulated CUDA kernels."""
    window = list(window_size) if window_size is not None else [-1, -1]
    return _Attention.apply(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, window, softcap,
                            alibi_slopes)


class schedule:
    """Context manager: the emulator's fiber order and cp.async landing time
    (ATTENTION_EXT_EMU_ORDER / ATTENTION_EXT_EMU_CPASYNC, read at every launch)."""

    def __init__(self, order="forward", cp_async="late"):
        self.new = {"ATTENTION_EXT_EMU_ORDER": order, "ATTENTION_EXT_EMU_CPASYNC": cp_async}

    def __enter__(self):
        self.old = {k: os.environ.get(k) for k in self.new}
        os.environ.update(self.new)
        return self

    def __exit__(self, *exc):
        for k, v in self.old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
