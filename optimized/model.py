"""The paged Gemma 4 forward: a batch of packed new tokens (prefill chunks and decode steps mixed),
K/V written into the pools before attention, Triton paged attention, KV-shared layers reading
their source layer's pool.

It imports only the reference's config (shared/DESIGN.md): its non-attention ops are `ops.py`
(plain torch) or `fused_ops.py` (Triton kernels), chosen by `fused`, with one signature set so
the forward below is the same for both; attention is the Triton kernels or, with
attention="eager", their eager twins (the same paged reads in torch: with fused=False no Triton
runs at all, which isolates the kernels when a divergence is bisected, and keeps API-level tests
quick under Triton's CPU interpreter). Q/K/V and gate/up are each one projection whose outputs
are split into column views, as a serving engine does. Taps carry the same names and meaning as
the reference's; each piece is reported per request with its positions.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from reference.config import Gemma4Config, LayerSpec

from . import fused_ops, ops
from .batch import ForwardBatch
from .kernels.attention import decode_attention, decode_attention_eager, extend_attention, extend_attention_eager
from .memory import KVCache

# sink(request_id, tap_name, positions [n], tensor [n, ...]); called only when capturing.
TapSink = Callable[[object, str, torch.Tensor, torch.Tensor], None]


def _projection_groups(config: Gemma4Config) -> dict[str, list[str]]:
    """Per layer, the weights stacked into one matrix: [q; k; v] (k and v where the layer has
    them) and [gate; up]."""
    groups = {}
    for spec in config.layers:
        p = f"layers.{spec.index}."
        a = p + "self_attn."
        qkv = [a + "q_proj.weight"]
        if not spec.kv_shared:
            qkv.append(a + "k_proj.weight")
            if spec.has_v_proj:
                qkv.append(a + "v_proj.weight")
        groups[p + "qkv"] = qkv
        groups[p + "gate_up"] = [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]
    return groups


def _stack_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat(parts), without a copy where the parts already lie back to back in one storage
    (weights from share_projection_storage)."""
    first = parts[0]
    adjacent = all(t.is_contiguous() and t.dtype == first.dtype and t.shape[1:] == first.shape[1:]
                   and t.untyped_storage().data_ptr() == first.untyped_storage().data_ptr() for t in parts)
    ends = [t.data_ptr() + t.numel() * t.element_size() for t in parts[:-1]]
    if adjacent and all(end == t.data_ptr() for end, t in zip(ends, parts[1:])):
        return first.as_strided((sum(t.shape[0] for t in parts), *first.shape[1:]), first.stride())
    return torch.cat(parts)


def fuse_projections(config: Gemma4Config, w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per layer, [q; k; v] and [gate; up] weights stacked into one matrix each."""
    return {name: _stack_rows([w[k] for k in keys]) for name, keys in _projection_groups(config).items()}


def share_projection_storage(config: Gemma4Config, w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Make the q/k/v and gate/up weights of the dict `w` views into one stacked matrix per group,
    in place, and return `w`: fuse_projections on it then copies nothing, so the reference
    (reading the parts) and the paged model (reading the stacks) share one copy of those weights.
    At 31B in bf16 that is 62 GB instead of 124, what lets the oracle fit both paths on one H200.
    In place, so that each group's parts are freed as soon as its stack exists (where nothing
    else holds them): the peak is the model plus one group's stack. A copy of the dict kept every
    part until its caller dropped it: the model plus all its stacks, about 112 GB at 31B. Measured
    on an H200 (bench/share_memory.py, bf16): E2B 0.08 GB above its 9.26 GB of weights against
    2.37 GB with the parts held; 26B-A4B 0.05 against 2.13 GB above 50.47 GB."""
    for keys in _projection_groups(config).values():
        stacked = torch.cat([w[k] for k in keys])
        start = 0
        for k in keys:
            rows = w[k].shape[0]
            w[k] = stacked[start:start + rows]
            start += rows
    return w


ATTENTION = ("triton", "eager")  # PagedGemma4's attention=: the kernels, or their eager twins
# The two op sets a user picks between (`check --ops`, `serve --ops`), as engine options: the
# Triton kernels, or their torch twins with no Triton at all (the unfused ops, attention's twins).
OP_SETS = {"kernels": dict(fused=True, attention="triton"), "eager": dict(fused=False, attention="eager")}


def check_attention(kind) -> None:
    """A ValueError naming the choices unless `kind` is one of ATTENTION (the Engine asks before
    it loads any weight)."""
    if kind not in ATTENTION:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION)}, got {kind!r}")


class PagedGemma4:
    def __init__(self, config: Gemma4Config, weights: dict[str, torch.Tensor], cache: KVCache,
                 fused: bool = False, fused_weights: dict[str, torch.Tensor] | None = None, tp=None,
                 attention: str = "triton"):
        """Under tensor parallelism (optimized/parallel.py) `config` and `weights` are one rank's
        shard and `tp` sums the row-parallel partial outputs (o_proj, the MLP's down projection
        and the experts) over the ranks: its `all_reduce` is the only rank logic here."""
        self.config, self.w, self.cache = config, weights, cache
        self.tp = tp
        self.ops = fused_ops if fused else ops
        check_attention(attention)
        self.attention_kind = attention
        self.fw = fused_weights if fused_weights is not None else fuse_projections(config, weights)
        self.device = next(iter(weights.values())).device
        self.inv_freq = {s.type: ops.rope_inv_freq(config.rope[s.type], s.head_dim, self.device) for s in config.layers}

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, batch: ForwardBatch, taps: TapSink | None = None,
                logit_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [N, V] of the packed new tokens (or of `logit_rows` only)."""
        cfg, w, o = self.config, self.w, self.ops
        emit = _emitter(taps, batch)
        x = o.scaled_embedding(w["embed_tokens.weight"], ids, cfg.hidden_size)
        emit("embed", x)
        ple = self.per_layer_inputs(ids, x) if cfg.has_ple else None
        if ple is not None:
            emit("ple", ple)
        # Each layer's input norm is computed by the pass that ends the layer before it (one launch
        # fewer per layer, and the q/k/v projection a plain one); the first one here, and the
        # last layer's pass computes the final norm.
        h = o.rms_norm(x, w["layers.0.input_layernorm.weight"], cfg.rms_norm_eps)
        for spec in cfg.layers:
            x, h = self.layer(spec, x, h, ple, batch, emit)
        if logit_rows is not None:
            h = h[logit_rows]
        logits = F.linear(h, w["embed_tokens.weight"])
        if cfg.final_logit_softcapping is not None:
            logits = o.softcap(logits, cfg.final_logit_softcapping)
        if logit_rows is None:
            emit("final_norm", h)
            emit("logits", logits)
        return logits

    def per_layer_inputs(self, ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        cfg, w, o = self.config, self.w, self.ops
        L, P = cfg.num_hidden_layers, cfg.hidden_size_per_layer_input
        token_part = o.scaled_embedding(w["embed_tokens_per_layer.weight"], ids, P).view(-1, L, P)
        ctx = (F.linear(x, w["per_layer_model_projection.weight"]) * cfg.hidden_size ** -0.5).view(-1, L, P)
        ctx = o.rms_norm(ctx, w["per_layer_projection_norm.weight"], cfg.rms_norm_eps)
        return (ctx + token_part) * 2.0 ** -0.5

    def layer(self, spec: LayerSpec, x, h, ple, batch: ForwardBatch, emit) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer on the residual stream x, h its input norm; returns the new x and its next
        norm (the next layer's input norm, or the final norm after the last layer)."""
        cfg, w, o, eps = self.config, self.w, self.ops, self.config.rms_norm_eps
        p = f"layers.{spec.index}."
        following = spec.index + 1
        next_weight = w[f"layers.{following}.input_layernorm.weight" if following < len(cfg.layers) else "norm.weight"]
        capturing = emit is not _no_emit
        a = self.attention(spec, h, batch, emit)
        # x = x + post_attention_norm(a), and the pre-feed-forward norm of the result, in one pass.
        x, h = o.add_rms_norm(a, x, w[p + "pre_feedforward_layernorm.weight"], eps,
                              x_weight=w[p + "post_attention_layernorm.weight"])
        emit(p + "attn_out", x)

        # gate_up projection and gelu_tanh(gate) * up in one op (one GEMV launch at decode); when
        # capturing, the same op also returns the projection it computed, for the mlp_gate_up tap.
        act = o.linear_gelu_mul(h, self.fw[p + "gate_up"], return_gate_up=capturing)
        if capturing:
            act, gate_up = act
            emit(p + "mlp_gate_up", gate_up)
        emit(p + "mlp_act", act)
        m = o.linear(act, w[p + "mlp.down_proj.weight"])  # a partial sum under tensor parallelism
        # layer_scalar joins the post-FFN pass unless the PLE block sits between the add and the scale;
        # without the PLE block this pass ends the layer, so it also computes the next norm.
        scalar, ends = (None, None) if ple is not None else (w[p + "layer_scalar"], next_weight)
        if cfg.enable_moe_block:
            top_w, top_i = o.route(x, w[p + "router.scale"], w[p + "router.proj.weight"],
                                   w[p + "router.per_expert_scale"], cfg.top_k_experts, eps)
            if capturing:  # the router's choice, as the reference records it: int64, ascending per row
                emit(p + "experts", top_i.sort(dim=-1).values.to(torch.int64))
            xe = o.rms_norm(x, w[p + "pre_feedforward_layernorm_2.weight"], eps)
            moe = o.experts(xe, top_w, top_i, w[p + "experts.gate_up_proj"], w[p + "experts.down_proj"])
            m, moe = self._all_reduce_pair(m, moe)
            out = o.post_ffn_moe_residual_scale(
                m, moe, x, w[p + "post_feedforward_layernorm_1.weight"], w[p + "post_feedforward_layernorm_2.weight"],
                w[p + "post_feedforward_layernorm.weight"], eps, scalar, return_normed=capturing, next_weight=ends)
        else:
            out = o.post_ffn_residual_scale(self._all_reduce(m), x, w[p + "post_feedforward_layernorm.weight"],
                                            eps, scalar, return_normed=capturing, next_weight=ends)
        if ends is not None:
            x, normed, h = out
        else:
            x, normed = out if capturing else (out, None)
        if capturing:
            emit(p + "mlp_out", normed)

        if ple is not None:
            g = o.linear_gelu_mul(x, w[p + "per_layer_input_gate.weight"], ple[:, spec.index, :])
            # x = (x + post_per_layer_input_norm(projection)) * layer_scalar: the post-FFN pass's
            # math exactly (norm, add, scale, each rounded as there), so the same op and kernel;
            # it ends the layer, so it also computes the next norm.
            x, _, h = o.post_ffn_residual_scale(o.linear(g, w[p + "per_layer_projection.weight"]), x,
                                                w[p + "post_per_layer_input_norm.weight"], eps, w[p + "layer_scalar"],
                                                next_weight=next_weight)
        emit(p + "out", x)
        return x, h

    def attention(self, spec: LayerSpec, h, batch: ForwardBatch, emit) -> torch.Tensor:
        """The attention block on h [N, H], the residual stream's input norm (computed by the pass
        that ended the previous layer)."""
        w, o, eps = self.w, self.ops, self.config.rms_norm_eps
        p = f"layers.{spec.index}."
        N, hd, Hq = h.shape[0], spec.head_dim, self.config.num_attention_heads
        qkv = o.linear(h, self.fw[p + "qkv"])
        q = qkv[:, : Hq * hd].view(N, Hq, hd)  # column views of one projection: strided, not copied
        k = v = None
        if not spec.kv_shared:
            kv_width = spec.num_kv_heads * hd
            k = qkv[:, Hq * hd: Hq * hd + kv_width].view(N, -1, hd)
            # K=V full layers: V is the raw key projection, before k_norm and RoPE.
            v = qkv[:, Hq * hd + kv_width:].view(N, -1, hd) if spec.has_v_proj else k
        a = p + "self_attn."
        k_pool, v_pool = self.cache.buffers(spec)
        slots = batch.swa_out_slots if spec.is_sliding else batch.out_slots
        # q/k/v norms and RoPE, and K/V written to the pool before attention (kernels read every
        # key from the pool); a KV-shared layer (k = None) computes q only. One launch when fused.
        q = o.qkv_norm_rope_store(q, k, v, w[a + "q_norm.weight"], None if k is None else w[a + "k_norm.weight"], eps,
                                  batch.positions, self.inv_freq[spec.type], k_pool, v_pool, slots)
        emit(p + "q", q)
        if emit is not _no_emit:  # a shared layer's keys are its source's, read back at its own slots
            emit(p + "k", k_pool[slots])
            emit(p + "v", v_pool[slots])
        pages = batch.swa_page_table if spec.is_sliding else batch.page_table
        # Looked up at each call, not bound once: oracle faults patch this module's attention names.
        if self.attention_kind == "eager":
            decode, extend = decode_attention_eager, extend_attention_eager
        else:
            decode, extend = decode_attention, extend_attention
        if batch.is_decode:
            out = decode(q, k_pool, v_pool, pages, batch.page_size, batch.seq_lens, window=spec.window)
        else:
            out = extend(q, k_pool, v_pool, pages, batch.page_size, batch.cu_seqlens_q, batch.seq_lens,
                         window=spec.window)
        emit(p + "o", out)
        return self._all_reduce(o.linear(out.reshape(N, -1), w[a + "o_proj.weight"]))

    def _all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """A row-parallel projection's output summed over the ranks (itself without tp)."""
        return x if self.tp is None else self.tp.all_reduce(x)

    def _all_reduce_pair(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Two partial sums in one all-reduce: the dense MLP's and the experts' outputs, which are
        normed apart, so each must be whole before its norm."""
        if self.tp is None:
            return a, b
        both = self.tp.all_reduce(torch.stack([a, b]))  # [2, N, H]: each half stays contiguous
        return both[0], both[1]


def _no_emit(name: str, t: torch.Tensor) -> None:
    pass


def _emitter(taps: TapSink | None, batch: ForwardBatch):
    if taps is None:
        return _no_emit

    def emit(name: str, t: torch.Tensor) -> None:
        for item, start, end in batch.token_ranges():
            taps(item.rid, name, batch.positions[start:end], t[start:end].detach().clone())

    return emit
