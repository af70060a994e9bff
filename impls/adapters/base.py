"""The one call shape that every implementation in the parity suite is wrapped in.

An adapter receives NumPy arrays in the layout ``[batch, seq, heads, head_dim]`` with integer
positions ``[batch, seq]``, and returns the rotated array as NumPy in the dtype the library
produces. It declares what it supports in a :class:`Support`; the harness reads that
declaration and reports a case outside it as "n/a" with the reason.

A new adapter is a subclass of :class:`Adapter` in one file plus one line in
``impls.registry.ADAPTERS``.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

from impls.frequencies import PAIRINGS, SCALING_TYPES, Scaling

DTYPES = ("float32", "bfloat16", "float16", "float64")

# Position patterns an adapter can express, from the most to the least general.
#   "any": arbitrary integers per token, negative ones included.
#   "non_negative": arbitrary integers >= 0 per token.
#   "runs": each row is made of runs p, p+1, p+2, ... with p >= 0 (offsets, packing, padding).
POSITION_KINDS = ("any", "non_negative", "runs")


def numpy_dtype(name: str) -> np.dtype:
    """Return the NumPy dtype for a dtype name, bfloat16 included (through ml_dtypes)."""
    if name == "bfloat16":
        return np.dtype(ml_dtypes.bfloat16)
    if name not in DTYPES:
        raise ValueError(f"Unknown dtype {name!r}. Valid dtypes: {', '.join(DTYPES)}.")
    return np.dtype(name)


@dataclasses.dataclass(frozen=True)
class RopeSpec:
    """The RoPE variant of a case, in the terms of the oracle."""

    theta: float = 10_000.0
    pairing: str = "half_split"
    rotary_dim: int | None = None
    scaling: Scaling = Scaling("default")

    @classmethod
    def make(
        cls,
        theta: float = 10_000.0,
        pairing: str = "half_split",
        rotary_dim: int | None = None,
        scaling: Mapping[str, Any] | Scaling | None = None,
    ) -> RopeSpec:
        """Build a spec, validating the scaling mapping."""
        if pairing not in PAIRINGS:
            raise ValueError(f"Unknown pairing {pairing!r}. Valid pairings: {', '.join(PAIRINGS)}.")
        return cls(float(theta), pairing, rotary_dim, Scaling.from_config(scaling))


@dataclasses.dataclass(frozen=True)
class Support:
    """The features an adapter can express. Anything else is reported as n/a, never run or passed."""

    pairings: frozenset[str] = frozenset(PAIRINGS)
    positions: str = "any"
    partial_rotary: bool = True
    scaling_types: frozenset[str] = frozenset({"default"})
    dtypes: frozenset[str] = frozenset({"float32", "bfloat16", "float16"})
    layout: str = "[batch, seq, heads, head_dim]"
    modes: tuple[str, ...] = ("eager",)
    theta: bool = True


class Adapter(abc.ABC):
    """An implementation of RoPE behind the suite's common call shape."""

    #: Short name shown in the parity table, such as ``"torch_onnx"``.
    name: str
    #: Distribution whose version the reports record, such as ``"torch"``.
    library: str
    support: Support = Support()

    def unsupported_reason(self, spec: RopeSpec, dtype: str, positions: np.ndarray, mode: str) -> str | None:
        """Return why this adapter cannot run a case, or None when it can."""
        support = self.support
        if spec.pairing not in support.pairings:
            return f"{self.name} has no {spec.pairing} pairing"
        if spec.rotary_dim is not None and not support.partial_rotary:
            return f"{self.name} has no partial rotary"
        if spec.scaling.rope_type not in support.scaling_types:
            return f"{self.name} has no {spec.scaling.rope_type} scaling"
        if dtype not in support.dtypes:
            return f"{self.name} does not take {dtype}"
        if mode not in support.modes:
            return f"{self.name} has no {mode} mode"
        if spec.theta != 10_000.0 and not support.theta:
            return f"{self.name} fixes theta at 10000"
        if support.positions != "any" and positions.min() < 0:
            return f"{self.name} takes no negative positions"
        return None

    @abc.abstractmethod
    def rotate(
        self, x: np.ndarray, positions: np.ndarray, spec: RopeSpec, *, mode: str = "eager"
    ) -> np.ndarray:
        """Rotate ``x`` ``[batch, seq, heads, head_dim]`` by ``positions`` ``[batch, seq]``."""

    def rotate_pair(
        self,
        q: np.ndarray,
        k: np.ndarray,
        q_positions: np.ndarray,
        k_positions: np.ndarray,
        spec: RopeSpec,
        *,
        mode: str = "eager",
    ) -> tuple[np.ndarray, np.ndarray]:
        """Rotate queries and keys, each by its own positions (cross-attention may differ)."""
        return self.rotate(q, q_positions, spec, mode=mode), self.rotate(k, k_positions, spec, mode=mode)

    def version(self) -> str:
        """Return the installed version of the wrapped library."""
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version(self.library)
        except PackageNotFoundError:
            return "unknown"


def contiguous_runs(row: np.ndarray) -> list[tuple[int, int, int]]:
    """Split a row of positions into runs ``p, p+1, ...``: a list of ``(start, stop, first)``.

    ``start`` and ``stop`` index the row; ``first`` is the position at ``start``.

    >>> contiguous_runs(np.array([0, 1, 2, 0, 1, 7, 8]))
    [(0, 3, 0), (3, 5, 0), (5, 7, 7)]
    """
    breaks = np.flatnonzero(np.diff(row) != 1) + 1
    bounds = np.concatenate([[0], breaks, [len(row)]])
    return [(int(a), int(b), int(row[a])) for a, b in zip(bounds[:-1], bounds[1:])]


__all__ = [
    "DTYPES",
    "POSITION_KINDS",
    "SCALING_TYPES",
    "Adapter",
    "RopeSpec",
    "Support",
    "contiguous_runs",
    "numpy_dtype",
]
