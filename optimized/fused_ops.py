"""The fused Triton kernels under the names and signatures of `ops.py`, so the paged model can
run on either set. Ops without a kernel (the embedding lookup, the RoPE frequencies, a bare
gelu_tanh) come from `ops.py`. The GEMV ops (linear_gelu_mul, linear) run their kernel within
gemv's row and weight limits (GEMV_MAX_ROWS, FUSED_MAX_ROWS, GEMV_MAX_WEIGHT), the unfused
kernels and F.linear past them."""

from __future__ import annotations

from .kernels.activation import gelu_tanh_mul, softcap
from .kernels.gemv import linear, linear_gelu_mul
from .kernels.moe import experts, route
from .kernels.norms import (add_rms_norm, post_ffn_moe_residual_scale, post_ffn_residual_scale, qkv_norm,
                            rms_norm)
from .kernels.rope import apply_rope, qkv_norm_rope_store, rope_and_store_kv
from .ops import gelu_tanh, rope_inv_freq, scaled_embedding

__all__ = [
    "add_rms_norm", "apply_rope", "experts", "gelu_tanh", "gelu_tanh_mul", "linear", "linear_gelu_mul",
    "post_ffn_moe_residual_scale", "post_ffn_residual_scale", "qkv_norm", "qkv_norm_rope_store", "rms_norm",
    "rope_and_store_kv", "rope_inv_freq", "route", "scaled_embedding", "softcap",
]
