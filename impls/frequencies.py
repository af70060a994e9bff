"""Inverse frequencies of RoPE and the frequency-scaling rules of Hugging Face transformers.

Everything here runs on the host in float64 NumPy, so both the oracle and the Flax module can
build their tables from one exact definition and round only once.

Notation: ``R`` is the rotary dimension (the number of rotated features, even), ``theta`` the
base, and pair ``i`` for ``i = 0 .. R/2 - 1`` rotates by the angle ``p * inv_freq[i]`` at
position ``p``, where

    inv_freq[i] = theta ** (-2 i / R).

The scaling types follow the definitions of ``transformers.modeling_rope_utils`` (5.x):

* ``linear``: ``inv_freq / factor``.
* ``dynamic`` (NTK-aware): for a sequence that reaches length ``L`` (largest position + 1)
  beyond ``original_max_position_embeddings`` ``M``, the base becomes
  ``theta * (factor * L / M - (factor - 1)) ** (R / (R - 2))``. Below ``M`` nothing changes.
  The base depends on positions, so it is computed at call time (see :func:`dynamic_theta`).
  transformers 5.x reads ``M`` for this type from ``config.max_position_embeddings``; here it
  is the ``original_max_position_embeddings`` key of the scaling mapping.
* ``yarn``: a ramp between interpolated (``inv_freq / factor``) and extrapolated frequencies
  over the dimensions between the correction range of ``beta_fast`` and ``beta_slow``
  rotations, with an attention factor ``0.1 * ln(factor) + 1`` that multiplies cos and sin.
* ``llama3``: wavelengths longer than ``M / low_freq_factor`` are divided by ``factor``, those
  shorter than ``M / high_freq_factor`` are kept, and the band between is blended smoothly.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

PAIRINGS = ("half_split", "interleaved")
SCALING_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")

# Keys each scaling type reads, with their defaults (None: required).
_SCALING_KEYS: dict[str, dict[str, Any]] = {
    "default": {},
    "linear": {"factor": None},
    "dynamic": {"factor": None, "original_max_position_embeddings": None},
    "yarn": {
        "factor": None,
        "original_max_position_embeddings": None,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "attention_factor": None,
        "mscale": None,
        "mscale_all_dim": None,
        "truncate": True,
    },
    "llama3": {
        "factor": None,
        "original_max_position_embeddings": None,
        "low_freq_factor": None,
        "high_freq_factor": None,
    },
}

# Keys that name the type; any other key must belong to the type.
_TYPE_KEYS = frozenset({"rope_type", "type"})
# Keys of Hugging Face rope_parameters that this suite takes as separate arguments.
_SEPARATE_KEYS = {
    "rope_theta": "pass it as theta=",
    "partial_rotary_factor": "pass rotary_dim=int(head_dim * partial_rotary_factor)",
}
# Range of each numeric key: (lower bound, inclusive) and whether it must be an integer.
_NUMBER_RULES: dict[str, tuple[float, bool, bool]] = {
    "factor": (1.0, True, False),
    "original_max_position_embeddings": (1.0, True, True),
    "beta_fast": (0.0, False, False),
    "beta_slow": (0.0, False, False),
    "attention_factor": (0.0, False, False),
    "mscale": (0.0, False, False),
    "mscale_all_dim": (0.0, False, False),
    "low_freq_factor": (0.0, False, False),
    "high_freq_factor": (0.0, False, False),
}


def _check_number(rope_type: str, name: str, value: Any) -> float | int:
    lower, inclusive, integer = _NUMBER_RULES[name]
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(
            f"Scaling {rope_type!r} key {name!r} must be a number, got {value!r} of type {type(value).__name__}."
        )
    if not math.isfinite(value):
        raise ValueError(f"Scaling {rope_type!r} key {name!r} must be finite, got {value}.")
    if integer and value != int(value):
        raise ValueError(f"Scaling {rope_type!r} key {name!r} must be a whole number, got {value}.")
    too_small = value < lower if inclusive else value <= lower
    if too_small:
        relation = ">=" if inclusive else ">"
        hint = " (a factor below 1 shortens the context instead of extending it)" if name == "factor" else ""
        raise ValueError(f"Scaling {rope_type!r} key {name!r} must be {relation} {lower:g}{hint}, got {value}.")
    return int(value) if integer else float(value)


@dataclasses.dataclass(frozen=True)
class Scaling:
    """A validated frequency-scaling rule, built from a Hugging Face ``rope_parameters`` dict.

    >>> Scaling.from_config({"rope_type": "linear", "factor": 2.0}).params["factor"]
    2.0
    """

    rope_type: str
    # Sorted (key, value) pairs rather than a dict, so that a Scaling is hashable and can sit in
    # a module's static attributes (jit caches on them).
    items: tuple[tuple[str, Any], ...] = ()

    @property
    def params(self) -> dict[str, Any]:
        """The scaling parameters as a dict, defaults filled in."""
        return dict(self.items)

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Scaling | None) -> Scaling:
        """Validate ``config`` (a ``rope_parameters``-style mapping) and fill in defaults."""
        if config is None:
            return cls("default")
        if isinstance(config, Scaling):
            return config
        if not isinstance(config, Mapping):
            raise TypeError(
                f"scaling must be a mapping such as {{'rope_type': 'linear', 'factor': 2.0}} "
                f"or None, got {type(config).__name__}."
            )

        rope_type = config.get("rope_type", config.get("type", "default"))
        if "rope_type" in config and "type" in config and config["type"] != config["rope_type"]:
            raise ValueError(
                f"Scaling gives rope_type={config['rope_type']!r} and type={config['type']!r}; keep one of them."
            )
        if not isinstance(rope_type, str) or rope_type not in _SCALING_KEYS:
            raise ValueError(
                f"Unknown scaling rope_type {rope_type!r}. Valid types: {', '.join(SCALING_TYPES)}."
            )

        for name, fix in _SEPARATE_KEYS.items():
            if name in config:
                raise ValueError(
                    f"Scaling contains {name}={config[name]!r}, which this module takes as a separate "
                    f"argument: {fix} and remove {name!r} from the scaling mapping."
                )

        expected = _SCALING_KEYS[rope_type]
        unknown = sorted(set(config) - set(expected) - _TYPE_KEYS)
        if unknown:
            raise ValueError(
                f"Unknown keys {unknown} for scaling rope_type {rope_type!r}. "
                f"Valid keys: {sorted(expected) or 'none'}."
            )

        params: dict[str, Any] = {}
        for name, default in expected.items():
            value = config.get(name, default)
            if value is None:
                if name not in ("attention_factor", "mscale", "mscale_all_dim"):
                    raise ValueError(f"Scaling rope_type {rope_type!r} requires the key {name!r}.")
            elif name == "truncate":
                if not isinstance(value, bool):
                    raise TypeError(f"Scaling 'yarn' key 'truncate' must be True or False, got {value!r}.")
            else:
                value = _check_number(rope_type, name, value)
            params[name] = value

        if rope_type == "llama3" and not params["high_freq_factor"] > params["low_freq_factor"]:
            raise ValueError(
                "llama3 scaling needs high_freq_factor > low_freq_factor, got "
                f"high_freq_factor={params['high_freq_factor']} and "
                f"low_freq_factor={params['low_freq_factor']}."
            )
        if rope_type == "yarn" and not params["beta_fast"] > params["beta_slow"]:
            raise ValueError(
                "yarn scaling needs beta_fast > beta_slow (the fast boundary turns more often), got "
                f"beta_fast={params['beta_fast']} and beta_slow={params['beta_slow']}."
            )
        return cls(rope_type, tuple(sorted(params.items())))

    def to_config(self) -> dict[str, Any]:
        """Return the Hugging Face ``rope_parameters`` form of this rule (without ``rope_theta``)."""
        config = {"rope_type": self.rope_type}
        config.update({k: v for k, v in self.params.items() if v is not None})
        return config


def validate_theta(theta: float) -> float:
    """Return ``theta`` as a float, or raise if it is not a positive finite number."""
    if isinstance(theta, bool) or not isinstance(theta, (int, float, np.floating, np.integer)):
        raise TypeError(f"theta must be a number, got {theta!r} of type {type(theta).__name__}.")
    if not math.isfinite(theta):
        raise ValueError(f"theta must be finite, got theta={theta}.")
    if theta <= 0:
        raise ValueError(f"theta must be > 0 (typical values are 1e4 to 1e6), got theta={theta}.")
    return float(theta)


def validate_rotary_dim(rotary_dim: int, head_dim: int | None = None) -> int:
    """Return ``rotary_dim`` if it is a positive even integer no larger than ``head_dim``."""
    if isinstance(rotary_dim, bool) or not isinstance(rotary_dim, (int, np.integer)):
        raise TypeError(f"rotary_dim must be an int, got {rotary_dim!r}.")
    if rotary_dim <= 0 or rotary_dim % 2:
        raise ValueError(
            f"rotary_dim must be a positive even number because features rotate in pairs, "
            f"got rotary_dim={rotary_dim}."
        )
    if head_dim is not None and rotary_dim > head_dim:
        raise ValueError(
            f"rotary_dim={rotary_dim} is larger than the head size {head_dim}; pass a "
            f"rotary_dim <= {head_dim} or leave it unset to rotate the whole head."
        )
    return int(rotary_dim)


def default_inverse_frequencies(rotary_dim: int, theta: float) -> np.ndarray:
    """Return ``theta ** (-2 i / R)`` for ``i = 0 .. R/2 - 1`` in float64."""
    exponents = np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim
    return 1.0 / (theta**exponents)


def dynamic_theta(theta: float, rotary_dim: int, scaling: Scaling, length: np.ndarray) -> np.ndarray:
    """Return the NTK-scaled base for sequences that reach ``length`` (largest position + 1).

    Lengths at or below ``original_max_position_embeddings`` keep ``theta``.
    """
    factor = scaling.params["factor"]
    original = scaling.params["original_max_position_embeddings"]
    length = np.maximum(np.asarray(length, dtype=np.float64), original)
    return theta * (factor * length / original - (factor - 1.0)) ** (rotary_dim / (rotary_dim - 2))


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def attention_factor(scaling: Scaling) -> float:
    """Return the factor that multiplies cos and sin (1.0 for every type but yarn)."""
    if scaling.rope_type != "yarn":
        return 1.0
    params = scaling.params
    if params["attention_factor"] is not None:
        return float(params["attention_factor"])
    if params["mscale"] and params["mscale_all_dim"]:
        return _yarn_mscale(params["factor"], params["mscale"]) / _yarn_mscale(
            params["factor"], params["mscale_all_dim"]
        )
    return _yarn_mscale(params["factor"])


def _yarn_inverse_frequencies(rotary_dim: int, theta: float, params: Mapping[str, Any]) -> np.ndarray:
    factor = params["factor"]
    original = params["original_max_position_embeddings"]

    # Dimension index at which a frequency completes `rotations` turns over the original context.
    def correction_dim(rotations: float) -> float:
        return (rotary_dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low = correction_dim(params["beta_fast"])
    high = correction_dim(params["beta_slow"])
    if params["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001  # A zero-width ramp would divide by zero.

    ramp = np.clip((np.arange(rotary_dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    extrapolation_weight = 1.0 - ramp

    extrapolated = default_inverse_frequencies(rotary_dim, theta)
    interpolated = extrapolated / factor
    return interpolated * (1.0 - extrapolation_weight) + extrapolated * extrapolation_weight


def _llama3_inverse_frequencies(rotary_dim: int, theta: float, params: Mapping[str, Any]) -> np.ndarray:
    factor = params["factor"]
    low_freq_factor = params["low_freq_factor"]
    high_freq_factor = params["high_freq_factor"]
    original = params["original_max_position_embeddings"]

    inv_freq = default_inverse_frequencies(rotary_dim, theta)
    wavelength = 2 * math.pi / inv_freq
    low_freq_wavelength = original / low_freq_factor
    high_freq_wavelength = original / high_freq_factor

    scaled = np.where(wavelength > low_freq_wavelength, inv_freq / factor, inv_freq)
    smooth = (original / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1.0 - smooth) * scaled / factor + smooth * scaled
    in_band = (wavelength >= high_freq_wavelength) & (wavelength <= low_freq_wavelength)
    return np.where(in_band, blended, scaled)


def inverse_frequencies(rotary_dim: int, theta: float, scaling: Scaling | None = None) -> np.ndarray:
    """Return the float64 inverse frequencies ``[R/2]`` of a static scaling type.

    ``dynamic`` scaling depends on positions: use :func:`dynamic_theta` first, then the
    default frequencies of that base.

    >>> inverse_frequencies(4, 100.0).tolist()
    [1.0, 0.1]
    """
    scaling = scaling or Scaling("default")
    if scaling.rope_type in ("default", "dynamic"):
        return default_inverse_frequencies(rotary_dim, theta)
    if scaling.rope_type == "linear":
        return default_inverse_frequencies(rotary_dim, theta) / scaling.params["factor"]
    if scaling.rope_type == "yarn":
        return _yarn_inverse_frequencies(rotary_dim, theta, scaling.params)
    if scaling.rope_type == "llama3":
        return _llama3_inverse_frequencies(rotary_dim, theta, scaling.params)
    raise ValueError(f"Unknown scaling rope_type {scaling.rope_type!r}.")


def interleaved_to_half_split(head_dim: int, rotary_dim: int | None = None) -> np.ndarray:
    """Return the feature permutation that maps the interleaved pairing onto the half-split one.

    With ``perm`` from this function, ``half_split(x[..., perm]) == interleaved(x)[..., perm]``:
    the even features of the rotated block move to its first half and the odd ones to its
    second half. Features past ``rotary_dim`` stay in place.

    >>> interleaved_to_half_split(8).tolist()
    [0, 2, 4, 6, 1, 3, 5, 7]
    """
    rotary_dim = validate_rotary_dim(head_dim if rotary_dim is None else rotary_dim, head_dim)
    rotated = np.concatenate([np.arange(0, rotary_dim, 2), np.arange(1, rotary_dim, 2)])
    return np.concatenate([rotated, np.arange(rotary_dim, head_dim)])
