"""The Flax NNX ``RoPE`` against the float64 oracle, plus its precision, jaxpr and input checks.

Every numeric case compares ``impls.flax_nnx.RoPE`` with :func:`impls.reference.rope_reference`
under the tolerance rule of ``oracle_tolerance`` in ``conftest.py`` (dtype, max|x| and the
largest absolute position). Cached modules tabulate ``TABLE_LENGTH`` positions, so the position
patterns below cross the table's edges on purpose.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from impls.adapters.base import numpy_dtype
from impls.frequencies import SCALING_TYPES, Scaling, interleaved_to_half_split
from impls.flax_nnx import RoPE, rotate
from impls.reference import rope_reference

TABLE_LENGTH = 64

SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0, "original_max_position_embeddings": 16},
    "yarn": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    },
}


def make_positions(pattern: str, shape: tuple[int, ...]) -> np.ndarray | None:
    """Return int32 positions of a named pattern for ``x`` of ``shape`` ``[*batch, seq, heads, dim]``.

    ``None`` means the module's default ``0 .. seq - 1``; ``shared`` is one ``[seq]`` row for
    every example; every other pattern is ``[*batch, seq]``.
    """
    batch, seq = shape[:-3], shape[-3]
    rng = np.random.default_rng(seq)
    if pattern == "default":
        return None
    if pattern == "shared":
        return np.arange(seq, dtype=np.int32)
    if pattern == "packed":
        # Each row contains two sequences, the second restarting at 0.
        row = np.concatenate([np.arange(seq // 2), np.arange(seq - seq // 2)])
        return np.broadcast_to(row, (*batch, seq)).astype(np.int32)
    if pattern == "offset":
        # Row b continues a sequence at 37 * b, as after a KV-cache prefix.
        starts = 37 * np.arange(int(np.prod(batch))).reshape(*batch, 1)
        return (starts + np.arange(seq)).astype(np.int32)
    if pattern == "left_padded":
        # Row b starts with b pad tokens at position 0, as transformers' generate fills them.
        pads = np.arange(int(np.prod(batch))).reshape(*batch, 1)
        return np.maximum(np.arange(seq) - pads, 0).astype(np.int32)
    if pattern == "negative":
        return (np.arange(seq) - seq).astype(np.int32) * np.ones((*batch, 1), np.int32)
    if pattern == "random":
        return rng.integers(-3000, 3000, size=(*batch, seq)).astype(np.int32)
    if pattern == "long":
        # The last positions below 8192, where float32 angles have their largest error here.
        return np.broadcast_to(8191 - np.arange(seq)[::-1], (*batch, seq)).astype(np.int32)
    if pattern == "table_end":
        # Crossing the end of the table only: no negative position sends the batch elsewhere.
        return np.broadcast_to(np.arange(seq) + TABLE_LENGTH + 1 - seq, (*batch, seq)).astype(np.int32)
    if pattern == "table_edges":
        # -1, 0, the last tabulated position and the first one past the table, repeated.
        edges = np.array([-1, 0, TABLE_LENGTH - 1, TABLE_LENGTH])
        return np.broadcast_to(np.resize(edges, seq), (*batch, seq)).astype(np.int32)
    raise ValueError(f"Unknown position pattern {pattern!r}.")


def random_x(shape: tuple[int, ...], dtype: str, seed: int = 0) -> np.ndarray:
    """Return standard-normal values of ``shape``, rounded to ``dtype``."""
    return np.random.default_rng(seed).standard_normal(shape).astype(numpy_dtype(dtype))


def make_rope(head_dim: int, *, cached: bool, **kwargs) -> RoPE:
    """Return a RoPE with tables of ``TABLE_LENGTH`` positions when ``cached``, else without."""
    if cached:
        return RoPE(embedding_size=head_dim, max_seq_len=TABLE_LENGTH, **kwargs)
    return RoPE(**kwargs)


def apply_rope(rope: RoPE, x: np.ndarray, positions: np.ndarray | None) -> np.ndarray:
    """Call ``rope`` on NumPy inputs and return NumPy, keeping the output dtype."""
    positions_jax = None if positions is None else jnp.asarray(positions)
    return np.asarray(rope(jnp.asarray(x), positions_jax))


def oracle_positions(shape: tuple[int, ...], positions: np.ndarray | None) -> np.ndarray:
    """Return the positions the oracle needs, with the default ``0 .. seq - 1`` spelled out."""
    if positions is None:
        return np.arange(shape[-3])
    return positions


@dataclasses.dataclass(frozen=True)
class Case:
    """One comparison of the module with the oracle."""

    dtype: str
    shape: tuple[int, ...]
    positions: str
    pairing: str = "half_split"
    rotary_dim: int | None = None
    scaling: str = "default"
    cached: bool = False

    @property
    def id(self) -> str:
        parts = [f"{self.dtype}[{','.join(map(str, self.shape))}]", self.positions]
        if self.pairing != "half_split":
            parts.append(self.pairing)
        if self.rotary_dim is not None:
            parts.append(f"rotary{self.rotary_dim}")
        if self.scaling != "default":
            parts.append(self.scaling)
        if self.cached:
            parts.append("cached")
        return "-".join(parts)


def _oracle_cases() -> list[Case]:
    cases = []
    shape = (2, 16, 4, 64)

    # Every position pattern, both pairings, with and without tables.
    for positions in (
        "default", "shared", "packed", "offset", "left_padded", "negative", "random", "long", "table_end",
        "table_edges",
    ):
        for pairing in ("half_split", "interleaved"):
            for cached in (False, True):
                cases.append(Case("float32", shape, positions, pairing, cached=cached))

    # Low-precision inputs: computed in float32, rounded once to the input dtype.
    for dtype in ("bfloat16", "float16"):
        for pairing in ("half_split", "interleaved"):
            for cached in (False, True):
                cases.append(Case(dtype, shape, "random", pairing, cached=cached))
                cases.append(Case(dtype, shape, "long", pairing, cached=cached))

    # Layouts: no batch axis, two batch axes, one token, one head.
    for layout in ((16, 2, 8), (2, 3, 5, 2, 16), (3, 1, 2, 8), (2, 7, 1, 6)):
        for positions in ("default", "shared", "offset"):
            if layout[:-3] == () and positions == "offset":
                continue  # Without a batch axis, "offset" is the same as "shared".
            cases.append(Case("float32", layout, positions))
            cases.append(Case("float32", layout, positions, "interleaved", cached=True))

    # Partial rotary: the smallest, a middle and the largest proper rotary_dim of 64.
    for rotary_dim in (2, 16, 62):
        for pairing in ("half_split", "interleaved"):
            for cached in (False, True):
                cases.append(Case("float32", shape, "random", pairing, rotary_dim, cached=cached))
    cases.append(Case("bfloat16", shape, "long", "interleaved", 16, cached=True))

    # Frequency scaling, at positions inside and far beyond the original context.
    for scaling in SCALING_TYPES:
        for pairing in ("half_split", "interleaved"):
            for cached in (False, True):
                for positions in ("offset", "long"):
                    cases.append(Case("float32", shape, positions, pairing, scaling=scaling, cached=cached))
        cases.append(Case("float32", shape, "random", rotary_dim=16, scaling=scaling, cached=True))
        cases.append(Case("bfloat16", shape, "long", scaling=scaling))
    return cases


ORACLE_CASES = _oracle_cases()


@pytest.mark.parametrize("case", ORACLE_CASES, ids=[case.id for case in ORACLE_CASES])
def test_rope_matches_oracle(case: Case, rope_tolerance):
    x = random_x(case.shape, case.dtype)
    positions = make_positions(case.positions, case.shape)
    scaling = SCALINGS[case.scaling]
    rope = make_rope(
        case.shape[-1], cached=case.cached, pairing=case.pairing, rotary_dim=case.rotary_dim, scaling=scaling
    )

    out = apply_rope(rope, x, positions)
    ref_positions = oracle_positions(case.shape, positions)
    expected = rope_reference(
        x, ref_positions, pairing=case.pairing, rotary_dim=case.rotary_dim, scaling=scaling
    )

    assert out.dtype == x.dtype
    atol = rope_tolerance(x, ref_positions, case.dtype, Scaling.from_config(scaling))
    np.testing.assert_allclose(out.astype(np.float64), expected, rtol=0, atol=atol)


PASSTHROUGH_CASES = [
    (dtype, pairing, cached)
    for dtype in ("float32", "bfloat16", "float16")
    for pairing in ("half_split", "interleaved")
    for cached in (False, True)
]


@pytest.mark.parametrize(
    "dtype, pairing, cached",
    PASSTHROUGH_CASES,
    ids=[f"{d}-{p}{'-cached' if c else ''}" for d, p, c in PASSTHROUGH_CASES],
)
def test_partial_rotary_passthrough_bit_identical(dtype, pairing, cached):
    shape = (2, 16, 4, 64)
    x = random_x(shape, dtype)
    positions = make_positions("random", shape)
    rope = make_rope(64, cached=cached, pairing=pairing, rotary_dim=24)

    out = apply_rope(rope, x, positions)

    # Compare bit patterns: NaN-free data, but -0.0 == 0.0 would hide a sign flip.
    assert out[..., 24:].tobytes() == x[..., 24:].tobytes()
    assert not np.array_equal(out[..., :24], x[..., :24])


@pytest.mark.parametrize("positions", ["negative", "table_end", "table_edges", "random"])
@pytest.mark.parametrize("pairing", ["half_split", "interleaved"])
def test_cached_out_of_table_equals_uncached(positions, pairing):
    # A batch with any position outside [0, TABLE_LENGTH) must take the computed path, which is
    # the uncached module's: a clamped gather would return the table's edge rows instead.
    shape = (2, 16, 4, 64)
    x = random_x(shape, "float32")
    pattern = make_positions(positions, shape)

    cached = apply_rope(make_rope(64, cached=True, pairing=pairing), x, pattern)
    uncached = apply_rope(make_rope(64, cached=False, pairing=pairing), x, pattern)

    np.testing.assert_array_equal(cached, uncached)


@pytest.mark.parametrize("pairing", ["half_split", "interleaved"])
def test_cached_table_float64_exact(pairing, rope_tolerance):
    # Tables computed in float64 and rounded once leave only output rounding. So the oracle's
    # tolerance for position 0 applies at position 8191, where float32 angles err by 5e-4 rad.
    shape = (2, 16, 4, 64)
    x = random_x(shape, "float32")
    positions = make_positions("long", shape)
    rope = RoPE(embedding_size=64, max_seq_len=8192, pairing=pairing)

    out = apply_rope(rope, x, positions)
    expected = rope_reference(x, positions, pairing=pairing)

    atol = rope_tolerance(x, np.zeros(1), "float32")
    np.testing.assert_allclose(out, expected, rtol=0, atol=atol)


@pytest.mark.parametrize("cached", [False, True], ids=["computed", "cached"])
@pytest.mark.parametrize("pairing", ["half_split", "interleaved"])
def test_int32_extreme_positions(pairing, cached):
    # float32 angles carry no information past about 2**24, but the output must stay a
    # rotation: finite, and every pair keeps its length.
    shape = (2, 4, 3, 16)
    x = random_x(shape, "float32")
    info = np.iinfo(np.int32)
    positions = np.array([[info.min, info.min + 1, info.max - 1, info.max], [-(2**24), 2**24, 2**30, -1]], np.int32)
    rope = RoPE(embedding_size=16, max_seq_len=8, pairing=pairing) if cached else RoPE(pairing=pairing)

    out = apply_rope(rope, x, positions)

    assert np.isfinite(out).all()
    perm = interleaved_to_half_split(16) if pairing == "interleaved" else np.arange(16)
    pair_norm = lambda a: np.hypot(a[..., perm][..., :8], a[..., perm][..., 8:])  # noqa: E731
    np.testing.assert_allclose(pair_norm(out), pair_norm(x), rtol=4 * np.finfo(np.float32).eps, atol=0)


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int16, np.uint16])
@pytest.mark.parametrize("cached", [False, True], ids=["computed", "cached"])
def test_narrow_int_positions_equal_int32(dtype, cached):
    # A table length of 4096 does not fit int8 or int16, so comparing narrow positions with it
    # wrapped eagerly and raised OverflowError under jit.
    x = jnp.asarray(random_x((2, 5, 3, 16), "float32"))
    positions = np.array([[0, 1, 2, 3, 4], [120, 121, 122, 123, 127]])
    rope = RoPE(embedding_size=16, max_seq_len=4096) if cached else RoPE()
    expected = np.asarray(rope(x, positions.astype(np.int32)))

    eager = rope(x, positions.astype(dtype))
    jitted = jax.jit(lambda value, at: rope(value, at))(x, positions.astype(dtype))

    np.testing.assert_array_equal(eager, expected)
    np.testing.assert_array_equal(jitted, expected)


def test_tables_accept_python_positions():
    cos, sin = RoPE().tables([0, 1, 2], 8)

    assert cos.shape == (3, 4)
    np.testing.assert_allclose(cos[0], np.ones(4))
    np.testing.assert_allclose(sin[0], np.zeros(4))


def test_default_positions_are_arange():
    x = jnp.asarray(random_x((2, 16, 4, 32), "float32"))
    rope = RoPE()

    np.testing.assert_array_equal(rope(x), rope(x, jnp.arange(16)))


def test_shared_positions_equal_per_row():
    x = jnp.asarray(random_x((3, 16, 4, 32), "float32"))
    shared = jnp.arange(5, 21)
    rope = RoPE()

    np.testing.assert_array_equal(rope(x, shared), rope(x, jnp.broadcast_to(shared, (3, 16))))


@pytest.mark.parametrize("cached", [False, True], ids=["computed", "cached"])
def test_interleaved_is_permuted_half_split(cached):
    # Both pairings rotate pair i by the same angle and differ only in which features pair up.
    x = random_x((2, 16, 4, 32), "float32")
    positions = make_positions("offset", x.shape)
    perm = interleaved_to_half_split(32)
    inverse = np.argsort(perm)

    interleaved = apply_rope(make_rope(32, cached=cached, pairing="interleaved"), x, positions)
    half_split = apply_rope(make_rope(32, cached=cached, pairing="half_split"), x[..., perm], positions)

    np.testing.assert_array_equal(interleaved, half_split[..., inverse])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "float64"])
@pytest.mark.parametrize("cached", [False, True], ids=["computed", "cached"])
def test_float64_under_x64(dtype, cached, rope_tolerance):
    # x64 is switched on only inside this context, so it cannot leak into other tests.
    shape = (2, 16, 4, 32)
    positions = make_positions("long", shape)
    with jax.enable_x64(True):
        x = random_x(shape, dtype)
        rope = make_rope(32, cached=cached, pairing="interleaved")
        out = apply_rope(rope, x, positions)

    expected = rope_reference(x, positions, pairing="interleaved")
    assert out.dtype == x.dtype
    np.testing.assert_allclose(out.astype(np.float64), expected, rtol=0, atol=rope_tolerance(x, positions, dtype))


def test_x64_context_does_not_leak():
    with jax.enable_x64(True):
        RoPE(embedding_size=8, max_seq_len=4)(jnp.ones((2, 4, 1, 8), jnp.float64))

    assert not jax.config.jax_enable_x64
    assert jnp.zeros(1).dtype == jnp.float32


def _sub_jaxprs(value):
    # Written out rather than jax.extend.core.jaxprs_in_params, which needs jax 0.10.
    if isinstance(value, jax.extend.core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jax.extend.core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _sub_jaxprs(item)


def _equations(jaxpr: jax.extend.core.Jaxpr):
    """Yield every equation of ``jaxpr``, descending into cond branches and other sub-jaxprs."""
    for equation in jaxpr.eqns:
        yield equation
        for value in equation.params.values():
            for sub in _sub_jaxprs(value):
                yield from _equations(sub)


JAXPR_CASES = {
    "computed": lambda: RoPE(),
    "cached": lambda: RoPE(embedding_size=32, max_seq_len=TABLE_LENGTH),
    "dynamic": lambda: RoPE(scaling=SCALINGS["dynamic"]),
    "yarn-partial": lambda: RoPE(rotary_dim=16, scaling=SCALINGS["yarn"]),
}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("module", list(JAXPR_CASES))
def test_angles_float32_broadcast_multiply(module, dtype):
    # A dot_general (matmul or einsum) for the angles would run as bf16 or TF32 passes on TPUs
    # and recent GPUs. A bfloat16 angle loses whole radians past position 256.
    rope = JAXPR_CASES[module]()
    x = jnp.zeros((2, 8, 2, 32), dtype)
    positions = jnp.zeros((2, 8), jnp.int32)

    jaxpr = jax.make_jaxpr(lambda x, p: rope(x, p))(x, positions).jaxpr
    equations = list(_equations(jaxpr))
    trig_inputs = [eq.invars[0].aval.dtype for eq in equations if eq.primitive.name in ("sin", "cos")]

    assert not [eq for eq in equations if eq.primitive.name == "dot_general"]
    assert trig_inputs  # The computed path is traced for every module, cached ones included.
    assert all(dtype == jnp.float32 for dtype in trig_inputs)


# (id, call that must raise, exception type, fragments the message must contain)
BAD_INPUTS = [
    ("odd-embedding_size", lambda: RoPE(embedding_size=63, max_seq_len=8), ValueError,
     ["embedding_size=63", "even"]),
    ("odd-rotary_dim", lambda: RoPE(rotary_dim=15), ValueError, ["rotary_dim=15", "even"]),
    ("odd-head-size", lambda: RoPE()(jnp.ones((1, 4, 1, 7))), ValueError, ["x.shape[-1] = 7", "even rotary_dim"]),
    ("rotary_dim-over-embedding_size", lambda: RoPE(embedding_size=16, max_seq_len=8, rotary_dim=32), ValueError,
     ["rotary_dim=32", "head size 16", "rotary_dim <= 16"]),
    ("rotary_dim-over-head-size", lambda: RoPE(rotary_dim=32)(jnp.ones((1, 4, 1, 16))), ValueError,
     ["rotary_dim=32", "head size 16", "rotary_dim <= 16"]),
    ("positions-shape", lambda: RoPE()(jnp.ones((2, 4, 1, 8)), jnp.zeros((2, 5), jnp.int32)), ValueError,
     ["(2, 5)", "(2, 4, 1, 8)", "[seq] = (4,)", "[batch, seq] = (2, 4)"]),
    ("positions-float", lambda: RoPE()(jnp.ones((2, 4, 1, 8)), jnp.zeros((2, 4), jnp.float32)), TypeError,
     ["float32", "astype(jnp.int32)"]),
    ("theta-zero", lambda: RoPE(theta=0.0), ValueError, ["theta=0.0", "> 0"]),
    ("theta-negative", lambda: RoPE(theta=-10_000.0), ValueError, ["theta=-10000.0", "> 0"]),
    ("factor-below-1", lambda: RoPE(scaling={"rope_type": "linear", "factor": 0.5}), ValueError,
     ["'factor'", "must be >= 1", "got 0.5"]),
    ("unknown-scaling-type", lambda: RoPE(scaling={"rope_type": "ntk", "factor": 2.0}), ValueError,
     ["'ntk'", *SCALING_TYPES]),
    ("head-size-not-embedding_size", lambda: RoPE(embedding_size=16, max_seq_len=8)(jnp.ones((1, 4, 1, 32))),
     ValueError, ["x.shape[-1] = 32", "embedding_size = 16", "embedding_size=32"]),
    ("embedding_size-alone", lambda: RoPE(embedding_size=16), ValueError,
     ["embedding_size=16", "max_seq_len=None", "both or neither"]),
    ("max_seq_len-alone", lambda: RoPE(max_seq_len=128), ValueError,
     ["embedding_size=None", "max_seq_len=128", "both or neither"]),
    ("embedding_size-float", lambda: RoPE(embedding_size=64.0, max_seq_len=8), TypeError,
     ["embedding_size", "64.0", "int"]),
    ("dynamic-rotary_dim-2", lambda: RoPE(rotary_dim=2, scaling=SCALINGS["dynamic"]), ValueError,
     ["rotary_dim R = 2", "at least 4"]),
    ("dynamic-head-size-2", lambda: RoPE(scaling=SCALINGS["dynamic"])(jnp.ones((1, 4, 1, 2))), ValueError,
     ["rotary_dim R = 2", "at least 4"]),
    ("unknown-pairing", lambda: RoPE(pairing="neox"), ValueError, ["'neox'", "half_split", "interleaved"]),
    ("integer-x", lambda: RoPE()(jnp.ones((1, 4, 1, 8), jnp.int32)), TypeError, ["int32", "floating"]),
]


@pytest.mark.parametrize(
    "make, error, fragments", [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS]
)
def test_bad_input_message(make, error, fragments):
    with pytest.raises(error) as info:
        make()

    message = str(info.value)
    for fragment in fragments:
        assert fragment in message


def test_bool_positions_message_names_dtype():
    with pytest.raises(TypeError) as info:
        RoPE()(jnp.ones((1, 2, 1, 8)), np.array([True, False]))

    message = str(info.value)
    assert "got dtype bool" in message
    assert "astype(jnp.int32)" in message
    assert "Float positions" not in message


@pytest.mark.parametrize(
    "positions", [np.array([1, 2**32 + 1]), [1, 2**31], np.array([1, -(2**31) - 1]), np.array([1, 2**63], np.uint64)],
    ids=["int64-array", "python-list", "int64-below-min", "uint64-array"],
)
def test_positions_outside_int32_rejected(positions):
    # Without x64, JAX keeps int64 in 32 bits, and 2**32 + 1 would rotate as position 1.
    with pytest.raises(ValueError) as info:
        RoPE()(jnp.ones((1, 2, 1, 8)), positions)

    message = str(info.value)
    assert str(np.asarray(positions)[1]) in message
    assert "int32 range" in message
    assert "jax_enable_x64" in message


def test_int64_positions_exact_under_x64(rope_tolerance):
    x = random_x((1, 2, 1, 8), "float64")
    positions = np.array([1, 2**32 + 1])

    with jax.enable_x64(True):
        out = np.asarray(RoPE()(jnp.asarray(x), positions))

    atol = rope_tolerance(x, positions, "float64")
    np.testing.assert_allclose(out, rope_reference(x, positions), rtol=0, atol=atol)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_restored_short_table_rejected(jit):
    # A state restored from a RoPE with 16 table rows would read row 15 for position 100.
    rope = RoPE(embedding_size=8, max_seq_len=4096)
    nnx.update(rope, nnx.state(RoPE(embedding_size=8, max_seq_len=16)))
    call = nnx.jit(lambda module, x, p: module(x, p)) if jit else (lambda module, x, p: module(x, p))

    with pytest.raises(ValueError) as info:
        call(rope, jnp.ones((1, 1, 1, 8)), jnp.array([100]))

    message = str(info.value)
    assert "shape (16, 4)" in message
    assert "max_seq_len=4096" in message
    assert "(4096, 4)" in message


def test_rotate_rejects_unknown_pairing():
    cos, sin = RoPE().tables(jnp.arange(4), 8)

    with pytest.raises(ValueError, match=r"Unknown pairing 'HALF_SPLIT'\. Valid pairings: half_split, interleaved\."):
        rotate(jnp.ones((1, 4, 1, 8)), cos, sin, "HALF_SPLIT")


def test_rotate_rejects_tables_wider_than_head():
    cos, sin = RoPE().tables(jnp.arange(4), 16)

    with pytest.raises(ValueError, match=r"8 frequencies, which rotate 16 features, but x has only 8"):
        rotate(jnp.ones((1, 4, 1, 8)), cos, sin)


def test_tables_reject_odd_rotary_dim():
    with pytest.raises(ValueError, match=r"rotary_dim must be a positive even number .* got rotary_dim=3"):
        RoPE().tables(jnp.arange(4), 3)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_dynamic_empty_sequence(jit):
    rope = RoPE(scaling=SCALINGS["dynamic"])
    x = jnp.ones((2, 0, 3, 8))
    call = jax.jit(rope) if jit else rope

    out = call(x)
    expected = rope_reference(np.ones((2, 0, 3, 8)), np.zeros((2, 0), np.int64), scaling=SCALINGS["dynamic"])

    assert out.shape == (2, 0, 3, 8)
    assert expected.shape == (2, 0, 3, 8)


def test_oracle_rejects_uint64_above_int64():
    # astype(np.int64) would turn 2**64 - 1 into position -1.
    positions = np.array([0, 2**64 - 1], np.uint64)

    with pytest.raises(ValueError, match=r"positions contains 18446744073709551615, above the int64 maximum"):
        rope_reference(np.ones((1, 2, 1, 8)), positions)


@pytest.mark.parametrize("dtype", [np.complex128, np.int32, np.bool_])
def test_oracle_rejects_non_float_x(dtype):
    x = np.ones((1, 2, 1, 8), dtype)

    with pytest.raises(TypeError, match=rf"x must be a real floating-point array .* got dtype {np.dtype(dtype)}"):
        rope_reference(x, np.arange(2))


def test_oracle_accepts_bfloat16_x():
    x = random_x((1, 2, 1, 8), "bfloat16")

    out = rope_reference(x, np.arange(2))

    np.testing.assert_array_equal(out, rope_reference(x.astype(np.float64), np.arange(2)))


def test_oracle_dynamic_rotary_dim_2_message():
    # The exponent R / (R - 2) divides by zero for R = 2, and the module rejects it the same way.
    with pytest.raises(ValueError, match=r"rotary_dim R = 2\. Rotate at least 4 features"):
        rope_reference(np.ones((1, 2, 1, 2)), np.arange(2), scaling=SCALINGS["dynamic"])
