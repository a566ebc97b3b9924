"""The operators from C++ (LibTorch), without Python: builds tests/cpp (CMake)
against the LibTorch inside the installed torch wheel, and runs it on the
compiled attention_ext/_C*.so (dlopen + c10::Dispatcher + autograd), and loads a converted model saved
by torch.jit.script (torch::jit::load), as a LibTorch deployment does."""
import copy
import fcntl
import os
import shutil
import subprocess
import warnings

import pytest
import torch
from torch import nn
from torch.utils import cpp_extension

from attention_ext import _loader, replace_multihead_attention

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
def test_cpp_libtorch_client(tmp_path):
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
    model, inputs, files = _scripted_model_files(tmp_path)
    rc, out = _run([EXE, _loader.library_path(), *files], timeout=300, env=env)
    assert rc == 0 and out.rstrip().endswith("PASS"), f"C++ test failed (exit code {rc}):\n{out[-6000:]}"
    _check_scripted_model_results(model, inputs, files[2])


def _scripted_model_files(tmp_path):
    """A converted nn.TransformerEncoder (float64, key padding), scripted and saved, and its inputs saved as
    the attributes of a scripted container (what torch::jit::load reads)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).double()
    converted = replace_multihead_attention(copy.deepcopy(model))

    class Inputs(nn.Module):
        def __init__(self, **tensors):
            super().__init__()
            for name, t in tensors.items():
                self.register_buffer(name, t)

        def forward(self):
            return self.x

    kpm = torch.zeros(3, 11, dtype=torch.bool)
    kpm[1, 7:] = True
    kpm[2, 3:] = True
    inputs = dict(x=torch.randn(3, 11, 32, dtype=torch.float64), key_padding_mask=kpm,
                  grad_out=torch.randn(3, 11, 32, dtype=torch.float64))
    paths = [str(tmp_path / name) for name in ("model.pt", "inputs.pt", "results.pkl")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated, not removed
        torch.jit.save(torch.jit.script(converted), paths[0])
        torch.jit.save(torch.jit.script(Inputs(**inputs)), paths[1])
    return model, inputs, paths


def _check_scripted_model_results(model, inputs, path):
    y, y_eval, *grads = torch.load(path, weights_only=False)  # written by the test program (a tensor list)
    x = inputs["x"].clone().requires_grad_()
    params = list(model.parameters())
    y_ref = model(x, src_key_padding_mask=inputs["key_padding_mask"])
    grads_ref = torch.autograd.grad(y_ref, [x] + params, inputs["grad_out"])
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(y_eval, y_ref, atol=1e-10, rtol=1e-8)
    assert len(grads) == len(grads_ref) == 1 + len(params)
    for i, (a, b) in enumerate(zip(grads, grads_ref)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8, msg=lambda m: f"gradient {i}: {m}")
