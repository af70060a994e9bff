"""Fixtures shared by the tests: the tolerance rule for an output against the float64 oracle."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

from impls.adapters.base import numpy_dtype
from impls.frequencies import Scaling, attention_factor


def oracle_tolerance(x: np.ndarray, positions: np.ndarray, dtype: str, scaling: Scaling | None = None) -> float:
    """Return the absolute tolerance of a rotated ``x`` against :func:`impls.reference.rope_reference`.

    A rotated pair has magnitude at most ``sqrt(2) * max|x| * a``, where ``a`` is the attention
    factor of the scaling (1 except for yarn). Two errors scale with it:

    * the angle ``p * inv_freq``: computed in float32 (float64 for float64 inputs), with
      ``inv_freq <= 1`` carrying about one ulp from the power and the division and the product
      another half, so at most ``2 * eps * |p|`` radians;
    * the output: up to three roundings in the output dtype (cos/sin table, product, sum), half
      an ulp each, so ``1.5 * eps(dtype)`` relative.

    Measured on the cases of ``test_adapters.py`` (positions up to 32767), the third-party
    adapters reach 3% to 32% of this bound.
    """
    angle_eps = float(np.finfo(np.float64 if dtype == "float64" else np.float32).eps)
    output_eps = float(ml_dtypes.finfo(numpy_dtype(dtype)).eps)
    magnitude = math.sqrt(2.0) * float(np.max(np.abs(np.asarray(x, np.float64)), initial=0.0))
    magnitude *= attention_factor(scaling or Scaling("default"))
    largest_position = max(float(np.max(np.abs(positions), initial=0)), 1.0)
    return magnitude * (2.0 * angle_eps * largest_position + 1.5 * output_eps)


@pytest.fixture
def rope_tolerance():
    """The function :func:`oracle_tolerance`."""
    return oracle_tolerance
