"""Deliberately broken RoPE implementations in the ``--impl`` signature, one per known mistake.

Each differs from ``parity.examples.numpy_rope`` by exactly one mistake, so the parity run must
fail on it and its diagnosis must name that mistake.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np


def _rotate(x, positions, theta, rotary_dim, pairing="half_split", positions_dtype=np.float32):
    exponents = np.arange(0, rotary_dim, 2, dtype=np.float32) / np.float32(rotary_dim)
    inv_freq = (1.0 / np.float32(theta) ** exponents).astype(np.float32)
    angles = positions[..., None].astype(positions_dtype).astype(np.float32) * inv_freq
    cos, sin = np.cos(angles)[..., None, :], np.sin(angles)[..., None, :]
    values = x.astype(np.float32)
    if pairing == "half_split":
        first, second = values[..., : rotary_dim // 2], values[..., rotary_dim // 2 : rotary_dim]
        rotated = np.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    else:
        first, second = values[..., 0:rotary_dim:2], values[..., 1:rotary_dim:2]
        rotated = np.stack([first * cos - second * sin, second * cos + first * sin], axis=-1)
        rotated = rotated.reshape(*values.shape[:-1], rotary_dim)
    return np.concatenate([rotated, values[..., rotary_dim:]], axis=-1).astype(x.dtype)


def _declare(function):
    function.pairing = "half_split"
    return function


@_declare
def other_pairing(q, k, q_positions, k_positions, *, theta, rotary_dim):
    """Declares half-split pairs but rotates adjacent (interleaved) ones."""
    return (_rotate(q, q_positions, theta, rotary_dim, "interleaved"),
            _rotate(k, k_positions, theta, rotary_dim, "interleaved"))


@_declare
def positions_ignored(q, k, q_positions, k_positions, *, theta, rotary_dim):
    """Rotates token i at position i whatever positions it is given."""
    q_arange = np.broadcast_to(np.arange(q.shape[1]), q_positions.shape)
    k_arange = np.broadcast_to(np.arange(k.shape[1]), k_positions.shape)
    return _rotate(q, q_arange, theta, rotary_dim), _rotate(k, k_arange, theta, rotary_dim)


@_declare
def decode_offset_missing(q, k, q_positions, k_positions, *, theta, rotary_dim):
    """Counts positions from the first token of each call, as a decode step without its offset."""
    return (_rotate(q, q_positions - q_positions[:, :1], theta, rotary_dim),
            _rotate(k, k_positions - k_positions[:, :1], theta, rotary_dim))


@_declare
def theta_ignored(q, k, q_positions, k_positions, *, theta, rotary_dim):
    """Always uses theta = 10000."""
    return _rotate(q, q_positions, 10_000.0, rotary_dim), _rotate(k, k_positions, 10_000.0, rotary_dim)


@_declare
def bfloat16_positions(q, k, q_positions, k_positions, *, theta, rotary_dim):
    """Casts positions to bfloat16 before the angles, so 8191 becomes 8192."""
    return (_rotate(q, q_positions, theta, rotary_dim, positions_dtype=ml_dtypes.bfloat16),
            _rotate(k, k_positions, theta, rotary_dim, positions_dtype=ml_dtypes.bfloat16))


@_declare
def partial_rotary_full_width(q, k, q_positions, k_positions, *, theta, rotary_dim):
    """Rotates the whole head, ignoring rotary_dim."""
    return _rotate(q, q_positions, theta, q.shape[-1]), _rotate(k, k_positions, theta, k.shape[-1])


@_declare
def queries_keys_swapped(q, k, q_positions, k_positions, *, theta, rotary_dim):
    """Returns the rotated keys first."""
    return _rotate(k, k_positions, theta, rotary_dim), _rotate(q, q_positions, theta, rotary_dim)


@_declare
def float32_for_bfloat16(q, k, q_positions, k_positions, *, theta, rotary_dim):
    """Rotates correctly but returns float32 whatever the input dtype."""
    return (_rotate(q, q_positions, theta, rotary_dim).astype(np.float32),
            _rotate(k, k_positions, theta, rotary_dim).astype(np.float32))
