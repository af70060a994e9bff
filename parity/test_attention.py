"""The Flax NNX multi-head attention with RoPE against attention computed from the oracle.

The module's own projection weights are read back and the whole attention is recomputed in
float64: projections, oracle rotation at the case's positions, softmax attention with the
case's mask, and the output projection. Decode cases run a prefill and then single tokens
through the KV cache and are compared with one causal pass of the oracle. The module runs
under ``nnx.jit``, as in training and serving. ``tests/test_flax_attention.py`` compares an
eager decode with the jitted one and checks the errors of eager calls.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from impls.flax_nnx import MultiHeadAttention, RoPE
from impls.reference import attention_reference, rope_reference
from parity.cases import CASES, Case
from parity.fixtures import load_case, load_manifest
from parity.metrics import compare
from parity.tolerance import EPS32



def _attention_case(case: Case) -> bool:
    # Every kind in float32, and the other pairing on every kind but cross-attention, whose
    # keys take the same RoPE path. bfloat16 inputs on one kind of each code path: full
    # sequences and the decode cache. Grouped-query keys, partial rotary, yarn (whose attention
    # factor scales the scores) and the largest head. Every variant compiles the attention
    # anew (about 0.5 s on a 2-core CPU), so the set stays small.
    if case.kind not in ("padded", "left_padded", "packed", "cross", "decode") or case.dtype == "float16":
        return False
    if case.dtype == "bfloat16":
        return case.kind != "cross" and case.pairing == "half_split" and case.rotary_dim is None
    if (case.kind == "cross" and case.pairing == "interleaved") or case.head_dim == 128:
        return False
    return case.scaling in (None, "yarn") and (case.rotary_dim is None or case.pairing == "half_split")


ATTENTION_CASES = [c for c in CASES if _attention_case(c)]
OUT_FEATURES = 32


@nnx.jit(static_argnames=("decode",))
def _jitted(mha: MultiHeadAttention, *args, **kwargs):
    # Defined once, so that cases with the same variant and shapes share a compilation.
    return mha(*args, **kwargs)


def _numpy_init(rng: np.random.Generator, scale_axes: int, scale: float = 1.0):
    """Return an initializer that draws from ``rng`` with NumPy, ignoring the JAX key.

    jax.random would compile its sampler once per weight shape, which took longer than the
    attention itself here. The weights are read back for the oracle, so any values serve.
    They are scaled by the fan-in (the product of the first ``scale_axes`` axes) to keep the
    scores near 1.
    """

    def init(key, shape, dtype=jnp.float32):
        fan_in = math.prod(shape[:scale_axes])
        return jnp.asarray(rng.standard_normal(shape) * scale / math.sqrt(fan_in), dtype)

    return init


def attention_tolerance(max_position: int, value_scale: float, features: int) -> float:
    """Return the float32 error bound of an attention output against the float64 oracle.

    The rotation rule of parity.tolerance, ``eps32 * (2 P + 4)`` per unit of value, applies to
    both queries and keys, and the softmax passes a score error on to the weighted values at
    most once more: four times that rule, in units of ``max |v|``. Each projection sums
    ``features`` float32 products, whose rounding errors grow about as ``sqrt(features)``.
    The computation runs in float32 for every input dtype here, because the parameters are
    float32.
    """
    rotation = EPS32 * (2 * max_position + 4) * 4
    projection = EPS32 * 4 * math.sqrt(features)
    return value_scale * (rotation + projection)


def _weights(module: nnx.Module) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(module.kernel[...], np.float64), np.asarray(module.bias[...], np.float64)


def _oracle_attention(mha, case: Case, inputs_q, inputs_k, q_positions, k_positions, mask):
    spec = case.spec
    rope = dict(theta=spec.theta, pairing=spec.pairing, rotary_dim=spec.rotary_dim, scaling=spec.scaling)
    wq, bq = _weights(mha.query)
    wk, bk = _weights(mha.key)
    wv, bv = _weights(mha.value)
    wo, bo = _weights(mha.out)

    query = np.einsum("bsf,fhd->bshd", inputs_q, wq) + bq  # [B, Sq, H, D]
    key = np.einsum("bsf,fhd->bshd", inputs_k, wk) + bk  # [B, Sk, Hkv, D]
    value = np.einsum("bsf,fhd->bshd", inputs_k, wv) + bv
    query = rope_reference(query, q_positions, **rope)
    key = rope_reference(key, k_positions, **rope)
    attended = attention_reference(query, key, value, mask)  # [B, Sq, H, D]
    return np.einsum("bshd,hdo->bso", attended, wo) + bo, float(np.abs(value).max())


def _mask(case: Case, arrays: dict) -> np.ndarray:
    """Return the boolean mask ``[B, 1, Sq, Sk]`` of the case (True attends)."""
    batch, seq, key_seq = case.batch, case.seq, case.key_seq
    mask = np.broadcast_to(arrays["k_mask"][:, None, None, :], (batch, 1, seq, key_seq))
    if case.kind == "packed":
        same_document = arrays["q_segments"][:, :, None] == arrays["k_segments"][:, None, :]
        mask = mask & same_document[:, None]
    if case.kind == "decode":
        mask = mask & np.tril(np.ones((seq, key_seq), bool))[None, None]
    return np.array(mask)


@pytest.fixture(scope="module")
def manifest():
    return load_manifest()


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=[c.id for c in ATTENTION_CASES])
def test_multi_head_attention(case, manifest, record_parity):
    arrays = load_case(case.id, manifest=manifest)
    batch, seq, key_seq = case.batch, case.seq, case.key_seq
    features_q = case.heads * case.head_dim
    features_k = case.key_heads * case.head_dim

    # [B, S, H, D] -> [B, S, H * D]: the case's queries and keys serve as the token features.
    inputs_q = arrays["q"].reshape(batch, seq, features_q)
    inputs_k = arrays["k"].reshape(batch, key_seq, features_k)
    mask = _mask(case, arrays)

    spec = case.spec
    rng = np.random.default_rng(case.seed)
    mha = MultiHeadAttention(
        num_heads=case.heads,
        num_kv_heads=case.key_heads,
        in_features=features_q,
        in_kv_features=features_k if case.kind == "cross" else None,
        qkv_features=features_q,
        out_features=OUT_FEATURES,
        rope=RoPE(spec.theta, rotary_dim=spec.rotary_dim, pairing=spec.pairing, scaling=spec.scaling),
        decode=False,
        kernel_init=_numpy_init(rng, 1),  # [in_features, heads, head_dim]
        out_kernel_init=_numpy_init(rng, 2),  # [heads, head_dim, out_features]
        bias_init=_numpy_init(rng, 0, 0.1),
        rngs=nnx.Rngs(case.seed),
    )

    q_positions, k_positions = arrays["q_positions"], arrays["k_positions"]
    if case.kind == "decode":
        # Prefill half the sequence, then feed one token at a time through the KV cache.
        mha.init_cache((batch, seq, features_q), jnp.float32)
        prefill = seq // 2
        steps = [(0, prefill)] + [(i, i + 1) for i in range(prefill, seq)]
        outputs = [
            _jitted(
                mha, jnp.asarray(inputs_q[:, a:b]), input_positions=jnp.asarray(q_positions[:, a:b]),
                mask=jnp.asarray(mask[:, :, a:b]), decode=True,
            )
            for a, b in steps
        ]
        actual = np.concatenate([np.asarray(o) for o in outputs], axis=1)
    elif case.kind == "cross":
        actual = _jitted(
            mha, jnp.asarray(inputs_q), jnp.asarray(inputs_k), input_positions=jnp.asarray(q_positions),
            kv_positions=jnp.asarray(k_positions), mask=jnp.asarray(mask),
        )
    else:
        actual = _jitted(mha, jnp.asarray(inputs_q), input_positions=jnp.asarray(q_positions), mask=jnp.asarray(mask))
    actual = np.asarray(actual)

    inputs_k_oracle = inputs_k if case.kind == "cross" else inputs_q
    expected, value_scale = _oracle_attention(
        mha, case, inputs_q.astype(np.float64), inputs_k_oracle.astype(np.float64), q_positions, k_positions, mask
    )

    # Query rows that are padding attend to whatever the mask leaves; only real tokens count.
    valid = arrays["q_mask"]
    position = int(max(np.abs(q_positions).max(), np.abs(k_positions).max()))
    tol = attention_tolerance(position, value_scale, features_q)
    metrics = compare(actual[valid], expected[valid], tol)

    record_parity({
        "impl": "flax_nnx_mha", "library": "flax", "case": case.id, "kind": case.kind, "dtype": case.dtype,
        "mode": "jit", "params": case.params(), "max_abs_position": position,
        "verdict": "pass" if metrics.passed else "fail", "tolerance": tol, "max_abs_error": metrics.max_abs_error,
        "metrics": {"output": metrics.as_dict()}, "output_dtype": str(actual.dtype),
    })
    assert metrics.passed, (
        f"attention output differs from the oracle by {metrics.max_abs_error:.3e} "
        f"(tolerance {tol:.3e}) at {metrics.worst_index}"
    )
