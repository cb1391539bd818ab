"""One module per benchmark, each with its `BENCHMARK` (images needed, measurement)."""
