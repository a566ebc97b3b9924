"""Forward, log-sum-exp and gradients of attention_ext.attention against the
float64 reference (tests/reference.py), over a representative (pairwise-style)
grid of shapes, head dims, dtypes, masks, causal/window/GQA options and memory
layouts.

Tolerance: error(ours vs float64 reference) <= 2 x error(F.scaled_dot_product_attention
in the same dtype, same inputs) + a small floor (reference.ABS_FLOOR).
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import zlib
from dataclasses import dataclass
from typing import Optional, Tuple

import pytest
import torch
import torch.nn.functional as F

import attention_ext
import emu
from conftest import cuda_marks, dtype_id, emu_marks, skip_unsupported
from reference import (assert_close_vs_baseline, assert_close_vs_baselines, flash2_rounding, reference_attention,
                       reference_grads, window_visibility)

ops = torch.ops.attention_ext
f32, f16, bf16, f64 = torch.float32, torch.float16, torch.bfloat16, torch.float64


@dataclass(frozen=True)
class Case:
    name: str
    batch: Tuple[int, ...] = (2,)
    hq: int = 4
    hkv: Optional[int] = None          # None: = hq
    L: int = 17
    S: int = 23
    E: int = 64
    Ev: Optional[int] = None           # None: = E
    dtype: torch.dtype = f32
    causal: bool = False
    window: Optional[Tuple[int, int]] = None
    mask: Optional[str] = None         # None | 'bool' | 'float' (float32) | 'floatq' (query dtype)
    mask_shape: str = "LS"             # see make_mask
    mask_grad: bool = False            # float mask requires grad
    ninf: bool = False                 # float mask: some -inf entries
    finfo_min: bool = False            # float mask: some rows / entries at finfo(mask dtype).min (finite!)
    fully_masked: bool = False         # mask makes some query rows see no key
    layout: str = "contig"             # see make_qkv
    scale: Optional[float] = None

    @property
    def Hkv(self):
        return self.hq if self.hkv is None else self.hkv

    @property
    def Dv(self):
        return self.E if self.Ev is None else self.Ev

    @property
    def gqa(self):
        return self.Hkv != self.hq

    @property
    def id(self):
        return f"{self.name}-{dtype_id(self.dtype)}"


def _c(name, **kw):
    return Case(name, **kw)


# fmt: off
CASES = [
    # --- float32: shapes, head dims, lengths ---
    _c("basic"),
    _c("rank3_E40_Ev64", batch=(), hq=3, L=7, S=129, E=40, Ev=64),
    _c("batch2x3_E8", batch=(2, 3), hq=2, L=9, S=7, E=8),
    _c("batch3d_E40", batch=(2, 1, 2), hq=2, L=5, S=11, E=40, causal=True),
    _c("hd1", batch=(3,), hq=2, L=7, S=7, E=1, Ev=1),
    _c("hd1_Ev8_causal", batch=(), hq=2, L=7, S=13, E=1, Ev=8, causal=True),
    _c("hd256", batch=(1,), hq=2, L=33, S=65, E=256),
    _c("hd80_Ev96_causal", batch=(2,), hq=2, L=129, S=127, E=80, Ev=96, causal=True),
    _c("hd96_Ev40_window", batch=(1,), hq=3, L=127, S=129, E=96, Ev=40, window=(8, 0)),
    _c("hd128_Ev8_gqa_causal", batch=(2,), hq=8, hkv=2, L=65, S=65, E=128, Ev=8, causal=True),
    _c("hd256_Ev1", batch=(1,), hq=1, L=7, S=9, E=256, Ev=1),
    _c("mqa_window", batch=(2,), hq=4, hkv=1, L=31, S=40, E=64, window=(3, 5)),
    _c("decode_L1_S1000", batch=(2,), hq=4, hkv=2, L=1, S=1000, E=64),
    _c("L1000_S7", batch=(1,), hq=2, L=1000, S=7, E=8),
    _c("L1000_causal", batch=(1,), hq=2, L=1000, S=1000, E=64, causal=True),
    _c("S600_chunked_dq", batch=(1,), hq=1, L=70, S=600, E=40),
    _c("L1_S1", batch=(3,), hq=2, L=1, S=1, E=8),
    _c("scale_custom", batch=(2,), hq=2, L=13, S=17, E=32, scale=0.37),
    _c("scale_negative", batch=(2,), hq=2, L=13, S=17, E=32, scale=-0.5),
    _c("scale_large_scores", batch=(2,), hq=2, L=65, S=300, E=64, scale=10.0, causal=True),
    _c("decode_causal", batch=(2,), hq=2, L=1, S=100, E=16, causal=True),
    _c("scale_causal_gqa", batch=(1,), hq=6, hkv=3, L=17, S=17, E=16, scale=1.5, causal=True),
    # causal / window geometry
    _c("causal_L_gt_S", batch=(2,), hq=2, L=40, S=9, E=16, causal=True),
    _c("causal_L_lt_S", batch=(2,), hq=2, L=9, S=40, E=16, causal=True),
    _c("window_empty_rows", batch=(1,), hq=2, L=30, S=6, E=16, window=(1, 1), layout="poison"),
    _c("window_diag", batch=(2,), hq=2, L=19, S=19, E=8, window=(0, 0)),
    _c("window_right_only", batch=(1,), hq=2, L=19, S=25, E=8, window=(-1, 2)),
    _c("window_causal", batch=(1,), hq=2, L=300, S=300, E=32, causal=True, window=(70, 5)),
    _c("window_rows_past_S", batch=(2,), hq=2, hkv=1, L=200, S=50, E=24, window=(10, 10), layout="poison"),
    _c("window_left_only", batch=(1,), hq=2, L=129, S=129, E=64, window=(16, -1)),
    # --- masks: every broadcast shape, bool and float (with gradient) ---
    _c("bool_LS", L=127, S=129, mask="bool", mask_shape="LS"),
    _c("bool_1S", L=20, S=30, mask="bool", mask_shape="1S"),
    _c("bool_S", L=20, S=30, mask="bool", mask_shape="S"),
    _c("bool_keypad_full", batch=(3,), L=20, S=30, mask="bool", mask_shape="keypad", fully_masked=True),
    # key tiles that a key-padding mask leaves whole (skipped) next to padded ones; one value for all
    _c("bool_keypad_prefix", batch=(3,), hq=2, L=70, S=600, mask="bool", mask_shape="keypad_prefix"),
    _c("bool_11_true", L=20, S=30, mask="bool", mask_shape="11"),
    # causal masks with left padding given as tensors (row by row; rows before a pad see nothing), also read
    # through a key stride other than 1: the key range of each block is narrowed to what its rows see
    _c("bool_causal_leftpad", batch=(3,), hq=2, L=300, S=300, mask="bool", mask_shape="causal_leftpad"),
    _c("bool_causal_leftpad_t", batch=(4,), hq=1, L=200, S=260, E=32, mask="bool", mask_shape="causal_leftpad_t"),
    _c("bool_11_false", L=20, S=30, mask="bool", mask_shape="11", fully_masked=True),
    # whole key tiles hidden at both ends of a row's range, in every layout the kernels narrow by: one key
    # range per batch element (one with no key at all), read with the key stride 1, through a misaligned base
    # (stride 1) and with stride 2; one block-diagonal mask per head (packed documents, GQA groups whose heads
    # differ); a decode row (L = 1) with a key range per head
    _c("bool_keypad_mid", batch=(4,), hq=2, L=70, S=600, E=32, mask="bool", mask_shape="keypad_mid"),
    _c("bool_keypad_mid_shift", batch=(4,), hq=2, L=40, S=300, E=16, mask="bool", mask_shape="keypad_mid_shift"),
    _c("bool_keypad_mid_stride2", batch=(4,), hq=2, L=40, S=300, E=16, mask="bool",
       mask_shape="keypad_mid_stride2"),
    _c("bool_docs_gqa_causal", batch=(2,), hq=4, hkv=2, L=300, S=300, E=32, mask="bool", mask_shape="docs",
       causal=True),
    _c("bool_docs_L_lt_S", batch=(1,), hq=2, L=150, S=400, E=16, mask="bool", mask_shape="docs"),
    _c("bool_docs_decode", batch=(2,), hq=4, hkv=1, L=1, S=700, E=64, mask="bool", mask_shape="docs"),
    _c("bool_HLS", L=12, S=14, mask="bool", mask_shape="HLS"),
    _c("bool_full", L=12, S=14, mask="bool", mask_shape="full"),
    _c("bool_L1_rows", L=12, S=14, mask="bool", mask_shape="L1", fully_masked=True),
    _c("bool_B1LS_causal_gqa", batch=(2,), hq=4, hkv=2, L=21, S=21, mask="bool", mask_shape="B1LS", causal=True),
    _c("bool_noncontig", L=15, S=18, mask="bool", mask_shape="noncontig"),
    _c("bool_rank3_HLS", batch=(), hq=2, L=10, S=12, E=16, mask="bool", mask_shape="HLS", fully_masked=True),
    _c("float_LS_grad", L=129, S=127, mask="float", mask_shape="LS", mask_grad=True),
    _c("float_1S_grad", L=20, S=30, mask="float", mask_shape="1S", mask_grad=True),
    _c("float_S_grad", L=20, S=30, mask="float", mask_shape="S", mask_grad=True),
    _c("float_keypad_grad", batch=(3,), L=20, S=30, mask="float", mask_shape="keypad", mask_grad=True),
    _c("float_HLS_grad", L=12, S=14, mask="float", mask_shape="HLS", mask_grad=True),
    _c("float_full_ninf_grad", L=12, S=14, mask="float", mask_shape="full", mask_grad=True, ninf=True,
       fully_masked=True),
    _c("float_L1_grad", L=12, S=14, mask="float", mask_shape="L1", mask_grad=True),
    _c("float_B1LS_grad_batch2d", batch=(2, 2), hq=2, L=9, S=11, mask="float", mask_shape="B1LS", mask_grad=True),
    _c("float_nograd", L=33, S=35, mask="float", mask_shape="LS"),
    _c("float_finfo_min_grad", L=33, S=35, mask="float", mask_shape="HLS", mask_grad=True, finfo_min=True),
    _c("float_noncontig_grad", L=15, S=18, mask="float", mask_shape="noncontig", mask_grad=True),
    _c("float_gqa_causal_window_grad", batch=(2,), hq=4, hkv=2, L=70, S=80, E=40, mask="float",
       mask_shape="HLS", mask_grad=True, causal=True, window=(20, -1)),
    _c("float_big_S600_grad", batch=(1,), hq=2, L=65, S=600, E=16, mask="float", mask_shape="LS", mask_grad=True),
    # --- memory layouts ---
    _c("layout_blhe", batch=(2,), hq=3, L=29, S=31, E=64, layout="blhe"),
    _c("layout_blhe_rank3", batch=(), hq=3, L=29, S=31, E=40, layout="blhe", causal=True),
    _c("layout_blhe_batch2d", batch=(2, 2), hq=2, L=9, S=10, E=8, layout="blhe", mask="float",
       mask_shape="keypad", mask_grad=True),
    _c("layout_sliced", batch=(2,), hq=2, L=19, S=23, E=24, Ev=16, layout="sliced"),
    _c("layout_expand_kv", batch=(3,), hq=4, hkv=2, L=17, S=19, E=32, layout="expand_kv"),
    _c("layout_poison", batch=(2,), hq=3, L=70, S=300, E=40, Ev=24, layout="poison"),
    _c("layout_poison_causal_gqa", batch=(2,), hq=4, hkv=2, L=65, S=129, E=64, layout="poison", causal=True),
    _c("layout_poison_L_gt_S_causal", batch=(1,), hq=2, L=140, S=20, E=8, layout="poison", causal=True),
    _c("layout_poison_window_mask", batch=(2,), hq=2, L=100, S=90, E=16, layout="poison", window=(5, 30),
       mask="float", mask_shape="keypad", mask_grad=True),
    _c("layout_lastdim_t", batch=(2,), hq=2, L=17, S=19, E=16, layout="lastdim_t", mask="bool", mask_shape="LS"),
    _c("layout_sliced_gqa_window", batch=(1,), hq=4, hkv=1, L=66, S=70, E=40, Ev=24, layout="sliced",
       window=(10, 10)),
    # --- float16 / bfloat16 ---
    *[
        _c(n, dtype=dt, **kw)
        for dt in (f16, bf16)
        for n, kw in [
            ("basic", {}),
            ("rank3_hd1", dict(batch=(), hq=2, L=7, S=9, E=1, Ev=8)),
            ("hd256_causal", dict(batch=(1,), hq=2, L=65, S=65, E=256, causal=True)),
            ("hd80_Ev40_gqa", dict(batch=(2,), hq=6, hkv=2, L=33, S=47, E=80, Ev=40)),
            ("hd128_window", dict(batch=(1,), hq=2, L=129, S=127, E=128, window=(16, 4))),
            ("float_mask_grad", dict(L=31, S=33, mask="float", mask_shape="B1LS", mask_grad=True, ninf=True)),
            ("floatq_mask_grad", dict(L=31, S=33, mask="floatq", mask_shape="HLS", mask_grad=True)),
            ("bool_keypad_full", dict(batch=(3,), L=20, S=30, mask="bool", mask_shape="keypad", fully_masked=True)),
            ("layout_blhe_mask_L1", dict(batch=(2,), hq=2, L=17, S=19, E=96, layout="blhe", mask="floatq",
                                         mask_shape="L1", mask_grad=True)),
            ("batch2d_causal", dict(batch=(2, 2), hq=2, L=9, S=12, E=64, causal=True)),
            ("layout_expand_kv", dict(batch=(2,), hq=2, L=20, S=20, E=64, layout="expand_kv")),
            ("hd8_odd_lengths", dict(batch=(3,), hq=2, L=127, S=129, E=8)),
            ("hd40_sliced_causal_window", dict(batch=(1,), hq=4, hkv=2, L=70, S=66, E=40, layout="sliced",
                                               causal=True, window=(9, -1))),
            ("bool_L1_rows_hd64", dict(batch=(2,), hq=2, L=12, S=14, mask="bool", mask_shape="L1",
                                       fully_masked=True)),
            ("window_empty_rows", dict(batch=(1,), hq=2, L=30, S=6, E=16, window=(1, 1), layout="poison")),
            ("floatq_noncontig_finfo_min", dict(L=15, S=18, E=32, mask="floatq", mask_shape="noncontig",
                                                finfo_min=True)),
            ("scale_large_scores", dict(batch=(1,), hq=2, L=70, S=90, E=64, scale=8.0)),
        ]
    ],
    _c("L1000_causal", dtype=bf16, batch=(1,), hq=2, L=1000, S=1000, E=64, causal=True),
    _c("decode_L1_S1000", dtype=f16, batch=(2,), hq=2, L=1, S=1000, E=128),
    # --- short query rows (L <= 4: the CPU forward reads K and V in place, RowTile, a GQA group's heads in one
    # block), every dtype: head dims off the 16-lane vectors and past 128, strided rows, masks with gradient,
    # causal / window, GQA ---
    *[
        _c(n, dtype=dt, **kw)
        for dt in (f32, f16, bf16)
        for n, kw in [
            ("rows_L1_gqa_S1000", dict(batch=(2,), hq=4, hkv=2, L=1, S=1000, E=64)),
            ("rows_L3_hd200_Ev40_blhe_mask", dict(batch=(2,), hq=4, hkv=2, L=3, S=530, E=200, Ev=40, layout="blhe",
                                                  mask="float", mask_shape="HLS", mask_grad=True)),
            ("rows_L4_Ev136_sliced_window", dict(batch=(1,), hq=2, L=4, S=300, E=24, Ev=136, layout="sliced",
                                                 causal=True, window=(100, 0))),
            ("rows_L2_keypad_poison", dict(batch=(3,), hq=2, L=2, S=70, E=20, Ev=12, mask="bool",
                                           mask_shape="keypad", layout="poison", fully_masked=True)),
            # four heads of a group x 4 rows: one block of 16 rows (fp32 / fp16), with a mask per head
            ("rows_L4_gqa4_docs", dict(batch=(2,), hq=8, hkv=2, L=4, S=400, E=64, mask="bool", mask_shape="docs")),
        ]
    ],
    # --- float64 (CPU only) ---
    _c("basic", dtype=f64),
    _c("rank3_causal_float_mask_grad", dtype=f64, batch=(), hq=2, L=13, S=17, E=8, causal=True, mask="floatq",
       mask_shape="LS", mask_grad=True),
    _c("window_empty_rows", dtype=f64, batch=(1,), hq=2, L=30, S=6, E=16, window=(1, 1), layout="poison"),
    _c("gqa_window_bool", dtype=f64, batch=(2,), hq=4, hkv=2, L=30, S=35, E=40, Ev=24, window=(4, 2),
       mask="bool", mask_shape="keypad", fully_masked=True),
    _c("layout_blhe_float32_mask", dtype=f64, batch=(2,), hq=2, L=19, S=20, E=16, layout="blhe", mask="float",
       mask_shape="1S", mask_grad=True),
]
# fmt: on


def _seed(case: Case) -> int:
    return zlib.crc32(case.id.encode())


# --------------------------------------------------------------------------------------------
# inputs

def make_qkv(case: Case, device):
    """Leaf base tensors (q_base, k_base, v_base) and a function mapping any (dtype
    converted) copy of them to the (q, k, v) views the op sees."""
    b, Hq, Hkv, L, S, E, Ev = case.batch, case.hq, case.Hkv, case.L, case.S, case.E, case.Dv
    dt = case.dtype
    nb = len(b)

    def rn(*shape):
        return torch.randn(*shape, dtype=dt, device=device)

    if case.layout == "contig":
        bases = (rn(*b, Hq, L, E), rn(*b, Hkv, S, E), rn(*b, Hkv, S, Ev))
        views = lambda q, k, v: (q, k, v)  # noqa: E731
    elif case.layout == "blhe":  # (..., L, H, E) storage seen as (..., H, L, E)
        bases = (rn(*b, L, Hq, E), rn(*b, S, Hkv, E), rn(*b, S, Hkv, Ev))
        views = lambda q, k, v: tuple(t.transpose(-3, -2) for t in (q, k, v))  # noqa: E731
    elif case.layout == "sliced":  # every other row, offset columns
        bases = (rn(*b, Hq, 2 * L, E + 3), rn(*b, Hkv, 2 * S, E + 5), rn(*b, Hkv, 2 * S + 1, Ev + 2))
        views = lambda q, k, v: (q[..., 1::2, 2:2 + E], k[..., ::2, 5:], v[..., 1::2, 1:1 + Ev])  # noqa: E731
    elif case.layout == "expand_kv":  # K/V broadcast over batch and heads (stride 0)
        bases = (rn(*b, Hq, L, E), rn(*([1] * nb), 1, S, E), rn(*([1] * nb), 1, S, Ev))
        views = lambda q, k, v: (q, k.expand(*b, Hkv, S, E), v.expand(*b, Hkv, S, Ev))  # noqa: E731
    elif case.layout == "poison":  # views into larger buffers whose other rows/columns are NaN:
        # any read outside the (L, E) / (S, E) / (S, Ev) windows turns the result into NaN
        def padded(*shape):
            t = torch.full((*shape[:-2], shape[-2] + 5, shape[-1] + 3), math.nan, dtype=dt, device=device)
            t[..., : shape[-2], : shape[-1]] = rn(*shape)
            return t

        bases = (padded(*b, Hq, L, E), padded(*b, Hkv, S, E), padded(*b, Hkv, S, Ev))
        views = lambda q, k, v: (q[..., :L, :E], k[..., :S, :E], v[..., :S, :Ev])  # noqa: E731
    elif case.layout == "lastdim_t":  # last dim not unit-stride
        bases = (rn(*b, Hq, E, L), rn(*b, Hkv, E, S), rn(*b, Hkv, Ev, S))
        views = lambda q, k, v: tuple(t.transpose(-1, -2) for t in (q, k, v))  # noqa: E731
    else:
        raise ValueError(case.layout)
    return bases, views


def mask_shape(case: Case):
    b, Hq, L, S = case.batch, case.hq, case.L, case.S
    return {
        "LS": (L, S),
        "1S": (1, S),
        "S": (S,),
        "keypad": (*b, 1, 1, S),
        "keypad_prefix": (*b, 1, 1, S),
        "keypad_mid": (*b, 1, 1, S),
        "keypad_mid_shift": (*b, 1, 1, S),
        "keypad_mid_stride2": (*b, 1, 1, S),
        "docs": (*b, Hq, L, S),
        "11": (1, 1),
        "causal_leftpad": (*b, 1, L, S),
        "causal_leftpad_t": (*b, 1, L, S),
        "HLS": (Hq, L, S),
        "full": (*b, Hq, L, S),
        "L1": (L, 1),
        "B1LS": (*b, 1, L, S),
        "noncontig": (*b, Hq, L, S),
    }[case.mask_shape]


def make_mask(case: Case, device):
    if case.mask is None:
        return None
    shape = mask_shape(case)
    if case.mask_shape == "noncontig":  # stored as (..., S, L), seen transposed
        store = (*shape[:-2], shape[-1], shape[-2])
    else:
        store = shape
    if case.mask == "bool":
        m = torch.rand(*store, device=device) < 0.7
        if case.mask_shape in ("L1",):
            m[:] = True
        if case.mask_shape == "11":  # one value for every query and key
            m[:] = not case.fully_masked
        if case.mask_shape.startswith("causal_leftpad"):  # Hugging Face's mask for a left-padded batch
            i, j = torch.arange(case.L, device=device)[:, None], torch.arange(case.S, device=device)[None, :]
            pads = [0, case.S // 6, case.S - 10, 1][:shape[0]]
            m = torch.stack([(j <= i + case.S - case.L) & (j >= pad) for pad in pads]).unsqueeze(1)
            if case.mask_shape.endswith("_t"):  # the same values stored transposed: key stride L, not 1
                m = m.transpose(-1, -2).contiguous().transpose(-1, -2)
        if case.mask_shape == "keypad_prefix":  # padding: batch element i sees its first S - i S / (2 B) keys
            m = m.reshape(-1, S := case.S)
            for i in range(m.shape[0]):
                m[i] = torch.arange(S, device=device) < S - i * S // (2 * m.shape[0])
            m = m.reshape(store)
        if case.mask_shape.startswith("keypad_mid"):  # batch element i sees keys [a_i, b_i); element 0 none
            m = m.reshape(-1, S := case.S)
            j = torch.arange(S, device=device)
            for i in range(1, m.shape[0]):
                a, e = sorted(torch.randint(0, S + 1, (2,)).tolist())
                m[i] = (j >= a) & (j < max(e, a + 1))
            m[0] = False
            m = m.reshape(store)
            if case.mask_shape.endswith("_shift"):  # the same values one byte into a buffer: base not 16-aligned
                buf = torch.zeros(*store[:-1], S + 1, dtype=torch.bool, device=device)
                buf[..., 1:] = m
                m = buf[..., 1:]
            elif case.mask_shape.endswith("_stride2"):
                buf = torch.zeros(*store[:-1], 2 * S, dtype=torch.bool, device=device)
                buf[..., ::2] = m
                m = buf[..., ::2]
        if case.mask_shape == "docs":  # block diagonal per (batch, head): each row sees the keys of its document
            m = m.reshape(-1, case.L, case.S)
            for x in range(m.shape[0]):
                kcut = sorted(torch.randint(1, case.S, (3,)).tolist())
                qcut = [c * case.L // case.S for c in kcut]
                doc_q = torch.bucketize(torch.arange(case.L, device=device), torch.tensor(qcut, device=device),
                                        right=True)
                doc_k = torch.bucketize(torch.arange(case.S, device=device), torch.tensor(kcut, device=device),
                                        right=True)
                m[x] = doc_q[:, None] == doc_k[None, :]
            m = m.reshape(store)
    else:
        mdt = f32 if case.mask == "float" else case.dtype
        m = torch.randn(*store, device=device).to(mdt)
        if case.ninf:
            m = m.masked_fill(torch.rand(*store, device=device) < 0.2, -math.inf)
        if case.finfo_min:  # HF-style "masking" with the most negative finite value: still visible
            lo = torch.finfo(mdt).min
            m = m.masked_fill(torch.rand(*store, device=device) < 0.3, lo)
    if case.mask_shape == "noncontig":
        m = m.transpose(-1, -2)
    if case.finfo_min:  # a whole query row at finfo.min: uniform attention, not a dead row
        m[..., 1, :] = torch.finfo(m.dtype).min
    if case.fully_masked:
        off = False if m.dtype == torch.bool else -math.inf
        m = m.clone()
        if case.mask_shape == "keypad":
            m[0] = off                     # every key of batch 0 masked
        elif m.dim() >= 2 and m.shape[-2] > 1:
            m[..., 0, :] = off             # first query row
            m[..., m.shape[-2] // 2, :] = off
    if case.mask_grad:
        assert m.is_floating_point()
        m = m.detach().requires_grad_()
    return m


def sdpa_mask(case: Case, mask, device):
    """The same visibility as one mask for F.scaled_dot_product_attention (no windows there)."""
    if mask is not None and mask.dim() < 2:  # SDPA wants at least (L, S)
        mask = mask.expand(case.L, case.S)
    vis = None
    if case.causal or case.window is not None:
        vis = window_visibility(case.L, case.S, case.causal, case.window, device=device)
    if mask is None:
        return vis
    if vis is None:
        return mask
    if mask.dtype == torch.bool:
        return mask & vis
    bias = torch.zeros(case.L, case.S, dtype=mask.dtype, device=device).masked_fill(~vis, -math.inf)
    return mask + bias


# --------------------------------------------------------------------------------------------
# the check

def check_forward_weights(case: Case, fw_op, qkv, mask, r, sout, slse, scores, averaged_only=False):
    """_attention_forward_weights (what MultiheadAttention's need_weights=True runs) on the same inputs:
    output and log-sum-exp as close to the reference as _attention_forward's must be, and weights (per head, and their mean
    over the heads) against the float64 reference's probabilities, with PyTorch's softmax of the same
    float32 scores, rounded to the dtype, as the error baseline (averaged_only: the mean only)."""
    dt = case.dtype
    base = torch.softmax(scores, dim=-1).to(dt)  # NaN on dead rows: no tolerance from there
    for avg in ((True,) if averaged_only else (False, True)):
        out_w, lse_w, _, w = fw_op(*qkv, mask, 0.0, case.causal, case.scale, case.gqa, list(case.window or (-1, -1)),
                                   avg)
        # (not bit for bit the same as _attention_forward's: with the head mean, or very long rows, the CPU
        # runs fewer query rows per product)
        assert_close_vs_baseline("output (with weights)", out_w, r.out, sout, dt)
        assert_close_vs_baseline("logsumexp (with weights)", lse_w, r.lse, slse, dt)
        assert torch.equal(torch.isneginf(lse_w), torch.isneginf(r.lse))
        ref, bw = r.probs, base
        if avg:  # the baseline averages its rounded per-head weights in float32 and rounds once
            ref, bw = r.probs.mean(dim=-3), base.float().mean(dim=-3).to(dt)
        assert w.dtype == dt and w.shape == ref.shape, (w.dtype, tuple(w.shape), tuple(ref.shape))
        assert w.is_contiguous()
        assert_close_vs_baseline("weights (head mean)" if avg else "weights", w, ref, bw, dt)

def run_case(case: Case, device: str):
    """device: 'cpu', 'cuda', or 'emu' (the CUDA kernels on the CPU emulator, CPU tensors)."""
    attn, fwd_op, fw_op = attention_ext.attention, ops._attention_forward, ops._attention_forward_weights
    emulated = device == "emu"
    if emulated:
        attn, fwd_op, fw_op, device = emu.attention, emu.ops._attention_forward, emu.ops._attention_forward_weights, "cpu"
    torch.manual_seed(_seed(case))
    bases, views = make_qkv(case, device)
    mask = make_mask(case, device)
    opts = dict(is_causal=case.causal, scale=case.scale, enable_gqa=case.gqa, window_size=case.window)

    # ours
    leaves = [t.detach().clone().requires_grad_() for t in bases]
    q, k, v = views(*leaves)
    mask_ours = mask.detach().clone().requires_grad_() if case.mask_grad else mask
    out = attn(q, k, v, mask_ours, **opts)
    assert out.shape == (*case.batch, case.hq, case.L, case.Dv)
    assert out.dtype == case.dtype and out.device.type == device
    if case.layout == "blhe":  # no hidden copy: the output is laid out like the query
        assert out.transpose(-3, -2).is_contiguous(), out.stride()
    grad_out = torch.randn(out.shape, dtype=case.dtype, device=device)
    out.backward(grad_out)

    # logsumexp (and the forward op agrees with the differentiable one)
    with torch.no_grad():
        q0, k0, v0 = views(*bases)
        m0 = None if mask is None else mask.detach()
        out_f, lse, rng = fwd_op(q0, k0, v0, m0, 0.0, case.causal, case.scale, case.gqa,
                                                 list(case.window or (-1, -1)))
    acc = f64 if case.dtype == f64 else f32
    assert lse.shape == (*case.batch, case.hq, case.L) and lse.dtype == acc
    assert rng.shape == (2,) and rng.dtype == torch.int64
    torch.testing.assert_close(out_f, out.detach(), rtol=0, atol=0, equal_nan=True,
                               msg="_attention_forward and attention disagree")

    # float64 reference (gradients wrt the base leaves, through the same views)
    refs = [t.detach().to(f64).requires_grad_() for t in bases]
    rq, rk, rv = views(*refs)
    rmask = None
    if mask is not None:
        rmask = mask.detach() if mask.dtype == torch.bool else mask.detach().to(f64).requires_grad_(case.mask_grad)
    r = reference_attention(rq, rk, rv, rmask, is_causal=case.causal, scale=case.scale, enable_gqa=case.gqa,
                            window_size=case.window)
    rin = refs + ([rmask] if case.mask_grad else [])
    rgrads = torch.autograd.grad(r.out, rin, grad_out.to(f64))

    # PyTorch's own SDPA in the same dtype, on the same inputs: the error baseline
    sleaves = [t.detach().clone().requires_grad_() for t in bases]
    sq, sk, sv = views(*sleaves)
    smask_leaf = mask.detach().clone().requires_grad_() if case.mask_grad else mask
    smask = sdpa_mask(case, smask_leaf, device)
    sout = F.scaled_dot_product_attention(sq, sk, sv, attn_mask=smask, scale=case.scale, enable_gqa=case.gqa)
    sin = sleaves + ([smask_leaf] if case.mask_grad else [])
    sgrads = torch.autograd.grad(sout, sin, grad_out)
    # baseline log-sum-exp: scores from a matmul in the input dtype, logsumexp in float32
    with torch.no_grad():
        sk_e = sk.repeat_interleave(case.hq // case.Hkv, dim=-3) if case.gqa else sk
        sc = case.scale if case.scale is not None else 1.0 / math.sqrt(case.E)
        scores = torch.matmul(sq, sk_e.transpose(-1, -2)).to(acc) * sc
        vis = r.visible
        if mask is not None and mask.dtype != torch.bool:
            scores = scores + mask.detach().to(acc)
        slse = torch.logsumexp(scores.masked_fill(~vis, -math.inf), dim=-1)

    dt = case.dtype
    # the CUDA kernels (emulated or not) in 16 bits: also PyTorch's CUDA FLASH backend, through the model of its
    # roundings (P and dS rounded before the products; PyTorch's CPU backward keeps them in float32, and on
    # other draws of the inputs its error is well under half of what any tensor-core kernel gets), with its own
    # output and given ours, as test_fuzz does
    models = []
    if (emulated or device == "cuda") and dt in (torch.float16, torch.bfloat16):
        mq, mk, mv = views(*[t.detach() for t in bases])
        own = flash2_rounding(mq, mk, mv, grad_out, smask, case.scale)
        given = flash2_rounding(mq, mk, mv, grad_out, smask, case.scale, out=out.detach())

        def to_bases(grads):  # gradients of the views as gradients of the bases (the views' adjoint, in float32)
            zs = [torch.zeros(t.shape, dtype=f32, device=t.device, requires_grad=True) for t in bases]
            adj = torch.autograd.grad(sum((w * g.to(f32)).sum() for w, g in zip(views(*zs), grads)), zs)
            return [a.to(dt) for a in adj]

        models = [(own[0], *to_bases(own[1:4])), (None, *to_bases(given[1:4]))]
    assert_close_vs_baselines("output", out, r.out, [sout] + [m[0] for m in models], dt)
    assert_close_vs_baseline("logsumexp", lse, r.lse, slse, dt)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(r.lse)), "rows with lse = -inf differ from the reference"
    for i, (name, leaf, rg, sg) in enumerate(zip(("dq", "dk", "dv"), leaves, rgrads, sgrads)):
        assert leaf.grad is not None, f"{name} missing"
        assert leaf.grad.dtype == dt and leaf.grad.shape == leaf.shape
        assert_close_vs_baselines(name, leaf.grad, rg, [sg] + [m[1 + i] for m in models], dt)
    if case.mask_grad:
        g = mask_ours.grad
        assert g is not None, "the float mask requires grad but got no gradient"
        assert g.shape == mask_ours.shape and g.dtype == mask_ours.dtype, (g.shape, g.dtype)
        # (against SDPA alone: a float32 mask's gradient is float32, where the model's dS from the rounded
        # output would set a tolerance hundreds of times ours)
        assert_close_vs_baseline("dmask", g, rgrads[3], sgrads[3], dt)

    check_forward_weights(case, fw_op, (q0, k0, v0), m0, r, sout, slse, scores.masked_fill(~vis, -math.inf),
                          averaged_only=emulated)

    # rows that see no key: exactly 0 output and gradient, -inf lse
    dead = ~r.visible.any(-1)  # (..., Hq, L)
    if bool(dead.any()):
        assert torch.all(out.detach()[dead] == 0)
        assert torch.all(torch.isneginf(lse[dead]))
    return out, lse


def _params():
    params = []
    for c in CASES:
        params.append(pytest.param(c, "cpu", id=f"cpu-{c.id}"))
        if c.dtype != f64:
            params.append(pytest.param(c, "cuda", id=f"cuda-{c.id}", marks=cuda_marks()))
            params.append(pytest.param(c, "emu", id=f"emu-{c.id}", marks=emu_marks()))
            if c.dtype in (f16, bf16):
                params.append(pytest.param(c, "emu90", id=f"emu90-{c.id}", marks=emu_marks()))
    return params


def _reaches_hopper(case: Case) -> bool:
    """Cases the Hopper kernels must take on an sm_90 device (a subset of those they cover: no mask, head dims
    of their buckets, the plain layout)."""
    return case.mask is None and case.E == case.Dv and case.E in (64, 128, 256) and case.layout == "contig"


@pytest.mark.parametrize("case,device", _params())
def test_attention_vs_reference(case, device, monkeypatch):
    """'emu90': the emulator as an sm_90 device (ATTENTION_EXT_EMU_ARCH=90): the half-precision cases through
    the Hopper kernels where they cover them (through the sm80 kernels otherwise, as on an H100)."""
    skip_unsupported(device, case.dtype)
    if device != "emu90":
        run_case(case, device)
        return
    monkeypatch.setenv("ATTENTION_EXT_EMU_ARCH", "90")
    with attention_ext.debug.kernel_log() as lines:
        run_case(case, "emu")
    if _reaches_hopper(case):
        # the forward may split the keys instead (flash-decoding: few query blocks, plan_fwd_splits)
        assert any(ln.startswith("emu forward: sm90a") or "keys split" in ln for ln in lines), lines
        assert any(ln.startswith("emu backward: sm90a") for ln in lines), lines


# Flash-decoding on the CUDA kernels: the key tiles of each (batch, head, query block) shared among CTAs
# whose partial outputs (O / l, m, l in fp32) are merged by a second kernel (csrc/cuda/flash_fwd.cuh,
# aux_kernels.cu's fwd_combine_kernel). The planner splits by itself only where a grid leaves SMs idle (the
# long-S grid cases above do, on the emulator's 132 SMs); ATTENTION_EXT_FWD_SPLITS forces a count: 3 (uneven
# shares) or 64 (more shares than key tiles, so some are empty). Output, lse, gradients (from the merged
# lse) and the weights op, on decode rows with per-head masks, causal blocks whose key ranges differ,
# windows, additive masks with gradient, fully masked rows and large scores.
SPLIT_CASES = {"bool_docs_decode-f32": 3, "window_causal-f32": 64, "float_big_S600_grad-f32": 3,
               "bool_keypad_full-f32": 64, "scale_large_scores-f32": 3, "scale_large_scores-bf16": 64,
               "hd40_sliced_causal_window-f16": 3, "rows_L2_keypad_poison-bf16": 64}


@pytest.mark.parametrize("case,device,splits", [
    pytest.param(c, d, SPLIT_CASES[c.id], id=f"{d}-{c.id}-{SPLIT_CASES[c.id]}", marks=marks)
    for c in CASES if c.id in SPLIT_CASES for d, marks in (("emu", emu_marks()), ("cuda", cuda_marks()))])
def test_split_keys_forward(case, device, splits, monkeypatch):
    assert sum(c.id in SPLIT_CASES for c in CASES) == len(SPLIT_CASES)
    skip_unsupported(device, case.dtype)
    monkeypatch.setenv("ATTENTION_EXT_FWD_SPLITS", str(splits))
    with attention_ext.debug.kernel_log() as lines:
        run_case(case, device)
    assert any(f"keys split {splits} ways" in ln for ln in lines), lines


@pytest.mark.parametrize("device", [pytest.param("emu", marks=emu_marks()), pytest.param("cuda", marks=cuda_marks())])
@pytest.mark.parametrize("value", ["3x", "0", "2000"])
def test_split_keys_bad_setting_is_an_error(device, value, monkeypatch):
    monkeypatch.setenv("ATTENTION_EXT_FWD_SPLITS", value)
    fn = emu.attention if device == "emu" else attention_ext.attention
    dev = "cpu" if device == "emu" else "cuda"
    q = torch.randn(1, 2, 1, 16, device=dev)
    with pytest.raises(ValueError, match=rf"ATTENTION_EXT_FWD_SPLITS must be a number of key shares in 1\.\.1024, got '{value}'"):
        fn(q, q, q)


# Decoding with grouped-query attention on the CUDA kernels: the G query heads of a key / value head run as G
# rows of one head (csrc/cuda/workspace.h, pack_gqa_rows), so each K / V tile is read once per group. Output
# and lse against the float64 reference (2x PyTorch's CPU error in the same dtype) for the layouts the stride
# folding must get right (a (B, 1, H, E) query seen through transpose, a key-padding mask broadcast over heads,
# a per-head float mask, MQA), with split keys (flash-decoding after packing) and, as an sm_90 device, the
# Hopper kernel; what must not pack (dropout, causal, windows, two query rows) runs as before; and
# ATTENTION_EXT_PACK_GQA=0 turns it off.
PACK_CASES = {
    # id: (dtype, Hq, Hkv, S, E, mask, query layout, forced key splits, emulated arch)
    "f16_G4_none": (f16, 8, 2, 300, 64, None, "contig", None, None),
    "bf16_G4_keypad_transposed": (bf16, 8, 2, 300, 64, "keypad", "bhle_from_blhe", None, None),
    "f32_G3_perhead_float": (f32, 6, 2, 129, 40, "perhead", "contig", None, None),
    "bf16_mqa_G8_split": (bf16, 8, 1, 700, 128, "keypad", "contig", 5, None),
    "f16_G4_hopper": (f16, 8, 2, 300, 128, None, "contig", None, "90"),
}


def _decode_inputs(dtype, Hq, Hkv, S, E, mask, layout, device, seed=3):
    g = torch.Generator().manual_seed(seed)
    B = 2
    q = torch.randn(B, 1, Hq, E, generator=g).transpose(1, 2) if layout == "bhle_from_blhe" else \
        torch.randn(B, Hq, 1, E, generator=g)
    k, v = torch.randn(B, Hkv, S, E, generator=g), torch.randn(B, Hkv, S, E, generator=g)
    m = None
    if mask == "keypad":
        m = torch.arange(S)[None, None, None, :] < torch.tensor([S, S // 3])[:, None, None, None]  # (B, 1, 1, S)
    elif mask == "perhead":
        m = torch.randn(B, Hq, 1, S, generator=g)
    q, k, v = (t.to(device=device, dtype=dtype) for t in (q, k, v))
    return q, k, v, (m.to(device) if m is not None else None)


def _forward_op(device):
    """(_attention_forward of the emulated or the real CUDA kernels, the device of their tensors)."""
    return (emu.ops._attention_forward, "cpu") if device == "emu" else (ops._attention_forward, "cuda")


def _decode_check(q, k, v, m, out, lse):
    r = reference_attention(q.cpu(), k.cpu(), v.cpu(), m.cpu() if m is not None else None, enable_gqa=True)
    bq, bk, bv = (t.cpu() for t in (q, k, v))
    sout = F.scaled_dot_product_attention(bq, bk, bv, attn_mask=m.cpu() if m is not None else None, enable_gqa=True)
    assert_close_vs_baseline("output", out.cpu(), r.out, sout, q.dtype)
    assert (lse.cpu().double() - r.lse).abs().max() < 1e-4


@pytest.mark.parametrize("device", [pytest.param("emu", marks=emu_marks()), pytest.param("cuda", marks=cuda_marks())])
@pytest.mark.parametrize("cid", list(PACK_CASES))
def test_gqa_decode_heads_packed(device, cid, monkeypatch):
    dtype, Hq, Hkv, S, E, mask, layout, splits, arch = PACK_CASES[cid]
    if arch is not None:
        if device != "emu":
            pytest.skip("the emulated sm_90 device only")
        monkeypatch.setenv("ATTENTION_EXT_EMU_ARCH", arch)
    if splits is not None:
        monkeypatch.setenv("ATTENTION_EXT_FWD_SPLITS", str(splits))
    fwd, dev = _forward_op(device)
    q, k, v, m = _decode_inputs(dtype, Hq, Hkv, S, E, mask, layout, dev)
    results = {}
    for pack in ("1", "0"):
        monkeypatch.setenv("ATTENTION_EXT_PACK_GQA", pack)
        with attention_ext.debug.kernel_log() as lines:
            out, lse, _ = fwd(q, k, v, m, 0.0, False, None, True, [-1, -1])
        assert out.shape == (2, Hq, 1, E) and lse.shape == (2, Hq, 1)
        packed = [ln for ln in lines if f"GQA heads packed {Hq // Hkv} per CTA" in ln]
        assert bool(packed) == (pack == "1"), lines
        if splits is not None:
            assert any(f"keys split {splits} ways" in ln for ln in lines), lines
        if arch == "90" and pack == "1":
            assert any(ln.startswith("emu forward: sm90a") for ln in lines), lines
        _decode_check(q, k, v, m, out, lse)
        results[pack] = out
    if layout == "bhle_from_blhe":  # the output follows the query's layout
        assert results["1"].transpose(1, 2).is_contiguous(), results["1"].stride()


@pytest.mark.parametrize("device", [pytest.param("emu", marks=emu_marks()), pytest.param("cuda", marks=cuda_marks())])
@pytest.mark.parametrize("what", ["dropout", "causal", "window", "two_rows", "alibi"])
def test_gqa_heads_not_packed(device, what):
    """Row-dependent semantics keep one CTA per query head (dropout's streams, causal / window bounds, rows, ALiBi's
    slope of the query head)."""
    fwd, dev = _forward_op(device)
    q, k, v, _ = _decode_inputs(f16, 8, 2, 200, 64, None, "contig", dev)
    if what == "two_rows":
        q = torch.cat([q, q.flip(0)], dim=2)
    kw = dict(dropout_p=0.3 if what == "dropout" else 0.0, is_causal=what == "causal",
              window=[50, 0] if what == "window" else [-1, -1])
    slopes = torch.rand(8, generator=torch.Generator().manual_seed(5)) * 0.2 + 0.01 if what == "alibi" else None
    with attention_ext.debug.kernel_log() as lines:
        out, lse, _ = fwd(q, k, v, None, kw["dropout_p"], kw["is_causal"], None, True, kw["window"], 0.0, slopes)
    assert lines and not any("GQA heads packed" in ln for ln in lines), lines
    if what == "alibi":  # the bias -m_h (S - 1 - j) as a float mask, in float64
        S = k.shape[-2]
        bias = -slopes.double()[:, None, None] * (S - 1 - torch.arange(S, dtype=torch.float64))
        want = F.scaled_dot_product_attention(q.cpu().double(), k.cpu().double(), v.cpu().double(), attn_mask=bias,
                                              enable_gqa=True)
        assert (out.cpu().double() - want).abs().max() < 5e-3
    elif what != "dropout":
        r = reference_attention(q.cpu(), k.cpu(), v.cpu(), None, enable_gqa=True, is_causal=kw["is_causal"],
                                window_size=kw["window"] if what == "window" else None)
        assert (out.cpu().double() - r.out).abs().max() < 5e-3


@pytest.mark.parametrize("device", [pytest.param("emu", marks=emu_marks()), pytest.param("cuda", marks=cuda_marks())])
def test_pack_gqa_bad_setting_is_an_error(device, monkeypatch):
    monkeypatch.setenv("ATTENTION_EXT_PACK_GQA", "yes")
    fwd, dev = _forward_op(device)
    q, k, v, _ = _decode_inputs(f16, 4, 2, 20, 16, None, "contig", dev)
    with pytest.raises(ValueError, match="ATTENTION_EXT_PACK_GQA must be 0 or 1, got 'yes'"):
        fwd(q, k, v, None, 0.0, False, None, True, [-1, -1])


def test_case_ids_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), [i for i in ids if ids.count(i) > 1]


# --------------------------------------------------------------------------------------------
# layout promises and misc semantics

@pytest.mark.parametrize("dtype", [f32, bf16], ids=dtype_id)
def test_output_layout_follows_query(device, dtype):
    """A (B, L, H, E) query seen through transpose(1, 2) gives an output laid out
    the same way (no hidden copy back to (B, H, L, E))."""
    torch.manual_seed(1)
    B, L, H, E, Ev = 2, 33, 4, 64, 40
    q = torch.randn(B, L, H, E, dtype=dtype, device=device).transpose(1, 2)
    k = torch.randn(B, L, H, E, dtype=dtype, device=device).transpose(1, 2)
    v = torch.randn(B, L, H, Ev, dtype=dtype, device=device).transpose(1, 2)
    out = attention_ext.attention(q, k, v)
    assert out.shape == (B, H, L, Ev)
    assert out.transpose(1, 2).is_contiguous(), out.stride()
    out_f, lse, _ = ops._attention_forward(q, k, v, None, 0.0, False, None, False, [-1, -1])
    assert out_f.transpose(1, 2).is_contiguous(), out_f.stride()
    assert lse.is_contiguous() and lse.shape == (B, H, L)
    # a contiguous query gives a contiguous output
    out_c = attention_ext.attention(q.contiguous(), k, v)
    assert out_c.is_contiguous()
    torch.testing.assert_close(out_c, out, rtol=0, atol=0)


def test_gradients_layout(device):
    """Gradients of strided views are laid out like their inputs where the input is dense."""
    torch.manual_seed(2)
    q = torch.randn(2, 17, 3, 16, device=device).transpose(1, 2).detach().requires_grad_()
    k = torch.randn(2, 19, 3, 16, device=device).transpose(1, 2).detach().requires_grad_()
    v = torch.randn(2, 19, 3, 8, device=device).transpose(1, 2).detach().requires_grad_()
    attention_ext.attention(q, k, v).sum().backward()
    for t in (q, k, v):
        assert t.grad.shape == t.shape and t.grad.stride() == t.stride(), (t.grad.stride(), t.stride())


@pytest.mark.parametrize("Ev", [1, 8])
def test_expanded_grad_output(device, Ev):
    """out.sum().backward() hands the backward a stride-0 (expanded) grad_output."""
    torch.manual_seed(12)
    q = torch.randn(2, 3, 17, 16, device=device, requires_grad=True)
    k = torch.randn(2, 3, 19, 16, device=device, requires_grad=True)
    v = torch.randn(2, 3, 19, Ev, device=device, requires_grad=True)
    attention_ext.attention(q, k, v, is_causal=True).sum().backward()
    _, _, rdq, rdk, rdv, _ = reference_grads(q, k, v, torch.ones(2, 3, 17, Ev), is_causal=True)
    for name, a, b in [("dq", q.grad, rdq), ("dk", k.grad, rdk), ("dv", v.grad, rdv)]:
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")


def check_score_jumps(device, dtype):
    """Scores that jump far above everything a row has seen: past its first 16 keys, and from one key block
    (512 keys on the CPU) to the next, by 4 to 200, per row, with rows whose first keys are masked (-inf)
    or at finfo.min. The CPU's bf16 forward exponentiates against a reference (the running max, or the max
    of the first 16 scores) and keeps it unless a tile exceeds it by more than 8; both outcomes and the
    redo must give the output, lse and gradients of the reference. Also run on every CPU bf16 path."""
    torch.manual_seed(21)
    L, S, E = 24, 1200, 32
    q, k, v = (torch.randn(2, 2, n, E, device=device).to(dtype) for n in (L, S, S))
    m = torch.zeros(2, 1, L, S, device=device)
    jump = torch.linspace(4, 200, L, device=device)[:, None]
    m[..., 16:] += jump / 2                      # above the first 16 keys
    m[..., 512:] += jump / 2                     # and again in the next key block
    m[..., 1100:] -= jump                        # then lower again
    m[0, 0, 3, :40] = -math.inf                  # a row whose first 16 keys are masked
    m = m.to(dtype)
    m[1, 0, 5, :20] = torch.finfo(dtype).min     # ... or at the most negative finite value
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    mask = m
    out = attention_ext.attention(q, k, v, mask)
    _, lse, _ = ops._attention_forward(q.detach(), k.detach(), v.detach(), mask.detach(), 0.0, False, None, False,
                                       [-1, -1])
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    rq, rk, rv = (t.detach().double().requires_grad_() for t in (q, k, v))
    r = reference_attention(rq, rk, rv, mask.detach().double())
    rgrads = torch.autograd.grad(r.out, (rq, rk, rv), do.double())
    sq, sk, sv = (t.detach().clone().requires_grad_() for t in (q, k, v))
    sout = F.scaled_dot_product_attention(sq, sk, sv, attn_mask=mask.detach())
    sgrads = torch.autograd.grad(sout, (sq, sk, sv), do)
    slse = torch.logsumexp((sq.detach() @ sk.detach().transpose(-1, -2)).float() * E ** -0.5 + m.float(), dim=-1)
    assert_close_vs_baseline("output", out, r.out, sout, dtype)
    assert_close_vs_baseline("logsumexp", lse, r.lse, slse, dtype)
    for name, g, rg, sg in zip(("dq", "dk", "dv"), grads, rgrads, sgrads):
        assert_close_vs_baseline(name, g, rg, sg, dtype)


@pytest.mark.parametrize("dtype", [f32, bf16, f16], ids=dtype_id)
def test_score_jumps(device, dtype):
    check_score_jumps(device, dtype)


@pytest.mark.parametrize("dtype", [f32, bf16], ids=dtype_id)
def test_finfo_min_row_is_uniform_not_dead(device, dtype):
    """A query row whose additive mask is finfo.min everywhere (HF-style masks) is NOT a
    dead row: every score is the same huge negative number, so the softmax is uniform
    (1/S), in the forward, in attention_probs and in the gradients (which must match the
    float64 reference of the same forward)."""
    torch.manual_seed(13)
    S = 35
    q = torch.randn(1, 2, 4, 16, dtype=dtype, device=device, requires_grad=True)
    k = torch.randn(1, 2, S, 16, dtype=dtype, device=device, requires_grad=True)
    v = torch.randn(1, 2, S, 8, dtype=dtype, device=device, requires_grad=True)
    m = torch.zeros(4, S, device=device)
    m[1] = torch.finfo(torch.float32).min
    m.requires_grad_()
    out = attention_ext.attention(q, k, v, m)
    torch.testing.assert_close(out[:, :, 1].float(), v.detach().float().mean(-2), rtol=2e-2, atol=2e-2)
    _, lse, rng = ops._attention_forward(q.detach(), k.detach(), v.detach(), m.detach(), 0.0, False, None, False, [-1, -1])
    p = ops.attention_probs(q.detach(), k.detach(), m.detach(), lse, rng)
    torch.testing.assert_close(p[:, :, 1].float(), torch.full((1, 2, S), 1.0 / S, device=device), rtol=1e-2, atol=1e-3,
                               msg=lambda s: f"attention_probs of the finfo.min row: {s}")
    g = torch.randn(out.shape, dtype=dtype, device=device)
    out.backward(g)
    _, _, rdq, rdk, rdv, rdm = reference_grads(q, k, v, g, m, mask_requires_grad=True)
    tol = 1e-4 if dtype == f32 else 5e-2
    for name, a, b in [("dq", q.grad, rdq), ("dk", k.grad, rdk), ("dv", v.grad, rdv), ("dmask", m.grad, rdm)]:
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol, msg=lambda s: f"{name}: {s}")


def test_mask_dtype_equivalence(device):
    """A bool mask and the equivalent float mask (0 / -inf) give the same result;
    a float32 mask and the same values in bf16 give the same result for bf16 queries."""
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 2, 13, 16, device=device) for _ in range(3))
    mb = torch.rand(13, 13, device=device) < 0.6
    mb[:, 0] = True
    mf = torch.zeros(13, 13, device=device).masked_fill(~mb, -math.inf)
    o1 = attention_ext.attention(q, k, v, mb)
    o2 = attention_ext.attention(q, k, v, mf)
    torch.testing.assert_close(o1, o2, rtol=1e-6, atol=1e-6)
    qb, kb, vb = (t.to(bf16) for t in (q, k, v))
    m = torch.randn(13, 13, device=device).to(bf16)
    torch.testing.assert_close(attention_ext.attention(qb, kb, vb, m), attention_ext.attention(qb, kb, vb, m.float()),
                               rtol=0, atol=0)


def test_causal_equals_mask_and_window_equals_mask(device):
    """is_causal / window_size give exactly what the equivalent boolean mask gives."""
    torch.manual_seed(4)
    q, k, v = (torch.randn(1, 2, 37, 16, device=device) for _ in range(3))
    for causal, window in [(True, None), (False, (5, 2)), (True, (7, 3)), (False, (0, -1))]:
        vis = window_visibility(37, 37, causal, window, device=device)
        o1 = attention_ext.attention(q, k, v, is_causal=causal, window_size=window)
        o2 = attention_ext.attention(q, k, v, vis)
        torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-6, msg=f"causal={causal} window={window}")


def test_default_scale_and_explicit_scale(device):
    torch.manual_seed(5)
    q, k, v = (torch.randn(2, 2, 9, 24, device=device) for _ in range(3))
    o1 = attention_ext.attention(q, k, v)
    o2 = attention_ext.attention(q, k, v, scale=1.0 / math.sqrt(24))
    torch.testing.assert_close(o1, o2, rtol=0, atol=0)
    o3 = attention_ext.attention(q, k, v, scale=0.0)  # uniform average of v
    torch.testing.assert_close(o3, v.mean(-2, keepdim=True).expand_as(o3), rtol=1e-5, atol=1e-6)


def test_gqa_equals_repeated_kv(device):
    """enable_gqa is repeat_interleave of the kv heads (query head h uses kv head h // group)."""
    torch.manual_seed(6)
    q = torch.randn(2, 6, 11, 16, device=device)
    k, v = (torch.randn(2, 2, 13, 16, device=device) for _ in range(2))
    o1 = attention_ext.attention(q, k, v, enable_gqa=True)
    o2 = attention_ext.attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1))
    torch.testing.assert_close(o1, o2, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [f32, f16, bf16], ids=dtype_id)
def test_fully_masked_everything(device, dtype):
    """Every row masked: output 0, lse -inf, every gradient exactly 0, no NaN."""
    torch.manual_seed(7)
    q, k, v = (torch.randn(2, 2, 9, 8, dtype=dtype, device=device, requires_grad=True) for _ in range(3))
    m = torch.full((9, 9), -math.inf, device=device, requires_grad=True)
    out = attention_ext.attention(q, k, v, m)
    _, lse, _ = ops._attention_forward(q.detach(), k.detach(), v.detach(), m.detach(), 0.0, False, None, False, [-1, -1])
    out.backward(torch.randn_like(out))
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))
    for t in (q, k, v, m):
        assert torch.all(t.grad == 0), t.grad
    mb = torch.zeros(9, 9, dtype=torch.bool, device=device)
    out = attention_ext.attention(q, k, v, mb)
    assert torch.all(out == 0)


def check_hidden_key_tiles(attn, device, dtype, layout, E=32, kind="bool"):
    """Key tiles that a boolean mask (kind 'bool': False) or an additive one ('additive': -inf, finite values
    elsewhere, with a gradient) hides from every row of a query block are skipped, not computed and
    masked: with NaN in the keys and values of every key more than 128 keys away from each mask row's
    visible span (every kernel's key tile is at most 128 keys wide, or starts at the first visible key as
    the CPU's 512-key tiles do), the output and dq are still the float64 reference's, and dk / dv are exactly
    0 there. PyTorch computes every tile: a NaN value times a zero weight is NaN, so this is no comparison
    with PyTorch. Layouts: a key-padding mask (B, 1, 1, S) (one row for all queries), the same mask
    materialised per query row (B, 1, L, S) (narrowed tile by tile from both ends), and a decode row
    (L = 1) with one key range per head."""
    torch.manual_seed(21)
    B, H, S = 3, 2, 1700
    L = 1 if layout == "decode_per_head" else 150
    spans = [(0, 100), (600, 1000), (1100, 1537)] + [(30, 40), (530, 1030), (1536, 1700)]  # visible [lo, hi)
    nb = B * H if layout == "decode_per_head" else B
    j = torch.arange(S, device=device)
    rows = torch.stack([(j >= lo) & (j < hi) for lo, hi in spans[:nb]])
    mask = rows.view(B, H, 1, S) if layout == "decode_per_head" else rows.view(B, 1, 1, S)
    if layout == "keypad_rows":
        mask = mask.expand(B, 1, L, S).contiguous()
    if kind == "additive":  # float32 masks for float32 inputs, the inputs' dtype otherwise (2-byte -inf)
        mdt = f32 if dtype == f32 else dtype
        mask = torch.where(mask, 0.5 * torch.randn(mask.shape, device=device), -math.inf).to(mdt).requires_grad_()
    q = torch.randn(B, H, L, E, dtype=dtype, device=device)
    k, v = (torch.randn(B, H, S, E, dtype=dtype, device=device) for _ in range(2))
    g = torch.randn(B, H, L, E, dtype=dtype, device=device)
    r = reference_attention(q.double(), k.double(), v.double(), mask.detach())
    _, _, rdq, rdk, rdv, rdm = reference_grads(q, k, v, g, mask.detach(), mask_requires_grad=kind == "additive")
    far = torch.zeros(B, H, S, dtype=torch.bool, device=device)
    for x, (lo, hi) in enumerate(spans[:nb]):
        b_, h_ = (x // H, x % H) if layout == "decode_per_head" else (x, slice(None))
        far[b_, h_] = (j < lo - 128) | (j >= hi + 128)
    assert far.any(dim=-1).all()
    kp, vp = k.clone(), v.clone()
    kp[far], vp[far] = math.nan, math.nan
    kp, vp, qq = (t.requires_grad_() for t in (kp, vp, q.clone()))
    out = attn(qq, kp, vp, mask)
    out.backward(g)
    tol = {f64: 1e-10, f32: 1e-4, f16: 1e-2, bf16: 3e-2}[dtype]
    checks = [("output", out, r.out), ("dq", qq.grad, rdq), ("dk", kp.grad, rdk), ("dv", vp.grad, rdv)]
    if kind == "additive":
        assert mask.grad is not None and mask.grad.shape == mask.shape
        checks.append(("dmask", mask.grad, rdm))
    for name, a, ref in checks:
        assert torch.isfinite(a).all(), f"{name}: NaN from keys the mask hides (their tiles were computed)"
        torch.testing.assert_close(a.double(), ref, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")
    assert (kp.grad[far] == 0).all() and (vp.grad[far] == 0).all()


@pytest.mark.parametrize("layout", ["keypad", "keypad_rows", "decode_per_head"])
@pytest.mark.parametrize("dtype", [f32, bf16], ids=dtype_id)
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda_marks()),
                                    pytest.param("emu", marks=emu_marks())])
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_hidden_key_tiles_are_not_read(device, dtype, layout, kind):
    """check_hidden_key_tiles on each backend (the Hopper kernels: test_hopper_emu.py)."""
    attn = emu.attention if device == "emu" else attention_ext.attention
    check_hidden_key_tiles(attn, "cpu" if device == "emu" else device, dtype, layout, kind=kind)


@pytest.mark.parametrize("dtype", [f16, f64], ids=dtype_id)
def test_hidden_key_tiles_additive_mask_dtypes(dtype):
    """The CPU narrowing by -inf for the other mask element sizes: float16 (0xFC00) and float64 masks."""
    check_hidden_key_tiles(attention_ext.attention, "cpu", dtype, "keypad_rows", kind="additive")


@pytest.mark.parametrize("where", ["q_row", "k_row", "k_row_causal", "v_col"])
@pytest.mark.parametrize("dtype", [f32, f16, bf16], ids=dtype_id)
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda_marks()),
                                    pytest.param("emu", marks=emu_marks())])
def test_nan_inputs_propagate_like_pytorch(device, dtype, where):
    """A NaN in an input gives NaN exactly where PyTorch's SDPA (float64, math) gives it, in the output and in
    every gradient, and finite values everywhere else. A row whose scores are all NaN (a NaN in its query)
    used to look like a fully masked row to the CPU kernels: output 0 and lse -inf, silently. With a causal
    mask, a NaN key reaches only the rows that see it (the reference runs each row on its visible keys;
    PyTorch's math backend adds -inf to the masked NaN scores and spreads NaN to every row, its CPU flash
    kernel to whole key blocks of the gradients); there the gradients may have more NaN in the NaN's head
    (see below)."""
    attn = emu.attention if device == "emu" else attention_ext.attention
    device = "cpu" if device == "emu" else device
    torch.manual_seed(11)
    # two key blocks of the CPU forward (512 keys each): a NaN row maximum is carried from block to block
    q, k, v = (torch.randn(1, 2, n, 64, dtype=dtype, device=device) for n in (37, 600, 600))
    causal = where == "k_row_causal"
    if where == "q_row":
        q[0, 1, 3, 7] = float("nan")
    elif where in ("k_row", "k_row_causal"):
        k[0, 0, 20, 5] = float("nan")
    else:
        v[0, 1, 100, 9] = float("nan")
    do = torch.randn(1, 2, 37, 64, dtype=dtype, device=device)
    ours = [t.clone().requires_grad_() for t in (q, k, v)]
    out = attn(*ours, is_causal=causal)
    out.backward(do)
    ref = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        if causal:  # row by row over its visible keys: the math backend adds -inf to a masked NaN score (NaN)
            rout = torch.cat([F.scaled_dot_product_attention(ref[0][..., i:i + 1, :], ref[1][..., :i + 1, :],
                                                             ref[2][..., :i + 1, :]) for i in range(37)], dim=-2)
        else:
            rout = F.scaled_dot_product_attention(*ref)
    rout.backward(do.cpu().double())
    for name, got, want in [("out", out, rout)] + [(n, a.grad, b.grad) for n, a, b in zip("qkv", ours, ref)]:
        got = got.detach().cpu()
        want_nan = want.isnan()
        if causal and name != "out":
            # The gradients are computed over whole tiles, where a masked key still meets the NaN: dQ = dS K
            # (0 x NaN in the NaN's column for the rows that do not see it), and the rows that are NaN give
            # NaN probabilities on their masked keys as well. PyTorch's CPU flash kernel spreads such NaNs
            # further (whole key blocks of dK and dV). So here: NaN wherever the reference has NaN, and in
            # the head of the NaN only.
            extra = got.isnan() & ~want_nan
            assert extra[:, 1].sum() == 0, f"d{name}: NaN in the head without one"
            want_nan = want_nan | extra
        assert torch.equal(got.isnan(), want_nan), (
            f"{name}: NaN at {got.isnan().sum().item()} places, PyTorch at {want.isnan().sum().item()}")
        assert got.isfinite().sum() == (~want_nan).sum(), f"{name}: inf where PyTorch is finite"
    if where == "q_row":  # the rows without a NaN are still right
        keep = torch.ones(37, dtype=torch.bool)
        keep[3] = False
        base = F.scaled_dot_product_attention(q, k, v)  # PyTorch in the same dtype sets the tolerance
        assert_close_vs_baseline("out, rows without NaN", out[0, 1, keep].detach().cpu(), rout[0, 1, keep].detach(),
                                 base[0, 1, keep].cpu(), dtype)


def test_empty_and_zero_length(device):
    """Zero-sized batch / lengths give empty (or zero) results without error."""
    for qs, ks in [((0, 2, 5, 8), (0, 2, 7, 8)), ((2, 2, 0, 8), (2, 2, 7, 8))]:
        q = torch.randn(*qs, device=device, requires_grad=True)
        k = torch.randn(*ks, device=device, requires_grad=True)
        v = torch.randn(*ks, device=device, requires_grad=True)
        out = attention_ext.attention(q, k, v)
        assert out.shape == qs
        out.sum().backward()
        assert k.grad.shape == ks and torch.all(k.grad == 0)
    # S = 0: no query row sees any key
    q = torch.randn(2, 2, 5, 8, device=device, requires_grad=True)
    k = torch.randn(2, 2, 0, 8, device=device, requires_grad=True)
    v = torch.randn(2, 2, 0, 4, device=device, requires_grad=True)
    out = attention_ext.attention(q, k, v)
    assert out.shape == (2, 2, 5, 4) and torch.all(out == 0)
    out.sum().backward()
    assert torch.all(q.grad == 0)


_ZERO_HEADS = """
import torch, attention_ext
q = torch.randn(2, 0, 5, 8, device='{device}', requires_grad=True)
k = torch.randn(2, 0, 7, 8, device='{device}', requires_grad=True)
v = torch.randn(2, 0, 7, 8, device='{device}', requires_grad=True)
out = attention_ext.attention(q, k, v)
assert out.shape == (2, 0, 5, 8), out.shape
out.sum().backward()
assert k.grad.shape == k.shape
print("OK")
"""


def test_zero_heads_does_not_crash(device):
    """Zero heads (empty tensors) must not crash the process (run in a subprocess:
    an integer division by zero would kill the test runner)."""
    r = subprocess.run([sys.executable, "-c", _ZERO_HEADS.format(device=device)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "OK" in r.stdout, (
        f"return code {r.returncode} (negative = killed by signal {-r.returncode}); stderr tail:\n{r.stderr[-2000:]}")


def test_deterministic(device):
    """Same inputs, same outputs and gradients, bit for bit (no atomics)."""
    torch.manual_seed(8)
    q = torch.randn(1, 1, 100, 32, device=device, requires_grad=True)
    k = torch.randn(1, 1, 700, 32, device=device, requires_grad=True)
    v = torch.randn(1, 1, 700, 32, device=device, requires_grad=True)
    res = []
    for _ in range(2):
        out = attention_ext.attention(q, k, v, is_causal=True)
        g = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        res.append((out, *g))
    for a, b in zip(*res):
        assert torch.equal(a, b)


def test_attention_probs_match_reference(device):
    """attention_probs without dropout = the reference softmax probabilities (0 for dead rows)."""
    torch.manual_seed(9)
    q = torch.randn(2, 4, 21, 16, device=device)
    k = torch.randn(2, 2, 300, 16, device=device)
    m = torch.randn(2, 1, 21, 300, device=device)
    m[0, 0, 3] = -math.inf
    _, lse, rng = ops._attention_forward(q, k, k[..., :8], m, 0.0, True, None, True, [40, -1])
    p = ops.attention_probs(q, k, m, lse, rng, 0.0, True, None, True, [40, -1])
    assert p.shape == (2, 4, 21, 300) and p.dtype == f32
    r = reference_attention(q, k, k[..., :8], m, is_causal=True, enable_gqa=True, window_size=(40, -1))
    torch.testing.assert_close(p.double(), r.probs, rtol=1e-5, atol=1e-6)
    assert torch.all(p[0, :, 3] == 0)
    # the Python wrapper (rng_state optional without dropout)
    p2 = attention_ext.attention_probs(q, k, lse, attn_mask=m, is_causal=True, enable_gqa=True, window_size=(40, -1))
    assert torch.equal(p, p2)


@pytest.mark.parametrize("dtype", [f16, bf16, f64], ids=dtype_id)
def test_attention_probs_dtypes(device, dtype):
    skip_unsupported(device, dtype)
    torch.manual_seed(10)
    q = torch.randn(3, 2, 7, 40, dtype=dtype, device=device)
    k = torch.randn(3, 2, 9, 40, dtype=dtype, device=device)
    _, lse, rng = ops._attention_forward(q, k, k, None, 0.0, False, None, False, [-1, -1])
    p = ops.attention_probs(q, k, None, lse, rng)
    assert p.dtype == dtype and p.shape == (3, 2, 7, 9)
    r = reference_attention(q, k, k)
    tol = {f16: 2e-3, bf16: 1e-2, f64: 1e-12}[dtype]
    torch.testing.assert_close(p.double(), r.probs, rtol=tol, atol=tol)


def check_probs_bf16_masked(device):
    """bf16 attention_probs over several key tiles (forward blocks of 512 keys) with a causal boolean mask
    with left padding (key ranges narrowed per query block, the rest written as zeros): the reference
    softmax rounded to bf16, zeros where masked. Also run on every CPU bf16 path (test_cpu_bf16_paths)."""
    torch.manual_seed(12)
    L = S = 700
    q, k = (torch.randn(2, 2, L, 64, dtype=bf16, device=device) for _ in range(2))
    i, j = torch.arange(L, device=device)[:, None], torch.arange(S, device=device)[None, :]
    m = torch.stack([(j <= i) & (j >= pad) for pad in (0, 520)]).unsqueeze(1)
    _, lse, rng = ops._attention_forward(q, k, k, m, 0.0, False, None, False, [-1, -1])
    p = ops.attention_probs(q, k, m, lse, rng)
    r = reference_attention(q, k, k, m).probs
    assert p.dtype == bf16 and p.shape == (2, 2, L, S)
    assert torch.all(p[~m.expand(2, 2, L, S)] == 0)
    torch.testing.assert_close(p.double(), r, rtol=1e-2, atol=1e-2)


def test_attention_probs_bf16_masked(device):
    check_probs_bf16_masked(device)


@pytest.mark.parametrize(
    "L,S,causal,window",
    [(15, 17, True, None), (30, 6, False, (1, 1)), (200, 50, False, (10, 10)), (70, 300, True, (100, 0))],
    ids=["causal", "window_empty_rows", "window_rows_past_S", "window_causal_S300"],
)
def test_backward_op_direct(device, L, S, causal, window):
    """_attention_backward called directly with the float64 reference's output and
    log-sum-exp (so it is checked independently of the forward kernel) = reference
    gradients; dmask is the empty (0,) tensor unless requested for a float mask.
    K/V are views into NaN-padded buffers: reading past S poisons the result."""
    torch.manual_seed(11)
    w = list(window or (-1, -1))
    q = torch.randn(2, 2, L, 16, device=device)
    kb = torch.full((2, 2, S + 7, 16), math.nan, device=device)
    vb = torch.full((2, 2, S + 7, 12), math.nan, device=device)
    kb[:, :, :S] = torch.randn(2, 2, S, 16, device=device)
    vb[:, :, :S] = torch.randn(2, 2, S, 12, device=device)
    k, v = kb[:, :, :S], vb[:, :, :S]
    m = torch.randn(1, S, device=device)
    g = torch.randn(2, 2, L, 12, device=device)
    rout, rlse, rdq, rdk, rdv, rdm = reference_grads(q, k, v, g, m, mask_requires_grad=True, is_causal=causal,
                                                     window_size=window)
    out, lse = rout.float(), rlse.float()
    rng = torch.zeros(2, dtype=torch.int64, device=device)
    dq, dk, dv, dm = ops._attention_backward(g, q, k, v, m, out, lse, rng, 0.0, causal, None, False, w, True)
    for name, a, b in [("dq", dq, rdq), ("dk", dk, rdk), ("dv", dv, rdv), ("dmask", dm, rdm)]:
        assert not torch.isnan(a).any(), f"{name} has NaN"
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5, msg=lambda msg: f"{name}: {msg}")
    assert dm.shape == m.shape
    _, _, _, dm0 = ops._attention_backward(g, q, k, v, m, out, lse, rng, 0.0, causal, None, False, w, False)
    assert dm0.shape == (0,)
    mb = m > 0
    _, _, _, dmb = ops._attention_backward(g, q, k, v, mb, out, lse, rng, 0.0, causal, None, False, w, True)
    assert dmb.shape == (0,)


def _half_ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Half the spacing of `dtype` at |x| (float64 x): the error of rounding x correctly to dtype."""
    bits = {bf16: 7, f16: 10}[dtype]
    _, e = torch.frexp(x.abs())  # |x| = m 2^e, m in [0.5, 1)
    ulp = torch.ldexp(torch.ones_like(x), e - 1 - bits)
    return 0.5 * ulp.clamp_min(torch.finfo(dtype).smallest_normal * 2.0 ** -bits)


@pytest.mark.parametrize("dtype", [bf16, f16], ids=dtype_id)
@pytest.mark.parametrize(
    "L,S,E,Ev,hq,hkv,causal,mask",
    [(9, 13, 1, 8, 2, 2, False, None), (64, 96, 32, 32, 4, 2, False, "keypad"), (128, 128, 64, 64, 2, 1, True, None),
     (40, 70, 16, 24, 2, 2, False, "float")],
    ids=["head_dim_1", "gqa_keypad", "causal_S128", "float_mask"],
)
def test_short_rows_backward_rounds_correctly(dtype, L, S, E, Ev, hq, hkv, causal, mask):
    """CPU backward in half precision, rows of at most one key tile (128 keys): dq, dk and dv are the
    float64 reference gradients rounded to the dtype, up to fp32 accumulation error. Here D = sum_j P dP
    comes from the tile; dot(dO, O) with O rounded to the dtype put dk an ulp off (1.5 half-ulps)."""
    torch.manual_seed(L * 1000 + S + E)
    q = torch.randn(3, hq, L, E).to(dtype).requires_grad_()
    k = torch.randn(3, hkv, S, E).to(dtype).requires_grad_()
    v = torch.randn(3, hkv, S, Ev).to(dtype).requires_grad_()
    if mask == "keypad":
        m = torch.arange(S).view(1, 1, 1, S) < torch.tensor([S, S - 20, 7]).view(3, 1, 1, 1)
    elif mask == "float":
        m = torch.randn(3, 1, L, S).to(dtype)
    else:
        m = None
    out = attention_ext.attention(q, k, v, m, is_causal=causal, enable_gqa=hq != hkv)
    g = torch.randn(out.shape).to(dtype)
    grads = torch.autograd.grad(out, (q, k, v), g)
    r64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    rm = m if m is None or m.dtype == torch.bool else m.double()
    r = reference_attention(*r64, rm, is_causal=causal, enable_gqa=hq != hkv)
    rgrads = torch.autograd.grad(r.out, r64, g.double())
    for name, a, b in zip(("dq", "dk", "dv"), grads, rgrads):
        excess = (a.double() - b).abs() - _half_ulp(b, dtype)
        worst = float(excess.max())
        assert worst <= 1e-4 * float(b.abs().max()), (
            f"{name}: {worst:.3g} beyond correct rounding at {tuple(int(i) for i in torch.unravel_index(excess.argmax(), excess.shape))}")


def test_kernel_log_cpu(capfd, monkeypatch):
    """ATTENTION_EXT_LOG_KERNEL=1: each CPU call names its kernel path and tile blocks."""
    monkeypatch.setenv("ATTENTION_EXT_LOG_KERNEL", "1")
    q = torch.randn(1, 2, 30, 16, requires_grad=True)
    out = attention_ext.attention(q, q, q, is_causal=True)
    out.sum().backward()
    err = capfd.readouterr().err
    assert "attention_ext: cpu forward: flash kernel, fp32 (BLAS tiles), blocks " in err, err
    assert "attention_ext: cpu backward: flash kernel, fp32 (BLAS tiles), blocks " in err, err
    monkeypatch.delenv("ATTENTION_EXT_LOG_KERNEL")
    attention_ext.attention(q, q, q)
    assert "attention_ext:" not in capfd.readouterr().err


def test_debug_kernel_log(capfd, monkeypatch):
    """attention_ext.debug.kernel_log(): the log lines of the block's calls, in order, handed back
    rather than printed; the environment variable is restored afterwards (unset, or its old value)."""
    monkeypatch.delenv("ATTENTION_EXT_LOG_KERNEL", raising=False)
    q = torch.randn(1, 2, 30, 16, requires_grad=True)
    with attention_ext.debug.kernel_log() as lines:
        attention_ext.attention(q, q, q, is_causal=True).sum().backward()
        attention_ext.attention(q.detach().double(), q.detach().double(), q.detach().double())
    assert len(lines) == 3, lines
    assert lines[0].startswith("cpu forward: flash kernel, fp32 (BLAS tiles), blocks "), lines
    assert lines[1].startswith("cpu backward: flash kernel, fp32 (BLAS tiles), blocks "), lines
    assert lines[2].startswith("cpu forward: flash kernel, fp64 (BLAS tiles), blocks "), lines
    assert "ATTENTION_EXT_LOG_KERNEL" not in os.environ
    attention_ext.attention(q, q, q)
    assert "attention_ext:" not in capfd.readouterr().err
    monkeypatch.setenv("ATTENTION_EXT_LOG_KERNEL", "0")
    with attention_ext.debug.kernel_log() as lines:
        attention_ext.attention(q, q, q)
    assert len(lines) == 1 and os.environ["ATTENTION_EXT_LOG_KERNEL"] == "0"
