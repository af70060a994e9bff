"""Adapters around Hugging Face transformers' rotary embeddings: Llama and GPT-NeoX.

Both run the library's own code: the model's ``*RotaryEmbedding`` module builds cos/sin from
``position_ids`` and the model's ``apply_rotary_pos_emb`` rotates ``[batch, heads, seq,
head_dim]`` inputs with the half-split pairing. The tables come back in the input dtype and the
rotation is computed in that dtype, as inside the models.

* ``hf_llama`` (``LlamaRotaryEmbedding``): the Llama default rope type always rotates the whole
  head and ignores ``partial_rotary_factor``, so this adapter declares no partial rotary.
* ``hf_gpt_neox`` (``GPTNeoXRotaryEmbedding``): honours ``partial_rotary_factor`` for every rope
  type, and its ``apply_rotary_pos_emb`` rotates the leading features and passes the rest.

The ``dynamic`` rope type rescales its base from ``max(position_ids) + 1`` taken over the whole
batch, and a module keeps the grown frequencies for later calls whose length stays above
``max_position_embeddings``. The adapters therefore build a fresh module for every call and, for
``dynamic``, one per batch row, so each row gets the base of its own largest position.

Only the transformers 5.x configuration form (``rope_parameters``) is supported, detected by the
config's signature rather than by version.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import numpy as np
import torch
from transformers import GPTNeoXConfig, LlamaConfig
from transformers.models.gpt_neox import modeling_gpt_neox
from transformers.models.llama import modeling_llama

from impls.adapters.base import Adapter, RopeSpec, Support
from impls.adapters.torch_util import from_torch, to_torch

for _config_class in (LlamaConfig, GPTNeoXConfig):
    if "rope_parameters" not in inspect.signature(_config_class.__init__).parameters:
        # Raised at import, so the registry reports the adapter as unavailable with this reason.
        raise ImportError(
            f"{_config_class.__name__} takes no rope_parameters argument: the Hugging Face "
            f"adapters need the transformers 5.x RoPE configuration (pip install 'transformers>=5.25')."
        )

_SCALING_TYPES = frozenset({"default", "linear", "dynamic", "yarn", "llama3"})


def partial_rotary_factor(rotary_dim: int, head_dim: int) -> float:
    """Return a ``partial_rotary_factor`` for which ``int(head_dim * factor) == rotary_dim``.

    transformers truncates ``head_dim * factor`` to an int, so ``rotary_dim / head_dim`` can
    land one below ``rotary_dim`` when the division rounds down; the next float up fixes that.
    """
    factor = rotary_dim / head_dim
    if int(head_dim * factor) != rotary_dim:
        factor = math.nextafter(factor, math.inf)
    if int(head_dim * factor) != rotary_dim:
        raise ValueError(
            f"No partial_rotary_factor gives rotary_dim={rotary_dim} for head_dim={head_dim}."
        )
    return factor


def rope_config_arguments(spec: RopeSpec, rotary_dim: int, head_dim: int) -> dict[str, Any]:
    """Return the config keyword arguments that express ``spec`` in transformers 5.x.

    ``max_position_embeddings`` is the threshold of the ``dynamic`` type, so it is set to the
    spec's ``original_max_position_embeddings``. For ``yarn`` and ``llama3`` it is set to the
    extended length (original times factor), which is what transformers' validation expects.
    """
    rope_parameters = spec.scaling.to_config()
    rope_parameters["rope_theta"] = spec.theta
    # Always explicit: GPTNeoXConfig defaults to rotating a quarter of the head (0.25).
    rope_parameters["partial_rotary_factor"] = partial_rotary_factor(rotary_dim, head_dim)

    rope_type = spec.scaling.rope_type
    max_position_embeddings = 2048  # unused by the default and linear types
    if rope_type == "dynamic":
        max_position_embeddings = int(rope_parameters.pop("original_max_position_embeddings"))
    elif rope_type in ("yarn", "llama3"):
        original = rope_parameters["original_max_position_embeddings"]
        max_position_embeddings = int(round(original * rope_parameters["factor"]))
    return {"rope_parameters": rope_parameters, "max_position_embeddings": max_position_embeddings}


class _HFRotaryAdapter(Adapter):
    library = "transformers"

    def _rotary_embedding(self, spec: RopeSpec, rotary_dim: int, head_dim: int) -> torch.nn.Module:
        raise NotImplementedError

    def _apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def rotate(self, x: np.ndarray, positions: np.ndarray, spec: RopeSpec, *, mode: str = "eager") -> np.ndarray:
        head_dim = x.shape[-1]
        rotary_dim = spec.rotary_dim or head_dim
        # [B, S, H, D] -> [B, H, S, D]: the layout of the models' attention.
        x_torch = to_torch(x).transpose(1, 2)
        position_ids = torch.from_numpy(np.asarray(positions, np.int64))

        if spec.scaling.rope_type == "dynamic":
            # One fresh module per row: the library's base comes from the batch-wide maximum
            # position and sticks to the module once grown.
            rows = [slice(b, b + 1) for b in range(x.shape[0])]
        else:
            rows = [slice(None)]

        outputs = []
        with torch.no_grad():
            for row in rows:
                rotary_embedding = self._rotary_embedding(spec, rotary_dim, head_dim)
                cos, sin = rotary_embedding(x_torch[row], position_ids[row])
                outputs.append(self._apply(x_torch[row], cos, sin))
        out = torch.cat(outputs, dim=0)
        # [B, H, S, D] -> [B, S, H, D]
        return from_torch(out.transpose(1, 2))


class HFLlamaAdapter(_HFRotaryAdapter):
    """``LlamaRotaryEmbedding`` with ``position_ids`` and Llama's ``apply_rotary_pos_emb``."""

    name = "hf_llama"
    support = Support(
        pairings=frozenset({"half_split"}),
        positions="any",
        # Llama's default type builds frequencies for the whole head whatever
        # partial_rotary_factor sets, and its apply_rotary_pos_emb rotates every feature.
        partial_rotary=False,
        scaling_types=_SCALING_TYPES,
        layout="[batch, heads, seq, head_dim]",
    )

    def _rotary_embedding(self, spec: RopeSpec, rotary_dim: int, head_dim: int) -> torch.nn.Module:
        config = LlamaConfig(
            hidden_size=head_dim,
            num_attention_heads=1,
            num_key_value_heads=1,
            head_dim=head_dim,
            **rope_config_arguments(spec, rotary_dim, head_dim),
        )
        return modeling_llama.LlamaRotaryEmbedding(config)

    def _apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rotated, _ = modeling_llama.apply_rotary_pos_emb(x, x, cos, sin, unsqueeze_dim=1)
        return rotated


class HFGPTNeoXAdapter(_HFRotaryAdapter):
    """``GPTNeoXRotaryEmbedding`` and GPT-NeoX's ``apply_rotary_pos_emb``, partial rotary included."""

    name = "hf_gpt_neox"
    support = Support(
        pairings=frozenset({"half_split"}),
        positions="any",
        partial_rotary=True,  # through partial_rotary_factor = rotary_dim / head_dim
        scaling_types=_SCALING_TYPES,
        layout="[batch, heads, seq, head_dim]",
    )

    def _rotary_embedding(self, spec: RopeSpec, rotary_dim: int, head_dim: int) -> torch.nn.Module:
        config = GPTNeoXConfig(
            hidden_size=head_dim,
            num_attention_heads=1,
            **rope_config_arguments(spec, rotary_dim, head_dim),
        )
        return modeling_gpt_neox.GPTNeoXRotaryEmbedding(config)

    def _apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rotated, _ = modeling_gpt_neox.apply_rotary_pos_emb(x, x, cos, sin, unsqueeze_dim=1)
        return rotated
