"""The parity run fails on each deliberately broken RoPE, and its diagnosis names the mistake."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from parity.cases import CASES
from parity.diagnose import summarize
from parity.fixtures import load_case, load_manifest
from parity.runner import UserAdapter, compare_case

REPO = Path(__file__).resolve().parent.parent

BROKEN = [
    ("other_pairing", "the other pairing"),
    ("positions_ignored", "positions ignored"),
    ("decode_offset_missing", "the decode offset missing"),
    ("theta_ignored", "theta ignored"),
    ("bfloat16_positions", "angles or positions in low precision"),
    ("partial_rotary_full_width", "partial rotary over the wrong width"),
    ("queries_keys_swapped", "queries and keys swapped"),
]


@pytest.fixture(scope="module")
def manifest():
    return load_manifest()


def _run_suite(target: str, manifest) -> list[dict]:
    adapter = UserAdapter(target)
    records = []
    for case in CASES:
        entry = next(e for e in manifest["cases"] if e["id"] == case.id)
        records.append(compare_case(adapter, case, load_case(case.id, manifest=manifest), entry, "eager"))
    return records


def test_example_passes(manifest):
    records = _run_suite("parity.examples:numpy_rope", manifest)
    verdicts = {r["verdict"] for r in records}
    assert verdicts == {"pass", "n/a"}
    assert summarize(records) == {}


@pytest.mark.parametrize(("function", "label"), BROKEN, ids=[name for name, _ in BROKEN])
def test_broken_diagnosed(function, label, manifest):
    target = f"tests.broken_ropes:{function}"
    records = _run_suite(target, manifest)

    failures = [r for r in records if r["verdict"] == "fail"]
    assert failures, f"{function} passed every case: the suite cannot see this mistake"
    diagnosis = summarize(records)[target]
    assert diagnosis.startswith(label), diagnosis


def test_parity_run_fails_on_broken():
    # The real command line, end to end: a wrong pairing must fail the run and be diagnosed.
    environment = dict(os.environ, PYTHONPATH=str(REPO))
    environment.pop("PYTEST_XDIST_WORKER", None)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "parity/test_rotation.py", "-p", "no:cacheprovider", "-q",
         "--impl", "tests.broken_ropes:other_pairing", "-k", "packed"],
        cwd=REPO, env=environment, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1, result.stdout[-3000:]
    assert "Diagnosis of failures" in result.stdout
    assert "tests.broken_ropes:other_pairing: the other pairing" in result.stdout


def test_unknown_impl_rejected():
    with pytest.raises(ValueError, match="package.module:callable"):
        UserAdapter("no_colon_here")
    with pytest.raises(ValueError, match="cannot import"):
        UserAdapter("no_such_module_xyz:rope")


def test_wrong_output_dtype_fails(manifest):
    records = _run_suite("tests.broken_ropes:float32_for_bfloat16", manifest)
    low_precision = [r for r in records if r["dtype"] in ("bfloat16", "float16") and r["verdict"] != "n/a"]
    assert low_precision
    assert all(r["verdict"] == "fail" for r in low_precision)
    assert "came back as float32 for bfloat16 input" in next(r["worst"] for r in low_precision if r["dtype"] == "bfloat16")
    assert all(r["verdict"] == "pass" for r in records if r["dtype"] == "float32" and r["verdict"] != "n/a")
