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
    """Return ``(rotate, spec)``: the adapter's ``rotate(x, positions)`` and its RoPE variant.

    JAX implementations run under jit, which compiles once per shape where an eager call
    compiles each of its operations. The properties hold in either mode, and the rotation
    tests compare the two modes case by case.
    """
    adapter = _adapter(name)
    spec = _spec_for(adapter)
    mode = "jit" if "jit" in adapter.support.modes else "eager"
    reason = adapter.unsupported_reason(spec, "float32", positions, mode)
    if reason:
        pytest.skip(f"n/a: {reason}")
    return functools.partial(adapter.rotate, spec=spec, mode=mode), spec


# Two fixed shapes rather than arbitrary ones, because each new shape compiles the JAX
# implementations again and the properties do not depend on the sizes beyond these. The first
# is one token of one head with two pairs. The second has several rows, tokens and heads.
shapes = st.sampled_from([(1, 1, 1, 4), (2, 8, 2, 32)])


def _random(shape, seed) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("name", ADAPTER_NAMES)
@EXAMPLES
@given(shape=shapes, seed=st.integers(0, 2**16))
def test_position_zero_identity(name, shape, seed):
    x = _random(shape, seed)
    positions = np.zeros(shape[:2], np.int32)
    rotate, spec = _usable(name, positions)
    out = rotate(x, positions).astype(np.float64)
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
    rotate, spec = _usable(name, positions)
    out = rotate(x, positions)
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
    rotate, spec = _usable(name, positions)

    def scores(offset):
        shifted = positions + offset
        q_rot = rotate(q, shifted).astype(np.float64)
        k_rot = rotate(k, shifted).astype(np.float64)
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
    rotate, spec = _usable(name, positions)
    full = rotate(x, positions)
    prefill = shape[1] // 2
    pieces = [rotate(x[:, :prefill], positions[:, :prefill])] if prefill else []
    pieces += [rotate(x[:, i : i + 1], positions[:, i : i + 1]) for i in range(prefill, shape[1])]
    stepwise = np.concatenate(pieces, axis=1)
    assert np.abs(stepwise.astype(np.float64) - full).max() <= tolerance("float32", start + shape[1], np.abs(x).max())


@pytest.mark.parametrize("name", ADAPTER_NAMES)
@EXAMPLES
@given(seed=st.integers(0, 2**16), lengths=st.sampled_from([[1, 4], [3, 2, 3], [5, 1, 1, 1]]))
def test_packed_equals_documents(name, seed, lengths):
    x = _random((1, sum(lengths), 2, 8), seed)
    positions = np.concatenate([np.arange(n) for n in lengths])[None].astype(np.int32)
    rotate, spec = _usable(name, positions)
    packed = rotate(x, positions)

    bounds = np.cumsum([0] + lengths)
    separate = np.concatenate(
        [rotate(x[:, a:b], np.arange(b - a, dtype=np.int32)[None]) for a, b in zip(bounds[:-1], bounds[1:])],
        axis=1,
    )
    assert np.abs(packed.astype(np.float64) - separate).max() <= tolerance("float32", max(lengths), np.abs(x).max())


@functools.lru_cache(maxsize=None)
def _jax_vjp_for(name: str, head_dim: int):
    """Return a jitted ``(x, positions, cotangent) -> cotangent @ d rope(x) / dx`` for a JAX implementation."""
    import jax

    if name in ("flax_nnx", "flax_nnx_cached"):
        from impls.flax_nnx import RoPE

        rope = RoPE(10_000.0) if name == "flax_nnx" else RoPE(10_000.0, head_dim, 4096)

        @jax.jit
        def pullback(x, positions, cotangent):
            return jax.vjp(lambda value: rope(value, positions), x)[1](cotangent)[0]

        return pullback

    import equinox as eqx

    # [B, S, H, D]: the module rotates one [S, D] head at a time, row i by position i.
    rope = jax.vmap(jax.vmap(eqx.nn.RotaryPositionalEmbedding(head_dim), in_axes=1, out_axes=1))

    @jax.jit
    def pullback(x, positions, cotangent):
        return jax.vjp(rope, x)[1](cotangent)[0]

    def clear_then_pull_back(x, positions, cotangent):
        # A trace reads Equinox's table cache, which other tests fill with other thetas.
        eqx.clear_caches()
        return pullback(x, positions, cotangent)

    return clear_then_pull_back


def _jax_vjp(name: str):
    if name not in ("flax_nnx", "flax_nnx_cached", "equinox"):
        return None

    def vjp(x, positions, cotangent):
        return np.asarray(_jax_vjp_for(name, x.shape[-1])(x, positions, cotangent))

    return vjp


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
