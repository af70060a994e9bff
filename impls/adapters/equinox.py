"""Adapter around Equinox's ``eqx.nn.RotaryPositionalEmbedding``.

The module rotates a ``[seq, embedding_size]`` array, row ``i`` by position ``i``, and takes no
positions. RoPE acts on each row alone, so a token at position ``p`` is rotated correctly by
writing it into row ``p`` of a zero buffer, calling the real module on the buffer and reading
row ``p`` back. Each buffer contains one head, and tokens of the whole batch share buffers of at
least ``max(positions) + 1`` rows: the ``k``-th token at a given position goes into the
``k``-th buffer of its head, so no buffer contains two tokens in one row. All buffers have
one shape, and the module is vmapped over them. This expresses offsets, packing, padding and
arbitrary positions with the library's own code, but not negative positions.
"""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from impls.adapters.base import Adapter, RopeSpec, Support


def occurrence_index(values: np.ndarray) -> np.ndarray:
    """Return, for each element of a 1-D array, how many earlier elements have the same value.

    >>> occurrence_index(np.array([3, 0, 3, 1, 3, 0])).tolist()
    [0, 0, 1, 0, 2, 1]
    """
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    block_starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    block_lengths = np.diff(np.r_[block_starts, len(values)])
    rank_in_sorted = np.arange(len(values)) - np.repeat(block_starts, block_lengths)
    index = np.empty_like(rank_in_sorted)
    index[order] = rank_in_sorted
    return index


def buffer_shape(max_position: int, slices: int) -> tuple[int, int]:
    """Return the shape ``(count, rows)`` of zero buffers for ``slices`` one-head buffers.

    Each buffer needs a row for every position up to ``max_position``.

    Eager JAX compiles every operation once per shape, so inputs should share shapes: both
    numbers are rounded up to powers of two. Buffers of fewer than 4096 rows in all grow to
    at least 128 rows and 4096 in all, so small inputs take one shape. Larger ones are padded
    by less than 2x in each number. The extra buffers and rows are zeros and never read.

    >>> buffer_shape(15, 4)  # a [2, 16, 2, D] case: 2 rows of positions 0 .. 15, 2 heads
    (32, 128)
    >>> buffer_shape(105, 4)
    (32, 128)
    >>> buffer_shape(7, 8192)  # 1024 rows of positions 0 .. 7, 8 heads
    (8192, 16)
    >>> buffer_shape(32767, 2)
    (2, 32768)
    """
    rows = 1 << max(4, max_position.bit_length())
    count = 1 << (slices - 1).bit_length()
    if count * rows < 4096:
        rows = max(rows, 128)
        count = max(count, 4096 // rows)
    return count, rows


@functools.lru_cache(maxsize=64)
def _jitted_module(rotary_dim: int, theta: float):
    # One jitted function per module, so a case whose buffers have a shape seen before reuses
    # its compilation. A trace reads Equinox's table cache, which rotate() clears before every
    # call, so each trace bakes in the tables of its own theta.
    return jax.jit(jax.vmap(eqx.nn.RotaryPositionalEmbedding(rotary_dim, theta=theta)))


class EquinoxAdapter(Adapter):
    """``eqx.nn.RotaryPositionalEmbedding(rotary_dim, theta)`` vmapped over buffers of single heads."""

    name = "equinox"
    library = "equinox"
    support = Support(
        pairings=frozenset({"half_split"}),
        positions="non_negative",
        partial_rotary=True,  # by slicing: the module gets only the rotated features
        modes=("eager", "jit"),
    )

    def rotate(self, x: np.ndarray, positions: np.ndarray, spec: RopeSpec, *, mode: str = "eager") -> np.ndarray:
        if positions.size == 0:
            return x.copy()
        if positions.min() < 0:
            raise ValueError(
                f"Equinox's RotaryPositionalEmbedding rotates row i by position i, so negative "
                f"positions cannot be expressed; got min(positions)={positions.min()}."
            )
        batch, seq, heads, head_dim = x.shape
        rotary_dim = spec.rotary_dim or head_dim

        # Equinox caches its tables by (embedding_size, dtype) and not by theta, so a module
        # with another theta would read the previous one's tables. Clearing the cache before
        # every case gives each theta its own tables.
        # NOTE: run on 0.13.8 only. The sources of 0.11.5 (the first with theta) and 0.12.2
        # also register the cache with clear_caches, but they need an older jax to import.
        eqx.clear_caches()

        flat_positions = positions.reshape(-1)
        buffer_index = occurrence_index(flat_positions)
        # [B, S, H, D] -> [B * S, H, R]: one row per token, only the rotated features.
        tokens = x.reshape(batch * seq, heads, head_dim)[..., :rotary_dim]

        # Token t goes to row flat_positions[t] of buffer buffer_index[t], for every head.
        count, rows = buffer_shape(int(flat_positions.max()), int(buffer_index.max() + 1) * heads)
        # [buffers, H, rows, R] -> [buffers * H, rows, R], padded to [count, rows, R].
        buffers = np.zeros((count, rows, rotary_dim), x.dtype)
        slot = buffer_index[:, None] * heads + np.arange(heads)  # [B * S, H]
        buffers[slot, flat_positions[:, None]] = tokens

        if mode == "jit":
            per_buffer = _jitted_module(rotary_dim, spec.theta)
        else:
            per_buffer = jax.vmap(eqx.nn.RotaryPositionalEmbedding(rotary_dim, theta=spec.theta))
        rotated = np.asarray(per_buffer(jnp.asarray(buffers)))[slot, flat_positions[:, None]]
        rotated = rotated.reshape(batch, seq, heads, rotary_dim)

        # The passthrough takes the module's output dtype: Equinox 0.11.5 returns float32 for a
        # bfloat16 input, later versions the input dtype.
        passthrough = x[..., rotary_dim:].astype(rotated.dtype)
        return np.concatenate([rotated, passthrough], axis=-1)
