"""Side-by-side benchmarks against transformers (run with `python -m benchmarks.NAME`)."""
