"""The parity reports: the summary table and the JSON and PNG files, also from xdist workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from parity import report
from parity.report import summary_lines

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("workers", ["0", "2"], ids=["serial", "xdist"])
def test_report_written(tmp_path, workers):
    pytest.importorskip("matplotlib", reason="the PNG report needs the report extra (matplotlib)")
    path = tmp_path / "report.json"
    environment = dict(os.environ, PYTHONPATH=str(REPO))
    environment.pop("PYTEST_XDIST_WORKER", None)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "parity/test_rotation.py", "-p", "no:cacheprovider", "-q",
         "-n", workers, "-k", "pos8191 and float32 and not theta and not rot16", f"--parity-report={path}"],
        cwd=REPO, env=environment, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:]
    assert "RoPE parity summary" in result.stdout

    document = json.loads(path.read_text())
    records = document["records"]
    assert document["libraries"]["numpy"] != "not installed"
    assert {r["impl"] for r in records} >= {"flax_nnx", "equinox", "torch_onnx"}
    passed = [r for r in records if r["verdict"] == "pass"]
    assert passed
    for key in ("max_abs_error", "tolerance", "metrics", "params", "library_version"):
        assert all(key in r for r in passed), key
    for key in ("max_abs_error", "max_rel_error", "max_ulp", "share_over_tolerance", "worst_index"):
        assert all(key in r["metrics"]["q"] for r in passed), key

    png = path.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_skipped_without_positions(tmp_path):
    pytest.importorskip("matplotlib", reason="the PNG report needs the report extra (matplotlib)")
    # Attention records carry no errors by position, so there is nothing to plot.
    records = [{"impl": "flax_nnx_mha", "case": "c1", "dtype": "float32", "mode": "jit", "verdict": "pass"}]
    path = tmp_path / "report.png"

    written = report.write_plot(path, records)

    assert written is False
    assert not path.exists()


def test_summary_lists_na_reason():
    records = [
        {"impl": "a", "case": "c1", "mode": "eager", "verdict": "pass", "max_abs_error": 1e-7, "tolerance": 1e-6},
        {"impl": "a", "case": "c2", "mode": "eager", "verdict": "n/a", "reason": "a has no interleaved pairing"},
    ]
    text = "\n".join(summary_lines(records))
    assert "n/a: a has no interleaved pairing" in text
    assert "a: 1 pass, 1 n/a" in text


def _reject_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


def test_json_report_is_strict_json(tmp_path):
    # A NaN output has a NaN error and a wrong-shape output an infinite one.
    records = [
        {"impl": "a", "case": "c1", "mode": "eager", "verdict": "fail", "max_abs_error": float("nan"),
         "error_by_position": [[0, float("nan")], [1, 0.5]]},
        {"impl": "a", "case": "c2", "mode": "eager", "verdict": "fail", "max_abs_error": float("inf"),
         "metrics": {"q": {"max_rel_error": -np.inf, "max_ulp": np.float32(3.0)}}},
    ]
    path = tmp_path / "report.json"

    report.write_json(path, records)

    document = json.loads(path.read_text(), parse_constant=_reject_constant)
    first, second = document["records"]
    assert first["max_abs_error"] == "nan"
    assert first["error_by_position"] == [[0, "nan"], [1, 0.5]]
    assert second["max_abs_error"] == "inf"
    assert second["metrics"]["q"]["max_rel_error"] == "-inf"
    assert second["metrics"]["q"]["max_ulp"] == 3.0
    assert float(second["max_abs_error"]) == float("inf")


def test_json_report_to_folder_rejected(tmp_path):
    folder = tmp_path / "reports"
    folder.mkdir()

    with pytest.raises(IsADirectoryError, match=r"is a folder\. Pass a file path such as .*parity\.json"):
        report.write_json(folder, [])

    assert list(tmp_path.iterdir()) == [folder]
    assert list(folder.iterdir()) == []


def test_json_report_failed_replace_leaves_no_temporary(tmp_path, monkeypatch):
    def fail_replace(source, target):
        raise OSError("simulated failure of os.replace")

    monkeypatch.setattr(report.os, "replace", fail_replace)

    with pytest.raises(OSError, match="simulated failure"):
        report.write_json(tmp_path / "report.json", [])

    assert list(tmp_path.iterdir()) == []
