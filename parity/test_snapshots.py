"""Drift: each implementation's output against its own snapshot from the fixtures.

An implementation can still agree with the oracle and yet have moved since the fixtures were
written, for example after a library upgrade. A move beyond the case's tolerance fails here,
naming the library version of the snapshot and the installed one.
"""

from __future__ import annotations

import pytest

from impls.registry import ADAPTERS, AdapterUnavailable, load_adapter
from parity.cases import CASES_BY_ID
from parity.fixtures import FixtureError, snapshot_cases
from parity.runner import snapshot_drift

SNAPSHOT_IDS = [case.id for case in snapshot_cases()]


@pytest.mark.parametrize("case_id", SNAPSHOT_IDS)
@pytest.mark.parametrize("impl", [entry.name for entry in ADAPTERS])
def test_snapshot_drift(impl, case_id):
    try:
        adapter = load_adapter(impl)
    except AdapterUnavailable as error:
        pytest.skip(str(error))
    try:
        message = snapshot_drift(adapter, CASES_BY_ID[case_id])
    except FixtureError as error:
        pytest.skip(f"n/a: {error}")
    assert message is None, message
