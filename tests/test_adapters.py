"""Third-party adapters against the float64 oracle, and the honesty of their declared support.

Every case runs the adapter's library code and compares the result with
:func:`impls.reference.rope_reference` under the tolerance rule of ``oracle_tolerance`` in
``conftest.py``. A case outside an adapter's declared :class:`Support` is skipped with the
adapter's own reason, as the parity table shows it as n/a. The honesty tests then check the
other direction: every declared-unsupported feature really fails (an error or a wrong result)
when forced through the adapter, and the library-level tests show the library itself lacks it.

The Flax NNX adapters are left out: their module is this project's own and has its own tests.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from impls.adapters.base import DTYPES, Adapter, RopeSpec, numpy_dtype
from impls.frequencies import PAIRINGS, SCALING_TYPES
from impls.reference import rope_reference
from impls.registry import ADAPTERS, AdapterUnavailable, load_adapter

ADAPTER_NAMES = tuple(entry.name for entry in ADAPTERS if not entry.name.startswith("flax_nnx"))

# Scaling parameters chosen so that each type changes the angles at positions of a few hundred.
SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
}
# The Llama 3.1 values, for the long-position cases.
LLAMA3_1 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

# Spec variants besides the plain one, as keyword arguments of RopeSpec.make (pairing apart).
VARIANTS = {
    "default": {},
    "partial": {"rotary_dim": 32},
    "theta500000": {"theta": 500_000.0},
    **{name: {"scaling": scaling} for name, scaling in SCALINGS.items()},
    "llama3.1": {"scaling": LLAMA3_1},
    # Scaling types derive their frequencies from the rotary dimension, not the head size.
    **{f"partial_{name}": {"rotary_dim": 32, "scaling": scaling} for name, scaling in SCALINGS.items()},
}


def make_positions(pattern: str, batch: int, seq: int) -> np.ndarray:
    """Return int64 positions ``[batch, seq]`` of a named pattern."""
    arange = np.arange(seq)
    rows = []
    for b in range(batch):
        if pattern == "arange":
            row = arange
        elif pattern == "offset":  # a KV cache of a different length per row
            row = arange + 5 + 37 * b
        elif pattern == "packed":  # several sequences per row, each restarting at 0
            cut = seq // 2 - b
            row = np.concatenate([np.arange(cut), np.arange(seq // 4), np.arange(seq - cut - seq // 4)])
        elif pattern == "left_padded":  # pad tokens at position 0, as transformers' generate fills them
            pad = 3 + b
            row = np.concatenate([np.zeros(pad, np.int64), np.arange(seq - pad)])
        elif pattern == "random":
            row = np.random.default_rng(b).integers(0, 512, seq)
        elif pattern == "negative":
            row = arange - seq // 2 - b
        elif pattern == "long8k":
            row = arange + 8192 - seq - b
        elif pattern == "long32k":
            row = arange + 32768 - seq - b
        elif pattern == "scaled":  # one row past the 64 original positions of SCALINGS, one below
            row = arange + (300 if b == 0 else 0)
        else:
            raise ValueError(f"Unknown position pattern {pattern!r}.")
        rows.append(row)
    return np.stack(rows).astype(np.int64)


def shape_for(pattern: str) -> tuple[int, int, int, int]:
    """Return ``[batch, seq, heads, head_dim]``: head size 128 for the long cases, as in Llama."""
    return (2, 8, 2, 128) if pattern.startswith("long") else (2, 16, 4, 64)


def make_case(pattern: str, dtype: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    shape = shape_for(pattern)
    x = np.random.default_rng(seed).standard_normal(shape).astype(numpy_dtype(dtype))
    return x, make_positions(pattern, shape[0], shape[1])


def case_id(dtype: str, pattern: str) -> str:
    return f"{dtype}[{','.join(map(str, shape_for(pattern)))}]-{pattern}"


# (dtype, positions, variant): every position pattern and dtype with the plain spec, then each
# variant on a few representative patterns.
POSITION_PATTERNS = ("arange", "offset", "packed", "left_padded", "random", "negative", "long8k", "long32k")
CASES = [(dtype, pattern, "default") for dtype in ("float32", "bfloat16", "float16") for pattern in POSITION_PATTERNS]
for _variant in ("partial", "theta500000", *SCALINGS):
    CASES += [("float32", "scaled", _variant), ("float32", "packed", _variant), ("bfloat16", "offset", _variant)]
CASES += [("float32", "long8k", "llama3.1"), ("float32", "long32k", "dynamic"), ("float32", "long32k", "yarn")]
CASES += [("float32", "scaled", f"partial_{name}") for name in SCALINGS]


@pytest.fixture(scope="module", params=ADAPTER_NAMES)
def adapter(request) -> Adapter:
    try:
        return load_adapter(request.param)
    except AdapterUnavailable as error:
        pytest.skip(str(error))


def skip_unless_supported(adapter: Adapter, spec: RopeSpec, dtype: str, positions: np.ndarray, mode: str = "eager"):
    reason = adapter.unsupported_reason(spec, dtype, positions, mode)
    if reason is not None:
        pytest.skip(f"n/a: {reason}")


def max_error(out: np.ndarray, expected: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(out, np.float64) - expected)))


@pytest.mark.parametrize("pairing", PAIRINGS)
@pytest.mark.parametrize(
    ("dtype", "pattern", "variant"),
    CASES,
    ids=[f"{case_id(dtype, pattern)}-{variant}" for dtype, pattern, variant in CASES],
)
def test_adapter_matches_oracle(adapter, dtype, pattern, variant, pairing, rope_tolerance):
    spec = RopeSpec.make(pairing=pairing, **VARIANTS[variant])
    x, positions = make_case(pattern, dtype)
    skip_unless_supported(adapter, spec, dtype, positions)

    out = adapter.rotate(x, positions, spec)
    expected = rope_reference(
        x, positions, theta=spec.theta, pairing=pairing, rotary_dim=spec.rotary_dim, scaling=spec.scaling
    )

    assert out.shape == x.shape
    assert np.all(np.isfinite(np.asarray(out, np.float64)))
    tolerance = rope_tolerance(x, positions, dtype, spec.scaling)
    assert max_error(out, expected) <= tolerance


@pytest.mark.parametrize("pairing", PAIRINGS)
def test_adapter_jit_mode_matches_oracle(adapter, pairing, rope_tolerance):
    spec = RopeSpec.make(pairing=pairing)
    x, positions = make_case("packed", "float32")
    skip_unless_supported(adapter, spec, "float32", positions, mode="jit")

    out = adapter.rotate(x, positions, spec, mode="jit")

    expected = rope_reference(x, positions, pairing=pairing)
    assert max_error(out, expected) <= rope_tolerance(x, positions, "float32")


@pytest.mark.parametrize("pairing", PAIRINGS)
def test_cross_attention_scores(adapter, pairing, rope_tolerance):
    """Queries of length 5 at the end of 9 keys: scores ``q . k / sqrt(D)`` of each rotated separately."""
    spec = RopeSpec.make(pairing=pairing)
    rng = np.random.default_rng(3)
    query = rng.standard_normal((2, 5, 4, 64)).astype(np.float32)
    key = rng.standard_normal((2, 9, 4, 64)).astype(np.float32)
    query_positions = np.broadcast_to(np.arange(4, 9), (2, 5)).copy()
    key_positions = np.broadcast_to(np.arange(9), (2, 9)).copy()
    skip_unless_supported(adapter, spec, "float32", key_positions)

    rotated_query = np.asarray(adapter.rotate(query, query_positions, spec), np.float64)
    rotated_key = np.asarray(adapter.rotate(key, key_positions, spec), np.float64)
    expected_query = rope_reference(query, query_positions, pairing=pairing)
    expected_key = rope_reference(key, key_positions, pairing=pairing)

    def scores(q, k):
        return np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])

    # |q'.k' - q.k| <= |q' - q| |k| + |q| |k' - k|, summed over 64 features.
    query_tolerance = rope_tolerance(query, query_positions, "float32")
    key_tolerance = rope_tolerance(key, key_positions, "float32")
    bound = 64 * (query_tolerance * np.abs(key).max() + np.abs(query).max() * key_tolerance) / np.sqrt(64)
    error = np.abs(scores(rotated_query, rotated_key) - scores(expected_query, expected_key)).max()
    assert error <= bound


# Declared-support honesty: a feature outside the declaration must fail when forced through.

PROBES = (
    [("pairing", pairing) for pairing in PAIRINGS]
    + [("partial_rotary", None)]
    + [("scaling", rope_type) for rope_type in SCALING_TYPES if rope_type != "default"]
    + [("dtype", dtype) for dtype in DTYPES]
    + [("negative_positions", None)]
)


def probe_case(adapter: Adapter, feature: str, value) -> tuple[RopeSpec, str, np.ndarray, np.ndarray] | None:
    """Return a case that differs from a supported one only in ``feature``, or None if it is supported."""
    support = adapter.support
    pairing = sorted(support.pairings)[0]
    dtype = "float32"
    spec_arguments = {"pairing": pairing}
    pattern = "scaled"

    if feature == "pairing":
        if value in support.pairings:
            return None
        spec_arguments["pairing"] = value
    elif feature == "partial_rotary":
        if support.partial_rotary:
            return None
        spec_arguments["rotary_dim"] = 32
    elif feature == "scaling":
        if value in support.scaling_types:
            return None
        spec_arguments["scaling"] = SCALINGS[value]
    elif feature == "dtype":
        if value in support.dtypes:
            return None
        dtype = value
    elif feature == "negative_positions":
        if support.positions == "any":
            return None
        pattern = "negative"

    x, positions = make_case(pattern, dtype)
    return RopeSpec.make(**spec_arguments), dtype, x, positions


@pytest.mark.parametrize(("feature", "value"), PROBES, ids=[f"{f}-{v}" if v else f for f, v in PROBES])
def test_declared_unsupported_really_fails(adapter, feature, value, rope_tolerance):
    """A declared-unsupported feature, forced through the adapter, raises or gives a wrong result.

    Modes are not probed: a torch adapter has no jit mode, and forcing one only runs it eagerly.
    """
    case = probe_case(adapter, feature, value)
    if case is None:
        pytest.skip(f"{adapter.name} supports {feature} {value or ''}: covered by the oracle table")
    spec, dtype, x, positions = case
    assert adapter.unsupported_reason(spec, dtype, positions, "eager") is not None

    try:
        out = adapter.rotate(x, positions, spec)
    except Exception:  # noqa: BLE001 - any error shows the feature cannot be expressed
        return
    expected = rope_reference(
        x, positions, theta=spec.theta, pairing=spec.pairing, rotary_dim=spec.rotary_dim, scaling=spec.scaling
    )
    error = max_error(out, expected)
    assert error > rope_tolerance(x, positions, dtype, spec.scaling), (
        f"{adapter.name} matches the oracle on declared-unsupported {feature} {value}: widen its Support"
    )


# Library-level facts behind the declarations.


def test_llama_ignores_partial_rotary_factor():
    """Llama's default type builds frequencies for the whole head, so hf_llama has no partial rotary."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = transformers.LlamaConfig(
        hidden_size=64,
        num_attention_heads=1,
        head_dim=64,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.5},
    )

    assert LlamaRotaryEmbedding(config).inv_freq.shape == (32,)


def test_torchtune_constructor_options():
    """torchtune's RoPE constructors have no pairing, rotary-dimension or linear/yarn/dynamic option."""
    pytest.importorskip("torch")
    torchtune_adapter = pytest.importorskip("impls.adapters.torchtune", exc_type=ImportError)

    rope_parameters = set(inspect.signature(torchtune_adapter.rotary_positional_embeddings_class()).parameters)
    scaled_parameters = set(inspect.signature(torchtune_adapter.llama3_scaled_rope_class()).parameters)

    assert rope_parameters == {"dim", "max_seq_len", "base"}
    assert scaled_parameters == {
        "dim",
        "max_seq_len",
        "base",
        "scale_factor",
        "low_freq_factor",
        "high_freq_factor",
        "old_context_len",
    }


def test_torchtune_negative_position_wraps():
    """``input_pos=-1`` indexes the table from its end, so negative positions come out wrong."""
    torch = pytest.importorskip("torch")
    torchtune_adapter = pytest.importorskip("impls.adapters.torchtune", exc_type=ImportError)
    rope = torchtune_adapter.rotary_positional_embeddings_class()(8, max_seq_len=16)
    x = torch.ones(1, 1, 1, 8)

    at_minus_one = rope(x, input_pos=torch.tensor([[-1]]))
    at_fifteen = rope(x, input_pos=torch.tensor([[15]]))

    assert torch.equal(at_minus_one, at_fifteen)


def test_lucidrains_pairs_adjacent_features():
    """rotary-embedding-torch pairs features (2i, 2i + 1) and has no half-split option."""
    torch = pytest.importorskip("torch")
    lucidrains = pytest.importorskip("rotary_embedding_torch.rotary_embedding_torch")

    rotated = lucidrains.rotate_half(torch.tensor([1.0, 2.0, 3.0, 4.0]))

    assert rotated.tolist() == [-2.0, 1.0, -4.0, 3.0]
    assert "interleaved" not in inspect.signature(lucidrains.RotaryEmbedding).parameters


def test_equinox_rope_has_no_positions():
    """Equinox rotates row ``i`` by position ``i``: no positions argument, no negative positions, no pairing."""
    eqx = pytest.importorskip("equinox")

    call_parameters = set(inspect.signature(eqx.nn.RotaryPositionalEmbedding.__call__).parameters)
    fields = {field.name for field in eqx.nn.RotaryPositionalEmbedding.__dataclass_fields__.values()}

    assert call_parameters == {"self", "x", "key"}
    assert fields <= {"embedding_size", "theta", "dtype"}
