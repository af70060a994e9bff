"""Positions through ``dot_product_attention_with_rope`` and ``MultiHeadAttention``, decoding included.

Most cases run in float64, with x64 switched on only inside the ``x64`` fixture. Rounding then
stays far below the effect of any position error (about 1e-2 here for a position off by one),
so a tight tolerance separates right from wrong. The reference is NumPy: the module's own
weights, :func:`impls.reference.rope_reference` and :func:`impls.reference.attention_reference`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from impls.flax_nnx import MultiHeadAttention, RoPE, dot_product_attention_with_rope
from impls.reference import attention_reference, rope_reference

EPS32 = float(np.finfo(np.float32).eps)


def attention_atol(value: np.ndarray, out_kernel: np.ndarray | None = None) -> float:
    """Return the tolerance of a float64 attention output against the float64 reference.

    nnx.dot_product_attention without dropout calls jax.nn.dot_product_attention, which computes
    the softmax in float32 even for float64 inputs (jax 0.10.2). Each weight then carries a
    relative error of at most about 16 float32 epsilons (exp, a sum of at most 9 terms, the
    division), so an attention output moves by at most ``16 * eps32 * max|v|``. An output
    projection multiplies that by the largest L1 norm of its kernel's columns. The float64
    steps round about 1e9 times finer and do not count.
    """
    atol = 16 * EPS32 * float(np.abs(value).max())
    if out_kernel is not None:
        atol *= float(np.abs(out_kernel).sum(axis=(0, 1)).max())
    return atol

IN_FEATURES = 16
HEAD_DIM = 8
TABLE_LENGTH = 32


@pytest.fixture
def x64():
    """Run the test with 64-bit types, restoring the previous setting afterwards."""
    with jax.enable_x64(True):
        yield


def random_array(shape: tuple[int, ...], seed: int, dtype=np.float64) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def make_rope(*, cached: bool, pairing: str = "half_split") -> RoPE:
    """Return a RoPE with tables of ``TABLE_LENGTH`` positions when ``cached``."""
    if cached:
        return RoPE(embedding_size=HEAD_DIM, max_seq_len=TABLE_LENGTH, pairing=pairing)
    return RoPE(pairing=pairing)


def make_mha(*, kv_heads: int = 4, cached: bool = False, pairing: str = "half_split", dtype=jnp.float64):
    """Return a fresh 4-head MultiHeadAttention with head size 8, RoPE and random biases."""
    # Building a module runs many small eager ops, so each configuration is built once and
    # cloned: a test that fills the decode cache never changes the stored original.
    return nnx.clone(_built_mha(kv_heads, cached, pairing, jnp.dtype(dtype), jax.config.jax_enable_x64))


@functools.lru_cache(maxsize=None)
def _built_mha(kv_heads: int, cached: bool, pairing: str, dtype: jnp.dtype, x64: bool) -> MultiHeadAttention:
    del x64  # Only part of the cache key: tables built under x64 are float64.
    mha = MultiHeadAttention(
        num_heads=4,
        in_features=IN_FEATURES,
        qkv_features=4 * HEAD_DIM,
        num_kv_heads=kv_heads,
        rope=make_rope(cached=cached, pairing=pairing),
        decode=False,
        param_dtype=dtype,
        dtype=dtype,
        rngs=nnx.Rngs(0),
    )
    # Zero biases would hide a bias applied after the rotation instead of before it.
    for seed, layer in enumerate((mha.query, mha.key, mha.value, mha.out)):
        layer.bias[...] = jnp.asarray(0.3 * random_array(layer.bias.shape, 100 + seed), dtype)
    return mha


def project(layer: nnx.LinearGeneral, inputs: np.ndarray) -> np.ndarray:
    """Return the float64 NumPy projection ``[*B, S, heads, head_dim]`` of an input projection."""
    kernel, bias = np.asarray(layer.kernel[...], np.float64), np.asarray(layer.bias[...], np.float64)
    return np.einsum("...sf,fhd->...shd", np.asarray(inputs, np.float64), kernel) + bias


def mha_pair_atol(mha: MultiHeadAttention, inputs) -> float:
    """Return the tolerance between two runs of ``mha`` over ``inputs``, each within attention_atol."""
    return 2 * attention_atol(project(mha.value, inputs), np.asarray(mha.out.kernel[...]))


@nnx.jit
def run_mha(mha, inputs_q, inputs_k=None, *, input_positions=None, kv_positions=None, mask=None):
    """Call ``mha`` outside decode mode, jitted: one compilation costs less than the eager ops."""
    return mha(inputs_q, inputs_k, input_positions=input_positions, kv_positions=kv_positions, mask=mask)


def mha_reference(mha, inputs_q, inputs_kv, q_positions, kv_positions, mask=None, pairing="half_split"):
    """Return the float64 NumPy output of ``mha``'s weights with the oracle's RoPE and attention.

    Returns ``(output, atol)``, the tolerance by :func:`attention_atol`.
    """
    query = rope_reference(project(mha.query, inputs_q), q_positions, pairing=pairing)
    key = rope_reference(project(mha.key, inputs_kv), kv_positions, pairing=pairing)
    value = project(mha.value, inputs_kv)
    attended = attention_reference(query, key, value, mask)
    out_kernel = np.asarray(mha.out.kernel[...], np.float64)
    out = np.einsum("...shd,hdo->...so", attended, out_kernel) + np.asarray(mha.out.bias[...], np.float64)
    return out, attention_atol(value, out_kernel)


def causal_mask(q_positions: np.ndarray, kv_positions: np.ndarray) -> np.ndarray:
    """Return ``[batch, 1, Sq, Sk]``: a query attends to keys at its position or before."""
    return (kv_positions[..., None, :] <= q_positions[..., :, None])[..., None, :, :]


# --- dot_product_attention_with_rope -----------------------------------------------------------

# (id, query length, key length, kv heads, query positions, key positions); None: the default.
ATTENTION_CASES = [
    ("self", 6, 6, 4, None, None),
    ("self-offset", 6, 6, 4, np.arange(6) + 40, None),
    ("gqa", 6, 6, 2, np.array([[0, 1, 2, 0, 1, 2], [5, 6, 7, 8, 9, 10]]), None),
    ("cross", 4, 9, 4, np.arange(5, 9), np.arange(9)),
    ("cross-gqa-rows", 3, 7, 1, np.array([[4, 5, 6], [10, 11, 12]]), np.array([np.arange(7), np.arange(6, 13)])),
    ("negative", 5, 5, 4, np.arange(5) - 20, np.arange(5) - 22),
]


@pytest.mark.parametrize("cached", [False, True], ids=["computed", "cached"])
@pytest.mark.parametrize(
    "q_len, kv_len, kv_heads, q_positions, kv_positions",
    [case[1:] for case in ATTENTION_CASES],
    ids=[case[0] for case in ATTENTION_CASES],
)
def test_attention_fn_matches_oracle(x64, q_len, kv_len, kv_heads, q_positions, kv_positions, cached):
    query = random_array((2, q_len, 4, HEAD_DIM), 0)
    key = random_array((2, kv_len, kv_heads, HEAD_DIM), 1)
    value = random_array((2, kv_len, kv_heads, HEAD_DIM), 2)

    out = dot_product_attention_with_rope(
        jnp.asarray(query),
        jnp.asarray(key),
        jnp.asarray(value),
        rope=make_rope(cached=cached),
        input_positions=None if q_positions is None else jnp.asarray(q_positions),
        kv_positions=None if kv_positions is None else jnp.asarray(kv_positions),
    )

    # Without kv_positions, keys of a self-attention take the query positions.
    ref_q_positions = np.arange(q_len) if q_positions is None else q_positions
    ref_kv_positions = ref_q_positions if kv_positions is None else kv_positions
    expected = attention_reference(
        rope_reference(query, ref_q_positions), rope_reference(key, ref_kv_positions), value
    )
    np.testing.assert_allclose(out, expected, rtol=0, atol=attention_atol(value))


@pytest.mark.parametrize("pairing", ["half_split", "interleaved"])
@pytest.mark.parametrize("cached", [False, True], ids=["computed", "cached"])
def test_right_aligned_query_equals_self_attention(x64, cached, pairing):
    # Queries of tokens 2..5 against keys of tokens 0..5 score exactly as those tokens do in
    # causal self-attention over 0..5, because the scores depend only on position differences.
    query = jnp.asarray(random_array((2, 6, 4, HEAD_DIM), 0))
    key = jnp.asarray(random_array((2, 6, 2, HEAD_DIM), 1))
    value = jnp.asarray(random_array((2, 6, 2, HEAD_DIM), 2))
    rope = make_rope(cached=cached, pairing=pairing)
    positions = np.arange(6)

    full = dot_product_attention_with_rope(
        query, key, value, mask=jnp.asarray(causal_mask(positions, positions)), rope=rope
    )
    block = dot_product_attention_with_rope(
        query[:, 2:],
        key,
        value,
        mask=jnp.asarray(causal_mask(positions[2:], positions)),
        rope=rope,
        input_positions=jnp.arange(2, 6),
        kv_positions=jnp.arange(6),
    )

    # Both sides round their softmax in float32, each within attention_atol of float64.
    np.testing.assert_allclose(block, full[:, 2:], rtol=0, atol=2 * attention_atol(np.asarray(value)))


def test_attention_fn_cross_lengths_need_kv_positions():
    query, key = jnp.ones((1, 4, 2, HEAD_DIM)), jnp.ones((1, 6, 2, HEAD_DIM))

    with pytest.raises(ValueError) as info:
        dot_product_attention_with_rope(query, key, key, rope=RoPE(), input_positions=jnp.arange(4))

    message = str(info.value)
    assert "Query length 4 differs from key length 6" in message
    assert "pass kv_positions of length 6" in message


# --- MultiHeadAttention ------------------------------------------------------------------------

# (id, kv heads, query length, key length, query positions, key positions, pairing, cached);
# None: the default positions, and keys take the query positions in self-attention.
MHA_CASES = [
    ("self", 4, 6, None, None, None, "half_split", False),
    ("self-cached", 4, 6, None, None, None, "half_split", True),
    ("self-packed", 4, 6, None, np.array([[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 4, 5]]), None, "interleaved", True),
    ("gqa", 2, 6, None, np.arange(6) + 11, None, "half_split", False),
    ("gqa-past-table", 2, 6, None, np.arange(6) + TABLE_LENGTH - 3, None, "interleaved", True),
    ("mqa", 1, 6, None, None, None, "half_split", True),
    ("cross", 4, 3, 7, np.arange(4, 7), np.arange(7), "half_split", False),
    ("cross-gqa", 2, 5, 8, np.array([np.arange(3, 8), np.arange(9, 14)]), np.array([np.arange(8), np.arange(6, 14)]),
     "interleaved", True),
]


@pytest.mark.parametrize(
    "kv_heads, q_len, kv_len, q_positions, kv_positions, pairing, cached",
    [case[1:] for case in MHA_CASES],
    ids=[case[0] for case in MHA_CASES],
)
def test_mha_matches_oracle(x64, kv_heads, q_len, kv_len, q_positions, kv_positions, pairing, cached):
    mha = make_mha(kv_heads=kv_heads, cached=cached, pairing=pairing)
    inputs_q = random_array((2, q_len, IN_FEATURES), 0)
    inputs_kv = inputs_q if kv_len is None else random_array((2, kv_len, IN_FEATURES), 1)

    out = run_mha(
        mha,
        jnp.asarray(inputs_q),
        None if kv_len is None else jnp.asarray(inputs_kv),
        input_positions=None if q_positions is None else jnp.asarray(q_positions),
        kv_positions=None if kv_positions is None else jnp.asarray(kv_positions),
    )

    ref_q_positions = np.arange(q_len) if q_positions is None else q_positions
    ref_kv_positions = ref_q_positions if kv_positions is None else kv_positions
    expected, atol = mha_reference(mha, inputs_q, inputs_kv, ref_q_positions, ref_kv_positions, pairing=pairing)
    np.testing.assert_allclose(out, expected, rtol=0, atol=atol)


@pytest.mark.parametrize("cached", [False, True], ids=["computed", "cached"])
def test_mha_right_aligned_cross_attention(x64, cached):
    mha = make_mha(kv_heads=2, cached=cached)
    inputs = jnp.asarray(random_array((2, 6, IN_FEATURES), 0))
    positions = np.arange(6)

    full = run_mha(mha, inputs, mask=jnp.asarray(causal_mask(positions, positions)))
    block = run_mha(
        mha,
        inputs[:, 2:],
        inputs,
        input_positions=jnp.arange(2, 6),
        kv_positions=jnp.arange(6),
        mask=jnp.asarray(causal_mask(positions[2:], positions)),
    )

    np.testing.assert_allclose(block, full[:, 2:], rtol=0, atol=mha_pair_atol(mha, inputs))


def test_mha_positions_change_output(x64):
    # Guards the tests above: if positions were dropped on the way, both calls would agree.
    mha = make_mha()
    inputs = jnp.asarray(random_array((2, 6, IN_FEATURES), 0))
    packed = jnp.asarray([0, 1, 2, 0, 1, 2])

    difference = np.abs(np.asarray(run_mha(mha, inputs, input_positions=packed) - run_mha(mha, inputs))).max()

    assert difference > 1e-3


def test_mha_without_rope_equals_upstream():
    ours = MultiHeadAttention(num_heads=2, in_features=8, decode=False, rngs=nnx.Rngs(3))
    upstream = nnx.MultiHeadAttention(num_heads=2, in_features=8, decode=False, rngs=nnx.Rngs(3))
    inputs = jnp.asarray(random_array((2, 5, 8), 0, np.float32))

    np.testing.assert_array_equal(ours(inputs), upstream(inputs))


# --- decoding ------------------------------------------------------------------------------------


def eager_decode_step(mha, inputs, positions, key_mask):
    """Run one decode call; ``positions`` and ``key_mask`` may be None."""
    kwargs = {}
    if positions is not None:
        kwargs["input_positions"] = positions
    if key_mask is not None:
        kwargs["mask"] = key_mask[:, None, None, :]
    return mha(inputs, decode=True, **kwargs)


decode_step = nnx.jit(eager_decode_step)


def decode(mha, inputs, chunks, positions=None, key_mask=None, step=decode_step):
    """Feed ``inputs`` ``[B, L, F]`` to ``mha`` in decode mode, in chunks of the given lengths.

    ``positions`` ``[B, L]`` or ``[L]`` are passed per chunk when given. ``key_mask`` ``[B, L]`` marks the
    tokens that later tokens may attend to (False for padding). Returns the concatenated outputs.
    """
    length = inputs.shape[-2]
    mha.init_cache(inputs.shape, inputs.dtype)
    key_mask = None if key_mask is None else jnp.asarray(key_mask)
    outputs, start = [], 0
    for chunk in chunks:
        stop = start + chunk
        chunk_positions = None if positions is None else jnp.asarray(positions[..., start:stop])
        outputs.append(step(mha, inputs[:, start:stop], chunk_positions, key_mask))
        start = stop
    assert start == length
    return jnp.concatenate(outputs, axis=1)


# (id, chunk lengths: a prefill chunk then decode steps, kv heads, cached)
DECODE_SCHEDULES = [
    ("token-by-token", [1] * 7, 4, False),
    ("token-by-token-gqa-cached", [1] * 7, 2, True),
    ("prefill3-then-tokens", [3, 1, 1, 1, 1], 4, True),
    ("prefill3-then-tokens-gqa", [3, 1, 1, 1, 1], 2, False),
    ("prefill4-chunk2-token-mqa", [4, 2, 1], 1, True),
]


@pytest.mark.parametrize(
    "chunks, kv_heads, cached", [s[1:] for s in DECODE_SCHEDULES], ids=[s[0] for s in DECODE_SCHEDULES]
)
def test_decode_equals_causal_pass(x64, chunks, kv_heads, cached):
    # Positions come from the cache index. A query or key rotated at the wrong position (for
    # example every new token at position 0) changes the scores and fails this test.
    mha = make_mha(kv_heads=kv_heads, cached=cached)
    inputs = jnp.asarray(random_array((2, 7, IN_FEATURES), 0))
    positions = np.arange(7)

    full = run_mha(mha, inputs, mask=jnp.asarray(causal_mask(positions, positions)))
    decoded = decode(mha, inputs, chunks)

    np.testing.assert_allclose(decoded, full, rtol=0, atol=mha_pair_atol(mha, inputs))


# Positions with gaps, per row [2, 6] or shared [6]: the differences between positions are not
# those of the cache slots, so only rotation at the given positions reproduces the full pass.
GAPPED_POSITIONS = {
    "per-row": np.array([[0, 1, 2, 9, 10, 30], [3, 5, 8, 13, 21, 34]]),
    "shared": np.array([0, 1, 2, 9, 10, 30]),
}


@pytest.mark.parametrize("cached", [False, True], ids=["computed", "cached"])
@pytest.mark.parametrize("layout", list(GAPPED_POSITIONS))
def test_decode_given_positions_equals_pass(x64, layout, cached):
    mha = make_mha(kv_heads=2, cached=cached)
    inputs = jnp.asarray(random_array((2, 6, IN_FEATURES), 0))
    positions = GAPPED_POSITIONS[layout]

    full = run_mha(
        mha, inputs, input_positions=jnp.asarray(positions), mask=jnp.asarray(causal_mask(positions, positions))
    )
    decoded = decode(mha, inputs, [3, 1, 1, 1], positions=positions)

    np.testing.assert_allclose(decoded, full, rtol=0, atol=mha_pair_atol(mha, inputs))


def test_decode_stores_positions(x64):
    mha = make_mha()
    inputs = jnp.asarray(random_array((2, 5, IN_FEATURES), 0))
    positions = np.array([[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])

    decode(mha, inputs[:, :4], [3, 1], positions=positions[:, :4])

    np.testing.assert_array_equal(mha.cached_positions[...], positions[:, :4])
    assert int(mha.cache_index[...]) == 4


@pytest.mark.parametrize("cached", [False, True], ids=["computed", "cached"])
def test_decode_left_padded_batch(x64, cached):
    # Row 0 carries 2 pad tokens before its 5 real ones; row 1 has 7 real tokens. Pads sit at
    # position 0, as transformers' generate places them, and are masked as keys. Each row's
    # real tokens must match an unpadded causal pass over that row alone.
    mha = make_mha(kv_heads=2, cached=cached)
    tokens = random_array((2, 7, IN_FEATURES), 0)
    pads = np.array([2, 0])
    is_token = np.arange(7)[None, :] >= pads[:, None]
    positions = np.maximum(np.cumsum(is_token, axis=1) - 1, 0)
    inputs = np.where(is_token[..., None], tokens, 0.0)

    decoded = decode(mha, jnp.asarray(inputs), [4, 1, 1, 1], positions=positions, key_mask=is_token)

    for row, pad in enumerate(pads):
        real = jnp.asarray(tokens[row : row + 1, pad:])
        row_positions = np.arange(7 - pad)
        expected = run_mha(mha, real, mask=jnp.asarray(causal_mask(row_positions, row_positions)))
        atol = mha_pair_atol(mha, tokens)
        np.testing.assert_allclose(decoded[row : row + 1, pad:], expected, rtol=0, atol=atol)


def float32_mha_atol(mha: MultiHeadAttention, inputs) -> float:
    """Return the tolerance between two float32 runs of ``mha`` over ``inputs``.

    Each run stays within half of it from float64. The projections sum 16 products and the
    rotation adds 4 roundings, so q and k carry a relative error of 20 float32 epsilons. A score
    sums 8 products of them, so it moves by ``48 * eps * sum|q_i k_i| / sqrt(8)``, and the
    softmax weights move by twice that, relative, on top of the softmax's own 16 epsilons.
    """
    query, key, value = (project(layer, inputs) for layer in (mha.query, mha.key, mha.value))
    heads_per_kv = query.shape[-2] // key.shape[-2]
    key = np.repeat(key, heads_per_kv, axis=-2)
    # [B, H, Sq, Sk]: the largest sum of absolute products behind any score.
    absolute_scores = np.einsum("bqhd,bkhd->bhqk", np.abs(query), np.abs(key)) / np.sqrt(HEAD_DIM)
    score_error = 48 * EPS32 * absolute_scores.max()
    relative_weight_error = 16 * EPS32 + 2 * score_error
    out_kernel_norm = np.abs(np.asarray(mha.out.kernel[...])).sum(axis=(0, 1)).max()
    return 2 * float(relative_weight_error * np.abs(value).max() * out_kernel_norm)


def test_decode_float32_equals_causal_pass():
    # The same schedule in float32, where the projections and the scores round in float32 too.
    mha = make_mha(kv_heads=2, cached=True, dtype=jnp.float32)
    inputs = jnp.asarray(random_array((2, 7, IN_FEATURES), 0, np.float32))
    positions = np.arange(7)

    full = run_mha(mha, inputs, mask=jnp.asarray(causal_mask(positions, positions)))
    decoded = decode(mha, inputs, [3, 1, 1, 1, 1])

    np.testing.assert_allclose(decoded, full, rtol=0, atol=float32_mha_atol(mha, inputs))


def test_eager_decode_equals_jitted():
    # Every other comparison here and in parity/ runs the module under jit. Eager calls take
    # other branches (concrete positions and cache index), so one schedule runs eagerly too.
    inputs = jnp.asarray(random_array((2, 7, IN_FEATURES), 0, np.float32))
    positions = np.array([[0, 1, 2, 3, 4, 5, 6], [9, 10, 11, 12, 13, 14, 15]])
    jitted = decode(make_mha(kv_heads=2, cached=True, dtype=jnp.float32), inputs, [3, 1, 1, 1, 1], positions)
    mha = make_mha(kv_heads=2, cached=True, dtype=jnp.float32)

    eager = decode(mha, inputs, [3, 1, 1, 1, 1], positions, step=eager_decode_step)

    np.testing.assert_allclose(eager, jitted, rtol=0, atol=float32_mha_atol(mha, inputs))


# (id, call on a decode-mode module with a cache of length 4 and batch 2, fragments)
DECODE_ERRORS = [
    ("kv_positions", lambda mha: mha(jnp.ones((2, 1, IN_FEATURES)), decode=True, kv_positions=jnp.arange(1)),
     ["kv_positions cannot be given with decode=True", "input_positions"]),
    ("positions-shape", lambda mha: mha(jnp.ones((2, 2, IN_FEATURES)), decode=True, input_positions=jnp.arange(3)),
     ["(3,)", "2 new tokens", "[2]", "(2, 2)"]),
    ("positions-float", lambda mha: mha(jnp.ones((2, 1, IN_FEATURES)), decode=True, input_positions=jnp.zeros(1)),
     ["float32", "astype(jnp.int32)"]),
    ("cache-overflow", lambda mha: mha(jnp.ones((2, 5, IN_FEATURES)), decode=True),
     ["4 slots", "0 are filled", "5 new tokens", "longer input_shape"]),
]


@pytest.mark.parametrize(
    "call, fragments", [case[1:] for case in DECODE_ERRORS], ids=[case[0] for case in DECODE_ERRORS]
)
def test_decode_bad_input_message(call, fragments):
    mha = make_mha(dtype=jnp.float32)
    mha.init_cache((2, 4, IN_FEATURES))

    with pytest.raises((ValueError, TypeError)) as info:
        call(mha)

    message = str(info.value)
    for fragment in fragments:
        assert fragment in message


def test_decode_without_cache_message():
    mha = make_mha(dtype=jnp.float32)

    with pytest.raises(ValueError) as info:
        mha(jnp.ones((2, 1, IN_FEATURES)), decode=True)

    assert "call init_cache(input_shape) first" in str(info.value)


def test_decode_overflow_under_jit_is_nan():
    # Under jit the cache index is traced and cannot raise, so an overflowing call, and every
    # call after it, returns NaN instead of attending to overwritten slots.
    mha = make_mha(dtype=jnp.float32)
    mha.init_cache((2, 4, IN_FEATURES))
    inputs = jnp.asarray(random_array((2, 6, IN_FEATURES), 0, np.float32))

    fitting = decode_step(mha, inputs[:, :3], None, None)
    overflowing = decode_step(mha, inputs[:, 3:5], None, None)
    later = decode_step(mha, inputs[:, 5:6], None, None)

    assert np.isfinite(fitting).all()
    assert np.isnan(overflowing).all()
    assert np.isnan(later).all()
    assert int(mha.cache_index[...]) == 6


def test_decode_chunk_longer_than_cache_under_jit():
    mha = make_mha(dtype=jnp.float32)
    mha.init_cache((2, 4, IN_FEATURES))

    with pytest.raises(ValueError) as info:
        decode_step(mha, jnp.ones((2, 5, IN_FEATURES)), None, None)

    message = str(info.value)
    assert "4 slots" in message
    assert "5 new tokens never fit" in message
    assert "longer input_shape" in message
    assert int(mha.cache_index[...]) == 0


# (id, call on a decode-mode module with a cache of length 4 and batch 2, fragments), each of
# which fails only after the new keys were computed.
LATE_DECODE_ERRORS = [
    ("query-key-lengths", lambda mha: mha(jnp.ones((2, 2, IN_FEATURES)), jnp.ones((2, 3, IN_FEATURES)), decode=True),
     ["inputs_q has 2 tokens", "inputs_k has 3"]),
    ("rope-head-size", None, ["x.shape[-1] = 8", "embedding_size = 4"]),
]


@pytest.mark.parametrize(
    "call, fragments", [case[1:] for case in LATE_DECODE_ERRORS], ids=[case[0] for case in LATE_DECODE_ERRORS]
)
def test_failed_decode_leaves_cache_unchanged(call, fragments):
    mha = make_mha(dtype=jnp.float32)
    if call is None:
        # The RoPE raises inside the attention function, after the cache was extended.
        mha.rope = RoPE(embedding_size=4, max_seq_len=8)
        call = lambda module: module(jnp.ones((2, 1, IN_FEATURES)), decode=True)  # noqa: E731
    mha.init_cache((2, 4, IN_FEATURES))
    before = jax.tree.map(np.asarray, nnx.state(mha, nnx.Cache))

    with pytest.raises(ValueError) as info:
        call(mha)

    message = str(info.value)
    for fragment in fragments:
        assert fragment in message
    after = jax.tree.map(np.asarray, nnx.state(mha, nnx.Cache))
    assert int(mha.cache_index[...]) == 0
    jax.tree.map(np.testing.assert_array_equal, after, before)


def test_decode_positions_outside_int32_rejected(x64):
    # The cache stores positions as int32 also under x64, where 2**32 + 1 would wrap to 1.
    mha = make_mha()
    mha.init_cache((2, 4, IN_FEATURES))

    with pytest.raises(ValueError) as info:
        mha(jnp.ones((2, 1, IN_FEATURES)), decode=True, input_positions=np.array([2**32 + 1]))

    message = str(info.value)
    assert "4294967297" in message
    assert "int32 range" in message
    assert int(mha.cache_index[...]) == 0


def test_decode_bool_positions_message():
    mha = make_mha(dtype=jnp.float32)
    mha.init_cache((2, 4, IN_FEATURES))

    with pytest.raises(TypeError) as info:
        mha(jnp.ones((2, 1, IN_FEATURES)), decode=True, input_positions=np.array([True]))

    assert "got dtype bool" in str(info.value)
    assert "Float positions" not in str(info.value)


@pytest.mark.parametrize("name", ["inputs_k", "inputs_v"])
def test_mha_kv_feature_size_message(name):
    mha = make_mha(dtype=jnp.float32)
    inputs = {"inputs_k": jnp.ones((2, 3, IN_FEATURES)), "inputs_v": jnp.ones((2, 3, IN_FEATURES))}
    inputs[name] = jnp.ones((2, 3, 8))

    with pytest.raises(ValueError, match=rf"{name} has 8 features but this module expects in_kv_features = 16"):
        mha(jnp.ones((2, 3, IN_FEATURES)), **inputs, kv_positions=jnp.arange(3))
