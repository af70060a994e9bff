"""Settings shared by tests/ and parity/: thread limits per xdist worker and the parity options."""

from __future__ import annotations

import os

# Under `pytest -n N` every worker would otherwise start a thread pool per core for XLA, BLAS and
# torch, and N workers would fight over the same cores. One thread each keeps N workers at N cores.
# This must run before jax or torch is imported, which conftest.py files are.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(variable, "1")


def pytest_addoption(parser):
    group = parser.getgroup("parity", "RoPE parity suite")
    group.addoption(
        "--impl",
        action="append",
        default=[],
        metavar="MODULE:CALLABLE",
        help="run the parity suite against your own RoPE, given as package.module:callable "
        "(see the README for its signature); may be repeated",
    )
    group.addoption(
        "--parity-report",
        default=None,
        metavar="PATH",
        help="write one JSON record per comparison to PATH and an error-by-position plot beside it (PATH with .png)",
    )


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        try:
            import torch
        except ImportError:
            return
        torch.set_num_threads(1)


def _modules_without_requirements() -> list[str]:
    # Doctest collection imports every module under impls/; an adapter whose optional framework
    # is missing would fail to import, so its file is left out of collection instead.
    from impls.registry import ADAPTERS, missing_requirement

    ignored = []
    for entry in ADAPTERS:
        if missing_requirement(entry):
            module = entry.target.split(":")[0]
            ignored.append(module.replace(".", "/") + ".py")
    return ignored


collect_ignore = _modules_without_requirements()
