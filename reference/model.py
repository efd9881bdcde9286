"""The reference Gemma 4 text decoder: eager, dense masks, readable top to bottom.

It is the truth the optimized path is judged against, so each op follows GEMMA4_SPEC.md (and
transformers' eager Gemma 4) in its order and its dtype: norms and softmax in float32 (float64
when the model is float64), everything else in the model dtype.

Taps: pass `taps={}` to `forward` and it is filled with the named tensors of shared/DESIGN.md
("Taps"), cloned, each of shape [B, T, ...]. With `taps=None` (the default) nothing is copied.
MoE layers also record `layers.{l}.experts`, the chosen expert ids [B, T, top_k], int64, sorted
ascending per row.

Forced routing: `forward(ids, forced_experts={layer: ids [B*T, k]})` routes those layers to the
given experts instead of the router's own top-k; their weights are computed as for its own choice
(softmax probabilities at those ids, renormalized, times per_expert_scale). oracle/run.py uses it
to build a float64 truth that follows another path's expert choices (docs/design_notes.md note 35).
Without it nothing changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import Gemma4Config, LayerSpec, RopeSpec
from .window import visible
from .weights import Weights


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where HF upcasts to float32 (norms, softmax, RoPE angles); float64 stays float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Gemma 4 RMSNorm: multiplies by `w` (not `1 + w`); computes in float32."""
    xf = x.to(compute_dtype(x.dtype))
    y = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    if weight is not None:
        y = y * weight.to(y.dtype)
    return y.to(x.dtype)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def rope_inv_freq(rope: RopeSpec, head_dim: int, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """inv_freq of length head_dim/2. Proportional RoPE keeps the full head size in the exponent
    and zeroes the frequencies past `partial_rotary_factor` (GEMMA4_SPEC.md 3.4)."""
    if rope.kind == "proportional":
        n_rot = int(rope.partial_rotary_factor * head_dim // 2)
        exponent = torch.arange(0, 2 * n_rot, 2, dtype=torch.int64, device=device).to(dtype) / head_dim
        inv = 1.0 / (rope.theta ** exponent)
        inv = torch.cat([inv, torch.zeros(head_dim // 2 - n_rot, dtype=dtype, device=device)])
        return inv / rope.factor
    dim = int(head_dim * rope.partial_rotary_factor)
    exponent = torch.arange(0, dim, 2, dtype=torch.int64, device=device).to(dtype) / dim
    inv = 1.0 / (rope.theta ** exponent)
    return torch.cat([inv, torch.zeros(head_dim // 2 - inv.numel(), dtype=dtype, device=device)])


def rope_cos_sin(rope: RopeSpec, head_dim: int, positions: torch.Tensor, dtype: torch.dtype):
    """cos/sin tables [..., head_dim] for integer positions, angles in float32, cast to dtype."""
    cdt = compute_dtype(dtype)
    inv = rope_inv_freq(rope, head_dim, cdt, positions.device)
    freqs = positions[..., None].to(cdt) * inv
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half over the whole head. x: [..., T, heads, D]; cos/sin: [..., T, D]."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def attention_mask(positions: torch.Tensor, window: int | None, dtype: torch.dtype) -> torch.Tensor:
    """Additive [T, T] mask: 0 where visible, finfo(dtype).min where not (as HF's eager path)."""
    ok = visible(positions[:, None], positions[None, :], window)
    zero = torch.zeros((), dtype=dtype, device=positions.device)
    return torch.where(ok, zero, torch.finfo(dtype).min)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scaled-by-one dot-product attention. q: [B, Hq, T, D], k/v: [B, Hkv, S, D] -> [B, Hq, T, D]."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) + mask  # Gemma 4 attention scale is 1.0
    probs = torch.softmax(scores, dim=-1, dtype=compute_dtype(q.dtype)).to(q.dtype)
    return torch.matmul(probs, v)


def moe_router_input(r: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """The router's input z = rms_norm(r) * scale * H**-0.5 for the residual stream r [N, H]."""
    return rms_norm(r, None, eps) * scale * r.shape[-1] ** -0.5


def moe_route(r: torch.Tensor, scale: torch.Tensor, proj_w: torch.Tensor, per_expert_scale: torch.Tensor,
              top_k: int, eps: float, forced: torch.Tensor | None = None):
    """MoE router (GEMMA4_SPEC.md 3.5): top-k expert weights [N, k] and ids [N, k] for the
    residual stream r [N, H]; scale [H], proj_w [E, H] and per_expert_scale [E] are the router's
    weights. The MoE functions are pure functions of tensors (Gemma4Reference.route/.experts
    look the weights up and call them), so kernels' twins and tests need no model.

    `forced` [N, k]: route to these expert ids instead of the top-k, weighted as the top-k would
    be (the probabilities at them, renormalized, times per_expert_scale). They are listed in
    descending probability, as topk lists its own, so the renormalizing sum adds in the same
    order: forced to the router's own choice, the result is bitwise the unforced one."""
    z = moe_router_input(r, scale, eps)
    # Softmax in float32 (transformers >= 5.13; GEMMA4_SPEC.md section 9).
    probs = torch.softmax(F.linear(z, proj_w), dim=-1, dtype=compute_dtype(r.dtype))
    if forced is None:
        top_w, top_i = torch.topk(probs, k=top_k, dim=-1)
    else:
        ids = forced.to(device=probs.device, dtype=torch.long)
        if ids.shape != (*probs.shape[:-1], top_k):
            raise ValueError(f"forced expert ids must have shape {[*probs.shape[:-1], top_k]}, got {list(ids.shape)}")
        w = probs.gather(-1, ids)
        order = torch.sort(w, dim=-1, descending=True, stable=True).indices
        top_w, top_i = w.gather(-1, order), ids.gather(-1, order)
    top_w = top_w / top_w.sum(dim=-1, keepdim=True)
    return top_w * per_expert_scale[top_i], top_i


def moe_experts(xe: torch.Tensor, top_w: torch.Tensor, top_i: torch.Tensor, gate_up: torch.Tensor,
                down: torch.Tensor) -> torch.Tensor:
    """Routed experts for tokens xe [N, H] routed by (top_w, top_i) [N, k]: gate_up [E, 2I, H],
    down [E, H, I]. Each expert runs over all of its tokens in one matmul, in ascending expert
    order; an id outside [0, E) contributes nothing."""
    Im = down.shape[2]
    out = torch.zeros_like(xe)
    for e in range(gate_up.shape[0]):
        slot, tok = torch.where(top_i.T == e)
        if tok.numel() == 0:
            continue
        gu = F.linear(xe[tok], gate_up[e])
        y = F.linear(gelu_tanh(gu[:, :Im]) * gu[:, Im:], down[e])
        y = y * top_w[tok, slot, None]
        out.index_add_(0, tok, y.to(out.dtype))
    return out


class Gemma4Reference:
    """The eager model. Call it on token ids [T] or [B, T]; get logits [T, V] or [B, T, V]."""

    def __init__(self, config: Gemma4Config, weights: Weights):
        self.config = config
        self.w = weights
        first = next(iter(weights.values()))
        self.dtype, self.device = first.dtype, first.device

    def __call__(self, ids: torch.Tensor, taps: dict | None = None, forced_experts=None) -> torch.Tensor:
        return self.forward(ids, taps, forced_experts)

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, taps: dict | None = None, forced_experts=None) -> torch.Tensor:
        """`forced_experts`: None, or {layer index: expert ids [B*T, top_k]} (rows in batch, then
        position order) that MoE layers route to instead of their own top-k (module docstring)."""
        cfg, w = self.config, self.w
        squeeze = ids.dim() == 1
        ids = ids.reshape(1, -1) if squeeze else ids
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise ValueError(f"token ids must have shape [T] or [B, T] with T > 0, got {list(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= cfg.vocab_size):
            raise ValueError(f"token ids must lie in [0, {cfg.vocab_size}), got range "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        ids = ids.to(self.device)
        record = _recorder(taps)
        T = ids.shape[1]
        positions = torch.arange(T, device=self.device)

        x = self.embed(ids)
        record("embed", x)
        ple = self.per_layer_inputs(ids, x) if cfg.has_ple else None
        if ple is not None:
            record("ple", ple)

        masks = {t: attention_mask(positions, cfg.sliding_window if t == "sliding_attention" else None, self.dtype)
                 for t in set(cfg.layer_types)}
        rope = {}
        for spec in cfg.layers:
            if spec.type not in rope:
                rope[spec.type] = rope_cos_sin(cfg.rope[spec.type], spec.head_dim, positions, self.dtype)

        shared_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for spec in cfg.layers:
            forced = None if forced_experts is None else forced_experts.get(spec.index)
            x = self.layer(spec, x, ple, rope[spec.type], masks[spec.type], shared_kv, record, forced)

        x = rms_norm(x, w["norm.weight"], cfg.rms_norm_eps)
        record("final_norm", x)
        logits = self.lm_head(x)
        record("logits", logits)
        if taps is not None and squeeze:
            for k in list(taps):
                taps[k] = taps[k][0]
        return logits[0] if squeeze else logits

    # -- pieces, in dataflow order ------------------------------------------------------
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        table = self.w["embed_tokens.weight"]
        # HF holds sqrt(H) as a float32 tensor and casts it to the weight dtype (39.25 in bf16 for E2B).
        scale = torch.tensor(self.config.hidden_size ** 0.5, dtype=torch.float32).to(table.dtype)
        return table[ids] * scale.to(table.device)

    def per_layer_inputs(self, ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """PLE [B, T, L, P]: token table part plus a normed projection of the embedding."""
        cfg, w = self.config, self.w
        L, P = cfg.num_hidden_layers, cfg.hidden_size_per_layer_input
        table = w["embed_tokens_per_layer.weight"]
        scale = torch.tensor(P ** 0.5, dtype=torch.float32).to(table.dtype).to(table.device)
        token_part = (table[ids] * scale).reshape(*ids.shape, L, P)
        ctx = F.linear(x, w["per_layer_model_projection.weight"]) * cfg.hidden_size ** -0.5
        ctx = rms_norm(ctx.reshape(*ids.shape, L, P), w["per_layer_projection_norm.weight"], cfg.rms_norm_eps)
        return (ctx + token_part) * 2.0 ** -0.5

    def layer(self, spec: LayerSpec, x, ple, cos_sin, mask, shared_kv, record, forced=None) -> torch.Tensor:
        w, eps = self.w, self.config.rms_norm_eps
        p = f"layers.{spec.index}."
        h = rms_norm(x, w[p + "input_layernorm.weight"], eps)
        a = self.attention(spec, h, cos_sin, mask, shared_kv, record)
        x = x + rms_norm(a, w[p + "post_attention_layernorm.weight"], eps)
        record(p + "attn_out", x)
        m = self.feed_forward(spec, x, record, forced)
        record(p + "mlp_out", m)
        x = self.layer_out(spec, x, m, None if ple is None else ple[..., spec.index, :])
        record(p + "out", x)
        return x

    def feed_forward(self, spec: LayerSpec, x: torch.Tensor, record=None, forced=None) -> torch.Tensor:
        """The post-feed-forward-normed branch (tap mlp_out) from the stream after attention:
        dense MLP, plus the routed experts and their branch norms on MoE models (tap experts;
        `forced`: expert ids [N, k] to route to instead of the top-k)."""
        cfg, w, eps = self.config, self.w, self.config.rms_norm_eps
        p = f"layers.{spec.index}."
        m = self.mlp(rms_norm(x, w[p + "pre_feedforward_layernorm.weight"], eps), p, record)
        if cfg.enable_moe_block:
            m1 = rms_norm(m, w[p + "post_feedforward_layernorm_1.weight"], eps)
            flat = x.reshape(-1, x.shape[-1])
            weights, experts = self.route(flat, p, forced)
            if record is not None:
                record(p + "experts", experts.sort(dim=-1).values.to(torch.int64).reshape(*x.shape[:-1], -1))
            moe = self.experts(rms_norm(flat, w[p + "pre_feedforward_layernorm_2.weight"], eps), weights, experts, p)
            m2 = rms_norm(moe.reshape(x.shape), w[p + "post_feedforward_layernorm_2.weight"], eps)
            m = m1 + m2
        return rms_norm(m, w[p + "post_feedforward_layernorm.weight"], eps)

    def layer_out(self, spec: LayerSpec, x: torch.Tensor, m: torch.Tensor, ple: torch.Tensor | None) -> torch.Tensor:
        """The stream leaving the layer (tap out): residual add, the PLE block where the model has
        one (`ple`: this layer's per-layer input), layer_scalar."""
        w, eps = self.w, self.config.rms_norm_eps
        p = f"layers.{spec.index}."
        x = x + m
        if ple is not None:
            g = gelu_tanh(F.linear(x, w[p + "per_layer_input_gate.weight"])) * ple
            g = F.linear(g, w[p + "per_layer_projection.weight"])
            x = x + rms_norm(g, w[p + "post_per_layer_input_norm.weight"], eps)
        return x * w[p + "layer_scalar"]

    def attention(self, spec: LayerSpec, h, cos_sin, mask, shared_kv, record) -> torch.Tensor:
        w = self.w
        B, T, _ = h.shape
        q, k, v = self.qkv(spec, h, *cos_sin)
        if spec.kv_shared:
            k, v = shared_kv[spec.kv_source]
        else:
            shared_kv[spec.index] = (k, v)
        lp = f"layers.{spec.index}."
        record(lp + "q", q)
        record(lp + "k", k)
        record(lp + "v", v)
        o = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask).transpose(1, 2)
        record(lp + "o", o)
        return F.linear(o.reshape(B, T, -1), w[lp + "self_attn.o_proj.weight"])

    def qkv(self, spec: LayerSpec, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """q, k, v [..., heads, D] (taps q, k, v) from the pre-attention-normed stream h [..., H];
        k and v are None on a KV-shared layer (it attends with its source's)."""
        w, eps = self.w, self.config.rms_norm_eps
        p = f"layers.{spec.index}.self_attn."
        heads = (*h.shape[:-1], -1, spec.head_dim)
        q = apply_rope(rms_norm(F.linear(h, w[p + "q_proj.weight"]).view(heads), w[p + "q_norm.weight"], eps), cos, sin)
        if spec.kv_shared:
            return q, None, None
        k_raw = F.linear(h, w[p + "k_proj.weight"]).view(heads)
        # K=V full layers have no v_proj: V is the raw key projection (before k_norm and RoPE).
        v_raw = F.linear(h, w[p + "v_proj.weight"]).view(heads) if spec.has_v_proj else k_raw
        k = apply_rope(rms_norm(k_raw, w[p + "k_norm.weight"], eps), cos, sin)
        return q, k, rms_norm(v_raw, None, eps)

    def mlp(self, y: torch.Tensor, p: str, record=None) -> torch.Tensor:
        """Dense MLP; taps mlp_gate_up (the two projections side by side) and mlp_act."""
        w = self.w
        gate = F.linear(y, w[p + "mlp.gate_proj.weight"])
        up = F.linear(y, w[p + "mlp.up_proj.weight"])
        act = gelu_tanh(gate) * up
        if record is not None:
            record(p + "mlp_gate_up", torch.cat([gate, up], dim=-1))
            record(p + "mlp_act", act)
        return F.linear(act, w[p + "mlp.down_proj.weight"])

    def route(self, r: torch.Tensor, p: str, forced: torch.Tensor | None = None):
        """Router: top-k expert weights [N, k] and ids [N, k] for the residual stream r [N, H]
        (`forced`: the ids to route to instead, see moe_route)."""
        cfg, w = self.config, self.w
        return moe_route(r, w[p + "router.scale"], w[p + "router.proj.weight"], w[p + "router.per_expert_scale"],
                         cfg.top_k_experts, cfg.rms_norm_eps, forced)

    def experts(self, xe: torch.Tensor, top_w: torch.Tensor, top_i: torch.Tensor, p: str) -> torch.Tensor:
        """Routed experts, each over all of its tokens in one matmul, in ascending expert order."""
        return moe_experts(xe, top_w, top_i, self.w[p + "experts.gate_up_proj"], self.w[p + "experts.down_proj"])

    def lm_head(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x, self.w["embed_tokens.weight"])  # tied, unscaled, in dtype
        c = self.config.final_logit_softcapping
        if c is not None:
            logits = torch.tanh(logits / c) * c
        return logits


def _recorder(taps: dict | None):
    if taps is None:
        return _no_record

    def record(name: str, t: torch.Tensor) -> None:
        taps[name] = t.detach().clone()

    return record


def _no_record(name: str, t: torch.Tensor) -> None:
    pass

