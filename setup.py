"""Build qkernels._C: the C++ CPU kernels always, the CUDA kernels when torch has CUDA and nvcc is found.

Environment:
  QKERNELS_CUDA=0|1        force the CUDA sources off / on (on fails loudly if nvcc or torch CUDA is missing)
  TORCH_CUDA_ARCH_LIST     e.g. "8.0;9.0a;10.0a" (our default when unset)
  MAX_JOBS                 parallel compile jobs (ninja)
  QKERNELS_DEBUG=1         -O0 -g builds for debugging

Nothing here uses -march=native: the wheel must run on any x86-64 / aarch64 machine. CPU kernels that want AVX2
select it at run time (see csrc/cpu/*_avx2.cpp).
"""

import glob
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "8.0;9.0a;10.0a"


def _want_cuda():
    import torch

    flag = os.environ.get("QKERNELS_CUDA", "").strip()
    has_nvcc = shutil.which("nvcc") is not None or os.path.exists(
        os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    )
    has_torch_cuda = torch.version.cuda is not None
    has_sources = bool(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    if flag == "0":
        return False
    if flag == "1":
        if not (has_nvcc and has_torch_cuda):
            raise RuntimeError(
                f"QKERNELS_CUDA=1 but nvcc found={has_nvcc}, torch CUDA build={has_torch_cuda} "
                f"(torch {torch.__version__}); install a CUDA build of torch and the CUDA toolkit"
            )
        return has_sources
    return has_nvcc and has_torch_cuda and has_sources


def _arch_flags():
    """-gencode flags per arch, plus -DQK_ENABLE_SMxx so arch-specific kernels compile only where they can run."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs  # torch's build helper reads it too
    defines = []
    for a in archs.replace(",", ";").replace(" ", ";").split(";"):
        a = a.strip().replace("+PTX", "")
        if not a:
            continue
        digits = a.replace(".", "").rstrip("af")
        defines.append(f"-DQK_ENABLE_SM{digits}")
    return sorted(set(defines))


def extensions():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    debug = os.environ.get("QKERNELS_DEBUG") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    # -ffp-contract=off: no silent a*b+c -> fma fusion (aarch64 has FMA in its baseline), so encoders stay bit-exact with
    # their plain-PyTorch references and llama.cpp; explicit intrinsics still use FMA where a kernel wants it.
    cxx_flags = opt + ["-fopenmp", "-ffp-contract=off", "-Wall", "-Wno-unused-function", "-Wno-sign-compare"]
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    if _want_cuda():
        # csrc/cuda: kernels in .cu (nvcc, once per arch), their torch-facing host code in .cpp (the host compiler,
        # once): keeping torch headers out of the .cu files keeps the multi-arch build short
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        arch_defines = _arch_flags()
        nvcc_flags = opt + [
            "--expt-relaxed-constexpr",
            "-lineinfo",
            "-DQK_WITH_CUDA",
        ] + arch_defines
        # the arch list as a macro argument (commas; csrc/build_info.cpp stringifies it) for cuda_build_archs()
        archs_macro = "-DQK_CUDA_ARCHS=" + ",".join(
            a.strip() for a in os.environ["TORCH_CUDA_ARCH_LIST"].replace(",", ";").replace(" ", ";").split(";")
            if a.strip()
        )
        return [
            CUDAExtension(
                "qkernels._C",
                sources,
                include_dirs=include_dirs,
                extra_compile_args={"cxx": cxx_flags + ["-DQK_WITH_CUDA", archs_macro] + arch_defines,
                                    "nvcc": nvcc_flags},
                extra_link_args=["-fopenmp"],
            )
        ]
    return [
        CppExtension(
            "qkernels._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    ]


def main():
    from torch.utils.cpp_extension import BuildExtension

    setup(
        ext_modules=extensions(),
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    )


if __name__ == "__main__":
    main()
