"""Query/key projection weights converted between the interleaved and half-split RoPE pairings.

Meta's Llama checkpoints rotate adjacent features ``(2i, 2i + 1)`` of each head (interleaved);
Hugging Face's Llama rotates ``(i, i + R/2)`` (half-split). Both use the same frequency for
pair ``i``, so permuting the output features of each head of the query and key projections
with ``perm = impls.frequencies.interleaved_to_half_split(head_dim)`` turns one model into the
other. The reason is that ``half_split(q[..., perm]) == interleaved(q)[..., perm]``, and a dot
product of a query and a key permuted alike is unchanged. Attention scores are therefore equal,
while the rotated queries and keys differ by the permutation. Value and output projections do
not change.

The functions permute the output features (one block of ``head_dim`` per head) along ``axis``:
``0`` for torch ``nn.Linear`` and Equinox ``Linear`` weights ``[out, in]`` and for biases,
``-1`` for Flax kernels ``[in, out]``. With partial rotary only the first ``rotary_dim``
features of each head move. Grouped-query attention converts the key weight with its own
number of heads (``num_kv_heads``). NumPy, JAX and torch arrays are accepted; the result has the
input's type and dtype and is a pure gather, so a round trip is bitwise exact.
"""

from __future__ import annotations

from typing import Any, TypeVar

import numpy as np

from impls.frequencies import PAIRINGS, interleaved_to_half_split

Array = TypeVar("Array")


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")
    return int(value)


def _weight_shape(name: str, weight: Any) -> tuple[int, ...]:
    if not hasattr(weight, "shape") or not (hasattr(weight, "take") or hasattr(weight, "index_select")):
        raise TypeError(
            f"{name} must be a NumPy, JAX or torch array, got {type(weight).__name__}. "
            f"Convert it with np.asarray first."
        )
    return tuple(weight.shape)


def _check_axis(axis: Any, shape: tuple[int, ...]) -> int:
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"axis must be an int, got {axis!r} of type {type(axis).__name__}.")
    if not -len(shape) <= axis < len(shape):
        raise ValueError(f"axis={axis} is out of range for a weight of shape {shape}.")
    return int(axis)


def head_feature_permutation(
    num_heads: int, head_dim: int, *, rotary_dim: int | None = None, inverse: bool = False
) -> np.ndarray:
    """Return the index ``[num_heads * head_dim]`` that maps interleaved heads to half-split ones.

    Feature ``j`` of head ``h`` in the result is feature ``perm[j]`` of head ``h`` in the input,
    where ``perm`` is :func:`impls.frequencies.interleaved_to_half_split`. ``inverse=True``
    returns the index of the opposite direction (half-split to interleaved).

    >>> head_feature_permutation(2, 4).tolist()
    [0, 2, 1, 3, 4, 6, 5, 7]
    """
    num_heads = _check_positive_int("num_heads", num_heads)
    head_dim = _check_positive_int("head_dim", head_dim)
    if head_dim % 2:
        raise ValueError(f"head_dim must be even because RoPE rotates features in pairs, got head_dim={head_dim}.")
    if rotary_dim is None:
        rotary_dim = head_dim
    rotary_dim = _check_positive_int("rotary_dim", rotary_dim)
    if rotary_dim % 2 or rotary_dim > head_dim:
        raise ValueError(
            f"rotary_dim must be even and at most head_dim={head_dim}, got rotary_dim={rotary_dim}; "
            f"leave it unset to rotate the whole head."
        )

    perm = interleaved_to_half_split(head_dim, rotary_dim)
    if inverse:
        perm = np.argsort(perm)
    index = np.arange(num_heads)[:, None] * head_dim + perm[None, :]  # [num_heads, head_dim]
    return index.reshape(-1)


def permute_heads(
    weight: Array,
    num_heads: int,
    *,
    source: str,
    target: str,
    rotary_dim: int | None = None,
    axis: int = 0,
) -> Array:
    """Reorder the per-head output features of a query or key weight from ``source`` to ``target`` pairing.

    Args:
        weight: projection weight or bias; NumPy, JAX or torch.
        num_heads: heads whose features lie along ``axis`` (``num_kv_heads`` for a key weight).
        source: pairing the weight was trained with, ``"interleaved"`` or ``"half_split"``.
        target: pairing it should work with.
        rotary_dim: rotated features per head (even); default the whole head.
        axis: the output-feature axis of ``weight``. For a kernel ``[in, heads, head_dim]``
            (Flax ``LinearGeneral``) or a bias ``[heads, head_dim]``, where every head has its
            own row, pass ``axis=-1`` with ``num_heads=1``.

    Raises:
        TypeError: a weight that is not an array, or an axis that is not an int.
        ValueError: unknown pairing, an axis outside ``weight``, a size along ``axis`` that
            ``num_heads`` does not divide, an odd head size or rotary_dim, or a kernel whose
            axis -2 has ``num_heads`` entries while ``num_heads`` splits axis -1.

    NOTE: the kernel check needs at least 3 axes. A 2-D bias ``[heads, head_dim]`` with
    ``num_heads=heads`` cannot be distinguished from a kernel ``[in, heads * head_dim]`` whose ``in``
    equals ``heads``, so it is permuted wrongly without an error.
    """
    for name, pairing in (("source", source), ("target", target)):
        if pairing not in PAIRINGS:
            raise ValueError(f"Unknown {name} pairing {pairing!r}. Valid pairings: {', '.join(PAIRINGS)}.")

    shape = _weight_shape("weight", weight)
    axis = _check_axis(axis, shape)
    num_heads = _check_positive_int("num_heads", num_heads)
    # A Flax LinearGeneral kernel [..., in, heads, head_dim] keeps each head on its own axis.
    # Splitting its last axis into num_heads blocks would permute inside those blocks, which
    # is wrong, and raises nothing whenever the block size is even.
    if len(shape) >= 3 and axis in (-1, len(shape) - 1) and num_heads > 1 and shape[-2] == num_heads:
        raise ValueError(
            f"weight of shape {shape} looks like a [in, heads, head_dim] kernel with its "
            f"{num_heads} heads on axis -2, but num_heads={num_heads} splits axis -1 into heads. "
            f"Pass num_heads=1 with axis=-1 to permute each head's features, or reshape the "
            f"weight to [in, heads * head_dim] first."
        )
    size = shape[axis]
    if size % num_heads:
        raise ValueError(
            f"weight has {size} features along axis {axis} (shape {shape}), which num_heads={num_heads} "
            f"does not divide; pass num_kv_heads for a key weight, or the axis that contains the "
            f"output features (0 for torch [out, in], -1 for Flax [in, out])."
        )
    head_dim = size // num_heads
    if head_dim % 2:
        raise ValueError(
            f"weight of shape {shape} gives heads of {head_dim} features ({size} / num_heads={num_heads}), "
            f"but RoPE rotates features in pairs, so the head size must be even; check num_heads and axis."
        )

    index = head_feature_permutation(num_heads, head_dim, rotary_dim=rotary_dim, inverse=source == "half_split")
    if source == target:
        return weight
    if hasattr(weight, "index_select"):  # torch.Tensor: take() would flatten it.
        import torch

        return weight.index_select(axis, torch.from_numpy(index).to(weight.device))
    return weight.take(index, axis=axis)


def convert_query_key_weights(
    query_weight: Array,
    key_weight: Array,
    *,
    num_heads: int,
    num_kv_heads: int | None = None,
    source: str,
    target: str,
    rotary_dim: int | None = None,
    axis: int = 0,
) -> tuple[Array, Array]:
    """Convert a query and a key projection together, grouped-query attention included.

    ``num_kv_heads`` defaults to ``num_heads`` (multi-head attention). Both projections must
    give heads of one size, and ``num_heads`` must be a multiple of ``num_kv_heads``.

    Raises:
        TypeError: the type checks of :func:`permute_heads`.
        ValueError: the checks of :func:`permute_heads`, or query and key head sizes that
            differ, or ``num_heads`` not a multiple of ``num_kv_heads``.
    """
    num_heads = _check_positive_int("num_heads", num_heads)
    num_kv_heads = num_heads if num_kv_heads is None else _check_positive_int("num_kv_heads", num_kv_heads)
    if num_heads % num_kv_heads:
        raise ValueError(
            f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads} "
            f"(each key/value head serves num_heads / num_kv_heads query heads)."
        )

    query_axis = _check_axis(axis, _weight_shape("query_weight", query_weight))
    key_axis = _check_axis(axis, _weight_shape("key_weight", key_weight))
    query_size, key_size = query_weight.shape[query_axis], key_weight.shape[key_axis]
    if query_size % num_heads == 0 and key_size % num_kv_heads == 0:
        query_head_dim, key_head_dim = query_size // num_heads, key_size // num_kv_heads
        if query_head_dim != key_head_dim:
            raise ValueError(
                f"query heads have {query_head_dim} features ({query_size} / num_heads={num_heads}) but "
                f"key heads have {key_head_dim} ({key_size} / num_kv_heads={num_kv_heads}); "
                f"check num_heads, num_kv_heads and axis={axis}."
            )

    query = permute_heads(query_weight, num_heads, source=source, target=target, rotary_dim=rotary_dim, axis=axis)
    key = permute_heads(key_weight, num_kv_heads, source=source, target=target, rotary_dim=rotary_dim, axis=axis)
    return query, key


__all__ = ["convert_query_key_weights", "head_feature_permutation", "permute_heads"]
