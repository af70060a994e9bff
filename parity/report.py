"""The parity reports: the terminal summary table, the JSON records and the error plot."""

from __future__ import annotations

import json
import math
import os
import platform
import tempfile
from collections import Counter
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from parity.diagnose import summarize

LIBRARIES = ("numpy", "jax", "jaxlib", "flax", "equinox", "torch", "transformers", "torchtune", "rotary-embedding-torch")


def library_versions() -> dict[str, str]:
    """Return the installed versions of the libraries the suite compares."""
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _format_error(record: dict) -> str:
    return f"{record['max_abs_error']:.2e}" if "max_abs_error" in record else "-"


def summary_lines(records: list[dict]) -> list[str]:
    """Return the summary table: implementation x case x mode, error, tolerance and verdict."""
    if not records:
        return ["No parity comparisons ran."]
    records = sorted(records, key=lambda r: (r["impl"], r["case"], r["mode"]))
    impl_width = max(len(r["impl"]) for r in records)
    case_width = max(len(r["case"]) for r in records)
    header = f"{'implementation':<{impl_width}}  {'case':<{case_width}}  {'mode':<5}  {'max |err|':>9}  {'tolerance':>9}  verdict"
    lines = [header, "-" * len(header)]
    for r in records:
        tolerance = f"{r['tolerance']:.2e}" if "tolerance" in r else "-"
        verdict = r["verdict"]
        if verdict in ("n/a", "skipped"):
            verdict = f"{verdict}: {r['reason']}"
        elif r.get("tolerance_override"):
            verdict = f"{verdict} (tolerance override: {r['tolerance_override']})"
        if r.get("drift"):
            verdict = f"{verdict}, DRIFT since snapshot: moved {r['snapshot_moved']:.2e}"
        lines.append(
            f"{r['impl']:<{impl_width}}  {r['case']:<{case_width}}  {r['mode']:<5}  "
            f"{_format_error(r):>9}  {tolerance:>9}  {verdict}"
        )

    lines.append("")
    counts: dict[str, Counter] = {}
    for r in records:
        counts.setdefault(r["impl"], Counter())[r["verdict"]] += 1
    for impl, count in sorted(counts.items()):
        parts = [f"{count[v]} {v}" for v in ("pass", "fail", "n/a", "skipped") if count[v]]
        lines.append(f"{impl}: {', '.join(parts)}")

    diagnoses = summarize(records)
    if diagnoses:
        lines.append("")
        lines.append("Diagnosis of failures (the known RoPE mistake that reproduces them):")
        for impl, text in sorted(diagnoses.items()):
            lines.append(f"  {impl}: {text}")
    return lines


def _strict_json(value: Any) -> Any:
    """Return ``value`` with every non-finite float replaced by the string ``"nan"``, ``"inf"`` or ``"-inf"``."""
    if isinstance(value, dict):
        return {key: _strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(item) for item in value]
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if not math.isfinite(value):
            if math.isnan(value):
                return "nan"
            return "inf" if value > 0 else "-inf"
    return value


def check_report_path(path: Path) -> None:
    """Raise IsADirectoryError if the JSON report cannot go to ``path`` because it is a folder."""
    if path.is_dir():
        raise IsADirectoryError(
            f"The parity report path {path} is a folder. Pass a file path such as {path / 'parity.json'}."
        )


def write_json(path: Path, records: list[dict]) -> None:
    """Write the records and library versions as strict JSON, atomically.

    JSON has no NaN or infinity, and ``json.dump`` would write the non-standard ``NaN`` and
    ``Infinity`` that strict parsers reject. Such values (the error of a NaN or wrong-shape
    output, for example) are written as the strings ``"nan"``, ``"inf"`` and ``"-inf"``,
    which ``float()`` reads back.

    Raises:
        IsADirectoryError: ``path`` is an existing folder.
    """
    check_report_path(path)
    document = {"libraries": library_versions(), "records": sorted(records, key=lambda r: (r["impl"], r["case"], r["mode"]))}
    text = json.dumps(_strict_json(document), indent=1, allow_nan=False)

    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
        os.replace(temporary, path)
    except BaseException:
        # Another error at the last step (a folder created meanwhile, a full disk) must not
        # leave the temporary file behind.
        Path(temporary).unlink(missing_ok=True)
        raise


def write_plot(path: Path, records: list[dict]) -> bool:
    """Plot the error against position for each implementation and dtype (float32 and lower).

    Returns False and writes nothing when no record has errors by position, because only the
    rotation comparisons record them.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    dtypes = sorted({r["dtype"] for r in records if "error_by_position" in r})
    if not dtypes:
        return False
    figure, axes = plt.subplots(1, len(dtypes), figsize=(6 * len(dtypes), 4.5), squeeze=False)
    for axis, dtype in zip(axes[0], dtypes):
        by_impl: dict[str, list[tuple[int, float]]] = {}
        for r in records:
            if r["dtype"] == dtype and "error_by_position" in r:
                by_impl.setdefault(r["impl"], []).extend(map(tuple, r["error_by_position"]))
        for impl, points in sorted(by_impl.items()):
            points = sorted(p for p in points if p[0] > 0 and p[1] > 0)
            if points:
                positions, errors = zip(*points)
                axis.scatter(positions, errors, s=6, label=impl)
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_title(f"{dtype}: max |error| per token against the float64 oracle")
        axis.set_xlabel("position")
        axis.set_ylabel("max |error|")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True
