"""Build of attention_ext: one extension module, attention_ext._C.

The module is a plain shared library of operators (no Python bindings, no
libtorch_python): Python loads it with torch.ops.load_library and C++
(LibTorch) programs can load or link the very same file.

Environment switches
  ATTENTION_EXT_CUDA=0|1      force the CUDA kernels off / on (default: on when
                              torch has CUDA and nvcc is found)
  ATTENTION_EXT_HEAD_DIMS     comma list of CUDA head-dim instantiations to
                              build (default: all, see csrc/cuda/generate.py)
  ATTENTION_EXT_DTYPES        comma list of CUDA dtypes, fp16,bf16,fp32 (default all)
  TORCH_CUDA_ARCH_LIST        CUDA architectures (default: the visible GPU, else "8.0;9.0")
  MAX_JOBS                    parallel compile jobs (ninja)
"""
import glob
import os

from setuptools import find_packages, setup

# torch's guess of the toolkit is the parent of `which nvcc`, which is wrong
# when nvcc is a wrapper in /usr/local/bin: prefer the real toolkit folder.
if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH") and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def env_flag(name):
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "auto"):
        return None
    return value in ("1", "true", "yes", "on")


def want_cuda():
    forced = env_flag("ATTENTION_EXT_CUDA")
    available = torch.version.cuda is not None and CUDA_HOME is not None
    if forced is True and not available:
        raise RuntimeError("ATTENTION_EXT_CUDA=1 but torch has no CUDA or no CUDA toolkit (nvcc) was found")
    return available if forced is None else forced


def cuda_sources():
    head_dims = os.environ.get("ATTENTION_EXT_HEAD_DIMS")
    dtypes = os.environ.get("ATTENTION_EXT_DTYPES")
    keep_dims = set(head_dims.split(",")) if head_dims else None
    keep_dtypes = set(dtypes.split(",")) if dtypes else None
    sources = []
    for path in sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")) + glob.glob(os.path.join("csrc", "cuda", "*.cpp"))):
        name = os.path.basename(path)
        # instantiation files are named <kind>_hdim<D>_<dtype>[_<variant>].cu
        if "_hdim" in name:
            parts = name[: -len(".cu")].split("_")
            dim = next(p[len("hdim"):] for p in parts if p.startswith("hdim"))
            dtype = parts[parts.index("hdim" + dim) + 1]
            if keep_dims is not None and dim not in keep_dims:
                continue
            if keep_dtypes is not None and dtype not in keep_dtypes:
                continue
        sources.append(path)
    return sources


def extension():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cxx = ["-O3", "-fopenmp", "-fno-math-errno"]
    define_macros = []
    if want_cuda():
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        define_macros.append(("ATTENTION_EXT_WITH_CUDA", "1"))
        head_dims = os.environ.get("ATTENTION_EXT_HEAD_DIMS")
        if head_dims:
            define_macros.append(("ATTENTION_EXT_HEAD_DIMS", head_dims.replace(",", "_")))
        nvcc = ["-O3", "--use_fast_math", "--expt-relaxed-constexpr", "-lineinfo"]
        return CUDAExtension(
            "attention_ext._C",
            sources + cuda_sources(),
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
            py_limited_api=True,
        )
    return CppExtension(
        "attention_ext._C",
        sources,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )


setup(
    name="attention_ext",
    version="0.1.0",
    description="Fused attention operators (forward and backward) for PyTorch, CPU and CUDA",
    packages=find_packages(include=["attention_ext", "attention_ext.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=["torch>=2.4"],
    zip_safe=False,
)
