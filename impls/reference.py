"""The float64 NumPy oracle that every RoPE implementation in this suite is judged against.

Shape notation:
    B: batch, S: sequence length, H: heads, D: head size, R: rotary dimension (R <= D).

For position ``p`` and pair ``i`` the angle is ``a = p * inv_freq[i]`` and the pair ``(u, v)``
becomes

    u' = u cos(a) - v sin(a)
    v' = v cos(a) + u sin(a)

scaled by the attention factor of the scaling type (1 except for yarn). The pairing decides
which features form pair ``i``: ``(i, i + R/2)`` for ``half_split`` (rotate_half: Hugging Face,
Equinox, Gemma) and ``(2i, 2i + 1)`` for ``interleaved`` (torchtune, Meta's Llama reference).
Features ``R .. D-1`` pass through unchanged.

Every step runs in float64: inputs of any floating dtype are widened first, and positions are
converted exactly (int64 values up to 2**53 are exact in float64).

>>> import numpy as np
>>> x = np.zeros((1, 2, 1, 4)); x[..., 0] = 1.0
>>> out = rope_reference(x, np.array([[0, 1]]), theta=100.0)
>>> np.round(out[0, 1, 0], 4).tolist()  # feature 0 pairs with feature 2 (half-split)
[0.5403, 0.0, 0.8415, 0.0]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

from impls.frequencies import (
    PAIRINGS,
    Scaling,
    attention_factor,
    default_inverse_frequencies,
    dynamic_theta,
    inverse_frequencies,
    validate_rotary_dim,
    validate_theta,
)


_INT64 = np.iinfo(np.int64)


def _as_int64(positions: np.ndarray) -> np.ndarray:
    """Return integer ``positions`` as int64, rejecting values that int64 cannot hold."""
    positions = np.asarray(positions)
    if not np.issubdtype(positions.dtype, np.integer):
        raise TypeError(
            f"positions must be integers, got dtype {positions.dtype}; round them and cast "
            f"with positions.astype(np.int64)."
        )
    # astype(np.int64) wraps uint64 values above 2**63 - 1 to negative positions.
    if positions.dtype == np.uint64 and positions.size and positions.max() > _INT64.max:
        raise ValueError(
            f"positions contains {int(positions.max())}, above the int64 maximum {_INT64.max} "
            f"that the oracle computes with. Pass positions of at most {_INT64.max}."
        )
    return positions.astype(np.int64)


def _is_real_floating(dtype: np.dtype) -> bool:
    if dtype.kind == "f":
        return True
    if dtype.kind != "V":
        return False
    # ml_dtypes floats (bfloat16, float8_*) have NumPy kind "V"; its finfo rejects the rest.
    try:
        ml_dtypes.finfo(dtype)
    except ValueError:
        return False
    return True


def _check_positions(x: np.ndarray, positions: np.ndarray) -> np.ndarray:
    positions = _as_int64(positions)
    batch_seq = x.shape[:-2]
    if positions.shape == batch_seq[-1:]:
        positions = np.broadcast_to(positions, batch_seq)
    if positions.shape != batch_seq:
        raise ValueError(
            f"positions has shape {positions.shape} but x of shape {x.shape} needs [seq] = "
            f"{batch_seq[-1:]} or [batch, seq] = {batch_seq}."
        )
    return positions


def rotation_angles(
    positions: np.ndarray,
    rotary_dim: int,
    theta: float = 10_000.0,
    scaling: Mapping[str, Any] | Scaling | None = None,
) -> np.ndarray:
    """Return the float64 angles ``[..., R/2]`` for integer ``positions`` of shape ``[...]``.

    Dynamic scaling takes its length from the largest position of each row (the last axis), so
    one row never changes another's angles.
    """
    scaling = Scaling.from_config(scaling)
    positions = _as_int64(positions)

    if scaling.rope_type == "dynamic":
        if rotary_dim <= 2:
            raise ValueError(
                f"dynamic scaling raises its base to the power R / (R - 2), which is undefined "
                f"for rotary_dim R = {rotary_dim}. Rotate at least 4 features or use another "
                f"scaling type."
            )
        # [..., 1]: one base per row, from that row's largest position. The initial value
        # changes no real maximum, and it gives an empty row the base theta instead of a
        # reduction error.
        row_length = positions.max(axis=-1, keepdims=True, initial=_INT64.min) + 1
        base = dynamic_theta(theta, rotary_dim, scaling, row_length)
        exponents = np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim
        inv_freq = 1.0 / (base[..., None] ** exponents)  # [..., 1, R/2]
    else:
        inv_freq = inverse_frequencies(rotary_dim, theta, scaling)  # [R/2]

    return positions[..., None].astype(np.float64) * inv_freq


def rope_reference(
    x: np.ndarray,
    positions: np.ndarray,
    *,
    theta: float = 10_000.0,
    pairing: str = "half_split",
    rotary_dim: int | None = None,
    scaling: Mapping[str, Any] | Scaling | None = None,
) -> np.ndarray:
    """Rotate ``x`` of shape ``[B, S, H, D]`` by integer ``positions`` of shape ``[B, S]`` or ``[S]``.

    Args:
        x: queries or keys, any real floating dtype (bfloat16 included); computed in float64.
        positions: integer positions, any values in the int64 range (negative ones rotate
            backwards).
        theta: the RoPE base, > 0.
        pairing: ``"half_split"`` or ``"interleaved"``.
        rotary_dim: number of leading features to rotate (even, <= D); default D.
        scaling: a Hugging Face ``rope_parameters``-style mapping, or None.

    Returns:
        float64 array of the shape of ``x``.

    Raises:
        TypeError: ``x`` not of a real floating dtype, or positions not integers.
        ValueError: uint64 positions above the int64 maximum, or a shape, pairing, theta,
            rotary_dim or scaling that is invalid.
    """
    x = np.asarray(x)
    # astype(np.float64) below would drop an imaginary part with only a ComplexWarning, and
    # integer or bool x is a caller's mistake that the Flax module rejects too.
    if not _is_real_floating(x.dtype):
        raise TypeError(f"x must be a real floating-point array such as float32 or float64, got dtype {x.dtype}.")
    if x.ndim < 3:
        raise ValueError(f"x must be [batch, seq, heads, head_dim] or [seq, heads, head_dim], got shape {x.shape}.")
    if pairing not in PAIRINGS:
        raise ValueError(f"Unknown pairing {pairing!r}. Valid pairings: {', '.join(PAIRINGS)}.")
    theta = validate_theta(theta)
    head_dim = x.shape[-1]
    rotary_dim = validate_rotary_dim(head_dim if rotary_dim is None else rotary_dim, head_dim)
    scaling = Scaling.from_config(scaling)
    positions = _check_positions(x, positions)

    x = x.astype(np.float64)
    angles = rotation_angles(positions, rotary_dim, theta, scaling)  # [B, S, R/2]
    factor = attention_factor(scaling)
    cos = (np.cos(angles) * factor)[..., None, :]  # [B, S, 1, R/2]: shared by all heads
    sin = (np.sin(angles) * factor)[..., None, :]

    rotated, passthrough = x[..., :rotary_dim], x[..., rotary_dim:]
    if pairing == "half_split":
        first, second = rotated[..., : rotary_dim // 2], rotated[..., rotary_dim // 2 :]
    else:
        first, second = rotated[..., 0::2], rotated[..., 1::2]

    new_first = first * cos - second * sin
    new_second = second * cos + first * sin

    out = np.empty_like(x)
    if pairing == "half_split":
        out[..., : rotary_dim // 2] = new_first
        out[..., rotary_dim // 2 : rotary_dim] = new_second
    else:
        out[..., 0:rotary_dim:2] = new_first
        out[..., 1:rotary_dim:2] = new_second
    out[..., rotary_dim:] = passthrough
    return out


def attention_reference(
    query: np.ndarray,
    key: np.ndarray,
    value: np.ndarray,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """Return softmax(q k^T / sqrt(D)) v in float64, with grouped-query heads repeated.

    Shapes: query ``[B, Sq, H, D]``, key ``[B, Sk, Hkv, D]``, value ``[B, Sk, Hkv, Dv]``,
    mask broadcastable to ``[B, H, Sq, Sk]`` (True attends). Rows with no key attended
    return zeros.
    """
    query, key, value = (np.asarray(a, dtype=np.float64) for a in (query, key, value))
    heads, kv_heads = query.shape[-2], key.shape[-2]
    if heads % kv_heads:
        raise ValueError(f"query heads {heads} must be a multiple of key/value heads {kv_heads}.")
    key = np.repeat(key, heads // kv_heads, axis=-2)
    value = np.repeat(value, heads // kv_heads, axis=-2)

    scores = np.einsum("bqhd,bkhd->bhqk", query, key) / np.sqrt(query.shape[-1])
    if mask is not None:
        mask = np.broadcast_to(mask, scores.shape)
        scores = np.where(mask, scores, -np.inf)
    row_max = np.max(scores, axis=-1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    weights = np.exp(scores - row_max)
    total = weights.sum(axis=-1, keepdims=True)
    weights = np.divide(weights, total, out=np.zeros_like(weights), where=total > 0)
    return np.einsum("bhqk,bkhd->bqhd", weights, value)


__all__ = ["attention_reference", "default_inverse_frequencies", "rope_reference", "rotation_angles"]
