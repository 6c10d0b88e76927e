"""Builds loratune's compiled pieces, all in ``src/loratune/kernels``: the CPU low-rank kernel for decoding
(``loratune.kernels._lowrank_cpu``) and the fused elementwise kernels for training (``loratune.kernels._fused_cpu``).

Everything else is declared in pyproject.toml. Both extensions are optional: without a C compiler the install
still succeeds and loratune runs the same arithmetic through PyTorch operations, only slower.
"""

import sys

from setuptools import Extension, setup

flags = [] if sys.platform == "win32" else ["-O3", "-Wno-psabi"]
# The training kernels share PyTorch's OpenMP threads where PyTorch itself runs on libgomp (Linux wheels).
openmp = ("-fopenmp",) if sys.platform.startswith("linux") else ()
SHARED = ["src/loratune/kernels/_vec16.h", "src/loratune/kernels/_per_isa.h"]


def kernel(module: str, path: str, extra: tuple[str, ...] = ()) -> Extension:
    """The optional extension ``loratune.<module>`` from ``src/loratune/<path>.c`` and its ``_body.h``."""
    return Extension(
        f"loratune.{module}",
        sources=[f"src/loratune/{path}.c"],
        depends=[f"src/loratune/{path}_body.h", *SHARED],
        extra_compile_args=[*flags, *extra],
        extra_link_args=list(extra),
        optional=True,
    )


setup(
    ext_modules=[
        kernel("kernels._lowrank_cpu", "kernels/_lowrank_cpu"),
        kernel("kernels._fused_cpu", "kernels/_fused_cpu", openmp),
    ]
)
