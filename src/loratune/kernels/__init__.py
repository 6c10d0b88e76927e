"""loratune's compiled CPU kernels (C sources in ``csrc/``, one extension module ``_cpu``) and their Python side:
``loader`` (imports the module once, says whether the kernels run and which instruction-set variant they run
with, ``LORATUNE_KERNEL_ISA``), ``lowrank`` (a LoRA layer's update for a few rows, for decoding) and ``fused``
(a training step's elementwise work: RMSNorm, silu·up, dropout masks, attention's backward between its products,
the cross-entropy's softmax). Each function of ``lowrank`` and ``fused`` checks its tensors before they reach C;
``fused``'s return None when the kernel cannot take them, and the caller runs the same arithmetic in PyTorch."""

from loratune.kernels.loader import ISAS, isa, kernel_available, runnable_isas, select_isa, use_isa

__all__ = ["ISAS", "isa", "kernel_available", "runnable_isas", "select_isa", "use_isa"]
