"""The tolerance rule of the parity suite, keyed by dtype and by the largest absolute position.

Every implementation is compared with the float64 oracle, so the tolerance bounds the error a
correct float32 implementation can make, plus one rounding of the output to its dtype:

    tol = scale * (eps32 * (2 * P + 4) + ulps * eps_out)

* ``scale`` is the largest ``|value|`` of the oracle's output for the case.
* ``P`` is the largest absolute position. A float32 angle ``p * inv_freq`` carries a relative
  error of at most one float32 epsilon (``inv_freq`` rounded once, the product rounded once),
  so its absolute error grows as ``eps32 * p``. A rotated pair mixes two values, which doubles
  it, and ``4 * eps32`` covers the rounding of cos, sin and the multiply-add near ``p = 0``.
* ``eps_out`` is the epsilon of the output dtype (0 for float32 and float64, whose rounding the
  first term covers) and ``ulps`` is 2. One epsilon is two roundings of half a unit in the
  last place, so the term allows four: the output's, and those of tables and products that
  Hugging Face keeps in bfloat16 (cos, sin, the two products and their sum).

Measured on the suite's cases, correct float32 implementations stay within a fifth of this
bound (at most 1.2e-3 against 6.5e-3 at position 8191, see the benchmarks page for the
run). Each of these exceeds it by orders of magnitude: a bfloat16 angle or position (1 rad at
position 1023), a bfloat16 inverse frequency (0.12 rad at position 100), the other pairing,
a wrong theta. ``tests/test_diagnosis.py`` shows each of them failing.

Overrides: :data:`OVERRIDES` may widen the rule for one adapter and dtype. Each entry carries
its reason, and the reports show it next to the tolerance. It is empty: no adapter needs one.
"""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np

from impls.adapters.base import numpy_dtype

EPS32 = float(np.finfo(np.float32).eps)
OUTPUT_ULPS = 2


@dataclasses.dataclass(frozen=True)
class Override:
    """A widened tolerance for one adapter and dtype, with the reason."""

    factor: float
    reason: str


# (adapter name, dtype) -> Override.
OVERRIDES: dict[tuple[str, str], Override] = {}


def output_epsilon(dtype: str) -> float:
    """Return the machine epsilon of a low-precision output dtype, 0 for float32 and float64."""
    if dtype in ("float32", "float64"):
        return 0.0
    # ml_dtypes.finfo supports bfloat16 on every ml_dtypes version; np.finfo does only from 0.7.
    return float(ml_dtypes.finfo(numpy_dtype(dtype)).eps)


def tolerance(dtype: str, max_position: int, scale: float) -> float:
    """Return the absolute tolerance for a case (see the module docstring for the rule).

    >>> round(tolerance("float32", 0, 1.0) / EPS32, 6)
    4.0
    >>> tolerance("float32", 8191, 4.5) > tolerance("float32", 150, 4.5)
    True
    """
    if max_position < 0:
        raise ValueError(f"max_position must be the largest absolute position (>= 0), got {max_position}.")
    # Angles are computed in float32 for every dtype but float64, which keeps float64 angles.
    angle_epsilon = float(np.finfo(np.float64).eps) if dtype == "float64" else EPS32
    angle_term = angle_epsilon * (2 * max_position + 4)
    rounding_term = OUTPUT_ULPS * output_epsilon(dtype)
    return float(scale * (angle_term + rounding_term))


def tolerance_for_input(x: np.ndarray, positions: np.ndarray, dtype: str, scaling=None) -> float:
    """Return the tolerance of a rotated ``x`` when the oracle's output is not at hand.

    A rotated pair is at most ``sqrt(2) * max|x|`` in magnitude, times the attention factor of
    the scaling (1 except for yarn), and that bound serves as the scale.
    """
    from impls.frequencies import Scaling, attention_factor

    scale = np.sqrt(2.0) * float(np.max(np.abs(np.asarray(x, np.float64)), initial=0.0))
    scale *= attention_factor(Scaling.from_config(scaling))
    return tolerance(dtype, int(np.max(np.abs(positions), initial=0)), scale)


def tolerance_for(adapter: str, dtype: str, max_position: int, scale: float) -> tuple[float, str | None]:
    """Return ``(tolerance, override reason or None)`` for one adapter on one case."""
    base = tolerance(dtype, max_position, scale)
    override = OVERRIDES.get((adapter, dtype))
    if override is None:
        return base, None
    return base * override.factor, override.reason


def table_rows(scale: float = 4.5) -> list[tuple[str, int, float]]:
    """Return ``(dtype, position, tolerance)`` rows for the README's table."""
    rows = []
    for dtype in ("float32", "bfloat16", "float16"):
        for position in (0, 150, 2048, 8191, 32767):
            rows.append((dtype, position, tolerance(dtype, position, scale)))
    return rows
