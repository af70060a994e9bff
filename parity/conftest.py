"""Collects the parity records (also from xdist workers) and prints the summary table."""

from __future__ import annotations

from pathlib import Path

import pytest

from parity import report

RECORD_KEY = "parity_record"

# Records of this pytest process; on an xdist controller, those of every worker.
_records: list[dict] = []


def pytest_configure(config):
    # A bad --impl stops the run once, with one message, instead of failing every test.
    from parity.runner import UserAdapter

    path = config.getoption("--parity-report")
    if path:
        try:
            report.check_report_path(Path(path))
        except (OSError, ValueError) as error:
            raise pytest.UsageError(f"--parity-report {path!r}: {error}") from error

    for target in config.getoption("--impl"):
        try:
            UserAdapter(target)
        except ValueError as error:
            raise pytest.UsageError(str(error)) from error


def pytest_collection_modifyitems(config, items):
    # With --impl only the rotation comparisons call the user's function; the invariants and
    # the attention tests exercise the built-in implementations, so they are deselected.
    if not config.getoption("--impl"):
        return
    selected = [item for item in items if "test_rotation" in item.nodeid or not item.nodeid.startswith("parity/")]
    deselected = [item for item in items if item not in selected]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = selected


def pytest_runtest_logreport(report):
    # Runs on the controller for every test report, also for tests run by xdist workers,
    # whose user_properties travel with the report. A record is attached once per test.
    if report.when != "call" and not (report.when == "setup" and report.skipped):
        return
    for name, value in report.user_properties:
        if name == RECORD_KEY:
            _records.append(value)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _records:
        return
    terminalreporter.section("RoPE parity summary")
    for line in report.summary_lines(_records):
        terminalreporter.write_line(line)

    path = config.getoption("--parity-report")
    if path:
        json_path = Path(path)
        report.write_json(json_path, _records)
        plot_path = json_path.with_suffix(".png")
        if report.write_plot(plot_path, _records):
            terminalreporter.write_line(f"Parity report: {json_path} and {plot_path}")
        else:
            terminalreporter.write_line(
                f"Parity report: {json_path}. No plot: only the rotation comparisons "
                f"(parity/test_rotation.py) record errors by position, and none ran."
            )


@pytest.fixture
def record_parity(request):
    """Attach a parity record to the running test, for the summary table and reports."""

    def record(value: dict) -> None:
        request.node.user_properties.append((RECORD_KEY, value))

    return record
