"""Generation: jitted prefill and an on-device decode loop over a KV cache."""
