"""Speed: timing primitives, the layout and dense-fallback decisions of `speed_up_`, speed
limits per shape, side-by-side benchmarks and the time split that yields the ceiling."""
