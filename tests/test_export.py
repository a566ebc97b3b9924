"""torch.export and AOTInductor: the deployment path of a model that uses attention_ext.

The exported program keeps attention_ext's ops (the differentiable `attention` in the training IR, the
internal forward after run_decompositions), runs with dynamic batch and length, and compiles ahead of time
with AOTInductor into a package that calls the same kernels; every result equals eager's.
"""
import os

import pytest
import torch

import attention_ext

pytestmark = pytest.mark.usefixtures("one_thread")


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = attention_ext.MultiheadAttention(32, 4, batch_first=True)

    def forward(self, x, pad):
        return self.mha(x, x, x, key_padding_mask=pad, need_weights=False)[0]


class Varlen(torch.nn.Module):
    def forward(self, q, k, v, cu):
        return attention_ext.attention_varlen(q, k, v, cu, cu, is_causal=True)


def _inputs(B, L, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, 32, generator=g)
    pad = torch.zeros(B, L, dtype=torch.bool)
    pad[-1, L - 3:] = True
    return x, pad


def _attention_targets(gm):
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function" and "attention_ext" in str(n.target)]


def test_export_static_dynamic_and_decomposed():
    torch.manual_seed(0)
    m = Block().eval()
    x, pad = _inputs(2, 10)
    ep = torch.export.export(m, (x, pad))
    assert _attention_targets(ep.graph_module) == ["attention_ext.attention.default"]
    torch.testing.assert_close(ep.module()(x, pad), m(x, pad), rtol=0, atol=0)
    B, L = torch.export.Dim("B"), torch.export.Dim("L", min=4, max=512)
    ep = torch.export.export(m, (x, pad), dynamic_shapes={"x": {0: B, 1: L}, "pad": {0: B, 1: L}})
    for shape in ((3, 17), (1, 64)):
        x2, pad2 = _inputs(*shape, seed=1)
        torch.testing.assert_close(ep.module()(x2, pad2), m(x2, pad2), rtol=0, atol=0)
    dec = ep.run_decompositions()
    assert _attention_targets(dec.graph_module) == ["attention_ext._attention_forward.default"]
    x3, pad3 = _inputs(2, 33, seed=2)
    torch.testing.assert_close(dec.module()(x3, pad3), m(x3, pad3), rtol=0, atol=0)


def test_export_varlen():
    q = torch.randn(20, 2, 8)
    cu = torch.tensor([0, 5, 20], dtype=torch.int32)
    ep = torch.export.export(Varlen(), (q, q, q, cu))
    assert _attention_targets(ep.graph_module) == ["attention_ext.attention_varlen.default"]
    torch.testing.assert_close(ep.module()(q, q, q, cu), Varlen()(q, q, q, cu), rtol=0, atol=0)


def test_aot_inductor_package(tmp_path):
    """AOTInductor compiles the exported block (the C++ op called from the generated code) and the loaded
    package gives eager's numbers, at the exported shape and at another batch and length."""
    torch.manual_seed(0)
    m = Block().eval()
    x, pad = _inputs(2, 10)
    B, L = torch.export.Dim("B", max=64), torch.export.Dim("L", min=4, max=512)
    with torch.no_grad():
        ep = torch.export.export(m, (x, pad), dynamic_shapes={"x": {0: B, 1: L}, "pad": {0: B, 1: L}})
        path = torch._inductor.aoti_compile_and_package(ep, package_path=os.path.join(tmp_path, "block.pt2"))
        runner = torch._inductor.aoti_load_package(path)
        for shape in ((2, 10), (3, 21)):
            x2, pad2 = _inputs(*shape, seed=3)
            with attention_ext.debug.kernel_log() as lines:
                out = runner(x2, pad2)
            assert len(lines) == 1 and lines[0].startswith("cpu forward: flash kernel"), lines  # our kernel ran
            torch.testing.assert_close(out, m(x2, pad2), rtol=1e-6, atol=1e-6)
