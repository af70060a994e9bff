"""A smoke run of the Flax NNX RoPE benchmark, so that the script cannot rot unnoticed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_flax_rope.py"


def test_benchmark_quick_run():
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--repeats", "1"], capture_output=True, text=True, timeout=300
    )

    assert completed.returncode == 0, completed.stderr
    for contender in ("floor (x * c)", "flax_nnx cached", "flax_nnx computed", "equinox (vmapped)", "textbook"):
        assert completed.stdout.count(contender) == 2  # One row per dtype.
