"""Short fine-tunes: the shared distillation loop and its checkpoints, `heal` (fixed ranks)
and `softrank` (ranks learned by soft-thresholding singular values, SoftLMs)."""
