"""Error metrics of one comparison between an implementation's output and the oracle's."""

from __future__ import annotations

import dataclasses

import numpy as np

from impls.adapters.base import numpy_dtype

_UINT_OF_WIDTH = {2: np.uint16, 4: np.uint32, 8: np.uint64}
_INT_OF_WIDTH = {2: np.int16, 4: np.int32, 8: np.int64}


@dataclasses.dataclass(frozen=True)
class Metrics:
    """How far ``actual`` is from ``expected``, and where it is worst."""

    max_abs_error: float
    max_rel_error: float
    max_ulp: int
    share_over_tolerance: float
    # Index of the worst element as (batch, position index, head, feature).
    worst_index: tuple[int, ...]
    tolerance: float

    @property
    def passed(self) -> bool:
        """True when no element is over the tolerance."""
        return self.share_over_tolerance == 0.0

    def as_dict(self) -> dict:
        """Return the metrics as JSON-friendly values."""
        values = dataclasses.asdict(self)
        values["worst_index"] = list(self.worst_index)
        return values


def _ordered_integers(values: np.ndarray) -> np.ndarray:
    """Map floats to integers whose order and spacing follow the floats' (one step per ULP).

    Returned as float64: a float64 ULP distance can exceed the int64 range (+0 to -inf), and
    distances that large need no exact count.
    """
    width = values.dtype.itemsize
    unsigned = _UINT_OF_WIDTH[width]
    bits = values.view(unsigned)
    sign_bit = unsigned(1 << (8 * width - 1))
    magnitude = (bits & (sign_bit - unsigned(1))).astype(np.float64)
    return np.where(bits & sign_bit, -magnitude, magnitude)


def ulp_distance(actual: np.ndarray, expected: np.ndarray, dtype: str) -> np.ndarray:
    """Return the distance in units in the last place of ``dtype`` between two arrays.

    Both arrays are rounded to ``dtype`` first, so the oracle's float64 values count from
    their nearest representable value.

    >>> ulp_distance(np.float32([1.0]), np.float64([1.0 + 2**-23]), "float32").tolist()
    [1.0]
    """
    target = numpy_dtype(dtype)
    a = np.asarray(actual).astype(target)
    e = np.asarray(expected).astype(target)
    return np.abs(_ordered_integers(a) - _ordered_integers(e))


REAL_DTYPES = ("float16", "bfloat16", "float32", "float64")


def check_output(actual, name: str) -> np.ndarray:
    """Return ``actual`` as a NumPy array, or raise ValueError unless it is a real floating array."""
    array = np.asarray(actual)
    if array.dtype.name not in REAL_DTYPES:
        raise ValueError(
            f"{name} has dtype {array.dtype}; expected a real floating array ({', '.join(REAL_DTYPES)})."
        )
    return array


def compare(actual: np.ndarray, expected: np.ndarray, tolerance: float) -> Metrics:
    """Compare an output with the oracle's float64 values of the same shape."""
    actual = check_output(actual, "The output")
    if actual.shape != expected.shape:
        raise ValueError(
            f"The implementation returned shape {actual.shape}, but the case expects {expected.shape}."
        )
    error = np.abs(actual.astype(np.float64) - expected)
    if not np.all(np.isfinite(error)):
        error = np.where(np.isfinite(error), error, np.inf)

    # Relative to each value, with a floor at the tolerance so zeros do not divide by zero.
    relative = error / np.maximum(np.abs(expected), max(tolerance, np.finfo(np.float64).tiny))
    worst = np.unravel_index(int(np.argmax(error)), error.shape)
    # The ULP distance is measured in the dtype the implementation returned.
    ulps = ulp_distance(actual, expected, actual.dtype.name)

    return Metrics(
        max_abs_error=float(error.max()),
        max_rel_error=float(relative.max()),
        max_ulp=int(min(ulps.max(), 2**62)),
        share_over_tolerance=float(np.mean(error > tolerance)),
        worst_index=tuple(int(i) for i in worst),
        tolerance=float(tolerance),
    )


def error_by_position(actual: np.ndarray, expected: np.ndarray, positions: np.ndarray) -> list[tuple[int, float]]:
    """Return ``(position, max error over heads and features)`` for every token, sorted by position."""
    error = np.abs(np.asarray(actual).astype(np.float64) - expected).max(axis=(-2, -1))  # [B, S]
    pairs = sorted(zip(positions.reshape(-1).tolist(), error.reshape(-1).tolist()))
    return [(int(p), float(e)) for p, e in pairs]
