"""The parity cases: one data table, expanded into parametrized tests with readable ids.

Each :class:`Case` describes a RoPE variant (theta, pairing, partial rotary, scaling), a dtype,
shapes and a position pattern. :func:`make_inputs` turns it into seeded arrays; the fixture
generator stores those inputs together with the oracle's outputs.

How the table was chosen: the full product of kinds, dtypes, head sizes, thetas, pairings and
scaling types would be thousands of cases. Instead every value of every axis appears at least
once, and each kind runs in float32 and bfloat16 with both pairings. The pairs of axes that
interact numerically are crossed:

* long positions with each dtype and each theta, because precision falls with both;
* partial rotary with both pairings, because the rotated pairs differ;
* scaling types with long positions, because scaling matters past the original context;
* grouped-query attention with cross-attention, for separate key shapes and positions.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from impls.adapters.base import RopeSpec, numpy_dtype

KINDS = ("padded", "left_padded", "packed", "cross", "decode", "long")

# The scaling configurations used by the table, in Hugging Face rope_parameters form.
SCALINGS: dict[str, dict[str, Any]] = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0, "original_max_position_embeddings": 2048},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "original_max_position_embeddings": 8192,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
    },
}


@dataclasses.dataclass(frozen=True)
class Case:
    """One parity case: shapes, dtype, RoPE variant and position pattern."""

    kind: str
    dtype: str = "float32"
    batch: int = 2
    seq: int = 16
    heads: int = 2
    head_dim: int = 64
    kv_seq: int | None = None
    kv_heads: int | None = None
    theta: float = 10_000.0
    pairing: str = "half_split"
    rotary_dim: int | None = None
    scaling: str | None = None
    max_position: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Unknown case kind {self.kind!r}. Valid kinds: {', '.join(KINDS)}.")
        if self.scaling is not None and self.scaling not in SCALINGS:
            raise ValueError(f"Unknown scaling {self.scaling!r}. Valid: {', '.join(SCALINGS)}.")

    @property
    def key_seq(self) -> int:
        """The key length (the query length unless the case is cross-attention)."""
        return self.seq if self.kv_seq is None else self.kv_seq

    @property
    def key_heads(self) -> int:
        """The number of key heads (fewer than query heads for grouped-query attention)."""
        return self.heads if self.kv_heads is None else self.kv_heads

    @property
    def spec(self) -> RopeSpec:
        """The RoPE variant of this case."""
        scaling = SCALINGS[self.scaling] if self.scaling else None
        return RopeSpec.make(self.theta, self.pairing, self.rotary_dim, scaling)

    @property
    def id(self) -> str:
        """A readable id such as ``float32[2,16,2,64]-packed-interleaved``."""
        parts = [f"{self.dtype}[{self.batch},{self.seq},{self.heads},{self.head_dim}]-{self.kind}"]
        if self.kv_seq is not None:
            parts.append(f"kv{self.kv_seq}")
        if self.kv_heads is not None:
            parts.append(f"gqa{self.kv_heads}")
        if self.max_position is not None:
            parts.append(f"pos{self.max_position}")
        if self.pairing != "half_split":
            parts.append(self.pairing)
        if self.rotary_dim is not None:
            parts.append(f"rot{self.rotary_dim}")
        if self.theta != 10_000.0:
            parts.append(f"theta{self.theta:.0e}".replace("+0", "").replace("+", ""))
        if self.scaling is not None:
            parts.append(self.scaling)
        return "-".join(parts)

    def params(self) -> dict[str, Any]:
        """Return the case's fields as JSON-friendly values (for manifests and reports)."""
        params = dataclasses.asdict(self)
        params["scaling"] = SCALINGS[self.scaling] if self.scaling else None
        return params


def _table() -> tuple[Case, ...]:
    cases: list[Case] = []

    # Every kind, in float32 and bfloat16, with both pairings.
    for kind in ("padded", "left_padded", "packed", "cross", "decode"):
        for dtype in ("float32", "bfloat16"):
            for pairing in ("half_split", "interleaved"):
                extra: dict[str, Any] = {"kv_seq": 24} if kind == "cross" else {}
                cases.append(Case(kind, dtype, pairing=pairing, **extra))

    # float16 once per pairing, on packed rows.
    cases.append(Case("packed", "float16"))
    cases.append(Case("packed", "float16", pairing="interleaved"))

    # Cross-attention with equal lengths but different positions, and with grouped-query keys.
    cases.append(Case("cross", kv_seq=16))
    cases.append(Case("cross", kv_seq=24, heads=4, kv_heads=2))
    cases.append(Case("padded", heads=4, kv_heads=1, pairing="interleaved"))

    # Long positions: each dtype, each theta, both pairings.
    for max_position in (8191, 32767):
        for dtype in ("float32", "bfloat16", "float16"):
            cases.append(Case("long", dtype, batch=1, seq=8, max_position=max_position))
    for theta in (5e5, 1e6):
        cases.append(Case("long", batch=1, seq=8, max_position=8191, theta=theta))
        cases.append(Case("long", batch=1, seq=8, max_position=8191, theta=theta, pairing="interleaved"))

    # Head sizes 128 and 256 and partial rotary over both pairings.
    for head_dim in (128, 256):
        cases.append(Case("packed", seq=8, heads=2, head_dim=head_dim))
    for pairing in ("half_split", "interleaved"):
        cases.append(Case("packed", rotary_dim=32, pairing=pairing))
        cases.append(Case("long", batch=1, seq=8, max_position=8191, rotary_dim=16, head_dim=64, pairing=pairing))
    cases.append(Case("packed", "bfloat16", seq=8, heads=2, head_dim=128, rotary_dim=64))

    # Scaling types, within and beyond the original context.
    for scaling in SCALINGS:
        cases.append(Case("packed", scaling=scaling))
        cases.append(Case("long", batch=1, seq=8, max_position=32767, scaling=scaling, theta=5e5))
    cases.append(Case("long", "bfloat16", batch=1, seq=8, max_position=32767, scaling="llama3", theta=5e5))

    # Seeds follow table order, so adding a case at the end changes no other case's data.
    return tuple(dataclasses.replace(case, seed=index) for index, case in enumerate(cases))


CASES: tuple[Case, ...] = _table()
CASES_BY_ID: dict[str, Case] = {case.id: case for case in CASES}
if len(CASES_BY_ID) != len(CASES):
    raise RuntimeError("Two parity cases share an id; make their parameters differ.")


def _packed_positions(rng: np.random.Generator, seq: int, documents: int) -> tuple[np.ndarray, np.ndarray]:
    cuts = np.sort(rng.choice(np.arange(1, seq), size=documents - 1, replace=False))
    bounds = np.concatenate([[0], cuts, [seq]])
    positions = np.concatenate([np.arange(b - a) for a, b in zip(bounds[:-1], bounds[1:])])
    segments = np.concatenate([np.full(b - a, i) for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))])
    return positions, segments


def make_inputs(case: Case) -> dict[str, np.ndarray]:
    """Return the seeded inputs of ``case``.

    Keys: ``q`` ``[B, S, H, D]`` and ``k`` ``[B, Sk, Hkv, D]`` in the case dtype,
    ``q_positions`` ``[B, S]`` and ``k_positions`` ``[B, Sk]`` (int32), ``q_mask`` ``[B, S]``
    and ``k_mask`` ``[B, Sk]`` (True for real tokens), ``q_segments`` and ``k_segments`` (the
    document index of each token; 0 unless packed).
    """
    rng = np.random.default_rng(case.seed)
    dtype = numpy_dtype(case.dtype)
    batch, seq, key_seq = case.batch, case.seq, case.key_seq

    q = rng.standard_normal((batch, seq, case.heads, case.head_dim)).astype(dtype)
    k = rng.standard_normal((batch, key_seq, case.key_heads, case.head_dim)).astype(dtype)

    q_positions = np.tile(np.arange(seq), (batch, 1))
    q_mask = np.ones((batch, seq), bool)
    q_segments = np.zeros((batch, seq), np.int32)

    if case.kind == "padded":
        # Right padding: row b has b * 5 pads at the end; positions still count 0 .. S-1.
        for b in range(batch):
            q_mask[b, seq - min(5 * b, seq - 1) :] = False
    elif case.kind == "left_padded":
        # Left padding with positions from the mask: cumsum(mask) - 1, pads at position 0.
        for b in range(batch):
            q_mask[b, : min(5 * b + 3, seq - 1)] = False
        q_positions = np.where(q_mask, np.cumsum(q_mask, axis=-1) - 1, 0)
    elif case.kind == "packed":
        # Three or more documents per row, split differently in each row; positions restart.
        for b in range(batch):
            q_positions[b], q_segments[b] = _packed_positions(rng, seq, 3 + b)
    elif case.kind == "decode":
        # Each row resumes a different sequence: its tokens sit at positions p, p+1, ...
        starts = rng.integers(1, 200, size=batch)
        q_positions = starts[:, None] + np.arange(seq)
    elif case.kind == "long":
        start = case.max_position - seq + 1
        q_positions = np.tile(np.arange(start, case.max_position + 1), (batch, 1))

    if case.kind == "cross":
        # Keys at 0 .. Sk-1; queries right-aligned to the end of each row's keys, one row
        # shifted further, so the two position arrays differ.
        k_positions = np.tile(np.arange(key_seq), (batch, 1))
        q_positions = np.stack([key_seq - seq + np.arange(seq) + 7 * b for b in range(batch)])
        k_mask = np.ones((batch, key_seq), bool)
        k_segments = np.zeros((batch, key_seq), np.int32)
    else:
        k_positions, k_mask, k_segments = q_positions.copy(), q_mask.copy(), q_segments.copy()

    return {
        "q": q,
        "k": k,
        "q_positions": q_positions.astype(np.int32),
        "k_positions": k_positions.astype(np.int32),
        "q_mask": q_mask,
        "k_mask": k_mask,
        "q_segments": q_segments.astype(np.int32),
        "k_segments": k_segments.astype(np.int32),
    }


def max_abs_position(inputs: dict[str, np.ndarray]) -> int:
    """Return the largest absolute position of a case's queries and keys."""
    return int(max(np.abs(inputs["q_positions"]).max(), np.abs(inputs["k_positions"]).max()))
