"""A minimal RoPE in the ``--impl`` signature, to copy when checking your own implementation.

    pytest parity/ --impl parity.examples:numpy_rope

The callable takes NumPy queries ``[batch, seq, heads, head_dim]`` and keys
``[batch, kv_seq, kv_heads, head_dim]`` with int32 positions ``[batch, seq]`` and
``[batch, kv_seq]``, and returns the rotated pair. Its ``pairing`` attribute names the
features that form a rotated pair.
"""

from __future__ import annotations

import numpy as np


def _rotate(x: np.ndarray, positions: np.ndarray, theta: float, rotary_dim: int) -> np.ndarray:
    # float32 inverse frequencies and a float32 broadcast multiply, as most libraries compute them.
    exponents = np.arange(0, rotary_dim, 2, dtype=np.float32) / np.float32(rotary_dim)
    inv_freq = (1.0 / np.float32(theta) ** exponents).astype(np.float32)
    angles = positions[..., None].astype(np.float32) * inv_freq  # [B, S, R/2]
    cos, sin = np.cos(angles)[..., None, :], np.sin(angles)[..., None, :]  # [B, S, 1, R/2]

    # bfloat16 and float16 inputs are rotated in float32 and rounded once at the end.
    values = x.astype(np.float32)
    half = rotary_dim // 2
    first, second = values[..., :half], values[..., half:rotary_dim]
    rotated = np.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return np.concatenate([rotated, values[..., rotary_dim:]], axis=-1).astype(x.dtype)


def numpy_rope(q, k, q_positions, k_positions, *, theta, rotary_dim):
    """Rotate queries and keys with half-split pairs ``(i, i + rotary_dim / 2)``."""
    return _rotate(q, q_positions, theta, rotary_dim), _rotate(k, k_positions, theta, rotary_dim)


numpy_rope.pairing = "half_split"
