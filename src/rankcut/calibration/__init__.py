"""What calibrated methods measure before they cut: calibration windows from a text source,
block-by-block activation statistics gathered by forward hooks, and the loss's output-side
Fisher information."""
