"""Rotated queries and keys of every implementation against the float64 oracle, case by case.

Eager runs of the snapshot cases also compare the output with the implementation's own
snapshot in the fixtures. An implementation that still agrees with the oracle but moved since
the snapshot (after a library upgrade, say) fails with both library versions named.
"""

from __future__ import annotations

import functools

import pytest

from impls.registry import ADAPTERS, AdapterUnavailable, load_adapter
from parity.cases import CASES, CASES_BY_ID
from parity.fixtures import FixtureError, load_case, load_manifest, load_snapshot
from parity.runner import UserAdapter, compare_case

MODES_BY_FRAMEWORK = {"jax": ("eager", "jit"), "torch": ("eager",)}


def pytest_generate_tests(metafunc):
    if "target" not in metafunc.fixturenames:
        return
    user_targets = metafunc.config.getoption("--impl")
    if user_targets:
        targets = [(f"user:{target}", ("eager",)) for target in user_targets]
    else:
        targets = [(entry.name, MODES_BY_FRAMEWORK.get(entry.framework, ("eager",))) for entry in ADAPTERS]

    params, ids = [], []
    for target, modes in targets:
        for case in CASES:
            for mode in modes:
                params.append((target, case.id, mode))
                ids.append(f"{target.removeprefix('user:')}-{case.id}-{mode}")
    metafunc.parametrize(("target", "case_id", "mode"), params, ids=ids)


@functools.lru_cache(maxsize=None)
def _adapter(target: str):
    if target.startswith("user:"):
        return UserAdapter(target.removeprefix("user:"))
    return load_adapter(target)


@pytest.fixture(scope="session")
def manifest():
    return load_manifest()


@functools.lru_cache(maxsize=None)
def _snapshot(name: str):
    try:
        return load_snapshot(name)
    except FixtureError:
        return None


def test_rotation(target, case_id, mode, manifest, record_parity):
    case = CASES_BY_ID[case_id]
    name = target.removeprefix("user:")
    try:
        adapter = _adapter(target)
    except AdapterUnavailable as error:
        record_parity({"impl": name, "case": case_id, "kind": case.kind, "dtype": case.dtype,
                       "mode": mode, "verdict": "skipped", "reason": str(error)})
        pytest.skip(str(error))

    arrays = load_case(case_id, manifest=manifest)
    entry = next(e for e in manifest["cases"] if e["id"] == case_id)
    # Eager outputs are also compared with the implementation's snapshot, to report drift.
    snapshot = _snapshot(name) if mode == "eager" else None
    stored = (snapshot[0], snapshot[1][case_id]) if snapshot and case_id in snapshot[1] else None
    record = compare_case(adapter, case, arrays, entry, mode, snapshot=stored)
    record_parity(record)

    if record["verdict"] == "n/a":
        pytest.skip(f"n/a: {record['reason']}")
    if record["verdict"] == "fail" and "metrics" not in record:
        pytest.fail(f"{name} on {case_id} ({mode}): {record['worst']}", pytrace=False)
    if record["verdict"] == "fail":
        diagnosis = record["diagnosis"]
        pytest.fail(
            f"{name} on {case_id} ({mode}): max |error| {record['max_abs_error']:.3e} at {record['worst']} "
            f"exceeds the tolerance {record['tolerance']:.3e}; reproduced by: "
            f"{', '.join(diagnosis['matches']) or 'no known mistake'} (nearest: {diagnosis['nearest']})",
            pytrace=False,
        )
    if "drift" in record:
        pytest.fail(record["drift"], pytrace=False)
