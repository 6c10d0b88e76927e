"""Builds loratune's one compiled piece, the CPU low-rank kernel (``loratune.layers._lowrank_cpu``).

Everything else is declared in pyproject.toml. The extension is optional: without a C compiler the install
still succeeds and loratune runs the same arithmetic through PyTorch operations, only slower when decoding.
"""

import sys

from setuptools import Extension, setup

flags = [] if sys.platform == "win32" else ["-O3", "-Wno-psabi"]
setup(
    ext_modules=[
        Extension(
            "loratune.layers._lowrank_cpu",
            sources=["src/loratune/layers/_lowrank_cpu.c"],
            depends=["src/loratune/layers/_lowrank_cpu_body.h"],
            extra_compile_args=flags,
            optional=True,
        )
    ]
)
