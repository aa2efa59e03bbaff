"""Shape buckets shared by the model inputs and the data pipeline, so jit compiles a handful of programs."""
from __future__ import annotations


def bucket(n: int, minimum: int = 64) -> int:
    """Smallest of 2^k * {1, 1.25, 1.5, 1.75} (>= minimum) not below n: at most 25% padding."""
    size = minimum
    while size * 2 < n:
        size *= 2
    return next(int(size * step) for step in (1, 1.25, 1.5, 1.75, 2) if size * step >= n)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pow2(n: int) -> int:
    """Smallest power of two >= max(n, 1)."""
    return 1 << max(0, (max(n, 1) - 1).bit_length())
