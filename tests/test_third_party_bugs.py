"""Known bugs of the wrapped libraries, each detected on the installed version.

Every bug test asserts the correct behaviour, so it fails today and is marked as a strict
xfail whose reason names the library version. An upstream fix turns it into an XPASS, which
strict mode reports as a failure, so the mark gets removed. ``raises=AssertionError`` (or the
error the bug produces) keeps an unrelated error from passing as the bug. Next to each bug test
a plain test checks that the adapter's normal route avoids the bug.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

import numpy as np
import pytest

from impls.adapters.base import RopeSpec
from impls.reference import rope_reference


def installed_version(distribution: str) -> str:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return "(not installed)"


EQUINOX = installed_version("equinox")
LUCIDRAINS = installed_version("rotary-embedding-torch")
TRANSFORMERS = installed_version("transformers")
TORCHTUNE = installed_version("torchtune")


def max_error(out, expected: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(out, np.float64) - expected)))


def random_heads(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# Equinox: the table cache ignores theta.


@pytest.fixture
def clean_equinox_cache():
    eqx = pytest.importorskip("equinox")
    eqx.clear_caches()
    yield eqx
    eqx.clear_caches()


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason=f"equinox {EQUINOX}: the RoPE cos/sin cache is keyed by (embedding_size, dtype) without theta",
)
def test_equinox_second_theta_gets_own_tables(clean_equinox_cache, rope_tolerance):
    eqx = clean_equinox_cache
    x = random_heads((64, 32))
    positions = np.arange(64)

    eqx.nn.RotaryPositionalEmbedding(32, theta=10_000.0)(x)
    out = eqx.nn.RotaryPositionalEmbedding(32, theta=500_000.0)(x)

    # [S, D] -> [1, S, 1, D] for the oracle.
    expected = rope_reference(x[None, :, None, :], positions, theta=500_000.0)[0, :, 0, :]
    assert max_error(out, expected) <= rope_tolerance(x, positions, "float32")


def test_equinox_adapter_avoids_theta_cache(rope_tolerance):
    pytest.importorskip("equinox")
    from impls.adapters.equinox import EquinoxAdapter

    adapter = EquinoxAdapter()
    x = random_heads((1, 64, 2, 32))
    positions = np.arange(64)[None]

    adapter.rotate(x, positions, RopeSpec.make(theta=10_000.0))
    out = adapter.rotate(x, positions, RopeSpec.make(theta=500_000.0))

    expected = rope_reference(x, positions, theta=500_000.0)
    assert max_error(out, expected) <= rope_tolerance(x, positions, "float32")


# rotary-embedding-torch: positions built in the input's dtype.


def bfloat16_case(seq: int = 512, dim: int = 32):
    """A ``[1, 1, seq, dim]`` bfloat16 input: bfloat16 represents integers exactly only up to 256."""
    torch = pytest.importorskip("torch")
    x = torch.from_numpy(random_heads((1, 1, seq, dim))).to(torch.bfloat16)
    # [B, H, S, D] -> [B, S, H, D] in float64 for the oracle.
    x_oracle = x.float().numpy().transpose(0, 2, 1, 3).astype(np.float64)
    return x, x_oracle, np.arange(seq)


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason=f"rotary-embedding-torch {LUCIDRAINS}: rotate_queries_or_keys builds positions in the "
    f"input's dtype, so bfloat16 rounds positions above 256",
)
def test_lucidrains_bfloat16_input_keeps_positions(rope_tolerance):
    lucidrains = pytest.importorskip("rotary_embedding_torch")
    x, x_oracle, positions = bfloat16_case()

    out = lucidrains.RotaryEmbedding(dim=32).rotate_queries_or_keys(x)

    expected = rope_reference(x_oracle, positions, pairing="interleaved").transpose(0, 2, 1, 3)
    assert max_error(out.float().numpy(), expected) <= rope_tolerance(x_oracle, positions, "bfloat16")


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason=f"rotary-embedding-torch {LUCIDRAINS}: a bfloat16 call caches angles of rounded positions, "
    f"which later float32 calls on the same module reuse",
)
def test_lucidrains_float32_after_bfloat16_call(rope_tolerance):
    torch = pytest.importorskip("torch")
    lucidrains = pytest.importorskip("rotary_embedding_torch")
    x, x_oracle, positions = bfloat16_case()
    rope = lucidrains.RotaryEmbedding(dim=32)

    rope.rotate_queries_or_keys(x)
    out = rope.rotate_queries_or_keys(x.to(torch.float32))

    expected = rope_reference(x_oracle, positions, pairing="interleaved").transpose(0, 2, 1, 3)
    assert max_error(out.numpy(), expected) <= rope_tolerance(x_oracle, positions, "float32")


def test_lucidrains_adapter_keeps_bfloat16_positions(rope_tolerance):
    pytest.importorskip("rotary_embedding_torch")
    from impls.adapters.base import numpy_dtype
    from impls.adapters.lucidrains import LucidrainsAdapter

    adapter = LucidrainsAdapter()
    spec = RopeSpec.make(pairing="interleaved")
    x = random_heads((1, 8, 2, 128)).astype(numpy_dtype("bfloat16"))
    positions = np.arange(8184, 8192)[None]

    bfloat16_out = adapter.rotate(x, positions, spec)
    float32_out = adapter.rotate(x.astype(np.float32), positions, spec)

    expected = rope_reference(x, positions, pairing="interleaved")
    assert max_error(bfloat16_out, expected) <= rope_tolerance(x, positions, "bfloat16")
    assert max_error(float32_out, expected) <= rope_tolerance(x, positions, "float32")


# Hugging Face transformers: dynamic NTK scaling takes one length for the whole batch.

DYNAMIC = {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 32}


def llama_dynamic_rotary_embedding():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = transformers.LlamaConfig(
        hidden_size=16,
        num_attention_heads=1,
        head_dim=16,
        max_position_embeddings=32,
        rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10_000.0},
    )
    return LlamaRotaryEmbedding(config)


def expected_cos(positions: np.ndarray) -> np.ndarray:
    """Return the half-split cos table ``[B, S, 16]`` of the oracle: each row scaled by its own length."""
    from impls.reference import rotation_angles

    angles = rotation_angles(positions, 16, 10_000.0, DYNAMIC)
    return np.cos(np.concatenate([angles, angles], axis=-1))


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason=f"transformers {TRANSFORMERS}: dynamic rope takes max(position_ids) over the whole batch, "
    f"so one row changes another row's base",
)
def test_hf_dynamic_rows_are_independent():
    torch = pytest.importorskip("torch")
    rotary_embedding = llama_dynamic_rotary_embedding()
    # Row 0 stays within the 32 original positions; row 1 reaches position 99.
    positions = np.stack([np.arange(16), np.arange(84, 100)])

    cos, _ = rotary_embedding(torch.zeros(2, 1, 16, 16), torch.from_numpy(positions))

    # float32 cos of angles below 100 rad: within 1e-5 of the float64 value.
    assert max_error(cos[0].numpy(), expected_cos(positions)[0]) <= 1e-5


@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason=f"transformers {TRANSFORMERS}: dynamic rope keeps the base of the longest call seen until a "
    f"call drops below max_position_embeddings",
)
def test_hf_dynamic_ignores_call_history():
    torch = pytest.importorskip("torch")
    rotary_embedding = llama_dynamic_rotary_embedding()
    rotary_embedding(torch.zeros(1, 1, 100, 16), torch.arange(100)[None])
    positions = np.arange(50)[None]

    cos, _ = rotary_embedding(torch.zeros(1, 1, 50, 16), torch.from_numpy(positions))

    assert max_error(cos.numpy(), expected_cos(positions)) <= 1e-5


@pytest.mark.parametrize("adapter_name", ["hf_llama", "hf_gpt_neox"])
def test_hf_adapter_dynamic_rows_are_independent(adapter_name, rope_tolerance):
    pytest.importorskip("transformers")
    from impls.registry import load_adapter

    adapter = load_adapter(adapter_name)
    spec = RopeSpec.make(scaling=DYNAMIC)
    x = random_heads((2, 16, 2, 16))
    positions = np.stack([np.arange(16), np.arange(84, 100)])

    adapter.rotate(x, np.tile(np.arange(184, 200), (2, 1)), spec)  # a longer call first
    out = adapter.rotate(x, positions, spec)

    expected = rope_reference(x, positions, scaling=DYNAMIC)
    assert max_error(out, expected) <= rope_tolerance(x, positions, "float32")


# torchtune: the table is never rebuilt past max_seq_len.


@pytest.mark.xfail(
    strict=True,
    raises=IndexError,
    reason=f"torchtune {TORCHTUNE}: RotaryPositionalEmbeddings documents recomputing its table past "
    f"max_seq_len but indexes past its end",
)
def test_torchtune_positions_past_max_seq_len(rope_tolerance):
    torch = pytest.importorskip("torch")
    torchtune_adapter = pytest.importorskip("impls.adapters.torchtune", exc_type=ImportError)
    rope = torchtune_adapter.rotary_positional_embeddings_class()(32, max_seq_len=16)
    x = random_heads((1, 8, 2, 32))
    positions = np.arange(16, 24)[None]

    out = rope(torch.from_numpy(x), input_pos=torch.from_numpy(positions))

    expected = rope_reference(x, positions, pairing="interleaved")
    assert max_error(out.numpy(), expected) <= rope_tolerance(x, positions, "float32")


def test_torchtune_adapter_reaches_long_positions(rope_tolerance):
    torchtune_adapter = pytest.importorskip("impls.adapters.torchtune", exc_type=ImportError)
    x = random_heads((1, 8, 2, 32))
    positions = np.arange(32760, 32768)[None]

    out = torchtune_adapter.TorchtuneAdapter().rotate(x, positions, RopeSpec.make(pairing="interleaved"))

    expected = rope_reference(x, positions, pairing="interleaved")
    assert max_error(out, expected) <= rope_tolerance(x, positions, "float32")
