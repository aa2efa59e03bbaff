"""Ops the model is built from, each behind an `impl` where backends differ: dense (float32-accumulating
dense layers), swiglu, attention (impl "cpu" | "xla" | "cudnn" | "splash"), context-parallel attention with
causal block skipping, token log-probabilities. Imports nothing of the package but sharding, config and errors."""
