"""Compression: `compress_` (the in-place core), its checkpoints, the full-rank factor cache
sweeps truncate from, the rank plot, and `oneshot`, the whole job from a model's name to a
saved folder."""
