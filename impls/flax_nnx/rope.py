"""Rotary position embedding (RoPE) as a Flax NNX module.

Shape notation:
    B: batch (any number of leading axes), S: sequence length, H: heads, D: head size,
    R: rotary dimension (the number of rotated features, R <= D, even).

For position ``p`` and pair ``i`` (``i = 0 .. R/2 - 1``) the angle is
``a = p * inv_freq[i]`` with ``inv_freq[i] = theta ** (-2 i / R)`` (before frequency scaling),
and the pair ``(u, v)`` becomes

    u' = m * (u cos(a) - v sin(a))
    v' = m * (v cos(a) + u sin(a))

where ``m`` is the attention factor of the scaling type (1 except for yarn). ``half_split``
pairs feature ``i`` with ``i + R/2``; ``interleaved`` pairs ``2i`` with ``2i + 1``. Features
``R .. D-1`` pass through bit-identical.

Precision: computed angles are float32 products, so they err by up to about ``1.2e-7 * |p|``
radians (5e-4 at position 8191). Past ``|p| = 2**24`` float32 cannot even represent the
position, and the output, though still a rotation that keeps every pair's length, no longer
follows it. Cached tables are exact to float32 rounding at every tabulated position.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec
from jaxtyping import Array, Float, Integer

from impls.frequencies import (
    PAIRINGS,
    Scaling,
    attention_factor,
    dynamic_theta,
    inverse_frequencies,
    validate_rotary_dim,
    validate_theta,
)


class RopeTable(nnx.Variable):
    """A precomputed cos or sin table of a :class:`RoPE`.

    A separate Variable type, not ``nnx.Param``, so that an optimizer over ``nnx.Param`` never
    updates it, while ``nnx.state`` and ``nnx.split`` still carry it.
    """


def _check_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {value!r} of type {type(value).__name__}.")


def _compute_dtype(dtype: jnp.dtype) -> jnp.dtype:
    # bfloat16 and float16 are widened to float32: a bf16 angle loses whole radians past
    # position 256, and bf16 arithmetic doubles the output error. float64 (under x64) stays.
    return jnp.promote_types(dtype, jnp.float32)


def _cond(pred: Array, true_fn: Callable, false_fn: Callable, operand: Array) -> Any:
    """Return ``lax.cond(pred, true_fn, false_fn, operand)``, calling the branch directly outside jit.

    Eager calls have a concrete predicate, and a ``lax.cond`` there would compile a new
    conditional on every call (about 0.2 s on a 2-core CPU). The direct call loses nothing:
    eagerly, the tables and the rotation are two separately compiled programs, so the tables
    are stored to memory between them, as they are after a conditional.
    """
    if isinstance(pred, jax.core.Tracer):
        return jax.lax.cond(pred, true_fn, false_fn, operand)
    return true_fn(operand) if bool(pred) else false_fn(operand)


def _gather_rows(
    table: Float[Array, "table_length half"], positions: Integer[Array, "*batch seq"]
) -> Float[Array, "*batch seq half"]:
    """Return ``table[positions]``, sharded like ``positions`` with the feature axis replicated.

    Under a mesh with explicit axes (the default of ``jax.make_mesh`` in jax 0.10), a gather
    with sharded indices raises unless the call gives its output sharding.
    """
    sharding = jax.typeof(positions).sharding
    out_sharding = None
    if not sharding.mesh.empty:
        out_sharding = sharding.update(spec=PartitionSpec(*sharding.spec, None))
    return table.at[positions].get(mode="clip", out_sharding=out_sharding)


@functools.partial(jax.jit, static_argnames=("stop",))
def _all_in_range(positions: Integer[Array, "..."], stop: int) -> Array:
    """Return whether every position lies in ``[0, stop)``, as one compiled program."""
    return jnp.all((positions >= 0) & (positions < stop))


@functools.partial(jax.jit, static_argnames=("dtype",))
def _looked_up_tables(
    cos_table: Float[Array, "table_length half"],
    sin_table: Float[Array, "table_length half"],
    positions: Integer[Array, "*batch seq"],
    *,
    dtype: jnp.dtype,
) -> tuple[Float[Array, "*batch seq half"], Float[Array, "*batch seq half"]]:
    # mode="clip" in the gather is safe, because this runs only when every index is in the table.
    return _gather_rows(cos_table, positions).astype(dtype), _gather_rows(sin_table, positions).astype(dtype)


def as_positions(positions: Any, name: str, dtype: Any = None) -> Integer[Array, "..."]:
    """Convert ``positions`` to a JAX integer array, rejecting values that would wrap.

    ``dtype`` is the integer dtype the caller stores the positions in. By default it is the
    dtype JAX stores them in: without x64, JAX keeps int64 and uint64 in 32 bits and wraps
    larger values silently, so a position above ``2**31 - 1`` would rotate as another one.
    Concrete values are checked. Traced values cannot be, and they wrap. Integer dtypes
    narrower than 32 bits are widened to int32.
    """
    if not isinstance(positions, jax.Array):
        positions = np.asarray(positions)
    if positions.dtype.kind in "iu" and not isinstance(positions, jax.core.Tracer):
        stored = np.dtype(jax.dtypes.canonicalize_dtype(positions.dtype) if dtype is None else dtype)
        if not np.can_cast(positions.dtype, stored, "safe") and positions.size:
            _check_position_range(np.asarray(positions), stored, name, x64_helps=dtype is None)

    positions = jnp.asarray(positions)
    if jnp.issubdtype(positions.dtype, jnp.floating):
        raise TypeError(
            f"{name} must be integers, got dtype {positions.dtype}. Float positions lose "
            f"exactness (bfloat16 rounds 257 to 256); pass {name}.astype(jnp.int32)."
        )
    if not jnp.issubdtype(positions.dtype, jnp.integer):
        raise TypeError(
            f"{name} must be integers, got dtype {positions.dtype}. Pass {name}.astype(jnp.int32)."
        )
    if jnp.iinfo(positions.dtype).bits < 32:
        # int8 and int16 cannot hold a table length such as 4096, so comparing positions
        # with it would wrap eagerly and raise OverflowError under jit. int32 represents every
        # narrower value exactly.
        positions = positions.astype(jnp.int32)
    return positions


def _check_position_range(positions: np.ndarray, stored: np.dtype, name: str, *, x64_helps: bool) -> None:
    limits = np.iinfo(stored)
    low, high = positions.min(), positions.max()
    if limits.min <= low and high <= limits.max:
        return
    value = int(low) if low < limits.min else int(high)
    hint = "Pass positions inside that range."
    if x64_helps and not jax.config.jax_enable_x64:
        hint = "Enable x64 with jax.config.update('jax_enable_x64', True), or pass positions inside that range."
    raise ValueError(
        f"{name} contains {value}, outside the {stored} range [{limits.min}, {limits.max}] "
        f"that stores these {positions.dtype} positions, so it would wrap silently. {hint}"
    )


def _check_positions(
    x_shape: tuple[int, ...], positions: Integer[Array, "..."], name: str
) -> Integer[Array, "*batch seq"]:
    positions = as_positions(positions, name)
    batch_seq = x_shape[:-2]
    if positions.shape == batch_seq[-1:]:
        return jnp.broadcast_to(positions, batch_seq)
    if positions.shape != batch_seq:
        raise ValueError(
            f"{name} has shape {positions.shape}, but x of shape {x_shape} needs "
            f"[seq] = {batch_seq[-1:]} or [batch, seq] = {batch_seq}."
        )
    return positions


def rotate(
    x: Float[Array, "*batch seq heads head_dim"],
    cos: Float[Array, "*batch seq half"],
    sin: Float[Array, "*batch seq half"],
    pairing: str = "half_split",
) -> Float[Array, "*batch seq heads head_dim"]:
    """Rotate the first ``R = 2 * cos.shape[-1]`` features of ``x`` by the given tables.

    The arithmetic runs in float32 (float64 for float64 inputs) and the result is rounded
    once to ``x.dtype``.

    Raises:
        ValueError: an unknown ``pairing``, ``cos`` and ``sin`` of different shapes, or tables
            wider than half the head size.
    """
    if pairing not in PAIRINGS:
        raise ValueError(f"Unknown pairing {pairing!r}. Valid pairings: {', '.join(PAIRINGS)}.")
    if cos.shape != sin.shape:
        raise ValueError(
            f"cos and sin must have the same shape, got {cos.shape} and {sin.shape}. Pass both "
            f"from one RoPE.tables call."
        )
    rotary_dim = 2 * cos.shape[-1]
    head_dim = x.shape[-1]
    if rotary_dim > head_dim:
        raise ValueError(
            f"The tables have {cos.shape[-1]} frequencies, which rotate {rotary_dim} features, but "
            f"x has only {head_dim}. Compute the tables for a rotary_dim <= {head_dim}."
        )
    compute_dtype = _compute_dtype(x.dtype)

    rotated = x[..., :rotary_dim].astype(compute_dtype)
    cos = cos[..., None, :].astype(compute_dtype)  # [*B, S, 1, R/2]: shared by every head
    sin = sin[..., None, :].astype(compute_dtype)

    if pairing == "half_split":
        first, second = rotated[..., : rotary_dim // 2], rotated[..., rotary_dim // 2 :]
        # Stacking on a new axis and reshaping is a free view for XLA, where a concatenate
        # of the halves costs a copy: [*B, S, H, 2, R/2] -> [*B, S, H, R].
        out = jnp.stack([first * cos - second * sin, second * cos + first * sin], axis=-2)
    else:
        # [*B, S, H, R] -> [*B, S, H, R/2, 2]: adjacent features form a pair.
        pairs = rotated.reshape(*rotated.shape[:-1], rotary_dim // 2, 2)
        first, second = pairs[..., 0], pairs[..., 1]
        out = jnp.stack([first * cos - second * sin, second * cos + first * sin], axis=-1)
    # [*B, S, H, 2, R/2] or [*B, S, H, R/2, 2] -> [*B, S, H, R]
    out = out.reshape(*rotated.shape).astype(x.dtype)

    if rotary_dim == head_dim:
        return out
    return jnp.concatenate([out, x[..., rotary_dim:]], axis=-1)


@functools.partial(jax.jit, static_argnames=("dynamic", "rotary_dim", "dtype", "attention_factor"))
def _computed_tables(
    positions: Integer[Array, "*batch seq"],
    inv_freq: Float[Array, " half"] | None,
    *,
    dynamic: tuple[float, float, int] | None,
    rotary_dim: int,
    dtype: jnp.dtype,
    attention_factor: float,
) -> tuple[Float[Array, "*batch seq half"], Float[Array, "*batch seq half"]]:
    """Return cos and sin of ``positions * inv_freq`` ``[*B, S, R/2]``.

    Under dynamic scaling ``inv_freq`` is None and the frequencies follow from ``dynamic =
    (theta, factor, original_max_position_embeddings)`` and each row's largest position.

    Compiled as one program, so an eager call runs one program instead of a handful of single
    operations, each compiled once per shape. Under an outer jit it is inlined.
    """
    if dynamic is not None:
        theta, factor, original = dynamic
        # [*B, 1]: one base per row, from that row's largest position, so rows of one batch
        # never change each other's frequencies.
        # The initial value is the dtype's minimum, so it changes no real maximum and an
        # empty sequence gets the base theta instead of a reduction error.
        lowest = jnp.iinfo(positions.dtype).min
        row_length = positions.max(axis=-1, keepdims=True, initial=lowest).astype(dtype) + 1
        length = jnp.maximum(row_length, original)
        base = theta * (factor * length / original - (factor - 1.0)) ** (rotary_dim / (rotary_dim - 2))
        exponents = jnp.arange(0, rotary_dim, 2, dtype=dtype) / rotary_dim
        inv_freq = 1.0 / base**exponents  # [*B, R/2]
        inv_freq = inv_freq[..., None, :]  # [*B, 1, R/2]

    # A broadcast multiply, not an outer product through dot_general: see the RoPE docs.
    angles = positions[..., None].astype(dtype) * inv_freq
    cos = jnp.cos(angles)
    sin = jnp.sin(angles)
    if attention_factor != 1.0:
        cos, sin = cos * attention_factor, sin * attention_factor
    return cos, sin


# Eager calls run the rotation as one compiled program rather than a dozen single operations,
# each of which would compile once per shape (about 40 ms apiece on a 2-core CPU). Under an
# outer jit the call is inlined and fuses as before.
_compiled_rotate = jax.jit(rotate, static_argnames=("pairing",))


class RoPE(nnx.Module):
    """Rotary position embedding for ``[*batch, seq, heads, head_dim]`` queries and keys.

    The math is written out in the module docstring. Angles computed in a call are a float32
    broadcast multiply ``positions * inv_freq`` (float64 under x64 with float64 inputs), never
    a matmul or einsum, whose float32 precision drops to bf16 or TF32 passes on TPUs and
    recent GPUs. Inverse frequencies are computed on the host in float64 and rounded once,
    except under dynamic scaling: its base depends on the positions, so the device computes
    the frequencies in the same dtype as the angles.

    Tables of cos and sin are precomputed (as :class:`RopeTable`, not ``nnx.Param``) only when
    both ``embedding_size`` and ``max_seq_len`` are given. They are computed in float64 on the
    host and rounded once, so they are more exact than float32 angles. When any position of a
    call falls outside ``[0, max_seq_len)``, the whole call computes its tables on the fly
    instead, exactly as the uncached module does: no position ever reads a clamped row.

    Args:
        theta: the base of the frequencies, > 0.
        embedding_size: the head size ``D``; with ``max_seq_len``, enables the tables and a
            check of ``x.shape[-1]``.
        max_seq_len: number of positions to tabulate; requires ``embedding_size``.
        rotary_dim: number of leading features to rotate (partial rotary); default: all.
        pairing: ``"half_split"`` (Hugging Face, Equinox, Gemma, upstream Flax) or
            ``"interleaved"`` (torchtune, Meta's Llama reference).
        scaling: a Hugging Face ``rope_parameters``-style mapping such as
            ``{"rope_type": "llama3", "factor": 8.0, ...}``, or None.

    Example:

    >>> import jax.numpy as jnp
    >>> rope = RoPE(theta=10_000.0)
    >>> x = jnp.ones((2, 5, 3, 8))  # [batch, seq, heads, head_dim]
    >>> rope(x).shape
    (2, 5, 3, 8)
    >>> bool(jnp.allclose(rope(x)[:, 0], x[:, 0]))  # position 0 is the identity
    True
    >>> positions = jnp.array([[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]])  # packed row, plain row
    >>> rope(x, positions).dtype
    dtype('float32')
    """

    def __init__(
        self,
        theta: float = 10_000.0,
        embedding_size: int | None = None,
        max_seq_len: int | None = None,
        *,
        rotary_dim: int | None = None,
        pairing: str = "half_split",
        scaling: Mapping[str, Any] | Scaling | None = None,
    ):
        self.theta = validate_theta(theta)

        if (embedding_size is None) != (max_seq_len is None):
            raise ValueError(
                f"embedding_size and max_seq_len enable the precomputed tables together: pass "
                f"both or neither, got embedding_size={embedding_size}, max_seq_len={max_seq_len}."
            )
        if embedding_size is not None:
            _check_int("embedding_size", embedding_size)
            _check_int("max_seq_len", max_seq_len)
            if embedding_size <= 0 or embedding_size % 2 and rotary_dim is None:
                raise ValueError(
                    f"embedding_size must be a positive even number because features rotate "
                    f"in pairs, got embedding_size={embedding_size}. Pass an even head size, or "
                    f"rotary_dim to rotate only an even number of leading features."
                )
            if max_seq_len <= 0:
                raise ValueError(f"max_seq_len must be positive, got max_seq_len={max_seq_len}.")
        if rotary_dim is not None:
            validate_rotary_dim(rotary_dim, embedding_size)
        if pairing not in PAIRINGS:
            raise ValueError(f"Unknown pairing {pairing!r}. Valid pairings: {', '.join(PAIRINGS)}.")

        self.embedding_size = embedding_size
        self.max_seq_len = max_seq_len
        self.rotary_dim = rotary_dim
        self.pairing = pairing
        self.scaling = Scaling.from_config(scaling)
        self.attention_factor = attention_factor(self.scaling)
        if rotary_dim is not None or embedding_size is not None:
            self._check_dynamic_rotary_dim(rotary_dim or embedding_size)

        self.cos: RopeTable | None = nnx.data(None)
        self.sin: RopeTable | None = nnx.data(None)
        # Dynamic scaling changes its frequencies with each row's largest position, so it has
        # no fixed table.
        if embedding_size is not None and self.scaling.rope_type != "dynamic":
            table_dim = rotary_dim or embedding_size
            # The tables are computed in float64 on the host and rounded once (error 3e-8),
            # which is more exact than float32 angles (error 5e-4 rad at position 8191).
            angles = np.arange(max_seq_len, dtype=np.float64)[:, None] * self._inv_freq_f64(table_dim)
            table_dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
            self.cos = RopeTable(jnp.asarray(np.cos(angles) * self.attention_factor, table_dtype))
            self.sin = RopeTable(jnp.asarray(np.sin(angles) * self.attention_factor, table_dtype))

    def _check_dynamic_rotary_dim(self, rotary_dim: int) -> None:
        if self.scaling.rope_type == "dynamic" and rotary_dim <= 2:
            raise ValueError(
                f"dynamic scaling raises its base to the power R / (R - 2), which is undefined "
                f"for rotary_dim R = {rotary_dim}; rotate at least 4 features or use another "
                f"scaling type."
            )

    def _check_table_shapes(self, cos_table: Array, sin_table: Array, table_dim: int) -> None:
        # A state restored with nnx.update or from a checkpoint can replace the tables with
        # ones of another length, and the clamped gather would then read the last row for
        # positions between the table length and max_seq_len.
        expected = (self.max_seq_len, table_dim // 2)
        for name, table in (("cos", cos_table), ("sin", sin_table)):
            if table.shape != expected:
                raise ValueError(
                    f"The {name} table has shape {table.shape}, but this RoPE has max_seq_len="
                    f"{self.max_seq_len} and rotates {table_dim} features, which need {expected}. "
                    f"The tables were probably restored from a RoPE built with other sizes; "
                    f"build this RoPE with max_seq_len={table.shape[0]} and matching sizes, or "
                    f"restore a state of the same configuration."
                )

    def _inv_freq_f64(self, rotary_dim: int) -> np.ndarray:
        return inverse_frequencies(rotary_dim, self.theta, self.scaling)

    def _rotary_dim_for(self, head_dim: int) -> int:
        if self.embedding_size is not None and head_dim != self.embedding_size:
            raise ValueError(
                f"x.shape[-1] = {head_dim} differs from this RoPE's embedding_size = "
                f"{self.embedding_size}; build the RoPE with embedding_size={head_dim}."
            )
        if self.rotary_dim is None:
            if head_dim % 2:
                raise ValueError(
                    f"The head size x.shape[-1] = {head_dim} is odd, but features rotate in "
                    f"pairs; use an even head size or pass an even rotary_dim."
                )
            return head_dim
        return validate_rotary_dim(self.rotary_dim, head_dim)

    def _compute_tables(
        self, positions: Integer[Array, "*batch seq"], rotary_dim: int, dtype: jnp.dtype
    ) -> tuple[Float[Array, "*batch seq half"], Float[Array, "*batch seq half"]]:
        if self.scaling.rope_type == "dynamic":
            params = self.scaling.params
            dynamic = (self.theta, params["factor"], params["original_max_position_embeddings"])
            inv_freq = None
        else:
            dynamic = None
            inv_freq = jnp.asarray(self._inv_freq_f64(rotary_dim), dtype)  # [R/2]
        return _computed_tables(
            positions, inv_freq, dynamic=dynamic, rotary_dim=rotary_dim, dtype=dtype,
            attention_factor=self.attention_factor,
        )

    def tables(
        self, positions: Integer[Array, "*batch seq"], rotary_dim: int, dtype: jnp.dtype = jnp.float32
    ) -> tuple[Float[Array, "*batch seq half"], Float[Array, "*batch seq half"]]:
        """Return ``(cos, sin)`` of shape ``[*batch, seq, rotary_dim / 2]`` for ``positions``.

        Both come out of a ``lax.cond``, which XLA always stores to memory: fused into the
        rotation instead, cos and sin would be recomputed for every head. Measured on a
        2-core CPU with jax 0.10.2 at [4, 2048, 16, 128], that fusion costs 2.4x (float32) to
        4x (bfloat16) the time of a plain ``x * c``. ``lax.optimization_barrier`` does not
        prevent it, because XLA:CPU removes barriers before fusion.
        """
        positions = as_positions(positions, "positions")
        dtype = _compute_dtype(dtype)
        rotary_dim = validate_rotary_dim(rotary_dim)
        self._check_dynamic_rotary_dim(rotary_dim)

        def compute(positions):
            return self._compute_tables(positions, rotary_dim, dtype)

        table_dim = self.rotary_dim or self.embedding_size
        use_table = (
            self.cos is not None
            and rotary_dim == table_dim
            and jnp.finfo(self.cos.dtype).bits >= jnp.finfo(dtype).bits
        )
        if not use_table:
            if not isinstance(positions, jax.core.Tracer):
                # Eager: the tables are a program of their own and reach memory before the
                # rotation reads them, so the conditional below would prevent nothing.
                return compute(positions)
            # Both branches compute the same tables, so the predicate only has to be unknown
            # at compile time (XLA folds a conditional on a constant). It is false only when a
            # position equals the minimum of its dtype, which then takes the other branch.
            # NOTE: under jax.vmap with batched positions, lax.cond becomes a select of both
            # branches, so the tables are computed twice and the fusion above comes back.
            not_minimum = jnp.all(positions > jnp.iinfo(positions.dtype).min)
            return _cond(not_minimum, compute, compute, positions)

        cos_table, sin_table = self.cos[...], self.sin[...]
        self._check_table_shapes(cos_table, sin_table, table_dim)
        in_table = _all_in_range(positions, self.max_seq_len)

        def lookup(positions):
            return _looked_up_tables(cos_table, sin_table, positions, dtype=dtype)

        # JAX gathers clamp out-of-range indices without an error, so a position outside the
        # table would silently read its first or last row. Such batches take the computed path.
        return _cond(in_table, lookup, compute, positions)

    def __call__(
        self,
        x: Float[Array, "*batch seq heads head_dim"],
        input_positions: Integer[Array, "*batch seq"] | Integer[Array, " seq"] | None = None,
    ) -> Float[Array, "*batch seq heads head_dim"]:
        """Rotate ``x`` by ``input_positions`` (default ``0 .. seq - 1``).

        ``input_positions`` may be ``[seq]`` (shared by every example) or ``[*batch, seq]``
        (per example, as packing and left padding need), with any integer values that JAX can
        store: without x64 that is the int32 range, and NumPy or Python positions outside it
        raise a ValueError.

        NOTE: under ``jax.jit`` the positions are traced, so this check cannot run. jit itself
        converts int64 NumPy arguments to int32 without x64, and values outside the int32
        range wrap silently.
        """
        if x.ndim < 3:
            raise ValueError(
                f"x must be [*batch, seq, heads, head_dim] with at least 3 axes, got shape {x.shape}."
            )
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"x must be a floating-point array, got dtype {x.dtype}.")
        rotary_dim = self._rotary_dim_for(x.shape[-1])

        if input_positions is None:
            input_positions = jnp.arange(x.shape[-3], dtype=jnp.int32)
        positions = _check_positions(x.shape, input_positions, "input_positions")

        cos, sin = self.tables(positions, rotary_dim, x.dtype)
        return _compiled_rotate(x, cos, sin, pairing=self.pairing)
