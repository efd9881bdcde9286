"""The paged Gemma 4 forward: a batch of packed new tokens (prefill chunks and decode steps mixed),
K/V written into the pools before attention, Triton paged attention, KV-shared layers reading
their source layer's pool.

It imports only the reference's config (shared/DESIGN.md): its own ops live in `ops.py`, so a bug
in the reference cannot hide by being shared. Taps carry the same names and meaning as the
reference's; each piece is reported per request with its positions.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from reference.config import Gemma4Config, LayerSpec

from . import ops
from .batch import ForwardBatch
from .kernels.attention import decode_attention, extend_attention
from .memory import KVCache

# sink(request_id, tap_name, positions [n], tensor [n, ...]); called only when capturing.
TapSink = Callable[[object, str, torch.Tensor, torch.Tensor], None]


class PagedGemma4:
    def __init__(self, config: Gemma4Config, weights: dict[str, torch.Tensor], cache: KVCache):
        self.config, self.w, self.cache = config, weights, cache
        first = next(iter(weights.values()))
        self.dtype, self.device = first.dtype, first.device
        self.inv_freq = {t: ops.rope_inv_freq(config.rope[t], config.global_head_dim if t == "full_attention"
                                              else config.head_dim, self.device) for t in set(config.layer_types)}

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, batch: ForwardBatch, taps: TapSink | None = None,
                logit_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [N, V] of the packed new tokens (or of `logit_rows` only)."""
        cfg, w = self.config, self.w
        emit = _emitter(taps, batch)
        x = ops.scaled_embedding(w["embed_tokens.weight"], ids, cfg.hidden_size)
        emit("embed", x)
        ple = self.per_layer_inputs(ids, x) if cfg.has_ple else None
        if ple is not None:
            emit("ple", ple)
        rope = {t: ops.rope_cos_sin(inv, batch.positions, self.dtype) for t, inv in self.inv_freq.items()}
        for spec in cfg.layers:
            x = self.layer(spec, x, ple, rope[spec.type], batch, emit)
        if logit_rows is not None:
            x = x[logit_rows]
        x = ops.rms_norm(x, w["norm.weight"], cfg.rms_norm_eps)
        logits = ops.softcap(F.linear(x, w["embed_tokens.weight"]), cfg.final_logit_softcapping)
        if logit_rows is None:
            emit("final_norm", x)
            emit("logits", logits)
        return logits

    def per_layer_inputs(self, ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        cfg, w = self.config, self.w
        L, P = cfg.num_hidden_layers, cfg.hidden_size_per_layer_input
        token_part = ops.scaled_embedding(w["embed_tokens_per_layer.weight"], ids, P).view(-1, L, P)
        ctx = (F.linear(x, w["per_layer_model_projection.weight"]) * cfg.hidden_size ** -0.5).view(-1, L, P)
        ctx = ops.rms_norm(ctx, w["per_layer_projection_norm.weight"], cfg.rms_norm_eps)
        return (ctx + token_part) * 2.0 ** -0.5

    def layer(self, spec: LayerSpec, x, ple, cos_sin, batch: ForwardBatch, emit) -> torch.Tensor:
        cfg, w, eps = self.config, self.w, self.config.rms_norm_eps
        p = f"layers.{spec.index}."
        h = ops.rms_norm(x, w[p + "input_layernorm.weight"], eps)
        x = x + ops.rms_norm(self.attention(spec, h, cos_sin, batch, emit), w[p + "post_attention_layernorm.weight"], eps)
        emit(p + "attn_out", x)

        residual = x
        m = ops.mlp(ops.rms_norm(x, w[p + "pre_feedforward_layernorm.weight"], eps),
                    w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"], w[p + "mlp.down_proj.weight"])
        if cfg.enable_moe_block:
            m1 = ops.rms_norm(m, w[p + "post_feedforward_layernorm_1.weight"], eps)
            top_w, top_i = ops.route(residual, w[p + "router.scale"], w[p + "router.proj.weight"],
                                     w[p + "router.per_expert_scale"], cfg.top_k_experts, eps)
            xe = ops.rms_norm(residual, w[p + "pre_feedforward_layernorm_2.weight"], eps)
            moe = ops.experts(xe, top_w, top_i, w[p + "experts.gate_up_proj"], w[p + "experts.down_proj"])
            m = m1 + ops.rms_norm(moe, w[p + "post_feedforward_layernorm_2.weight"], eps)
        m = ops.rms_norm(m, w[p + "post_feedforward_layernorm.weight"], eps)
        emit(p + "mlp_out", m)
        x = residual + m

        if ple is not None:
            g = ops.gelu_tanh(F.linear(x, w[p + "per_layer_input_gate.weight"])) * ple[:, spec.index, :]
            x = x + ops.rms_norm(F.linear(g, w[p + "per_layer_projection.weight"]),
                                 w[p + "post_per_layer_input_norm.weight"], eps)
        x = x * w[p + "layer_scalar"]
        emit(p + "out", x)
        return x

    def attention(self, spec: LayerSpec, h, cos_sin, batch: ForwardBatch, emit) -> torch.Tensor:
        w, eps = self.w, self.config.rms_norm_eps
        p = f"layers.{spec.index}.self_attn."
        N, hd = h.shape[0], spec.head_dim
        cos, sin = cos_sin
        q = ops.apply_rope(ops.rms_norm(F.linear(h, w[p + "q_proj.weight"]).view(N, -1, hd),
                                        w[p + "q_norm.weight"], eps), cos, sin)
        k_pool, v_pool = self.cache.buffers(spec)
        slots = batch.swa_out_slots if spec.is_sliding else batch.out_slots
        if not spec.kv_shared:
            k_raw = F.linear(h, w[p + "k_proj.weight"]).view(N, -1, hd)
            # K=V full layers: V is the raw key projection, before k_norm and RoPE.
            v_raw = F.linear(h, w[p + "v_proj.weight"]).view(N, -1, hd) if spec.has_v_proj else k_raw
            k = ops.apply_rope(ops.rms_norm(k_raw, w[p + "k_norm.weight"], eps), cos, sin)
            v = ops.rms_norm(v_raw, None, eps)
            k_pool[slots] = k  # written before attention: kernels read every key from the pool
            v_pool[slots] = v
        lp = f"layers.{spec.index}."
        emit(lp + "q", q)
        if emit is not _no_emit:  # a shared layer's keys are its source's, read back at its own slots
            emit(lp + "k", k_pool[slots])
            emit(lp + "v", v_pool[slots])
        pages = batch.swa_page_table if spec.is_sliding else batch.page_table
        if batch.is_decode:
            o = decode_attention(q, k_pool, v_pool, pages, batch.page_size, batch.seq_lens, window=spec.window)
        else:
            o = extend_attention(q, k_pool, v_pool, pages, batch.page_size, batch.cu_seqlens_q,
                                 batch.seq_lens, window=spec.window)
        emit(lp + "o", o)
        return F.linear(o.reshape(N, -1), w[p + "o_proj.weight"])


def _no_emit(name: str, t: torch.Tensor) -> None:
    pass


def _emitter(taps: TapSink | None, batch: ForwardBatch):
    if taps is None:
        return _no_emit

    def emit(name: str, t: torch.Tensor) -> None:
        for item, start, end in batch.token_ranges():
            taps(item.rid, name, batch.positions[start:end], t[start:end].detach().clone())

    return emit
