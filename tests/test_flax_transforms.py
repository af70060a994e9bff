"""The Flax NNX RoPE under jit, grad, vmap, remat, nnx.scan and sharding, and as NNX state.

Numeric checks compare with the float64 oracle under ``oracle_tolerance`` from ``conftest.py``.
The sharding test runs in a subprocess, because the flag that splits the CPU into 8 devices
must be set before jax initializes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from impls.frequencies import Scaling
from impls.flax_nnx import MultiHeadAttention, RoPE, RopeTable
from impls.reference import rope_reference

REPO_ROOT = Path(__file__).resolve().parents[1]
TABLE_LENGTH = 64

YARN = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32}
DYNAMIC = {"rope_type": "dynamic", "factor": 4.0, "original_max_position_embeddings": 16}


def random_x(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# Positions [2, 16]: row 0 inside the table, row 1 crossing its end and going negative.
POSITIONS = np.stack([np.arange(16), np.concatenate([np.arange(56, 68), np.arange(-4, 0)])]).astype(np.int32)
INSIDE_TABLE = np.stack([np.arange(16), np.arange(40, 56)]).astype(np.int32)

# (id, RoPE keyword arguments, positions)
JIT_CASES = [
    ("computed", {}, POSITIONS),
    ("computed-interleaved", {"pairing": "interleaved"}, POSITIONS),
    ("cached-inside", {"embedding_size": 32, "max_seq_len": TABLE_LENGTH}, INSIDE_TABLE),
    ("cached-crossing", {"embedding_size": 32, "max_seq_len": TABLE_LENGTH}, POSITIONS),
    ("cached-partial-interleaved",
     {"embedding_size": 32, "max_seq_len": TABLE_LENGTH, "rotary_dim": 16, "pairing": "interleaved"}, INSIDE_TABLE),
    ("cached-yarn", {"embedding_size": 32, "max_seq_len": TABLE_LENGTH, "scaling": YARN}, POSITIONS),
    ("dynamic", {"scaling": DYNAMIC}, POSITIONS),
]


def oracle(x: np.ndarray, positions: np.ndarray, kwargs: dict) -> np.ndarray:
    """Return the oracle's output for a RoPE built with ``kwargs``."""
    return rope_reference(
        x,
        positions,
        pairing=kwargs.get("pairing", "half_split"),
        rotary_dim=kwargs.get("rotary_dim"),
        scaling=kwargs.get("scaling"),
    )


def tolerance(rope_tolerance, x: np.ndarray, positions: np.ndarray, kwargs: dict) -> float:
    return rope_tolerance(x, positions, "float32", Scaling.from_config(kwargs.get("scaling")))


@pytest.mark.parametrize("kwargs, positions", [c[1:] for c in JIT_CASES], ids=[c[0] for c in JIT_CASES])
def test_jit_matches_oracle(kwargs, positions, rope_tolerance):
    rope = RoPE(**kwargs)
    x = random_x((2, 16, 4, 32))

    out = jax.jit(lambda x, p: rope(x, p))(jnp.asarray(x), jnp.asarray(positions))

    atol = tolerance(rope_tolerance, x, positions, kwargs)
    np.testing.assert_allclose(out, oracle(x, positions, kwargs), rtol=0, atol=atol)


# Dynamic scaling is left out: its frequencies depend on each row's largest position, so the
# inverse rotation is not the rotation at the negated positions.
GRAD_CASES = [case for case in JIT_CASES if case[0] != "dynamic"]


@pytest.mark.parametrize("kwargs, positions", [c[1:] for c in GRAD_CASES], ids=[c[0] for c in GRAD_CASES])
def test_grad_is_inverse_rotation(kwargs, positions, rope_tolerance):
    # RoPE is linear in x, out = m * R(p) x, so the gradient of <out, g> is m * R(p)^T g,
    # the rotation of g by the negated angles (times the same attention factor m).
    rope = RoPE(**kwargs)
    x = random_x((2, 16, 4, 32))
    cotangent = random_x((2, 16, 4, 32), seed=1)

    def loss(x):
        return jnp.vdot(rope(x, jnp.asarray(positions)), jnp.asarray(cotangent))

    grad = jax.jit(jax.grad(loss))(jnp.asarray(x))

    expected = oracle(cotangent, -positions, kwargs)
    atol = tolerance(rope_tolerance, cotangent, positions, kwargs)
    np.testing.assert_allclose(grad, expected, rtol=0, atol=atol)


@pytest.mark.parametrize("kwargs, positions", [c[1:] for c in JIT_CASES], ids=[c[0] for c in JIT_CASES])
def test_vmap_over_batch(kwargs, positions, rope_tolerance):
    # Each example is [seq, heads, dim] with positions [seq], and a cached module decides per
    # example whether its positions fit the table.
    rope = RoPE(**kwargs)
    x = random_x((2, 16, 4, 32))

    out = jax.jit(jax.vmap(lambda x, p: rope(x, p)))(jnp.asarray(x), jnp.asarray(positions))

    atol = tolerance(rope_tolerance, x, positions, kwargs)
    np.testing.assert_allclose(out, oracle(x, positions, kwargs), rtol=0, atol=atol)


@pytest.mark.parametrize("cached", [False, True], ids=["computed", "cached"])
def test_remat_value_and_grad(cached, rope_tolerance):
    kwargs = {"embedding_size": 32, "max_seq_len": TABLE_LENGTH} if cached else {}
    rope = RoPE(**kwargs)
    x = random_x((2, 16, 4, 32))
    cotangent = random_x((2, 16, 4, 32), seed=1)

    # The module goes through NNX transforms only: nnx.remat writes the module's variables
    # back after the call, which NNX rejects for a module captured from an outer jax.jit.
    @nnx.remat
    def apply(rope, x):
        return rope(x, jnp.asarray(POSITIONS))

    @nnx.jit
    def value_and_grad(rope, x):
        return nnx.value_and_grad(lambda rope, x: jnp.vdot(apply(rope, x), jnp.asarray(cotangent)), argnums=1)(rope, x)

    value, grad = value_and_grad(rope, jnp.asarray(x))

    expected_value = np.vdot(oracle(x, POSITIONS, kwargs), cotangent)
    # The value sums 4096 products of rotated values and cotangents: each term within the
    # rope tolerance times max|g|, plus float32 summation over 4096 terms.
    atol = 4096 * tolerance(rope_tolerance, x, POSITIONS, kwargs) * np.abs(cotangent).max()
    assert abs(float(value) - expected_value) <= atol
    atol = tolerance(rope_tolerance, cotangent, POSITIONS, kwargs)
    np.testing.assert_allclose(grad, oracle(cotangent, -POSITIONS, kwargs), rtol=0, atol=atol)


class Block(nnx.Module):
    """A layer that rotates its input with a cached RoPE and mixes features with a Linear."""

    def __init__(self, rngs: nnx.Rngs):
        self.rope = RoPE(embedding_size=32, max_seq_len=TABLE_LENGTH, pairing="interleaved")
        self.linear = nnx.Linear(32, 32, rngs=rngs)

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        return jnp.tanh(self.linear(self.rope(x, positions)))


def test_scan_over_stacked_layers(rope_tolerance):
    layers = 3

    @nnx.split_rngs(splits=layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create_stack(rngs):
        return Block(rngs)

    stack = create_stack(nnx.Rngs(0))
    x = random_x((2, 16, 4, 32))
    positions = jnp.asarray(POSITIONS)

    @nnx.jit
    @nnx.scan(in_axes=(0, nnx.Carry, None), out_axes=nnx.Carry)
    def forward(block, x, positions):
        return block(x, positions)

    out = forward(stack, jnp.asarray(x), positions)

    # The same layers one by one, in NumPy with the oracle.
    expected = x.astype(np.float64)
    for layer in range(layers):
        kernel = np.asarray(stack.linear.kernel[...][layer], np.float64)
        bias = np.asarray(stack.linear.bias[...][layer], np.float64)
        expected = np.tanh(rope_reference(expected, POSITIONS, pairing="interleaved") @ kernel + bias)

    assert stack.rope.cos.shape == (layers, TABLE_LENGTH, 16)
    # Per layer, the rotation error (the oracle rule) passes through a Linear whose kernel
    # columns have L1 norm below 8, and the Linear adds 32 float32 roundings. tanh only shrinks it.
    atol = layers * 8 * (rope_tolerance(x, POSITIONS, "float32") + 32 * np.finfo(np.float32).eps * np.abs(x).max())
    np.testing.assert_allclose(out, expected, rtol=0, atol=atol)


def make_mha(cached: bool = True) -> MultiHeadAttention:
    rope = RoPE(embedding_size=8, max_seq_len=TABLE_LENGTH) if cached else RoPE()
    return MultiHeadAttention(num_heads=2, in_features=16, qkv_features=16, rope=rope, decode=False, rngs=nnx.Rngs(0))


def _arrays(state: nnx.State) -> dict[str, np.ndarray]:
    """Return the arrays of ``state`` by path, such as ``{"rope/cos": ...}``."""
    return {"/".join(map(str, path)): np.asarray(variable[...]) for path, variable in nnx.to_flat_state(state)}


def _paths(state: nnx.State) -> list[str]:
    return list(_arrays(state))


def test_rope_is_child_module():
    mha = make_mha()

    assert "rope/cos" in _paths(nnx.state(mha))
    assert "rope/sin" in _paths(nnx.state(mha))


def test_tables_are_not_params():
    mha = make_mha()

    assert not [path for path in _paths(nnx.state(mha, nnx.Param)) if path.startswith("rope")]
    assert sorted(_paths(nnx.state(mha, RopeTable))) == ["rope/cos", "rope/sin"]


def test_split_merge_round_trip():
    mha = make_mha()
    inputs = jnp.asarray(random_x((2, 6, 16)))
    positions = jnp.arange(3, 9)

    graphdef, params, tables = nnx.split(mha, nnx.Param, RopeTable)
    merged = nnx.merge(graphdef, params, tables)

    assert sorted(_paths(tables)) == ["rope/cos", "rope/sin"]
    np.testing.assert_array_equal(merged(inputs, input_positions=positions), mha(inputs, input_positions=positions))


def test_sgd_step_leaves_tables():
    # An optimizer updates what nnx.grad differentiates, nnx.Param by default: the gradient
    # state must not hold the tables, and a step over it must leave them untouched.
    mha = make_mha()
    inputs = jnp.asarray(random_x((2, 6, 16)))
    tables_before = _arrays(nnx.state(mha, RopeTable))
    params_before = _arrays(nnx.state(mha, nnx.Param))

    def loss(model):
        return jnp.sum(model(inputs, input_positions=jnp.arange(6)) ** 2)

    grads = nnx.grad(loss)(mha)
    params = nnx.state(mha, nnx.Param)
    nnx.update(mha, jax.tree.map(lambda p, g: p - 0.1 * g, params, grads))

    assert not [path for path in _paths(grads) if path.startswith("rope")]
    for path, table in _arrays(nnx.state(mha, RopeTable)).items():
        np.testing.assert_array_equal(table, tables_before[path])
    params_after = _arrays(nnx.state(mha, nnx.Param))
    assert [path for path in params_after if not np.array_equal(params_after[path], params_before[path])]


SHARDING_SCRIPT = textwrap.dedent(
    """
    import json

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    from impls.flax_nnx import MultiHeadAttention, RoPE

    # jax.make_mesh gives explicit axes by default, the stricter mode for sharded gathers.
    mesh = jax.make_mesh((2, 4), ("batch", "seq"))
    batch_and_seq = NamedSharding(mesh, P("batch", "seq"))
    x = np.random.default_rng(0).standard_normal((4, 16, 2, 32)).astype(np.float32)
    inside = np.broadcast_to(np.arange(16), (4, 16)).astype(np.int32)
    crossing = inside + np.array([[0], [20], [50], [-8]], np.int32)
    modules = {
        "computed": RoPE(),
        "cached": RoPE(embedding_size=32, max_seq_len=64),
        "dynamic": RoPE(scaling={"rope_type": "dynamic", "factor": 4.0, "original_max_position_embeddings": 8}),
    }
    results = {"devices": len(jax.devices())}
    for name, rope in modules.items():
        for label, positions in (("inside", inside), ("crossing", crossing)):
            fn = jax.jit(lambda x, p: rope(x, p))
            unsharded = np.asarray(fn(jnp.asarray(x), jnp.asarray(positions)))
            out = fn(jax.device_put(x, batch_and_seq), jax.device_put(positions, batch_and_seq))
            results[f"{name}-{label}"] = {
                "max_difference": float(np.abs(np.asarray(out) - unsharded).max()),
                "scale": float(np.abs(unsharded).max()),
                # Older jax (0.8) drops trailing None entries of a PartitionSpec.
                "spec": list(out.sharding.spec) + [None] * (out.ndim - len(out.sharding.spec)),
            }

    # Attention over a sequence-sharded key needs a reshard that jax.nn.dot_product_attention
    # does not do, so the multi-head attention shards the batch only.
    mha = MultiHeadAttention(
        num_heads=2, in_features=16, rope=RoPE(embedding_size=8, max_seq_len=64), decode=False, rngs=nnx.Rngs(0)
    )
    inputs = np.random.default_rng(1).standard_normal((4, 16, 16)).astype(np.float32)
    call = nnx.jit(lambda mha, inputs, positions: mha(inputs, input_positions=positions))
    unsharded = np.asarray(call(mha, jnp.asarray(inputs), jnp.asarray(crossing)))
    batch = NamedSharding(mesh, P("batch"))
    out = call(mha, jax.device_put(inputs, batch), jax.device_put(crossing, batch))
    results["mha-batch"] = {
        "max_difference": float(np.abs(np.asarray(out) - unsharded).max()),
        "scale": float(np.abs(unsharded).max()),
        "spec": list(out.sharding.spec) + [None] * (out.ndim - len(out.sharding.spec)),
    }
    print(json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def sharding_results() -> dict:
    """Run the sharded and unsharded modules in a subprocess with 8 CPU devices."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    completed = subprocess.run(
        [sys.executable, "-c", SHARDING_SCRIPT], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.strip().splitlines()[-1])


# (case, output sharding) where the inputs are sharded over batch and sequence, or batch only.
SHARDING_CASES = [
    *[(f"{name}-{label}", ["batch", "seq", None, None])
      for name in ("computed", "cached", "dynamic") for label in ("inside", "crossing")],
    ("mha-batch", ["batch", None, None]),
]


def test_sharding_uses_8_devices(sharding_results):
    assert sharding_results["devices"] == 8


@pytest.mark.parametrize("case, spec", SHARDING_CASES, ids=[case for case, _ in SHARDING_CASES])
def test_sharded_equals_unsharded(sharding_results, case, spec):
    # Sharding splits elementwise work and exact reductions (max, all), so the RoPE results
    # agree bit for bit. The attention's batch-independent matmuls may be blocked differently
    # per shard: jax 0.10 still agrees bit for bit, jax 0.8.1 differs by 4.8e-7, so they get a
    # few float32 roundings of the output's scale. The output keeps the input's sharding.
    result = sharding_results[case]
    if case.startswith("mha"):
        assert result["max_difference"] <= 8 * np.finfo(np.float32).eps * result["scale"]
    else:
        assert result["max_difference"] == 0.0
    assert result["spec"] == spec
