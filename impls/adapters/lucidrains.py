"""Adapter around rotary-embedding-torch (``RotaryEmbedding`` and ``apply_rotary_emb``).

The library pairs adjacent features (interleaved) and works on ``[batch, heads, seq,
head_dim]``. Its convenience method ``rotate_queries_or_keys`` builds positions with
``arange`` in the dtype of the input and stores the angles in a cache on the module. A
bfloat16 or float16 input therefore gets rounded positions (bfloat16 represents integers
exactly only up to 256) and leaves wrong angles in the cache for later calls. The adapter takes the other
documented route: it passes float32 positions of its own to ``RotaryEmbedding.forward``, which
returns the angles without caching them, and rotates with ``apply_rotary_emb``. A fresh module
per call keeps any cached state out of the comparison.

Partial rotary is the library's own: a module of ``dim=rotary_dim`` rotates the first
``rotary_dim`` features and ``apply_rotary_emb`` passes the rest through.

No scaling type besides the default is declared. The library's ``interpolate_factor`` (linear
scaling) divides only the positions that ``get_seq_pos`` builds, on the input-dtype route above,
and ``theta_rescale_factor`` is a fixed NTK change of theta, not the length-dependent
``dynamic`` type.
"""

from __future__ import annotations

import numpy as np
import torch
from rotary_embedding_torch import RotaryEmbedding, apply_rotary_emb

from impls.adapters.base import Adapter, RopeSpec, Support
from impls.adapters.torch_util import from_torch, to_torch


class LucidrainsAdapter(Adapter):
    """``RotaryEmbedding(dim=rotary_dim, theta=theta)`` at explicit float32 positions."""

    name = "lucidrains"
    library = "rotary-embedding-torch"
    support = Support(
        pairings=frozenset({"interleaved"}),
        positions="any",
        partial_rotary=True,
        layout="[batch, heads, seq, head_dim]",
    )

    def rotate(self, x: np.ndarray, positions: np.ndarray, spec: RopeSpec, *, mode: str = "eager") -> np.ndarray:
        rotary_dim = spec.rotary_dim or x.shape[-1]
        rope = RotaryEmbedding(dim=rotary_dim, theta=spec.theta)

        # float32 represents every integer position up to 2**24 exactly.
        float_positions = torch.from_numpy(np.asarray(positions, np.float32))
        # [B, S, H, D] -> [B, H, S, D]
        x_torch = to_torch(x).transpose(1, 2)
        with torch.no_grad():
            # [B, S] -> [B, S, R] -> [B, 1, S, R]: one set of angles for every head.
            angles = rope(float_positions)[:, None]
            out = apply_rotary_emb(angles, x_torch, seq_dim=-2)
        # [B, H, S, D] -> [B, S, H, D]
        return from_torch(out.transpose(1, 2))
