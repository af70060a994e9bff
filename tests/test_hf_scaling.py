"""Frequency scaling of the Flax NNX RoPE against Hugging Face transformers, one rope type at a time.

The reference is transformers' own code: ``LlamaRotaryEmbedding`` built from a ``LlamaConfig``
whose ``rope_parameters`` select the type (it calls ``ROPE_INIT_FUNCTIONS``), and
``apply_rotary_pos_emb`` on the rotated features. Our module receives the same
``rope_parameters`` dict that transformers standardised.

Both sides compute in float32, and each must lie within ``oracle_tolerance`` (``conftest.py``)
of the float64 oracle. The first check ties transformers' definitions to the oracle's; the
second compares our output with transformers' directly, within twice that tolerance.

Dynamic (NTK) scaling differs on purpose: our base follows each row's largest position, where
transformers uses the largest position of the whole batch (and keeps it across calls while the
length grows). So dynamic cases use one row, or rows with equal maxima, and a fresh
transformers module per call.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the transformers comparison needs torch")
transformers = pytest.importorskip("transformers", reason="the transformers comparison needs transformers")

import jax.numpy as jnp  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb  # noqa: E402

from impls.frequencies import Scaling  # noqa: E402
from impls.flax_nnx import RoPE  # noqa: E402
from impls.reference import rope_reference  # noqa: E402

HEAD_DIM = 64
HEADS = 2
THETA = 10_000.0
TABLE_LENGTH = 256

# (id, rope_parameters without rope_theta, max_position_embeddings). Original contexts are short
# so that positions of a few hundred reach far past them.
SCALINGS = [
    ("default", {"rope_type": "default"}, 64),
    ("linear", {"rope_type": "linear", "factor": 4.0}, 64),
    ("dynamic", {"rope_type": "dynamic", "factor": 4.0}, 32),
    ("yarn", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}, 64),
    ("yarn-mscale", {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16,
                     "mscale": 1.0, "mscale_all_dim": 0.5}, 128),
    ("yarn-attention_factor-betas", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                                     "attention_factor": 1.25, "beta_fast": 16.0, "beta_slow": 2.0}, 128),
    ("yarn-no-truncate", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                          "truncate": False}, 64),
    ("llama3", {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64}, 512),
]

# Positions [2, 24]: row 0 within every original context, row 1 far beyond.
POSITIONS = np.stack([np.arange(24), np.arange(24) * 7 + 150]).astype(np.int32)


def hf_config(rope_parameters: dict, max_positions: int, partial_rotary_factor: float | None):
    """Return a LlamaConfig whose heads have size HEAD_DIM and whose RoPE follows ``rope_parameters``."""
    parameters = {**rope_parameters, "rope_theta": THETA}
    if partial_rotary_factor is not None:
        parameters["partial_rotary_factor"] = partial_rotary_factor
    return transformers.LlamaConfig(
        hidden_size=HEADS * HEAD_DIM,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=max_positions,
        rope_parameters=parameters,
    )


def hf_rotate(config, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Return transformers' rotation of ``x`` ``[B, S, H, D]``: its cos/sin on the first R features."""
    embedding = LlamaRotaryEmbedding(config)  # Fresh: dynamic scaling keeps state across calls.
    x_torch = torch.from_numpy(x)
    cos, sin = embedding(x_torch, torch.from_numpy(positions.astype(np.int64)))
    rotary_dim = cos.shape[-1]
    # [B, S, H, D]: cos and sin are [B, S, R] and need the head axis at 2.
    rotated, _ = apply_rotary_pos_emb(x_torch[..., :rotary_dim], x_torch[..., :rotary_dim], cos, sin, unsqueeze_dim=2)
    return torch.cat([rotated, x_torch[..., rotary_dim:]], dim=-1).numpy()


def our_scaling(config) -> dict:
    """Return the config's standardised rope_parameters as our module takes them.

    transformers keeps the base and the partial rotary factor in the same dict, where our
    module takes them as ``theta=`` and ``rotary_dim=``. Its dynamic type reads the original
    context from max_position_embeddings, which our mapping names explicitly.
    """
    parameters = {
        key: value for key, value in config.rope_parameters.items() if key not in ("rope_theta", "partial_rotary_factor")
    }
    if parameters["rope_type"] == "dynamic":
        parameters["original_max_position_embeddings"] = config.max_position_embeddings
    return parameters


def _cases():
    cases = []
    for name, parameters, max_positions in SCALINGS:
        for cached in (False, True):
            cases.append((f"{name}{'-cached' if cached else ''}", parameters, max_positions, None, cached))
        # transformers' Llama ignores partial_rotary_factor for the default type only.
        if name != "default":
            cases.append((f"{name}-partial", parameters, max_positions, 0.5, True))
    return cases


CASES = _cases()


def run_case(parameters, max_positions, partial_rotary_factor, cached, x, positions):
    """Return (ours, transformers', oracle's output, scaling) for one case."""
    config = hf_config(parameters, max_positions, partial_rotary_factor)
    scaling = our_scaling(config)
    rotary_dim = None if partial_rotary_factor is None else int(HEAD_DIM * partial_rotary_factor)
    table = {"embedding_size": HEAD_DIM, "max_seq_len": TABLE_LENGTH} if cached else {}
    rope = RoPE(THETA, rotary_dim=rotary_dim, scaling=scaling, **table)

    ours = np.asarray(rope(jnp.asarray(x), jnp.asarray(positions)))
    theirs = hf_rotate(config, x, positions)
    expected = rope_reference(x, positions, theta=THETA, rotary_dim=rotary_dim, scaling=scaling)
    return ours, theirs, expected, Scaling.from_config(scaling)


def batch_for(parameters) -> tuple[np.ndarray, np.ndarray]:
    """Return ``x`` and positions: one row at a time for dynamic scaling, both rows otherwise."""
    x = np.random.default_rng(0).standard_normal((2, 24, HEADS, HEAD_DIM)).astype(np.float32)
    if parameters["rope_type"] == "dynamic":
        return x[1:], POSITIONS[1:]
    return x, POSITIONS


@pytest.mark.parametrize(
    "parameters, max_positions, partial_rotary_factor, cached", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_transformers_within_oracle_tolerance(parameters, max_positions, partial_rotary_factor, cached, rope_tolerance):
    x, positions = batch_for(parameters)

    _, theirs, expected, scaling = run_case(parameters, max_positions, partial_rotary_factor, cached, x, positions)

    atol = rope_tolerance(x, positions, "float32", scaling)
    np.testing.assert_allclose(theirs, expected, rtol=0, atol=atol)


@pytest.mark.parametrize(
    "parameters, max_positions, partial_rotary_factor, cached", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_flax_matches_transformers(parameters, max_positions, partial_rotary_factor, cached, rope_tolerance):
    x, positions = batch_for(parameters)

    ours, theirs, _, scaling = run_case(parameters, max_positions, partial_rotary_factor, cached, x, positions)

    atol = 2 * rope_tolerance(x, positions, "float32", scaling)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=atol)


@pytest.mark.parametrize("cached", [False, True], ids=["computed", "cached"])
def test_dynamic_equal_maxima_matches_transformers(cached, rope_tolerance):
    # With equal row maxima, transformers' batch-wide length is every row's own length.
    _, parameters, max_positions = SCALINGS[2]
    x = np.random.default_rng(0).standard_normal((2, 24, HEADS, HEAD_DIM)).astype(np.float32)
    positions = np.stack([np.arange(24) * 7 + 150, np.arange(24) * 3 + 242]).astype(np.int32)
    assert positions[0].max() == positions[1].max()

    ours, theirs, _, scaling = run_case(parameters, max_positions, None, cached, x, positions)

    np.testing.assert_allclose(ours, theirs, rtol=0, atol=2 * rope_tolerance(x, positions, "float32", scaling))


def test_dynamic_rows_independent():
    # Our dynamic base comes from each row's own largest position, so a row's output does not
    # depend on the other rows of its batch (transformers' batch-wide maximum would change it).
    _, parameters, max_positions = SCALINGS[2]
    scaling = our_scaling(hf_config(parameters, max_positions, None))
    rope = RoPE(THETA, scaling=scaling)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 24, HEADS, HEAD_DIM)).astype(np.float32))
    positions = jnp.asarray(POSITIONS)

    batched = rope(x, positions)

    np.testing.assert_array_equal(batched[:1], rope(x[:1], positions[:1]))
    np.testing.assert_array_equal(batched[1:], rope(x[1:], positions[1:]))


def test_dynamic_needs_original_context():
    # transformers' standardised dynamic parameters carry no original context, so our error
    # must name the key to add.
    parameters = our_scaling(hf_config(SCALINGS[2][1], 32, None))
    del parameters["original_max_position_embeddings"]

    with pytest.raises(ValueError) as info:
        RoPE(THETA, scaling=parameters)

    message = str(info.value)
    assert "'dynamic'" in message
    assert "requires the key 'original_max_position_embeddings'" in message
