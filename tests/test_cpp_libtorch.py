"""The operators from C++ (LibTorch), without Python: builds tests/cpp (CMake)
against the LibTorch inside the installed torch wheel, and runs it on the
compiled attention_ext/_C*.so (dlopen + c10::Dispatcher + autograd)."""
import fcntl
import os
import shutil
import subprocess

import pytest
import torch
from torch.utils import cpp_extension

from attention_ext import _loader

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(HERE, "cpp")
BUILD = os.path.join(SRC, "build")  # gitignored cache, reused between runs
EXE = os.path.join(BUILD, "attention_ext_cpp_test")


def _run(cmd, timeout, env=None):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    return r.returncode, r.stdout + r.stderr


def _configure_args():
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    # Include/lib paths of the wheel's LibTorch instead of find_package(Torch): a CUDA
    # build of torch makes find_package(Torch) require a complete CUDA toolkit, and the
    # test program only needs the CPU libraries (c10, torch_cpu).
    args = [
        f"-DAE_TORCH_INCLUDE_DIRS={';'.join(cpp_extension.include_paths())}",
        f"-DAE_TORCH_LIBRARY_DIR={torch_lib}",
        f"-DAE_TORCH_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        "-DCMAKE_BUILD_TYPE=Release",
    ]
    if shutil.which("ninja"):
        args.append("-GNinja")
    return args


def _build():
    os.makedirs(BUILD, exist_ok=True)
    configure = ["cmake", "-S", SRC, "-B", BUILD, *_configure_args()]
    rc, log = _run(configure, timeout=120)
    if rc != 0:  # e.g. a cache from another generator / torch: start over once
        shutil.rmtree(BUILD)
        os.makedirs(BUILD)
        rc, log = _run(configure, timeout=120)
    assert rc == 0, f"cmake configure failed:\n{log[-4000:]}"
    rc, log = _run(["cmake", "--build", BUILD, "--parallel", str(max(1, min(4, os.cpu_count() or 1)))], timeout=300)
    assert rc == 0, f"cmake build failed:\n{log[-6000:]}"
    assert os.path.isfile(EXE), f"{EXE} was not built"


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed (needed to build tests/cpp)")
def test_cpp_libtorch_client():
    os.makedirs(BUILD, exist_ok=True)
    with open(os.path.join(BUILD, ".lock"), "w") as lock:  # concurrent test sessions share the build dir
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            _build()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    env = dict(os.environ)
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (torch_lib, env.get("LD_LIBRARY_PATH")) if p)
    rc, out = _run([EXE, _loader.library_path()], timeout=300, env=env)
    assert rc == 0 and out.rstrip().endswith("PASS"), f"C++ test failed (exit code {rc}):\n{out[-6000:]}"
