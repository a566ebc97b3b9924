"""Locates and loads the compiled operator library (attention_ext/_C*.so)."""
import glob
import os

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))


def library_path():
    candidates = sorted(glob.glob(os.path.join(_HERE, "_C.*so")) + glob.glob(os.path.join(_HERE, "_C.*pyd")))
    if not candidates:
        raise ImportError(
            "attention_ext: the compiled library attention_ext/_C*.so was not found; "
            "build it with `pip install --no-build-isolation .` or `bash scripts/setup.sh`"
        )
    return candidates[0]


def load():
    if not hasattr(torch.ops.attention_ext, "_attention_forward"):
        torch.ops.load_library(library_path())


def has_cuda_kernels():
    """True when the library was built with the CUDA kernels."""
    load()
    return torch._C._dispatch_has_kernel_for_dispatch_key("attention_ext::_attention_forward", "CUDA")


def emu_library_path():
    """The test-only library of the CUDA kernels on the CPU SIMT emulator
    (attention_ext/_C_emu*.so, csrc/cuda/emu/), or None when it was not built."""
    candidates = sorted(glob.glob(os.path.join(_HERE, "_C_emu.*so")))
    return candidates[0] if candidates else None


def load_emu():
    """Loads attention_ext/_C_emu*.so (registers torch.ops.attention_ext_emu.*); False if it was not built."""
    if hasattr(torch.ops.attention_ext_emu, "_attention_forward"):
        return True
    path = emu_library_path()
    if path is None:
        return False
    torch.ops.load_library(path)
    return True
