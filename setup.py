"""Build megalite and its native extensions.

Three extensions, each built only when its sources exist:

* ``megalite._C``     C++ CPU kernels (fused Adam, LayerNorm/RMSNorm) against the torch headers,
                      OpenMP-parallel.  Built everywhere.
* ``megalite._cuda``  the same kernels for CUDA.  Built only where torch was built with CUDA and
                      ``nvcc`` exists (``MEGALITE_BUILD_CUDA=0`` turns it off).
* ``megalite._data``  the indexed-dataset builder and sample/blending index helpers: pybind11 and
                      numpy only, no torch headers, so it compiles in seconds.

Install with ``pip install --no-build-isolation -e .``: build isolation would download another
torch instead of using the one in the environment.
"""
import glob
import os
import shutil

from setuptools import find_packages, setup

NVCC_FLAGS = ["-O3", "--use_fast_math", "-std=c++17"]   # tests/ops/test_adam_ptx.py compiles with these
ROOT = os.path.dirname(os.path.abspath(__file__))


def sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def openmp_flags():
    return ["-fopenmp"] if os.name != "nt" else ["/openmp"]


def pybind11_include():
    """pybind11's headers (pybind11/numpy.h needs no numpy headers): the pybind11 package's, else the
    copy every torch wheel ships in torch/include -- an offline machine with torch but no pybind11
    still builds megalite._data, and with it the CUDA extension in the same build."""
    try:
        import pybind11
        return pybind11.get_include()
    except ImportError:
        from torch.utils import cpp_extension
        return next(p for p in cpp_extension.include_paths()
                    if os.path.exists(os.path.join(p, "pybind11", "pybind11.h")))


def extensions():
    exts, cmdclass = [], {}
    from torch.utils import cpp_extension

    cpu_sources = sources("csrc/cpu/*.cpp")
    if cpu_sources:
        exts.append(cpp_extension.CppExtension(
            "megalite._C", cpu_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            # -fno-math-errno: otherwise GCC keeps a scalar errno-setting sqrtf call in the Adam loop
            # and cannot vectorize it (no code reads errno).  AVX2 is chosen at run time, not here.
            extra_compile_args=["-O3", "-std=c++17", "-fno-math-errno"] + openmp_flags(),
            extra_link_args=openmp_flags(),
        ))

    cuda_sources = sources("csrc/cuda/*.cu") + sources("csrc/cuda/*.cpp")
    want_cuda = os.environ.get("MEGALITE_BUILD_CUDA", "1") != "0"
    import torch
    has_nvcc = cpp_extension.CUDA_HOME is not None or shutil.which("nvcc") is not None
    if cuda_sources and want_cuda and torch.version.cuda is not None and has_nvcc:
        exts.append(cpp_extension.CUDAExtension(
            "megalite._cuda", cuda_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": ["-O3", "-std=c++17"],
                                "nvcc": NVCC_FLAGS},
        ))

    data_sources = sources("csrc/data/*.cpp")
    if data_sources:
        from setuptools import Extension
        exts.append(Extension(
            "megalite._data", data_sources,
            include_dirs=[pybind11_include(), os.path.join(ROOT, "csrc")],
            extra_compile_args=["-O3", "-std=c++17"] + openmp_flags(),
            extra_link_args=openmp_flags(),
            language="c++",
        ))

    if exts:
        cmdclass["build_ext"] = cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)
    return exts, cmdclass


ext_modules, cmdclass = extensions()

# Name, version and dependencies (the torch floor among them) are in pyproject.toml's [project].
setup(
    packages=find_packages(include=["megalite", "megalite.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
