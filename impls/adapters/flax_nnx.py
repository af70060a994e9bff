"""Adapters around this project's Flax NNX :class:`impls.flax_nnx.RoPE`, uncached and cached."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from impls.adapters.base import Adapter, RopeSpec, Support
from impls.flax_nnx import RoPE

_SUPPORT = Support(
    scaling_types=frozenset({"default", "linear", "dynamic", "yarn", "llama3"}),
    modes=("eager", "jit"),
)


@functools.lru_cache(maxsize=64)
def _jitted_call(rope: RoPE):
    # Cached per module, which is cached per spec below, so each variant compiles once per shape.
    return jax.jit(lambda x, positions: rope(x, positions))


class FlaxNNXAdapter(Adapter):
    """``RoPE(theta, rotary_dim=, pairing=, scaling=)``, computing its tables on the fly."""

    name = "flax_nnx"
    library = "flax"
    support = _SUPPORT

    @functools.lru_cache(maxsize=64)
    def _module(self, spec: RopeSpec, head_dim: int) -> RoPE:
        return RoPE(spec.theta, rotary_dim=spec.rotary_dim, pairing=spec.pairing, scaling=spec.scaling)

    def rotate(self, x: np.ndarray, positions: np.ndarray, spec: RopeSpec, *, mode: str = "eager") -> np.ndarray:
        rope = self._module(spec, x.shape[-1])
        x_jax = jnp.asarray(x)
        positions_jax = jnp.asarray(positions, jnp.int32)
        if mode == "jit":
            return np.asarray(_jitted_call(rope)(x_jax, positions_jax))
        return np.asarray(rope(x_jax, positions_jax))


class FlaxNNXCachedAdapter(FlaxNNXAdapter):
    """The same module with precomputed tables of 4096 positions.

    Cases with positions past the table check that those fall back to computed values.
    """

    name = "flax_nnx_cached"
    table_length = 4096

    @functools.lru_cache(maxsize=64)
    def _module(self, spec: RopeSpec, head_dim: int) -> RoPE:
        return RoPE(
            spec.theta,
            embedding_size=head_dim,
            max_seq_len=self.table_length,
            rotary_dim=spec.rotary_dim,
            pairing=spec.pairing,
            scaling=spec.scaling,
        )
