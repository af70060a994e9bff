"""Adapter around ``torch.onnx.ops.rotary_embedding``, the ONNX RotaryEmbedding-23 op in torch.

The op takes ``[batch, heads, seq, head_dim]`` inputs, gathers user-supplied cos/sin tables of
shape ``[max_position + 1, rotary_dim / 2]`` at ``position_ids`` and supports both pairings
and partial rotary. Only the default scaling is declared: the op applies whatever tables it is
given, so scaled tables would test this project's table code rather than torch's.
"""

from __future__ import annotations

import numpy as np
import torch

from impls.adapters.base import Adapter, RopeSpec, Support
from impls.adapters.torch_util import from_torch, to_torch

if not hasattr(getattr(torch.onnx, "ops", None), "rotary_embedding"):
    # Raised at import, so the registry reports the adapter as unavailable with this reason.
    raise ImportError(
        f"torch {torch.__version__} has no torch.onnx.ops.rotary_embedding; install a torch that "
        f"provides it (the suite pins torch==2.13.0)."
    )


class TorchOnnxAdapter(Adapter):
    """``torch.onnx.ops.rotary_embedding`` with tables built in float32 as Hugging Face builds them."""

    name = "torch_onnx"
    library = "torch"
    support = Support(positions="non_negative", layout="[batch, heads, seq, head_dim]")

    def rotate(self, x: np.ndarray, positions: np.ndarray, spec: RopeSpec, *, mode: str = "eager") -> np.ndarray:
        rotary_dim = spec.rotary_dim or x.shape[-1]

        # float32 inverse frequencies and a float32 broadcast multiply, as transformers does.
        exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim
        inv_freq = 1.0 / (spec.theta**exponents)
        table_positions = torch.arange(int(positions.max()) + 1, dtype=torch.float32)
        angles = table_positions[:, None] * inv_freq[None, :]  # [max_position + 1, R/2]

        # [B, S, H, D] -> [B, H, S, D]: the op's 4-D layout.
        x_torch = to_torch(x).transpose(1, 2)
        # ONNX RotaryEmbedding gives the caches the input's type T. torch's eager op would also
        # take float32 caches with bfloat16 input, but then returns float32, not the input dtype.
        out = torch.onnx.ops.rotary_embedding(
            x_torch,
            torch.cos(angles).to(x_torch.dtype),
            torch.sin(angles).to(x_torch.dtype),
            torch.from_numpy(np.asarray(positions, np.int64)),
            interleaved=spec.pairing == "interleaved",
            rotary_embedding_dim=rotary_dim if rotary_dim != x.shape[-1] else 0,
        )
        # [B, H, S, D] -> [B, S, H, D]
        return from_torch(out.transpose(1, 2))
