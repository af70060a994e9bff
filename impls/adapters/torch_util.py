"""Conversions between NumPy arrays (bfloat16 through ml_dtypes) and torch tensors."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import torch


def to_torch(x: np.ndarray) -> torch.Tensor:
    """Return ``x`` as a torch tensor of the same dtype, bfloat16 included."""
    if not x.flags.writeable:
        # Read-only inputs (the goldens) are copied: torch tensors are always writable.
        x = np.array(x)
    if x.dtype == ml_dtypes.bfloat16:
        # torch cannot read ml_dtypes arrays; the bit pattern is shared, so reinterpret it.
        return torch.from_numpy(np.ascontiguousarray(x).view(np.uint16).astype(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(x))


def from_torch(x: torch.Tensor) -> np.ndarray:
    """Return a torch tensor as NumPy, bfloat16 as ml_dtypes.bfloat16."""
    x = x.detach().cpu().contiguous()
    if x.dtype == torch.bfloat16:
        return x.view(torch.int16).numpy().view(np.uint16).view(ml_dtypes.bfloat16)
    return x.numpy()
