"""Adapter around Equinox's ``eqx.nn.RotaryPositionalEmbedding``.

The module rotates a ``[seq, embedding_size]`` array at positions ``0 .. seq - 1`` and takes no
positions. Each run ``p, p+1, ...`` of a row is therefore placed at rows ``p ..`` of a zero
buffer, rotated there by the real module and read back, which expresses offsets, packing and
padding with the library's own code. Negative positions cannot be expressed.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from impls.adapters.base import Adapter, RopeSpec, Support, contiguous_runs


class EquinoxAdapter(Adapter):
    """``eqx.nn.RotaryPositionalEmbedding(rotary_dim, theta)`` vmapped over heads."""

    name = "equinox"
    library = "equinox"
    support = Support(
        pairings=frozenset({"half_split"}),
        positions="non_negative",
        partial_rotary=True,  # by slicing: the module gets only the rotated features
        modes=("eager", "jit"),
    )

    def rotate(self, x: np.ndarray, positions: np.ndarray, spec: RopeSpec, *, mode: str = "eager") -> np.ndarray:
        rotary_dim = spec.rotary_dim or x.shape[-1]

        # Equinox caches its tables by (embedding_size, dtype) and not by theta, so a module
        # with another theta would read the previous one's tables. Clearing the cache before
        # every case gives each theta its own tables.
        eqx.clear_caches()
        rope = eqx.nn.RotaryPositionalEmbedding(rotary_dim, theta=spec.theta)

        # [seq, heads, R] -> [seq, heads, R]: the module sees one head at a time.
        per_head = jax.vmap(rope, in_axes=1, out_axes=1)
        if mode == "jit":
            per_head = jax.jit(per_head)

        out = np.array(x, copy=True)
        for b in range(x.shape[0]):
            for start, stop, first in contiguous_runs(positions[b]):
                length = stop - start
                # [first + length, heads, R]: the run sits at rows first .. first + length - 1.
                buffer = jnp.zeros((first + length, x.shape[2], rotary_dim), x.dtype)
                buffer = buffer.at[first:].set(jnp.asarray(x[b, start:stop, :, :rotary_dim]))
                rotated = per_head(buffer)[first:]
                out[b, start:stop, :, :rotary_dim] = np.asarray(rotated)
        return out
