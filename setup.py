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
  ATTENTION_EXT_EMU=0|1       build attention_ext._C_emu, the CUDA kernels compiled as
                              host C++ on a SIMT emulator (csrc/cuda/emu/), for the
                              tests without a GPU (default: on when the CUDA toolkit's
                              headers are found; it needs no GPU and no CUDA torch)
  TORCH_CUDA_ARCH_LIST        CUDA architectures (default: the visible GPUs, else "8.0;9.0a"; 9.0 is
                              built as 9.0a, the target with wgmma / setmaxnreg that the Hopper
                              kernels need; a list naming plain "9.0" builds no Hopper kernels)
  ATTENTION_EXT_DEBUG_INFO=1  keep the host compiler's debug information (-g, from Python's own CFLAGS);
                              by default the C++ sources are compiled with -g0, which takes a quarter off the
                              compile time of the torch-heavy files (ops.cpp: 39 -> 29 s)
  MAX_JOBS                    parallel compile jobs (ninja)
"""
import glob
import os
import subprocess

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
    paths = glob.glob(os.path.join("csrc", "cuda", "*.cu")) + glob.glob(os.path.join("csrc", "cuda", "*.cpp"))
    paths += glob.glob(os.path.join("csrc", "cuda", "hopper", "*.cpp"))
    for path in sorted(paths):
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


def default_arch_list():
    """The visible GPUs' architectures (9.0 as 9.0a), else 8.0 and 9.0a."""
    archs = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            arch = "%d.%d" % (major, minor) + ("a" if (major, minor) == (9, 0) else "")
            if arch not in archs:
                archs.append(arch)
    return ";".join(archs) if archs else "8.0;9.0a"


def no_debug_info():
    """-g0 after distutils' flags, which carry Python's own CFLAGS (-g): the last -g option wins."""
    return [] if env_flag("ATTENTION_EXT_DEBUG_INFO") else ["-g0"]


def extension():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cxx = ["-O3", "-fopenmp", "-fno-math-errno"] + no_debug_info()
    define_macros = []
    if want_cuda():
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = default_arch_list()
        define_macros.append(("ATTENTION_EXT_WITH_CUDA", "1"))
        if "9.0a" in os.environ["TORCH_CUDA_ARCH_LIST"].replace(" ", ";").split(";"):
            define_macros.append(("ATTENTION_EXT_SM90A", "1"))  # the Hopper kernels are built: register them
        head_dims = os.environ.get("ATTENTION_EXT_HEAD_DIMS")
        if head_dims:
            define_macros.append(("ATTENTION_EXT_HEAD_DIMS", head_dims.replace(",", "_")))
        nvcc = ["-O3", "--use_fast_math", "--expt-relaxed-constexpr", "-lineinfo"]
        # nvcc through scripts/nvcc_ptxas.sh, which keeps ptxas's report of the Hopper instantiations beside their
        # objects for tests/test_hopper_build.py (a PYTORCH_NVCC of the user's, such as ccache, is what it runs).
        wrapper = os.path.join(ROOT, "scripts", "nvcc_ptxas.sh")
        if os.environ.get("PYTORCH_NVCC") != wrapper:
            os.environ["ATTENTION_EXT_REAL_NVCC"] = os.environ.get("PYTORCH_NVCC") or os.path.join(CUDA_HOME, "bin", "nvcc")
            os.environ["PYTORCH_NVCC"] = wrapper
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


# The toolkit's headers for the emulator: torch's CUDA_HOME, or (a CPU build of torch, which sets none)
# the toolkit found above.
CUDA_HEADERS_HOME = CUDA_HOME or os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")


def want_emu():
    forced = env_flag("ATTENTION_EXT_EMU")
    have_headers = CUDA_HEADERS_HOME is not None and os.path.exists(os.path.join(CUDA_HEADERS_HOME, "include", "cuda_fp16.h"))
    if forced is True and not have_headers:
        raise RuntimeError("ATTENTION_EXT_EMU=1 needs the CUDA toolkit's headers (cuda_fp16.h); none found")
    return have_headers if forced is None else forced


def emu_access_hooks():
    """Racecheck on the emulator (csrc/cuda/emu/racecheck.h) sees the kernels' loads and stores through
    the -fsanitize=thread instrumentation, whose hooks racecheck.cpp defines (no TSan runtime is linked).
    GCC is told to leave out the function entry / exit hooks, which racecheck does not use."""
    cxx = os.environ.get("CXX", "c++")
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False).stdout
    except OSError:
        version = ""
    gcc = "clang" not in version.lower()
    return ["-fsanitize=thread"] + (["--param=tsan-instrument-func-entry-exit=0"] if gcc else [])


def emu_extension():
    """attention_ext._C_emu: the kernels of csrc/cuda as host C++ (see csrc/cuda/emu/simt.h).

    Each CUDA translation unit is compiled through a one-line wrapper in
    build/emu_src (so its object never collides with the nvcc one), with
    ATTENTION_EXT_SIMT_EMU defined and hidden visibility (its copies of the
    glue and registry stay private to this library)."""
    wrap_dir = os.path.join("build", "emu_src")
    os.makedirs(wrap_dir, exist_ok=True)
    host_only = ("attention_cuda.cpp", "rng_state.cu", "tma_desc.cpp")  # the emulator has its own twins
    wrapped = [p for p in cuda_sources() if not p.endswith(host_only)]
    glue = [os.path.join("csrc", n) for n in ("glue.cpp", "varlen.cpp", "composite.cpp", "kvcache.cpp")]
    sources, plain = [], []
    for path in wrapped + glue:
        name = "emu_" + os.path.splitext(os.path.basename(path))[0] + ".cpp"  # never the wrapped file's own name
        target = os.path.join(wrap_dir, name)
        text = '#include "%s"\n' % os.path.relpath(path, "csrc").replace(os.sep, "/")
        if not os.path.exists(target) or open(target).read() != text:
            with open(target, "w") as f:
                f.write(text)
        (plain if path in glue else sources).append(target)
    # the emulator's own runtime and the glue need no access hooks; the test kernels do
    emu_dir = os.path.join("csrc", "cuda", "emu")
    runtime = ("simt.cpp", "sm90_emu.cpp", "racecheck.cpp", "attention_emu.cpp")
    for path in sorted(glob.glob(os.path.join(emu_dir, "*.cpp"))):
        (plain if os.path.basename(path) in runtime else sources).append(path)
    hooks = emu_access_hooks()
    ext = CppExtension(
        "attention_ext._C_emu",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "cuda"), os.path.join(CUDA_HEADERS_HOME, "include")],
        define_macros=[("ATTENTION_EXT_SIMT_EMU", "1")] + ([("ATTENTION_EXT_EMU_ACCESS_HOOKS", "1")] if hooks else []),
        extra_compile_args={"cxx": ["-O2", "-fno-strict-aliasing", "-fvisibility=hidden", "-Wno-unknown-pragmas", "-Wno-psabi"]
                            + no_debug_info() + hooks},
        py_limited_api=True,
    )
    ext.plain_sources = plain  # compiled without the hooks' flags (Build.build_extension)
    ext.hook_flags = hooks
    return ext


class Build(BuildExtension):
    """torch's BuildExtension (ninja), and an extension's `plain_sources` compiled first with its flags
    less `hook_flags`, into objects it links (the emulator: the access instrumentation only where
    racecheck needs it, since every instrumented load costs a call)."""

    def build_extension(self, ext):
        plain = getattr(ext, "plain_sources", None)
        if plain:
            args = {k: [f for f in v if f not in ext.hook_flags] for k, v in ext.extra_compile_args.items()}
            objects = self.compiler.compile(plain, output_dir=os.path.join(self.build_temp, "plain"),
                                            macros=ext.define_macros, include_dirs=ext.include_dirs,
                                            debug=self.debug, extra_postargs=args, depends=ext.depends)
            ext.extra_objects = list(ext.extra_objects or []) + [o for o in objects if o not in ext.extra_objects]
        super().build_extension(ext)


setup(
    name="attention_ext",
    version="0.1.0",
    description="Fused attention operators (forward and backward) for PyTorch, CPU and CUDA",
    packages=find_packages(include=["attention_ext", "attention_ext.*"]),
    ext_modules=[extension()] + ([emu_extension()] if want_emu() else []),
    cmdclass={"build_ext": Build.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=["torch>=2.4"],
    zip_safe=False,
)
