"""The non-attention ops of the paged forward in plain torch, written for packed tokens [N, ...].

They follow GEMMA4_SPEC.md in op order and dtype (norms and softmax in float32, the rest in the
model dtype), written independently of reference/model.py so that the oracle compares two
implementations, not one twice. The ops with a fused Triton kernel (`fused_ops.py`) have the same
names and signatures here, so the paged model runs either set unchanged (`fused=` switch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from reference.config import RopeSpec


def _wide(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    xf = x.to(_wide(x.dtype))
    y = xf * torch.pow(xf.square().mean(-1, keepdim=True) + eps, -0.5)
    return (y if weight is None else y * weight.to(y.dtype)).to(x.dtype)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def scaled_embedding(table: torch.Tensor, ids: torch.Tensor, width: int) -> torch.Tensor:
    # The scale is a float32 number rounded to the table's dtype (39.25 for sqrt(1536) in bf16),
    # passed as a Python number: exact in the dtype, so the product rounds as with a dtype tensor,
    # and no host-to-device copy (which a decode graph could not capture).
    scale = torch.tensor(width ** 0.5, dtype=torch.float32).to(table.dtype).item()
    return table[ids] * scale


def rope_inv_freq(rope: RopeSpec, head_dim: int, device) -> torch.Tensor:
    """float32 [head_dim / 2]; proportional RoPE zeroes the non-rotating tail."""
    n_rot = int(rope.partial_rotary_factor * head_dim // 2)
    denom = head_dim if rope.kind == "proportional" else 2 * n_rot
    steps = torch.arange(0, 2 * n_rot, 2, dtype=torch.int64, device=device).float() / denom
    inv = 1.0 / (rope.theta ** steps)
    if rope.kind == "proportional":
        inv = inv / rope.factor
    return torch.cat([inv, inv.new_zeros(head_dim // 2 - n_rot)])


def apply_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """x [N, heads, D], rotate-half over the whole head; angles in float32, cos/sin in x's dtype."""
    freqs = positions[:, None].to(inv_freq.dtype) * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos().to(x.dtype)[:, None, :], emb.sin().to(x.dtype)[:, None, :]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def qkv_norm(q, k, v, q_weight, k_weight, eps: float):
    """q_norm and k_norm (with weights) and v_norm (without); k = v = None on KV-shared layers."""
    if k is None:
        return rms_norm(q, q_weight, eps), None, None
    return rms_norm(q, q_weight, eps), rms_norm(k, k_weight, eps), rms_norm(v, None, eps)


def rope_and_store_kv(k, v, positions, inv_freq, k_pool, v_pool, out_slots) -> None:
    k_pool[out_slots] = apply_rope(k, positions, inv_freq)
    v_pool[out_slots] = v


def qkv_norm_rope_store(q, k, v, q_weight, k_weight, eps: float, positions, inv_freq, k_pool, v_pool, out_slots):
    """An attention layer's q/k/v epilogue: qkv_norm, RoPE of q, then k's RoPE and the K/V store
    (the three ops above, in that order). Returns q; k = v = k_weight = None on KV-shared layers,
    whose pools are not touched."""
    q, k, v = qkv_norm(q, k, v, q_weight, k_weight, eps)
    q = apply_rope(q, positions, inv_freq)
    if k is not None:
        rope_and_store_kv(k, v, positions, inv_freq, k_pool, v_pool, out_slots)
    return q


def add_rms_norm(x, residual, weight, eps: float, *, x_weight=None):
    """new_residual = residual + rms_norm(x, x_weight); returns it and rms_norm(it, weight)."""
    new = residual + (x if x_weight is None else rms_norm(x, x_weight, eps))
    return new, rms_norm(new, weight, eps)


def gelu_tanh_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return gelu_tanh(gate) * up


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w)


def linear_gelu_mul(x, w, up=None, *, return_gate_up=False):
    """gelu_tanh(gate) * up with [gate; up] = x @ w.T split in column halves (the MLP), or with
    gate = x @ w.T and `up` given (the PLE gate). return_gate_up=True (MLP only) also returns the
    projection, the `mlp_gate_up` tap."""
    if up is not None:
        return gelu_tanh_mul(F.linear(x, w), up)
    gate_up = F.linear(x, w)
    inter = w.shape[0] // 2
    act = gelu_tanh_mul(gate_up[:, :inter], gate_up[:, inter:])
    return (act, gate_up) if return_gate_up else act


def post_ffn_residual_scale(m, residual, weight, eps: float, scalar=None, *, return_normed=False, next_weight=None):
    """(residual + rms_norm(m, weight)) * scalar; return_normed adds the normed branch (the mlp_out
    tap); next_weight (the pass that ends a layer) adds the next layer's input norm of the result,
    and then the result is always (out, normed or None, next norm)."""
    normed = rms_norm(m, weight, eps)
    out = residual + normed
    out = out if scalar is None else out * scalar
    if next_weight is not None:
        return out, normed if return_normed else None, rms_norm(out, next_weight, eps)
    return (out, normed) if return_normed else out


def post_ffn_moe_residual_scale(m_dense, m_moe, residual, w_dense, w_moe, weight, eps: float, scalar=None, *,
                                return_normed=False, next_weight=None):
    m = rms_norm(m_dense, w_dense, eps) + rms_norm(m_moe, w_moe, eps)
    return post_ffn_residual_scale(m, residual, weight, eps, scalar, return_normed=return_normed,
                                   next_weight=next_weight)


def softcap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    return torch.tanh(logits / cap) * cap


def route(r, scale, proj_w, per_expert_scale, top_k: int, eps: float):
    """Top-k expert weights and ids for the residual stream r [N, H] (fp32 softmax)."""
    z = rms_norm(r, None, eps) * scale * r.shape[-1] ** -0.5
    probs = torch.softmax(F.linear(z, proj_w), dim=-1, dtype=_wide(r.dtype))
    top_w, top_i = torch.topk(probs, k=top_k, dim=-1)
    return top_w / top_w.sum(-1, keepdim=True) * per_expert_scale[top_i], top_i


def experts(xe, top_w, top_i, gate_up, down) -> torch.Tensor:
    """Each expert over all of its tokens in one matmul, ascending expert order."""
    out = torch.zeros_like(xe)
    inter = down.shape[-1]
    for e in torch.unique(top_i).tolist():
        tok, slot = torch.nonzero(top_i == e, as_tuple=True)
        gu = F.linear(xe[tok], gate_up[e])
        y = F.linear(gelu_tanh(gu[:, :inter]) * gu[:, inter:], down[e]) * top_w[tok, slot, None]
        out.index_add_(0, tok, y.to(out.dtype))
    return out
