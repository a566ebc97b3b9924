"""Shared pytest helpers of the attention_ext suite.

Device parametrization: GPU tests live beside the CPU ones. A test that takes a
``device`` argument runs for 'cpu' and 'cuda'; the 'cuda' case carries the
``cuda`` marker and is skipped where there is no GPU or the library was built
without the CUDA kernels. The kernel grids take float64 on the CPU only (the
CUDA ops take it in ATen operations, tested in test_zero_head_dim.py): use
``device_dtype_params`` (or ``skip_unsupported``) for tests over dtypes.

    def test_x(device): ...                          # cpu + cuda
    @pytest.mark.parametrize("device,dtype", device_dtype_params())
    def test_y(device, dtype): ...                   # (cpu, f32/f16/bf16/f64) + (cuda, f32/f16/bf16)
"""
import os
import sys

# Kernels fill their freshly allocated outputs with NaN before writing them
# (csrc/glue.h: poison), so an element a kernel forgets to write cannot pass a
# test by luck. scripts/test.sh sets it too; ATTENTION_EXT_POISON=0 turns it off.
os.environ.setdefault("ATTENTION_EXT_POISON", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import attention_ext  # noqa: F401,E402  (loads the library: registers torch.ops.attention_ext.*)
from attention_ext import _loader  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `import reference` from the test files


def _cuda_skip_reason():
    if not torch.cuda.is_available():
        return "no CUDA GPU available"
    if not _loader.has_cuda_kernels():
        return "attention_ext was built without the CUDA kernels"
    return None


CUDA_SKIP_REASON = _cuda_skip_reason()
HAS_CUDA = CUDA_SKIP_REASON is None

ALL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_DTYPE_IDS = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64"}


def dtype_id(dtype):
    return _DTYPE_IDS.get(dtype, str(dtype).replace("torch.", ""))


def cuda_marks():
    return (pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason=CUDA_SKIP_REASON or ""))


def emu_marks():
    """Marks of a case run on the CUDA kernels' CPU emulation (tests/emu.py)."""
    import emu

    return (pytest.mark.emu, pytest.mark.skipif(not emu.LOADED, reason=emu.SKIP_REASON or ""))


def device_params():
    """['cpu', 'cuda'] as pytest params; 'cuda' is marked `cuda` and skipped without a GPU/CUDA kernels."""
    return [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=cuda_marks())]


def device_dtype_params(dtypes=ALL_DTYPES):
    """(device, dtype) params for every pair the kernels have (float64 on the CPU only)."""
    params = []
    for dev in ("cpu", "cuda"):
        for dt in dtypes:
            if dev == "cuda" and dt == torch.float64:
                continue
            marks = cuda_marks() if dev == "cuda" else ()
            params.append(pytest.param(dev, dt, id=f"{dev}-{dtype_id(dt)}", marks=marks))
    return params


def skip_unsupported(device, dtype):
    """Skips (device, dtype) pairs the kernels do not have (float64 on CUDA, which the CUDA ops run in ATen
    operations)."""
    if dtype == torch.float64 and device != "cpu":
        pytest.skip("float64 on CUDA runs in ATen operations (test_zero_head_dim.py), not in the kernels")


@pytest.fixture(params=device_params())
def device(request):
    """'cpu' and 'cuda' (the latter skipped where unavailable)."""
    return request.param


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread avoids OpenMP spin-waiting on a busy shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
