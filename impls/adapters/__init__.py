"""Adapters that wrap each RoPE implementation in the suite's common call shape."""

from impls.adapters.base import Adapter, RopeSpec, Support, contiguous_runs, numpy_dtype

__all__ = ["Adapter", "RopeSpec", "Support", "contiguous_runs", "numpy_dtype"]
