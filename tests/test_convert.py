"""Query/key weight conversion between the interleaved (Meta) and half-split (Hugging Face) pairings.

The proof is at the level users care about: attention scores of a Meta-layout model with
interleaved RoPE equal those of the converted model with half-split RoPE. Rotation uses the
float64 oracle, so the only difference is summation order (about 1e-15 relative).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from impls.convert import convert_query_key_weights, head_feature_permutation, permute_heads
from impls.reference import attention_reference, rope_reference

HIDDEN = 32  # input features of the projections: small, so 64-head cases stay fast
HEAD_DIM = 16
HEAD_CONFIGS = [(8, 8), (8, 2), (32, 4), (64, 8)]


def project(hidden: np.ndarray, weight: np.ndarray, heads: int) -> np.ndarray:
    """``hidden [B, S, HIDDEN] @ weight.T`` with a torch-layout weight ``[heads * D, HIDDEN]`` -> ``[B, S, heads, D]``."""
    out = hidden @ weight.T
    return out.reshape(*hidden.shape[:-1], heads, -1)


def attention_scores(query: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Return ``q . k / sqrt(D)`` ``[B, H, Sq, Sk]``, each key head shared by a group of query heads."""
    key = np.repeat(key, query.shape[-2] // key.shape[-2], axis=-2)
    return np.einsum("bqhd,bkhd->bhqk", query, key) / np.sqrt(query.shape[-1])


def meta_model(heads: int, kv_heads: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    query_weight = rng.standard_normal((heads * HEAD_DIM, HIDDEN)) / np.sqrt(HIDDEN)
    key_weight = rng.standard_normal((kv_heads * HEAD_DIM, HIDDEN)) / np.sqrt(HIDDEN)
    value_weight = rng.standard_normal((kv_heads * HEAD_DIM, HIDDEN)) / np.sqrt(HIDDEN)
    hidden = rng.standard_normal((2, 12, HIDDEN))
    return query_weight, key_weight, value_weight, hidden


@pytest.mark.parametrize("rotary_dim", [None, 8], ids=["full", "partial8"])
@pytest.mark.parametrize(("heads", "kv_heads"), HEAD_CONFIGS, ids=[f"heads{h}-kv{k}" for h, k in HEAD_CONFIGS])
def test_converted_weights_give_same_scores(heads, kv_heads, rotary_dim):
    query_weight, key_weight, value_weight, hidden = meta_model(heads, kv_heads)
    # Packed rows: the second sequence of each row restarts at 0.
    positions = np.stack([np.r_[np.arange(7), np.arange(5)], np.arange(40, 52)])

    def rotated(weights, pairing):
        query = project(hidden, weights[0], heads)
        key = project(hidden, weights[1], kv_heads)
        rope = {"pairing": pairing, "rotary_dim": rotary_dim}
        return rope_reference(query, positions, **rope), rope_reference(key, positions, **rope)

    meta_query, meta_key = rotated((query_weight, key_weight), "interleaved")
    hf_weights = convert_query_key_weights(
        query_weight,
        key_weight,
        num_heads=heads,
        num_kv_heads=kv_heads,
        source="interleaved",
        target="half_split",
        rotary_dim=rotary_dim,
    )
    hf_query, hf_key = rotated(hf_weights, "half_split")

    meta_scores = attention_scores(meta_query, meta_key)
    hf_scores = attention_scores(hf_query, hf_key)
    np.testing.assert_allclose(hf_scores, meta_scores, rtol=1e-12, atol=1e-12)

    causal = np.tril(np.ones((12, 12), bool))
    value = project(hidden, value_weight, kv_heads)
    np.testing.assert_allclose(
        attention_reference(hf_query, hf_key, value, causal),
        attention_reference(meta_query, meta_key, value, causal),
        rtol=1e-12,
        atol=1e-12,
    )


@pytest.mark.parametrize(("heads", "kv_heads"), HEAD_CONFIGS, ids=[f"heads{h}-kv{k}" for h, k in HEAD_CONFIGS])
def test_unconverted_weights_change_scores(heads, kv_heads):
    """Without conversion the scores differ, so the equality above is not vacuous."""
    query_weight, key_weight, _, hidden = meta_model(heads, kv_heads)
    positions = np.arange(12)

    def scores(pairing):
        query = rope_reference(project(hidden, query_weight, heads), positions, pairing=pairing)
        key = rope_reference(project(hidden, key_weight, kv_heads), positions, pairing=pairing)
        return attention_scores(query, key)

    assert np.abs(scores("half_split") - scores("interleaved")).max() > 0.1


def test_rotated_queries_differ_by_permutation():
    """The converted model's rotated queries are the Meta ones with each head's features permuted."""
    query_weight, _, _, hidden = meta_model(8, 8)
    positions = np.arange(12)

    meta = rope_reference(project(hidden, query_weight, 8), positions, pairing="interleaved")
    hf_weight = permute_heads(query_weight, 8, source="interleaved", target="half_split")
    hf = rope_reference(project(hidden, hf_weight, 8), positions, pairing="half_split")

    perm = head_feature_permutation(1, HEAD_DIM)
    np.testing.assert_allclose(hf, meta[..., perm], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "float64"])
@pytest.mark.parametrize("rotary_dim", [None, 8], ids=["full", "partial8"])
def test_round_trip_is_bitwise(dtype, rotary_dim):
    numpy_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    weight = np.random.default_rng(1).standard_normal((4 * HEAD_DIM, HIDDEN)).astype(numpy_dtype)

    half_split = permute_heads(weight, 4, source="interleaved", target="half_split", rotary_dim=rotary_dim)
    back = permute_heads(half_split, 4, source="half_split", target="interleaved", rotary_dim=rotary_dim)

    assert back.dtype == weight.dtype
    assert back.tobytes() == weight.tobytes()
    assert half_split.tobytes() != weight.tobytes()


def test_partial_rotary_keeps_passthrough_features():
    weight = np.arange(2 * HEAD_DIM, dtype=np.float64)[:, None]  # feature index as the value

    converted = permute_heads(weight, 2, source="interleaved", target="half_split", rotary_dim=8)

    head = converted[:HEAD_DIM, 0].astype(int).tolist()
    assert head == [0, 2, 4, 6, 1, 3, 5, 7, 8, 9, 10, 11, 12, 13, 14, 15]


def test_flax_kernel_axis():
    """A Flax kernel ``[in, out]`` converts along its last axis like the transposed torch weight."""
    query_weight, _, _, _ = meta_model(4, 4)

    from_torch_layout = permute_heads(query_weight, 4, source="interleaved", target="half_split")
    from_flax_layout = permute_heads(query_weight.T, 4, source="interleaved", target="half_split", axis=-1)

    assert np.array_equal(from_flax_layout.T, from_torch_layout)


def test_bias_converts_like_weight_rows():
    query_weight, _, _, _ = meta_model(4, 4)
    bias = query_weight[:, 0].copy()

    converted_bias = permute_heads(bias, 4, source="interleaved", target="half_split")
    converted_weight = permute_heads(query_weight, 4, source="interleaved", target="half_split")

    assert np.array_equal(converted_bias, converted_weight[:, 0])


def test_torch_weight_round_trip():
    torch = pytest.importorskip("torch")
    weight = torch.randn(8 * HEAD_DIM, HIDDEN, dtype=torch.bfloat16)
    query, key = convert_query_key_weights(
        weight, weight[: 2 * HEAD_DIM], num_heads=8, num_kv_heads=2, source="interleaved", target="half_split"
    )

    back_query, back_key = convert_query_key_weights(
        query, key, num_heads=8, num_kv_heads=2, source="half_split", target="interleaved"
    )

    assert isinstance(query, torch.Tensor)
    assert torch.equal(back_query, weight)
    assert torch.equal(back_key, weight[: 2 * HEAD_DIM])
    numpy_query = permute_heads(weight.float().numpy(), 8, source="interleaved", target="half_split")
    assert np.array_equal(query.float().numpy(), numpy_query)


def test_jax_weight_matches_numpy():
    jnp = pytest.importorskip("jax.numpy")
    weight = np.random.default_rng(2).standard_normal((4 * HEAD_DIM, HIDDEN)).astype(np.float32)

    converted = permute_heads(jnp.asarray(weight), 4, source="interleaved", target="half_split")

    assert np.array_equal(np.asarray(converted), permute_heads(weight, 4, source="interleaved", target="half_split"))


# Input checks.


def test_rejects_size_not_divisible_by_heads():
    with pytest.raises(ValueError, match=r"100 features along axis 0 .* num_heads=8 does not divide"):
        permute_heads(np.zeros((100, HIDDEN)), 8, source="interleaved", target="half_split")


def test_rejects_odd_head_size():
    with pytest.raises(ValueError, match=r"heads of 9 features .* must be even"):
        permute_heads(np.zeros((72, HIDDEN)), 8, source="interleaved", target="half_split")


def test_rejects_bad_rotary_dim():
    with pytest.raises(ValueError, match=r"rotary_dim must be even and at most head_dim=16, got rotary_dim=7"):
        permute_heads(np.zeros((64, HIDDEN)), 4, source="interleaved", target="half_split", rotary_dim=7)
    with pytest.raises(ValueError, match=r"at most head_dim=16, got rotary_dim=18"):
        permute_heads(np.zeros((64, HIDDEN)), 4, source="interleaved", target="half_split", rotary_dim=18)


def test_rejects_unknown_pairing():
    with pytest.raises(ValueError, match=r"Unknown target pairing 'neox'"):
        permute_heads(np.zeros((64, HIDDEN)), 4, source="interleaved", target="neox")


def test_rejects_axis_out_of_range():
    with pytest.raises(ValueError, match=r"axis=2 is out of range for a weight of shape \(64, 32\)"):
        permute_heads(np.zeros((64, HIDDEN)), 4, source="interleaved", target="half_split", axis=2)


def test_rejects_heads_not_multiple_of_kv_heads():
    with pytest.raises(ValueError, match=r"num_heads=8 must be a multiple of num_kv_heads=3"):
        convert_query_key_weights(
            np.zeros((128, HIDDEN)), np.zeros((48, HIDDEN)), num_heads=8, num_kv_heads=3,
            source="interleaved", target="half_split",
        )


def test_rejects_query_key_head_size_mismatch():
    with pytest.raises(ValueError, match=r"query heads have 16 features .* key heads have 8"):
        convert_query_key_weights(
            np.zeros((128, HIDDEN)), np.zeros((16, HIDDEN)), num_heads=8, num_kv_heads=2,
            source="interleaved", target="half_split",
        )


def test_rejects_non_positive_heads():
    with pytest.raises(ValueError, match=r"num_heads must be a positive int, got 0"):
        permute_heads(np.zeros((64, HIDDEN)), 0, source="interleaved", target="half_split")


def test_rejects_3d_kernel_split_along_head_dim():
    # A Flax LinearGeneral kernel [in, heads, head_dim]: num_heads=4 would split head_dim (16)
    # into 4 blocks of 4 and permute inside each block.
    kernel = np.zeros((HIDDEN, 4, HEAD_DIM))

    with pytest.raises(ValueError) as info:
        permute_heads(kernel, 4, source="interleaved", target="half_split", axis=-1)

    message = str(info.value)
    assert "(32, 4, 16)" in message
    assert "num_heads=1 with axis=-1" in message
    assert "[in, heads * head_dim]" in message


def test_3d_kernel_with_one_head_matches_2d():
    query_weight, _, _, _ = meta_model(4, 4)
    kernel_2d = query_weight.T  # Flax [in, heads * head_dim]
    kernel_3d = kernel_2d.reshape(HIDDEN, 4, HEAD_DIM)

    converted_3d = permute_heads(kernel_3d, 1, source="interleaved", target="half_split", axis=-1)
    converted_2d = permute_heads(kernel_2d, 4, source="interleaved", target="half_split", axis=-1)

    assert np.array_equal(converted_3d.reshape(HIDDEN, -1), converted_2d)


def test_stacked_torch_weights_not_taken_for_3d_kernel():
    # Layers stacked on axis 0, torch layout [layers, out, in]: as many layers as heads is common.
    query_weight, _, _, _ = meta_model(4, 4)
    stacked = np.stack([query_weight] * 4)

    converted = permute_heads(stacked, 4, source="interleaved", target="half_split", axis=1)

    assert np.array_equal(converted[2], permute_heads(query_weight, 4, source="interleaved", target="half_split"))


@pytest.mark.parametrize(
    "axis, error, pattern",
    [
        (3, ValueError, r"axis=3 is out of range for a weight of shape \(64, 32\)"),
        (-3, ValueError, r"axis=-3 is out of range for a weight of shape \(64, 32\)"),
        (1.0, TypeError, r"axis must be an int, got 1\.0 of type float"),
        (True, TypeError, r"axis must be an int, got True of type bool"),
    ],
    ids=["too-large", "too-small", "float", "bool"],
)
def test_convert_rejects_bad_axis(axis, error, pattern):
    with pytest.raises(error, match=pattern):
        convert_query_key_weights(
            np.zeros((64, HIDDEN)), np.zeros((64, HIDDEN)), num_heads=4, source="interleaved", target="half_split",
            axis=axis,
        )


def test_permute_rejects_bool_axis():
    with pytest.raises(TypeError, match=r"axis must be an int, got True of type bool"):
        permute_heads(np.zeros((64, HIDDEN)), 4, source="interleaved", target="half_split", axis=True)


def test_rejects_list_weight():
    weight = np.zeros((64, HIDDEN)).tolist()

    with pytest.raises(TypeError, match=r"weight must be a NumPy, JAX or torch array, got list"):
        permute_heads(weight, 4, source="interleaved", target="half_split")
    with pytest.raises(TypeError, match=r"query_weight must be a NumPy, JAX or torch array, got list"):
        convert_query_key_weights(weight, weight, num_heads=4, source="interleaved", target="half_split")
