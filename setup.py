"""Builds loratune's compiled pieces: the CPU low-rank kernel for decoding (``loratune.layers._lowrank_cpu``)
and the fused elementwise kernels for training (``loratune.train._fused_cpu``).

Everything else is declared in pyproject.toml. Both extensions are optional: without a C compiler the install
still succeeds and loratune runs the same arithmetic through PyTorch operations, only slower.
"""

import sys

from setuptools import Extension, setup

flags = [] if sys.platform == "win32" else ["-O3", "-Wno-psabi"]
setup(
    ext_modules=[
        Extension(
            "loratune.layers._lowrank_cpu",
            sources=["src/loratune/layers/_lowrank_cpu.c"],
            depends=["src/loratune/layers/_lowrank_cpu_body.h", "src/loratune/_vec16.h"],
            extra_compile_args=flags,
            optional=True,
        ),
        Extension(
            "loratune.train._fused_cpu",
            sources=["src/loratune/train/_fused_cpu.c"],
            depends=["src/loratune/train/_fused_cpu_body.h", "src/loratune/_vec16.h"],
            extra_compile_args=flags,
            optional=True,
        ),
    ]
)
