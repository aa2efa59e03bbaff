"""Data pipeline: images, videos and text into model inputs (never imports glmv_jax.model)."""
