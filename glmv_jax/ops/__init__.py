"""Ops the model is built from, each behind an `impl` where backends differ: dense (float32-accumulating
dense layers), swiglu, attention (impl "cpu" | "xla"; slots for "cudnn" and "splash"), context-parallel
attention, token log-probabilities. Imports nothing of the package but sharding, config and errors."""
