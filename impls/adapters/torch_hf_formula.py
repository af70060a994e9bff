"""The Hugging Face formulation of RoPE written in plain torch: ``x * cos + rotate_half(x) * sin``.

This is the formula of transformers' Llama code without the library: float32 inverse
frequencies, a float32 broadcast multiply ``positions * inv_freq``, tables concatenated to the
full rotary width and cast to the input dtype, and the rotation computed in the input dtype.
"""

from __future__ import annotations

import numpy as np
import torch

from impls.adapters.base import Adapter, RopeSpec, Support
from impls.adapters.torch_util import from_torch, to_torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Map the halves ``(x1, x2)`` of the last axis to ``(-x2, x1)``."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class TorchHFFormulaAdapter(Adapter):
    """Half-split RoPE in torch with explicit ``position_ids``, partial rotary by slicing."""

    name = "torch_hf_formula"
    library = "torch"
    support = Support(pairings=frozenset({"half_split"}))

    def rotate(self, x: np.ndarray, positions: np.ndarray, spec: RopeSpec, *, mode: str = "eager") -> np.ndarray:
        position_ids = torch.from_numpy(np.asarray(positions, np.int64))
        return from_torch(apply_rope(to_torch(x), position_ids, spec.theta, spec.rotary_dim or x.shape[-1]))


def apply_rope(x: torch.Tensor, position_ids: torch.Tensor, theta: float, rotary_dim: int) -> torch.Tensor:
    """Rotate the first ``rotary_dim`` features of ``x`` ``[B, S, H, D]`` at ``position_ids`` ``[B, S]``."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim
    inv_freq = 1.0 / (theta**exponents)
    freqs = position_ids[..., None].float() * inv_freq  # [B, S, R/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [B, S, R]
    # [B, S, R] -> [B, S, 1, R]: one table for every head, in the input dtype as in HF.
    cos = emb.cos()[:, :, None, :].to(x.dtype)
    sin = emb.sin()[:, :, None, :].to(x.dtype)

    rotated, passthrough = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat((rotated * cos + rotate_half(rotated) * sin, passthrough), dim=-1)
