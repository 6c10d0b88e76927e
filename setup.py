"""Builds loratune's compiled CPU kernels, ``loratune.kernels._cpu``, from ``src/loratune/kernels/csrc``: the
low-rank update for decoding, the fused elementwise kernels for training and intrinsic training's projection,
each compiled for every instruction set the compiler can target (see ``csrc/kernels.h``).

Everything else is declared in pyproject.toml. The extension is optional: without a C compiler the install
still succeeds and loratune runs the same arithmetic through PyTorch operations, only slower.
"""

import sys
from glob import glob

from setuptools import Extension, setup

CSRC = "src/loratune/kernels/csrc"
flags = [] if sys.platform == "win32" else ["-O3", "-Wno-psabi"]
# The training kernels share PyTorch's OpenMP threads where PyTorch itself runs on libgomp (Linux wheels).
openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []

setup(
    ext_modules=[
        Extension(
            "loratune.kernels._cpu",
            sources=sorted(glob(f"{CSRC}/*.c")),
            depends=sorted(glob(f"{CSRC}/*.h")),
            extra_compile_args=[*flags, *openmp],
            extra_link_args=openmp,
            optional=True,
        )
    ]
)
