"""Generation: inference weights (per layer, q/k/v fused), the KV cache, a jitted prefill and an on-device decode
loop (sampling, thinking budget)."""
