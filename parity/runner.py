"""Running one implementation on one case and turning the outcome into a report record."""

from __future__ import annotations

import importlib
from collections.abc import Callable

import numpy as np

from impls.adapters.base import Adapter, RopeSpec, Support
from parity import diagnose
from parity.cases import Case
from parity.metrics import check_output, compare, error_by_position
from parity.tolerance import tolerance_for

class ImplementationError(RuntimeError):
    """A user implementation that raised or returned something other than two real arrays."""


USER_SIGNATURE = "rope(q, k, q_positions, k_positions, *, theta, rotary_dim) -> (q_rotated, k_rotated)"


def _as_numpy(array) -> np.ndarray:
    if hasattr(array, "detach"):  # a torch tensor, possibly bfloat16
        from impls.adapters.torch_util import from_torch

        return from_torch(array)
    return np.asarray(array)


class UserAdapter(Adapter):
    """An implementation given on the command line as ``package.module:callable``.

    The callable has the signature in :data:`USER_SIGNATURE`: NumPy inputs ``q``
    ``[batch, seq, heads, head_dim]`` and ``k`` ``[batch, kv_seq, kv_heads, head_dim]``,
    int32 positions ``[batch, seq]`` and ``[batch, kv_seq]``, and keyword arguments ``theta``
    and ``rotary_dim`` (the number of leading features to rotate). It may carry an attribute
    ``pairing`` (``"half_split"``, the default, or ``"interleaved"``).
    """

    library = "user"

    def __init__(self, target: str):
        module_name, _, attribute = target.partition(":")
        if not module_name or not attribute:
            raise ValueError(f"--impl takes package.module:callable, got {target!r}.")
        try:
            module = importlib.import_module(module_name)
        except (ImportError, TypeError) as error:
            raise ValueError(
                f"--impl {target!r}: cannot import {module_name!r} ({error}). Make sure it is on "
                f"PYTHONPATH or installed."
            ) from error
        function = getattr(module, attribute, None)
        if not callable(function):
            raise ValueError(f"--impl {target!r}: {module_name} has no callable named {attribute!r}.")
        pairing = getattr(function, "pairing", "half_split")
        if pairing not in ("half_split", "interleaved"):
            raise ValueError(f"--impl {target!r}: pairing must be 'half_split' or 'interleaved', got {pairing!r}.")

        self.function: Callable = function
        self.name = target
        self.support = Support(pairings=frozenset({pairing}))

    def rotate_pair(self, q, k, q_positions, k_positions, spec: RopeSpec, *, mode: str = "eager"):
        rotary_dim = spec.rotary_dim or q.shape[-1]
        try:
            result = self.function(q, k, q_positions, k_positions, theta=spec.theta, rotary_dim=rotary_dim)
        except Exception as error:  # noqa: BLE001 - any failure of user code is reported, not raised
            raise ImplementationError(f"{self.name} raised {type(error).__name__}: {error}") from error
        if not isinstance(result, (tuple, list)) or len(result) != 2:
            raise ImplementationError(
                f"{self.name} returned {type(result).__name__}, expected a pair (q_rotated, k_rotated)."
            )
        try:
            return tuple(check_output(_as_numpy(out), f"{self.name}'s {which}") for out, which in zip(result, ("q", "k")))
        except ValueError as error:
            raise ImplementationError(str(error)) from error

    def rotate(self, x, positions, spec, *, mode="eager"):
        return self.rotate_pair(x, x, positions, positions, spec, mode=mode)[0]


def run_pieces(adapter: Adapter, case: Case, arrays: dict, mode: str) -> dict[str, np.ndarray]:
    """Call the implementation the way the case prescribes (decode: prefill, then single tokens)."""
    spec = case.spec
    q_parts, k_parts = [], []
    cross = case.key_seq != case.seq or case.kind == "cross"
    for piece in diagnose.pieces_of(case):
        window = slice(piece.start, piece.stop)
        q_out, k_out = adapter.rotate_pair(
            arrays["q"][:, window],
            arrays["k"] if cross else arrays["k"][:, window],
            arrays["q_positions"][:, window],
            arrays["k_positions"] if cross else arrays["k_positions"][:, window],
            spec,
            mode=mode,
        )
        q_parts.append(np.asarray(q_out))
        k_parts.append(np.asarray(k_out))
    k = k_parts[0] if cross else np.concatenate(k_parts, axis=1)
    return {"q": np.concatenate(q_parts, axis=1), "k": k}


def unsupported(adapter: Adapter, case: Case, arrays: dict, mode: str) -> str | None:
    """Return why ``adapter`` cannot run ``case`` in ``mode``, or None."""
    positions = np.concatenate([arrays["q_positions"].ravel(), arrays["k_positions"].ravel()])
    return adapter.unsupported_reason(case.spec, case.dtype, positions, mode)


def drift_message(adapter: Adapter, case: Case, moved: float, tolerance: float, snapshot_entry: dict) -> str:
    """Describe a move of ``adapter``'s output away from its snapshot, naming both versions."""
    return (
        f"drift: {adapter.name} moved by {moved:.3e} (tolerance {tolerance:.3e}) on {case.id} since its "
        f"snapshot with {snapshot_entry['library']} {snapshot_entry['library_version']}; installed: "
        f"{adapter.library} {adapter.version()}. If the new output is right, regenerate the fixtures "
        f"with `python -m parity.fixtures generate`."
    )


def compare_case(
    adapter: Adapter,
    case: Case,
    arrays: dict,
    entry: dict,
    mode: str,
    snapshot: tuple[dict, np.ndarray] | None = None,
) -> dict:
    """Run ``adapter`` on ``case`` and return a record with metrics, tolerance and verdict.

    With ``snapshot`` (the manifest's snapshot entry of the adapter and its stored queries for
    this case), the record also stores how far the output moved from it, and carries a
    ``drift`` message when that is beyond the tolerance.
    """
    record = {
        "impl": adapter.name,
        "library": adapter.library,
        "library_version": adapter.version(),
        "case": case.id,
        "kind": case.kind,
        "dtype": case.dtype,
        "mode": mode,
        "params": case.params(),
        "max_abs_position": entry["max_abs_position"],
    }
    reason = unsupported(adapter, case, arrays, mode)
    if reason:
        record.update(verdict="n/a", reason=reason)
        return record

    scale = float(max(np.abs(arrays["expected_q"]).max(), np.abs(arrays["expected_k"]).max()))
    tol, override = tolerance_for(adapter.name, case.dtype, entry["max_abs_position"], scale)
    try:
        outputs = run_pieces(adapter, case, arrays, mode)
    except ImplementationError as error:
        record.update(
            verdict="fail",
            tolerance=tol,
            max_abs_error=float("inf"),
            worst=str(error),
            diagnosis={"matches": [], "harmless": [], "nearest": str(error), "nearest_error": float("inf")},
        )
        return record

    for which in ("q", "k"):
        # RoPE returns its input's dtype; a float32 result for bfloat16 input hides the
        # rounding a bfloat16 model would see, and doubles the memory it writes.
        if outputs[which].dtype != arrays[which].dtype:
            record.update(
                verdict="fail",
                tolerance=tol,
                max_abs_error=float("inf"),
                worst=f"{which} came back as {outputs[which].dtype} for {arrays[which].dtype} input",
                diagnosis={"matches": [], "harmless": [], "nearest": "the output dtype differs from the input's",
                           "nearest_error": float("inf")},
            )
            return record
        expected_shape = arrays[f"expected_{which}"].shape
        if outputs[which].shape != expected_shape:
            record.update(
                verdict="fail",
                tolerance=tol,
                max_abs_error=float("inf"),
                worst=f"{which} has shape {outputs[which].shape}, expected {expected_shape}",
                diagnosis=diagnose.assess(case, arrays, outputs, tol),
            )
            return record

    metrics = {which: compare(outputs[which], arrays[f"expected_{which}"], tol) for which in ("q", "k")}
    passed = all(m.passed for m in metrics.values())
    diagnosis = diagnose.assess(case, arrays, outputs, tol, passed=passed)
    worst = max(metrics, key=lambda which: metrics[which].max_abs_error)
    record.update(
        verdict="pass" if passed else "fail",
        tolerance=tol,
        tolerance_override=override,
        output_dtype=str(outputs["q"].dtype),
        max_abs_error=metrics[worst].max_abs_error,
        metrics={which: m.as_dict() for which, m in metrics.items()},
        worst=f"{worst}{list(metrics[worst].worst_index)}",
        error_by_position=error_by_position(outputs["q"], arrays["expected_q"], arrays["q_positions"]),
        diagnosis=diagnosis,
    )
    if snapshot is not None:
        snapshot_entry, stored = snapshot
        moved = float(np.abs(outputs["q"].astype(np.float64) - stored.astype(np.float64)).max())
        record["snapshot_moved"] = moved
        if moved > entry["tolerance"]:
            record["drift"] = drift_message(adapter, case, moved, entry["tolerance"], snapshot_entry)
    return record


def snapshot_drift(adapter: Adapter, case: Case, directory=None) -> str | None:
    """Return a drift message when ``adapter`` moved beyond tolerance from its snapshot, else None.

    Raises FixtureError when there is no snapshot of this implementation or case.
    """
    from parity.fixtures import FixtureError, load_case, load_manifest, load_snapshot

    manifest = load_manifest(directory)
    entry, outputs = load_snapshot(adapter.name, directory, manifest)
    if case.id not in outputs:
        raise FixtureError(f"The snapshot of {adapter.name!r} has no case {case.id!r}.")
    case_entry = next(e for e in manifest["cases"] if e["id"] == case.id)
    arrays = load_case(case.id, directory, manifest)

    current = run_pieces(adapter, case, arrays, "eager")["q"].astype(np.float64)
    moved = float(np.abs(current - outputs[case.id].astype(np.float64)).max())
    if moved <= case_entry["tolerance"]:
        return None
    return drift_message(adapter, case, moved, case_entry["tolerance"], entry)
