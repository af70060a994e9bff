"""Flax NNX RoPE: the module, an attention function and a multi-head attention that take positions."""

from impls.flax_nnx.attention import MultiHeadAttention, dot_product_attention_with_rope
from impls.flax_nnx.rope import RoPE, RopeTable, rotate

__all__ = ["MultiHeadAttention", "RoPE", "RopeTable", "dot_product_attention_with_rope", "rotate"]
