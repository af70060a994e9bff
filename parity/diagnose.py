"""Diagnosis of a failed comparison: which known RoPE mistake reproduces the wrong output.

Each :class:`Mistake` recomputes a case with the float64 oracle the way a broken
implementation would: with the other pairing, ignoring positions, and so on. A comparison
records which mistakes its output matches, and which mistakes would have given the correct
result anyway on that case. :func:`summarize` then names, per implementation, the mistake
that explains the most failures without contradicting the passes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import ml_dtypes
import numpy as np

from impls.frequencies import inverse_frequencies
from impls.reference import rope_reference
from parity.cases import Case


@dataclasses.dataclass(frozen=True)
class Piece:
    """One call of an implementation: rows ``start:stop`` of the sequence axis."""

    start: int
    stop: int


def pieces_of(case: Case) -> list[Piece]:
    """Split a case into the calls an implementation gets: one, or prefill then single tokens."""
    if case.kind != "decode":
        return [Piece(0, case.seq)]
    prefill = case.seq // 2
    return [Piece(0, prefill)] + [Piece(i, i + 1) for i in range(prefill, case.seq)]


Variant = Callable[[Case, dict, np.ndarray, np.ndarray, str], np.ndarray]


def _oracle(case: Case, x: np.ndarray, positions: np.ndarray, **changes) -> np.ndarray:
    spec = case.spec
    kwargs = dict(theta=spec.theta, pairing=spec.pairing, rotary_dim=spec.rotary_dim, scaling=spec.scaling)
    kwargs.update(changes)
    return rope_reference(x, positions, **kwargs)


def _per_piece(case: Case, x: np.ndarray, positions: np.ndarray, transform) -> np.ndarray:
    if x.shape[1] != case.seq:  # keys of cross-attention are one piece
        return transform(x, positions)
    parts = [transform(x[:, p.start : p.stop], positions[:, p.start : p.stop]) for p in pieces_of(case)]
    return np.concatenate(parts, axis=1)


def _other_pairing(case, arrays, x, positions, which):
    other = "interleaved" if case.pairing == "half_split" else "half_split"
    return _oracle(case, x, positions, pairing=other)


def _positions_ignored(case, arrays, x, positions, which):
    return _per_piece(case, x, positions, lambda xs, ps: _oracle(case, xs, np.broadcast_to(np.arange(xs.shape[1]), ps.shape)))


def _decode_offset_missing(case, arrays, x, positions, which):
    # Each call counts from its own first token, as a decode step that forgot the cache index.
    return _per_piece(case, x, positions, lambda xs, ps: _oracle(case, xs, ps - ps[:, :1]))


def _theta_ignored(case, arrays, x, positions, which):
    return _oracle(case, x, positions, theta=10_000.0)


def _bf16_positions(case, arrays, x, positions, which):
    rounded = positions.astype(ml_dtypes.bfloat16).astype(np.float64)
    # Fractional positions are outside the oracle's integer contract; rounded positions are
    # integers again, so rotate with their exact values.
    return _oracle(case, x, rounded.astype(np.int64))


def _rotate_with(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray, pairing: str) -> np.ndarray:
    """Rotate the first ``2 * len(inv_freq)`` features with the given frequencies, in float64."""
    rotary_dim = 2 * len(inv_freq)
    angles = positions[..., None].astype(np.float64) * inv_freq  # [B, S, R/2]
    cos, sin = np.cos(angles)[..., None, :], np.sin(angles)[..., None, :]  # [B, S, 1, R/2]
    out = x.astype(np.float64)
    if pairing == "half_split":
        first, second = out[..., : rotary_dim // 2].copy(), out[..., rotary_dim // 2 : rotary_dim].copy()
        out[..., : rotary_dim // 2] = first * cos - second * sin
        out[..., rotary_dim // 2 : rotary_dim] = second * cos + first * sin
    else:
        first, second = out[..., 0:rotary_dim:2].copy(), out[..., 1:rotary_dim:2].copy()
        out[..., 0:rotary_dim:2] = first * cos - second * sin
        out[..., 1:rotary_dim:2] = second * cos + first * sin
    return out


def _bf16_frequencies(case, arrays, x, positions, which):
    if case.scaling is not None:
        return _oracle(case, x, positions)
    spec = case.spec
    rotary_dim = spec.rotary_dim or x.shape[-1]
    inv_freq = inverse_frequencies(rotary_dim, spec.theta).astype(ml_dtypes.bfloat16).astype(np.float64)
    return _rotate_with(x, positions, inv_freq, spec.pairing)


def _full_width(case, arrays, x, positions, which):
    if case.rotary_dim is None:
        return _oracle(case, x, positions)
    return _oracle(case, x, positions, rotary_dim=None)


def _head_dim_denominator(case, arrays, x, positions, which):
    if case.rotary_dim is None or case.scaling is not None:
        return _oracle(case, x, positions)
    # The R rotated features get the first R/2 frequencies of the full head size D.
    inv_freq = inverse_frequencies(x.shape[-1], case.theta)[: case.rotary_dim // 2]
    return _rotate_with(x, positions, inv_freq, case.pairing)


def _swapped_outputs(case, arrays, x, positions, which):
    # The rotated queries came back as keys and the other way round.
    other = "k" if which == "q" else "q"
    return _oracle(case, arrays[other], arrays[f"{other}_positions"])


def _swapped_positions(case, arrays, x, positions, which):
    # Queries rotated at the keys' positions and keys at the queries' (equal lengths only).
    other_positions = arrays["k_positions" if which == "q" else "q_positions"]
    if other_positions.shape != positions.shape:
        return np.full(x.shape, np.nan)
    return _oracle(case, x, other_positions)


@dataclasses.dataclass(frozen=True)
class Mistake:
    """A known way to get RoPE wrong, and how to reproduce its output."""

    label: str
    variants: tuple[Variant, ...]


MISTAKES: tuple[Mistake, ...] = (
    Mistake("the other pairing (half-split and interleaved swapped)", (_other_pairing,)),
    Mistake("positions ignored (an arange used instead)", (_positions_ignored,)),
    Mistake("the decode offset missing (each call starts at position 0)", (_decode_offset_missing,)),
    Mistake("theta ignored (10000 used instead)", (_theta_ignored,)),
    Mistake("angles or positions in low precision (bfloat16)", (_bf16_positions, _bf16_frequencies)),
    Mistake("partial rotary over the wrong width", (_full_width, _head_dim_denominator)),
    Mistake("queries and keys swapped", (_swapped_outputs, _swapped_positions)),
)


def _max_error(actual: np.ndarray, expected: np.ndarray) -> float:
    # A variant that cannot apply to this case returns NaN, and matches nothing.
    if actual.shape != expected.shape or np.isnan(expected).any():
        return float("inf")
    return float(np.abs(np.asarray(actual, np.float64) - expected).max())


# Per case id: (label, predicted outputs, distance of the prediction from the oracle). The
# predictions depend only on the case, so every implementation and mode reuses them.
_PREDICTIONS: dict[str, list[tuple[str, dict[str, np.ndarray], float]]] = {}


def _predictions(case: Case, arrays: dict) -> list[tuple[str, dict[str, np.ndarray], float]]:
    if case.id not in _PREDICTIONS:
        rows = []
        for mistake in MISTAKES:
            for variant in mistake.variants:
                predicted = {which: variant(case, arrays, arrays[which], arrays[f"{which}_positions"], which) for which in ("q", "k")}
                distance = max(_max_error(predicted[w], arrays[f"expected_{w}"]) for w in ("q", "k"))
                rows.append((mistake.label, predicted, distance))
        _PREDICTIONS[case.id] = rows
    return _PREDICTIONS[case.id]


def assess(case: Case, arrays: dict, outputs: dict[str, np.ndarray], tolerance: float, passed: bool = False) -> dict:
    """Return which mistakes reproduce ``outputs`` and which are harmless on this case.

    ``outputs`` maps ``"q"`` and ``"k"`` to the implementation's results. A mistake *matches*
    when one of its variants reproduces both within ``tolerance``. It is *harmless* when that
    variant equals the oracle here, because then the case cannot tell it from a correct result.
    A ``passed`` comparison needs only the harmless list, so its matches are not computed.
    """
    for which in ("q", "k"):
        output = np.asarray(outputs[which], np.float64)
        if output.shape == arrays[f"expected_{which}"].shape and not np.all(np.isfinite(output)):
            # NaN or inf is no known mistake of the rotation itself.
            bad = tuple(int(i) for i in np.argwhere(~np.isfinite(output))[0])
            return {"matches": [], "harmless": [], "nearest": f"the output contains NaN or inf at {which}{list(bad)}",
                    "nearest_error": float("inf")}

    predictions = _predictions(case, arrays)
    harmless = sorted({label for label, _, distance in predictions if distance <= tolerance})
    if passed:
        return {"matches": [], "harmless": harmless, "nearest": "", "nearest_error": float("inf")}

    matches, nearest = set(), (float("inf"), "")
    for label, predicted, distance in predictions:
        error = max(_max_error(outputs[w], predicted[w]) for w in ("q", "k"))
        if error < nearest[0]:
            nearest = (error, label)
        if distance > tolerance and error <= tolerance:
            matches.add(label)
    return {"matches": sorted(matches), "harmless": harmless, "nearest": nearest[1], "nearest_error": nearest[0]}


def summarize(records: list[dict]) -> dict[str, str]:
    """Name, per implementation, the mistake that best explains its failed comparisons.

    A mistake scores one point per failure it reproduces and loses one per passed comparison
    on which it would have failed (not harmless there).
    """
    by_impl: dict[str, list[dict]] = {}
    for record in records:
        if record.get("verdict") in ("pass", "fail") and "diagnosis" in record:
            by_impl.setdefault(record["impl"], []).append(record)

    verdicts = {}
    for impl, rows in by_impl.items():
        failures = [r for r in rows if r["verdict"] == "fail"]
        if not failures:
            continue
        passes = [r for r in rows if r["verdict"] == "pass"]
        scores = {}
        for mistake in MISTAKES:
            explained = sum(mistake.label in r["diagnosis"]["matches"] for r in failures)
            contradicted = sum(mistake.label not in r["diagnosis"]["harmless"] for r in passes)
            if explained:
                scores[mistake.label] = (explained - contradicted, explained)
        if scores:
            label = max(scores, key=lambda name: scores[name])
            explained = scores[label][1]
            verdicts[impl] = f"{label}: reproduces {explained} of {len(failures)} failed comparisons"
        else:
            nearest = min(failures, key=lambda r: r["diagnosis"]["nearest_error"])["diagnosis"]
            if nearest["nearest_error"] == float("inf"):
                verdicts[impl] = f"no known mistake reproduces the failures: {nearest['nearest'] or 'the outputs have the wrong shape'}"
            else:
                verdicts[impl] = (
                    f"no known mistake reproduces the failures; nearest: {nearest['nearest']} "
                    f"(off by {nearest['nearest_error']:.2e})"
                )
    return verdicts
