"""Dot-product attention with RoPE, and a multi-head attention that threads positions through.

Shape notation:
    B: batch (any leading axes), Sq: query length, Sk: key length, H: query heads,
    Hkv: key/value heads (H is a multiple of Hkv), D: head size.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from jaxtyping import Array, Bool, Float, Integer

from impls.flax_nnx.rope import RoPE, as_positions


def dot_product_attention_with_rope(
    query: Float[Array, "*batch q_len heads head_dim"],
    key: Float[Array, "*batch kv_len kv_heads head_dim"],
    value: Float[Array, "*batch kv_len kv_heads v_dim"],
    bias: Float[Array, "..."] | None = None,
    mask: Bool[Array, "..."] | None = None,
    *,
    rope: RoPE,
    input_positions: Integer[Array, "*batch q_len"] | Integer[Array, " q_len"] | None = None,
    kv_positions: Integer[Array, "*batch kv_len"] | Integer[Array, " kv_len"] | None = None,
    **kwargs: Any,
) -> Float[Array, "*batch q_len heads v_dim"]:
    """Rotate queries and keys with ``rope``, then apply ``nnx.dot_product_attention``.

    Fits as the ``attention_fn`` of ``nnx.MultiHeadAttention``, bound with
    ``functools.partial(dot_product_attention_with_rope, rope=rope)``.

    Positions:
        * queries take ``input_positions``, keys take ``kv_positions``;
        * without ``kv_positions``, keys take ``input_positions`` when query and key lengths
          are equal (self-attention), and a ``ValueError`` asks for ``kv_positions`` otherwise;
        * without either, queries take ``0 .. Sq - 1`` and keys ``0 .. Sk - 1``.

    With ``R(p)`` the rotation of every pair by ``p * inv_freq`` and ``a`` the attention
    factor of the scaling (1 except for yarn), the score of a query at position ``m`` and a key
    at position ``n`` is

        s(m, n) = a**2 * <R(m) q, R(n) k> / sqrt(D) = a**2 * <q, R(n - m) k> / sqrt(D),

    because rotations are orthogonal. The scores depend only on position differences, so a
    query block placed at positions ``2 .. 5`` against keys at ``0 .. 5`` scores the same as
    those tokens in self-attention. Dynamic scaling is the exception: its frequencies follow
    each row's largest position, which can differ between queries and keys.

    Remaining keyword arguments (``dropout_rng``, ``deterministic``, ``is_causal``, ...) go to
    ``nnx.dot_product_attention``.

    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 6, 2, 8)), jnp.float32)
    >>> full = dot_product_attention_with_rope(x, x, x, rope=RoPE(), is_causal=True)
    >>> causal = jnp.arange(6)[None, :] <= jnp.arange(2, 6)[:, None]  # [4 queries, 6 keys]
    >>> block = dot_product_attention_with_rope(
    ...     x[:, 2:], x, x, mask=causal, rope=RoPE(),
    ...     input_positions=jnp.arange(2, 6), kv_positions=jnp.arange(6))
    >>> block.shape
    (1, 4, 2, 8)
    >>> bool(jnp.allclose(block, full[:, 2:], atol=1e-5))
    True
    """
    if kv_positions is None:
        if input_positions is not None:
            if query.shape[-3] != key.shape[-3]:
                raise ValueError(
                    f"Query length {query.shape[-3]} differs from key length {key.shape[-3]}, so "
                    f"input_positions cannot serve the keys: pass kv_positions of length "
                    f"{key.shape[-3]} too."
                )
            kv_positions = input_positions

    query = rope(query, input_positions)
    key = rope(key, kv_positions)
    return nnx.dot_product_attention(query, key, value, bias, mask, **kwargs)


@functools.lru_cache(maxsize=256)
def _accepts_positions(attention_fn: Callable[..., Any]) -> bool:
    try:
        parameters = inspect.signature(attention_fn).parameters
    except (TypeError, ValueError):
        return False
    return "input_positions" in parameters


class MultiHeadAttention(nnx.MultiHeadAttention):
    """``nnx.MultiHeadAttention`` whose call also takes ``input_positions`` and ``kv_positions``.

    The positions are forwarded to ``attention_fn`` only when given, so an ``attention_fn`` that
    does not know the keywords keeps working. Pass ``rope=`` to make the RoPE a child module
    (``nnx.state`` and ``nnx.split`` then carry it) with ``dot_product_attention_with_rope`` as
    the default ``attention_fn``.

    Decoding (``decode=True`` after :meth:`init_cache`) takes one or more new tokens per call.
    The cache stores keys before rotation together with their positions, and the attention
    function rotates them at those positions, so a key rotates exactly as in a full pass.
    Each new token takes its position from ``input_positions`` when given (per row, so a
    left-padded batch decodes right) and from the cache index otherwise. A call that raises
    leaves the cache unchanged.

    New tokens that do not fit into the cache raise a ValueError in eager calls, and under jit
    when the chunk alone is longer than the cache.
    NOTE: under jit the cache index is traced and cannot raise, so a chunk that overflows the
    remaining slots returns an output that is NaN everywhere. The index still advances, so
    every later call also returns NaN until :meth:`init_cache`. The cache contents are then
    undefined, because ``lax.dynamic_update_slice`` clamps its start and overwrites the last
    slots.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> mha = MultiHeadAttention(num_heads=2, in_features=8, rope=RoPE(), decode=False,
    ...                          rngs=nnx.Rngs(0))
    >>> x = jnp.ones((1, 5, 8))
    >>> mha(x, input_positions=jnp.arange(5)).shape
    (1, 5, 8)
    """

    def __init__(
        self,
        *args: Any,
        rope: RoPE | None = None,
        attention_fn: Callable[..., Array] | None = None,
        **kwargs: Any,
    ):
        if attention_fn is None:
            attention_fn = dot_product_attention_with_rope if rope is not None else nnx.dot_product_attention
        super().__init__(*args, attention_fn=attention_fn, **kwargs)
        self.rope = rope
        self.cached_positions: nnx.Cache | None = nnx.data(None)

    def init_cache(self, input_shape: tuple[int, ...], dtype: jnp.dtype = jnp.float32) -> None:
        """Allocate the decode cache for inputs of shape ``[*batch, max_length, features]``."""
        super().init_cache(input_shape, dtype)
        self.cached_positions = nnx.Cache(jnp.zeros(input_shape[:-1], jnp.int32))

    def _attention_kwargs(self, input_positions, kv_positions) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        if self.rope is not None:
            kwargs["rope"] = self.rope
        if input_positions is not None:
            kwargs["input_positions"] = input_positions
        if kv_positions is not None:
            kwargs["kv_positions"] = kv_positions
        return kwargs

    def _extend_cache(
        self, query: Array, key: Array, value: Array, mask: Array | None, input_positions: Array | None
    ) -> tuple[Array, Array, Array, Array, Array, Array | None, Callable[[], None]]:
        """Return the cache extended by the new tokens, without storing it yet.

        Returns the keys, values, mask and positions for the attention function, a traced
        overflow flag (None in eager calls, which raise instead) and a function that stores
        the extended cache. The caller stores it only after the attention succeeded, so a
        call that raises leaves the cache as it was.
        """
        if self.cached_key is None or self.cached_value is None or self.cache_index is None:
            raise ValueError("The decode cache is not initialized: call init_cache(input_shape) first.")

        *batch_dims, max_length, kv_heads, head_dim = self.cached_key.shape
        chunk = key.shape[-3]
        if tuple(key.shape[:-3]) != tuple(batch_dims) or key.shape[-2:] != (kv_heads, head_dim):
            raise ValueError(
                f"Decode input gives keys of shape {key.shape}, which do not fit the cache of "
                f"shape {self.cached_key.shape}: batch and head axes must match."
            )
        if query.shape[-3] != chunk:
            raise ValueError(
                f"Decoding takes the same new tokens as queries and keys, but inputs_q has "
                f"{query.shape[-3]} tokens and inputs_k has {chunk}. Pass inputs_k of the same "
                f"length, or leave it unset."
            )

        index = self.cache_index[...]
        # lax.dynamic_update_slice clamps its start, so an overfull cache would silently
        # overwrite its last slots. An eager call has a concrete index and raises. Under jit
        # only a chunk longer than the whole cache is known at trace time, and any other
        # overflow is returned as a flag that makes the caller's output NaN.
        overflow = None
        if isinstance(index, jax.core.Tracer):
            if chunk > max_length:
                raise ValueError(
                    f"The decode cache has {max_length} slots, so {chunk} new tokens never fit. "
                    f"Call init_cache with a longer input_shape."
                )
            overflow = index + chunk > max_length
        elif int(index) + chunk > max_length:
            raise ValueError(
                f"The decode cache has {max_length} slots and {int(index)} are filled, so {chunk} "
                f"new tokens do not fit; call init_cache with a longer input_shape."
            )
        if input_positions is None:
            positions = index + jnp.arange(chunk, dtype=jnp.int32)
        else:
            # The cache stores positions as int32, also under x64.
            positions = as_positions(input_positions, "input_positions", jnp.int32)
            if positions.shape not in ((chunk,), (*batch_dims, chunk)):
                raise ValueError(
                    f"input_positions has shape {positions.shape}, but {chunk} new tokens need "
                    f"[{chunk}] or {(*batch_dims, chunk)}."
                )
        positions = jnp.broadcast_to(positions, (*batch_dims, chunk)).astype(jnp.int32)

        zero = jnp.zeros((), index.dtype)
        start = (zero,) * len(batch_dims) + (index, zero, zero)
        cached_key = lax.dynamic_update_slice(self.cached_key[...], key.astype(self.cached_key.dtype), start)
        cached_value = lax.dynamic_update_slice(self.cached_value[...], value.astype(self.cached_value.dtype), start)
        cached_positions = lax.dynamic_update_slice(
            self.cached_positions[...], positions, (zero,) * len(batch_dims) + (index,)
        )

        def store() -> None:
            self.cached_key[...] = cached_key
            self.cached_value[...] = cached_value
            self.cached_positions[...] = cached_positions
            self.cache_index[...] = index + chunk

        # [Sq, max_length]: new token i attends to cache slots up to index + i, never to unwritten ones.
        visible = jnp.arange(max_length)[None, :] <= (index + jnp.arange(chunk))[:, None]
        visible = jnp.broadcast_to(visible, (*batch_dims, 1, chunk, max_length))
        mask = visible if mask is None else jnp.logical_and(mask, visible)
        return cached_key, cached_value, mask, positions, cached_positions, overflow, store

    def __call__(
        self,
        inputs_q: Float[Array, "*batch q_len features"],
        inputs_k: Float[Array, "*batch kv_len features"] | None = None,
        inputs_v: Float[Array, "*batch kv_len features"] | None = None,
        *,
        input_positions: Integer[Array, "*batch q_len"] | Integer[Array, " q_len"] | None = None,
        kv_positions: Integer[Array, "*batch kv_len"] | Integer[Array, " kv_len"] | None = None,
        mask: Bool[Array, "..."] | None = None,
        deterministic: bool | None = None,
        rngs: nnx.Rngs | nnx.RngStream | None = None,
        sow_weights: bool = False,
        decode: bool | None = None,
        is_causal: bool = False,
        out_sharding: Any = None,
        qkv_sharding: Any = None,
    ) -> Float[Array, "*batch q_len out_features"]:
        """Project, rotate by position, attend and project back; see ``nnx.MultiHeadAttention``."""
        if rngs is None:
            rngs = self.rngs
        elif isinstance(rngs, nnx.Rngs):
            rngs = rngs.dropout

        if inputs_k is None:
            if inputs_v is not None:
                raise ValueError("inputs_v was given without inputs_k; pass inputs_k as well.")
            inputs_k = inputs_q
        if inputs_v is None:
            inputs_v = inputs_k
        if inputs_q.shape[-1] != self.in_features:
            raise ValueError(
                f"inputs_q has {inputs_q.shape[-1]} features but this module expects "
                f"in_features = {self.in_features}."
            )
        for name, inputs in (("inputs_k", inputs_k), ("inputs_v", inputs_v)):
            if inputs.shape[-1] != self.in_kv_features:
                raise ValueError(
                    f"{name} has {inputs.shape[-1]} features but this module expects "
                    f"in_kv_features = {self.in_kv_features}."
                )

        query = self.query(inputs_q, out_sharding=qkv_sharding)  # [*B, Sq, H, D]
        key = self.key(inputs_k, out_sharding=qkv_sharding)  # [*B, Sk, Hkv, D]
        value = self.value(inputs_v, out_sharding=qkv_sharding)  # [*B, Sk, Hkv, D]
        if self.normalize_qk:
            query = self.query_ln(query)
            key = self.key_ln(key)

        decode = nnx.module.first_from(
            decode,
            self.decode,
            error_msg="No decode argument was given to MultiHeadAttention, in the call or the constructor.",
        )
        overflow = store_cache = None
        if decode:
            if kv_positions is not None:
                raise ValueError(
                    "kv_positions cannot be given with decode=True: keys come from the cache, "
                    "which stores each key's position. Pass input_positions for the new tokens."
                )
            key, value, mask, input_positions, kv_positions, overflow, store_cache = self._extend_cache(
                query, key, value, mask, input_positions
            )
            if not _accepts_positions(self.attention_fn) and self.rope is None:
                # An attention function without position arguments cannot receive the cache positions.
                input_positions = kv_positions = None

        dropout_rng = None
        if self.dropout_rate > 0.0:
            deterministic = nnx.module.first_from(
                deterministic,
                self.deterministic,
                error_msg="No deterministic argument was given to MultiHeadAttention, in the call or the constructor.",
            )
            if not deterministic:
                if rngs is None:
                    raise ValueError("Dropout needs rngs: pass rngs to the call or keep_rngs=True.")
                dropout_rng = rngs()
        else:
            deterministic = True

        x = self.attention_fn(
            query,
            key,
            value,
            mask=mask,
            dropout_rng=dropout_rng,
            dropout_rate=self.dropout_rate,
            broadcast_dropout=self.broadcast_dropout,
            deterministic=deterministic,
            dtype=self.dtype,
            precision=self.precision,
            module=self if sow_weights else None,
            is_causal=is_causal,
            **self._attention_kwargs(input_positions, kv_positions),
        )
        out = self.out(x, out_sharding=out_sharding)
        if store_cache is not None:
            store_cache()
        if overflow is not None:
            out = jnp.where(overflow, jnp.nan, out)
        return out
