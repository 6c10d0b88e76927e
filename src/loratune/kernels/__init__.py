"""loratune's compiled CPU kernels and their loaders: ``lowrank`` (a LoRA layer's update for a few rows, for
decoding) and ``fused`` (a training step's elementwise work: RMSNorm, silu·up, dropout masks, attention's
backward between its products, the cross-entropy's softmax). Each function returns None when its kernel cannot
take the tensors, and the caller runs the same arithmetic in PyTorch."""
