"""Fixtures shared by the tests: the tolerance rule for an output against the float64 oracle."""

from __future__ import annotations

import numpy as np
import pytest

from impls.frequencies import Scaling
from parity.tolerance import tolerance_for_input


def oracle_tolerance(x: np.ndarray, positions: np.ndarray, dtype: str, scaling: Scaling | None = None) -> float:
    """Return the tolerance of a rotated ``x`` against :func:`impls.reference.rope_reference`.

    The rule is the one of the parity suite (``parity.tolerance``), with the scale bounded from
    the input. Measured on the cases of ``test_adapters.py`` (positions up to 32767), the
    third-party adapters reach at most a third of it.
    """
    return tolerance_for_input(x, positions, dtype, scaling)


@pytest.fixture
def rope_tolerance():
    """The function :func:`oracle_tolerance`."""
    return oracle_tolerance
