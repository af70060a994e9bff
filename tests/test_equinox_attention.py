"""Attention-level parity of Equinox: ``MultiheadAttention`` with RoPE applied through ``process_heads``.

The route is the one Equinox documents: ``process_heads`` receives the projected heads
``[seq, heads, qk_size]`` and rotates queries and keys with ``jax.vmap(rope, in_axes=1,
out_axes=1)``. The module gives query row ``i`` and key row ``j`` the positions ``i`` and ``j``,
so in cross-attention both sequences start at position 0. The reference projects the same
inputs with the module's own weights in float64, rotates with the oracle and attends with
:func:`impls.reference.attention_reference`.
"""

from __future__ import annotations

import numpy as np
import pytest

eqx = pytest.importorskip("equinox")
jax = pytest.importorskip("jax")

from impls.reference import attention_reference, rope_reference  # noqa: E402

HEADS = 4
QK_SIZE = 16
VO_SIZE = 8
QUERY_SIZE, KEY_SIZE, VALUE_SIZE, OUTPUT_SIZE = 32, 24, 20, 16

# float32 throughout: every inner product has at most 32 terms, and three of them chain
# (projection, score, output projection), so the standard bound of n * eps relative per step
# gives about 3 * 32 * eps32 = 1.1e-5 relative to the largest output.
RELATIVE_TOLERANCE = 3 * 32 * float(np.finfo(np.float32).eps)


def make_attention(key_size: int, value_size: int):
    """A MultiheadAttention with biases everywhere and queries of QUERY_SIZE features."""
    return eqx.nn.MultiheadAttention(
        num_heads=HEADS,
        query_size=QUERY_SIZE,
        key_size=key_size,
        value_size=value_size,
        output_size=OUTPUT_SIZE,
        qk_size=QK_SIZE,
        vo_size=VO_SIZE,
        use_query_bias=True,
        use_key_bias=True,
        use_value_bias=True,
        use_output_bias=True,
        key=jax.random.key(0),
    )


@pytest.fixture(autouse=True)
def clean_equinox_cache():
    """Equinox caches RoPE tables by (embedding_size, dtype) without theta: clear around each test."""
    eqx.clear_caches()
    yield
    eqx.clear_caches()


def linear_float64(layer, x: np.ndarray) -> np.ndarray:
    """Apply an ``eqx.nn.Linear`` (weight ``[out, in]``) in float64."""
    out = np.asarray(x, np.float64) @ np.asarray(layer.weight, np.float64).T
    if layer.bias is not None:
        out = out + np.asarray(layer.bias, np.float64)
    return out


def reference_attention(module, query, key, value, mask, theta: float) -> np.ndarray:
    """Return the module's output computed in float64 with oracle RoPE, ``[q_seq, output_size]``."""
    q_heads = linear_float64(module.query_proj, query).reshape(len(query), HEADS, QK_SIZE)
    k_heads = linear_float64(module.key_proj, key).reshape(len(key), HEADS, QK_SIZE)
    v_heads = linear_float64(module.value_proj, value).reshape(len(value), HEADS, VO_SIZE)

    # [S, H, D] -> [1, S, H, D]: the oracle's batch axis.
    q_rotated = rope_reference(q_heads[None], np.arange(len(query)), theta=theta)
    k_rotated = rope_reference(k_heads[None], np.arange(len(key)), theta=theta)
    attended = attention_reference(q_rotated, k_rotated, v_heads[None], mask)[0]  # [Sq, H, VO]
    return linear_float64(module.output_proj, attended.reshape(len(query), HEADS * VO_SIZE))


def rope_attention(module, rope, query, key, value, mask, *, jit: bool):
    def process_heads(query_heads, key_heads, value_heads):
        per_head = jax.vmap(rope, in_axes=1, out_axes=1)
        return per_head(query_heads), per_head(key_heads), value_heads

    def call(module, query, key, value, mask):
        return module(query, key, value, mask, process_heads=process_heads)

    if jit:
        call = eqx.filter_jit(call)
    return np.asarray(call(module, query, key, value, mask))


CASES = {
    "self": (12, 12, None),
    "self-causal": (12, 12, "causal"),
    "cross": (5, 9, None),
    "cross-masked": (5, 9, "key_padding"),
}


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("theta", [10_000.0, 500_000.0], ids=["theta10000", "theta500000"])
@pytest.mark.parametrize("case", list(CASES))
def test_multihead_attention_with_rope(case, theta, jit):
    query_length, key_length, mask_kind = CASES[case]
    rng = np.random.default_rng(0)
    query = rng.standard_normal((query_length, QUERY_SIZE)).astype(np.float32)
    if case.startswith("self"):
        attention = make_attention(QUERY_SIZE, QUERY_SIZE)
        key = value = query
    else:
        attention = make_attention(KEY_SIZE, VALUE_SIZE)
        key = rng.standard_normal((key_length, KEY_SIZE)).astype(np.float32)
        value = rng.standard_normal((key_length, VALUE_SIZE)).astype(np.float32)

    mask = None
    if mask_kind == "causal":
        mask = np.tril(np.ones((query_length, key_length), bool))
    elif mask_kind == "key_padding":  # the last 3 keys are padding
        mask = np.ones((query_length, key_length), bool)
        mask[:, -3:] = False
    rope = eqx.nn.RotaryPositionalEmbedding(QK_SIZE, theta=theta)

    out = rope_attention(attention, rope, query, key, value, mask, jit=jit)

    expected = reference_attention(attention, query, key, value, mask, theta)
    assert out.shape == (query_length, OUTPUT_SIZE)
    np.testing.assert_allclose(out, expected, rtol=0, atol=RELATIVE_TOLERANCE * np.abs(expected).max())


def test_rope_changes_attention():
    """Without RoPE the output differs, so the comparison above depends on the rotation."""
    attention = make_attention(QUERY_SIZE, QUERY_SIZE)
    query = np.random.default_rng(0).standard_normal((12, QUERY_SIZE)).astype(np.float32)

    plain = np.asarray(attention(query, query, query))

    expected = reference_attention(attention, query, query, query, None, 10_000.0)
    assert np.abs(plain - expected).max() > 100 * RELATIVE_TOLERANCE * np.abs(expected).max()
