"""Properties every RoPE must have, checked with hypothesis on each implementation that can express them.

* position 0 is the identity;
* each rotated pair keeps its norm;
* ``q . k`` depends only on the position difference;
* a prefill followed by single-token calls equals one full call (decode);
* a packed row equals its documents rotated one by one;
* the gradient is the inverse rotation of the cotangent.

Tolerances follow parity.tolerance: the float32 rule at the largest position involved.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from impls.adapters.base import RopeSpec
from impls.frequencies import interleaved_to_half_split
from impls.reference import rope_reference
from impls.registry import ADAPTERS, AdapterUnavailable, load_adapter
from parity.tolerance import EPS32, tolerance

EXAMPLES = settings(max_examples=4, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
ADAPTER_NAMES = [entry.name for entry in ADAPTERS]


@functools.lru_cache(maxsize=None)
def _adapter(name: str):
    try:
        return load_adapter(name)
    except AdapterUnavailable as error:
        pytest.skip(str(error))


def _spec_for(adapter) -> RopeSpec:
    pairing = "half_split" if "half_split" in adapter.support.pairings else "interleaved"
    return RopeSpec.make(theta=10_000.0, pairing=pairing)


def _usable(name: str, positions: np.ndarray) -> tuple:
    adapter = _adapter(name)
    spec = _spec_for(adapter)
    reason = adapter.unsupported_reason(spec, "float32", positions, "eager")
    if reason:
        pytest.skip(f"n/a: {reason}")
    return adapter, spec


# A few fixed shapes rather than arbitrary ones: eager JAX compiles every operation once per
# shape, and the properties do not depend on the sizes beyond these.
shapes = st.sampled_from([(1, 1, 1, 4), (1, 5, 2, 8), (2, 8, 1, 32)])


def _random(shape, seed) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("name", ADAPTER_NAMES)
@EXAMPLES
@given(shape=shapes, seed=st.integers(0, 2**16))
def test_position_zero_identity(name, shape, seed):
    x = _random(shape, seed)
    positions = np.zeros(shape[:2], np.int32)
    adapter, spec = _usable(name, positions)
    out = adapter.rotate(x, positions, spec).astype(np.float64)
    assert np.abs(out - x).max() <= tolerance("float32", 0, np.abs(x).max())


def _pair_norms(x: np.ndarray, pairing: str) -> np.ndarray:
    if pairing == "interleaved":
        x = x[..., interleaved_to_half_split(x.shape[-1])]
    half = x.shape[-1] // 2
    return np.hypot(x[..., :half].astype(np.float64), x[..., half:].astype(np.float64))


@pytest.mark.parametrize("name", ADAPTER_NAMES)
@EXAMPLES
@given(shape=shapes, seed=st.integers(0, 2**16), offset=st.integers(0, 8000))
def test_pair_norms_kept(name, shape, seed, offset):
    x = _random(shape, seed)
    positions = np.broadcast_to(offset + np.arange(shape[1]), shape[:2]).astype(np.int32)
    adapter, spec = _usable(name, positions)
    out = adapter.rotate(x, positions, spec)
    scale = np.abs(x).max()
    # The angle error rotates a pair without changing its norm, so only the rounding of cos,
    # sin and the products remains.
    assert np.abs(_pair_norms(out, spec.pairing) - _pair_norms(x, spec.pairing)).max() <= 8 * EPS32 * scale


@pytest.mark.parametrize("name", ADAPTER_NAMES)
@EXAMPLES
@given(shape=shapes, seed=st.integers(0, 2**16), shift=st.integers(1, 4000))
def test_scores_depend_on_difference(name, shape, seed, shift):
    q = _random(shape, seed)
    k = _random(shape, seed + 1)
    positions = np.broadcast_to(np.arange(shape[1]), shape[:2]).astype(np.int32)
    adapter, spec = _usable(name, positions)

    def scores(offset):
        shifted = positions + offset
        q_rot = adapter.rotate(q, shifted, spec).astype(np.float64)
        k_rot = adapter.rotate(k, shifted, spec).astype(np.float64)
        return np.einsum("bqhd,bkhd->bhqk", q_rot, k_rot)

    near, far = scores(0), scores(shift)
    # Each side carries the rotation error at its largest position; a score sums D products.
    per_value = tolerance("float32", shift + shape[1], 1.0)
    bound = 2 * per_value * shape[3] * np.abs(q).max() * np.abs(k).max()
    assert np.abs(far - near).max() <= bound


@pytest.mark.parametrize("name", ADAPTER_NAMES)
@EXAMPLES
@given(shape=shapes, seed=st.integers(0, 2**16), start=st.integers(0, 500))
def test_decode_equals_full(name, shape, seed, start):
    x = _random(shape, seed)
    positions = np.broadcast_to(start + np.arange(shape[1]), shape[:2]).astype(np.int32)
    adapter, spec = _usable(name, positions)
    full = adapter.rotate(x, positions, spec)
    prefill = shape[1] // 2
    pieces = [adapter.rotate(x[:, :prefill], positions[:, :prefill], spec)] if prefill else []
    pieces += [adapter.rotate(x[:, i : i + 1], positions[:, i : i + 1], spec) for i in range(prefill, shape[1])]
    stepwise = np.concatenate(pieces, axis=1)
    assert np.abs(stepwise.astype(np.float64) - full).max() <= tolerance("float32", start + shape[1], np.abs(x).max())


@pytest.mark.parametrize("name", ADAPTER_NAMES)
@EXAMPLES
@given(seed=st.integers(0, 2**16), lengths=st.sampled_from([[1, 4], [3, 2, 3], [5, 1, 1, 1]]))
def test_packed_equals_documents(name, seed, lengths):
    x = _random((1, sum(lengths), 2, 8), seed)
    positions = np.concatenate([np.arange(n) for n in lengths])[None].astype(np.int32)
    adapter, spec = _usable(name, positions)
    packed = adapter.rotate(x, positions, spec)

    bounds = np.cumsum([0] + lengths)
    separate = np.concatenate(
        [adapter.rotate(x[:, a:b], np.arange(b - a, dtype=np.int32)[None], spec) for a, b in zip(bounds[:-1], bounds[1:])],
        axis=1,
    )
    assert np.abs(packed.astype(np.float64) - separate).max() <= tolerance("float32", max(lengths), np.abs(x).max())


def _jax_vjp(name: str):
    import jax
    import jax.numpy as jnp

    if name in ("flax_nnx", "flax_nnx_cached"):
        from impls.flax_nnx import RoPE

        def vjp(x, positions, cotangent):
            rope = RoPE(10_000.0) if name == "flax_nnx" else RoPE(10_000.0, x.shape[-1], 4096)
            rotate = lambda value: rope(value, jnp.asarray(positions))  # noqa: E731
            return np.asarray(jax.vjp(rotate, jnp.asarray(x))[1](jnp.asarray(cotangent))[0])

        return vjp
    if name == "equinox":
        import equinox as eqx

        def vjp(x, positions, cotangent):
            eqx.clear_caches()
            rope = jax.vmap(jax.vmap(eqx.nn.RotaryPositionalEmbedding(x.shape[-1]), in_axes=1, out_axes=1))
            return np.asarray(jax.vjp(rope, jnp.asarray(x))[1](jnp.asarray(cotangent))[0])

        return vjp
    return None


def _torch_vjp(name: str):
    if name != "torch_hf_formula":
        return None
    import torch

    from impls.adapters.torch_hf_formula import apply_rope

    def vjp(x, positions, cotangent):
        value = torch.from_numpy(x).requires_grad_(True)
        out = apply_rope(value, torch.from_numpy(positions.astype(np.int64)), 10_000.0, x.shape[-1])
        out.backward(torch.from_numpy(cotangent))
        return value.grad.numpy()

    return vjp


# Implementations that cannot be differentiated, with the reason.
NOT_DIFFERENTIABLE = {
    "torch_onnx": "torch.onnx.ops.rotary_embedding registers no autograd formula (torch 2.13.0)",
}


@pytest.mark.parametrize("name", ADAPTER_NAMES)
@EXAMPLES
@given(shape=shapes, seed=st.integers(0, 2**16), start=st.integers(0, 3000))
def test_gradient_inverse_rotation(name, shape, seed, start):
    if name in NOT_DIFFERENTIABLE:
        pytest.skip(f"n/a: {NOT_DIFFERENTIABLE[name]}")
    vjp = _jax_vjp(name) or _torch_vjp(name)
    if vjp is None:
        pytest.skip(f"n/a: the {name} adapter wraps its library behind NumPy, so this test has no differentiable call")
    _adapter(name)
    x = _random(shape, seed)
    cotangent = _random(shape, seed + 1)
    # Equinox rotates row i by position i, so it is differentiated at 0 .. seq - 1.
    offset = 0 if name == "equinox" else start
    positions = np.broadcast_to(offset + np.arange(shape[1]), shape[:2]).astype(np.int32)

    gradient = vjp(x, positions, cotangent)
    # The rotation is orthogonal, so its transpose is the rotation by the negated angles.
    expected = rope_reference(cotangent, -positions.astype(np.int64))
    assert np.abs(gradient - expected).max() <= tolerance("float32", offset + shape[1], np.abs(cotangent).max())
