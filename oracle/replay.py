"""Layer-local replay: recompute one tap in float64 from the upstream taps of the same capture.

The global judgement (oracle/compare.py) measures a tap against the truth, so its error and its
noise both carry everything earlier layers passed on; deep in a bfloat16 stack that inherited
error dwarfs what one stage adds. A replay removes it: feed a stage the capture's OWN inputs
(cast to float64) and run the reference's math on them. Then

    local error = metric(cand[T] vs replay(cand)[T])     what the candidate's stage T added
    local noise = metric(ref[T]  vs replay(ref)[T])      what the reference's stage T adds

(oracle/compare.py judges the pair with the usual Tolerance). The math is the reference's own:
its methods end at the tap boundaries (qkv, feed_forward, layer_out, lm_head), and this module
calls them on a capture's taps.

    replayer = Replayer(config, weights)       # weights in any dtype; kept in float64
    replayer.inputs("layers.3.o")              # ("layers.3.q", "layers.3.k", "layers.3.v")
    result = replayer.replay("layers.3.o", request_capture)   # Replayed, or Skipped(reason)

Stages and their inputs (STAGES below; `prev` is the previous layer's `out`, `embed` for layer 0):

    q           prev                      pre-attention norm, q_proj, q_norm, RoPE at the tap's positions
    k, v        prev                      k_proj / v_proj (or raw k on K=V layers), k_norm + RoPE / v_norm
    k, v        layers.{src}.k / .v       on a KV-shared layer: it attends with its source's final K / V
                                          at the same positions (an identity, exact by definition)
    o           q, k, v of the layer      causal (+ sliding window) attention, GQA, scale 1.0
    attn_out    prev, o                   o_proj, post-attention norm, residual add
    mlp_gate_up attn_out                  pre-feed-forward norm, gate and up projections
    mlp_act     mlp_gate_up               gelu_tanh(gate) * up
    mlp_out     attn_out                  dense MLP (+ router, top-k experts, branch norms on MoE)
    out         attn_out, mlp_out, (ple)  residual add, PLE block, layer_scalar
    final_norm  last layer's out
    logits      final_norm                tied lm head, softcap

Not replayed: `embed` and `ple` (their input is the token ids, which a capture does not hold) and
the pool taps `k_cache` / `v_cache` (optimized path only, so there is no reference noise for them;
the global judgement against the truth's k / v covers them), and the MoE `experts` taps (a choice,
not a value: mlp_out's replay recomputes it, and a wrong one shows there).

Two stages also return what the sharp checks of oracle/tolerance.py measure against (16-bit
compared dtypes only): `mlp_act` the reference's op sequence run in the compared dtype on the
capture's own gate/up (`Replayed.same_dtype`: a correct activation kernel reproduces it to within
a ULP), and `o` the output of the optimized kernels' documented rounding points before their final
store (`Replayed.documented`: where compiled, tl.dot takes the probabilities in the storage dtype,
optimized.kernels.DOT_IN_STORAGE_DTYPE; under the interpreter it takes float32 and this is None).

Rows a replay cannot define are left out, never guessed: attention rows whose visible keys are not
all in the capture (a request that reused a cached prefix has no taps for the prefix), and MoE rows
whose top-k choice is a near tie (see `replay_mlp_out`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from reference.config import Gemma4Config, LayerSpec
from reference.model import (Gemma4Reference, attend, attention_mask, gelu_tanh, moe_router_input, rms_norm,
                             rope_cos_sin)
from reference.weights import CastOnRead
from reference.window import first_visible_key, visible

import optimized.kernels

from .capture import RequestCapture, rows_at
from .taps import TapNameError, parse_tap

F64 = torch.float64

# A top-k choice is a near tie when the gap between the k-th and (k+1)-th router logits is under
# this many times their rounding scale in the compared dtype (see _near_tie): the capture's own
# rounding may flip such a choice, and then either expert set is a correct output. Measured on
# tiny-moe in bfloat16 (4 seeds x 6 prompts x 6 layers, 1440 rows): the reference's own flips
# against float64 all sat below 0.4 of the scale; 4 leaves 10x headroom and sets aside ~8% of rows.
ROUTER_TIE = 4.0


@dataclass(frozen=True)
class Replayed:
    """A replayed tap: float64 values [T, ...] on the capture's positions, and which rows are
    defined (None: all); `note` says why rows were left out."""

    values: torch.Tensor
    rows: torch.Tensor | None = None
    note: str | None = None
    same_dtype: torch.Tensor | None = None  # the reference's op sequence in the compared dtype (mlp_act)
    documented: torch.Tensor | None = None  # float64, with the kernels' documented roundings (o)


@dataclass(frozen=True)
class Skipped:
    """No replay for this tap in this capture, and why."""

    reason: str


@dataclass(frozen=True)
class Stage:
    inputs: Callable[[Gemma4Config, int | None], tuple[str, ...]]  # (config, layer) -> input tap names
    run: Callable[..., torch.Tensor | Replayed]  # (model, spec, *inputs, positions=[, compared_dtype=])
    wants_dtype: bool = False  # a discrete choice (MoE top-k) needs the compared dtype's rounding


# --------------------------------------------------------------------------------------
# One function per stage. Inputs are float64 [T, ...]; `positions` [T] are the capture's.
# --------------------------------------------------------------------------------------


def _qkv(m: Gemma4Reference, spec: LayerSpec, prev: torch.Tensor, positions: torch.Tensor):
    h = rms_norm(prev, m.w[_layer(spec) + "input_layernorm.weight"], m.config.rms_norm_eps)
    cos, sin = rope_cos_sin(m.config.rope[spec.type], spec.head_dim, positions, F64)
    return m.qkv(spec, h, cos, sin)


def replay_q(m: Gemma4Reference, spec: LayerSpec, prev: torch.Tensor, *, positions: torch.Tensor) -> torch.Tensor:
    return _qkv(m, spec, prev, positions)[0]


def replay_k(m: Gemma4Reference, spec: LayerSpec, prev: torch.Tensor, *, positions: torch.Tensor) -> torch.Tensor:
    # On a KV-shared layer `prev` is the source layer's k tap (see _kv_inputs).
    return prev if spec.kv_shared else _qkv(m, spec, prev, positions)[1]


def replay_v(m: Gemma4Reference, spec: LayerSpec, prev: torch.Tensor, *, positions: torch.Tensor) -> torch.Tensor:
    return prev if spec.kv_shared else _qkv(m, spec, prev, positions)[2]


def replay_o(m: Gemma4Reference, spec: LayerSpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
             positions: torch.Tensor, compared_dtype: torch.dtype | None = None) -> Replayed:
    # The mask is built from position values, so a capture that starts past 0 (a reused prefix)
    # still lines up; rows missing some visible key are computed but left out.
    mask = attention_mask(positions, spec.window, F64)
    o = attend(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], mask)[0].transpose(0, 1)
    documented = None
    if compared_dtype in LOW_PRECISION and optimized.kernels.DOT_IN_STORAGE_DTYPE:
        documented = attend_probs_rounded(q, k, v, mask, compared_dtype)
    needed = torch.tensor([p - first_visible_key(p, spec.window) + 1 for p in positions.tolist()],
                          device=positions.device)
    present = visible(positions[:, None], positions[None, :], spec.window).sum(dim=1)
    rows = present == needed
    if bool(rows.all()):
        return Replayed(o, documented=documented)
    return Replayed(o, rows, f"{int((~rows).sum())} query rows left out: some of their visible keys are "
                             f"not in the capture (e.g. a reused prefix)", documented=documented)


LOW_PRECISION = (torch.bfloat16, torch.float16)


def attend_probs_rounded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                         dtype: torch.dtype) -> torch.Tensor:
    """Attention in float64 with the compiled kernels' one extra rounding: the unnormalised
    probabilities exp(s - max) rounded to `dtype` before P @ V, the denominator summed from the
    unrounded ones (optimized/kernels/attention.py `_attend_block`). The row max is the final one,
    not the kernel's running max per key block: the relative rounding error is the same in
    distribution. q [T, Hq, D], k/v [S, Hkv, D] -> [T, Hq, D]."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1).transpose(0, 1), v.repeat_interleave(g, 1).transpose(0, 1)
    s = torch.matmul(q.transpose(0, 1), k.transpose(1, 2)) + mask
    p = torch.exp(s - s.amax(-1, keepdim=True))
    return (torch.matmul(p.to(dtype).to(F64), v) / p.sum(-1, keepdim=True)).transpose(0, 1)


def replay_attn_out(m: Gemma4Reference, spec: LayerSpec, prev: torch.Tensor, o: torch.Tensor, *,
                    positions: torch.Tensor) -> torch.Tensor:
    a = F.linear(o.reshape(o.shape[0], -1), m.w[_attn(spec) + "o_proj.weight"])
    return prev + rms_norm(a, m.w[_layer(spec) + "post_attention_layernorm.weight"], m.config.rms_norm_eps)


def replay_mlp_gate_up(m: Gemma4Reference, spec: LayerSpec, attn_out: torch.Tensor, *,
                       positions: torch.Tensor) -> torch.Tensor:
    p = _layer(spec)
    h = rms_norm(attn_out, m.w[p + "pre_feedforward_layernorm.weight"], m.config.rms_norm_eps)
    return torch.cat([F.linear(h, m.w[p + "mlp.gate_proj.weight"]), F.linear(h, m.w[p + "mlp.up_proj.weight"])], -1)


def replay_mlp_act(m: Gemma4Reference, spec: LayerSpec, gate_up: torch.Tensor, *, positions: torch.Tensor,
                   compared_dtype: torch.dtype | None = None) -> Replayed:
    """gelu_tanh(gate) * up in float64 and, in a 16-bit compared dtype, the reference's op sequence in
    that dtype on the same (capture's) gate and up: what a correct activation kernel reproduces."""
    gate, up = gate_up.chunk(2, dim=-1)
    same = None
    if compared_dtype in LOW_PRECISION:
        g, u = gate.to(compared_dtype).cpu(), up.to(compared_dtype).cpu()  # exact: the capture's own values
        same = gelu_tanh(g) * u
    return Replayed(gelu_tanh(gate) * up, same_dtype=same)


def replay_mlp_out(m: Gemma4Reference, spec: LayerSpec, attn_out: torch.Tensor, *, positions: torch.Tensor,
                   compared_dtype: torch.dtype | None = None) -> torch.Tensor | Replayed:
    """The feed-forward branch. On MoE models, rows whose top-k expert choice is a near tie
    (see _near_tie) are left out: the capture's own rounding may pick either expert set, and
    the two outputs differ by a whole expert."""
    out = m.feed_forward(spec, attn_out)
    if not m.config.enable_moe_block:
        return out
    rows = ~_near_tie(m, attn_out, _layer(spec), compared_dtype)
    if bool(rows.all()):
        return Replayed(out)
    return Replayed(out, rows, f"{int((~rows).sum())} rows left out: their top-{m.config.top_k_experts} expert "
                               f"choice is a near tie that rounding may flip")


def replay_out(m: Gemma4Reference, spec: LayerSpec, attn_out: torch.Tensor, mlp_out: torch.Tensor,
               ple: torch.Tensor | None = None, *, positions: torch.Tensor) -> torch.Tensor:
    return m.layer_out(spec, attn_out, mlp_out, None if ple is None else ple[:, spec.index, :])


def replay_final_norm(m: Gemma4Reference, spec: None, last_out: torch.Tensor, *,
                      positions: torch.Tensor) -> torch.Tensor:
    return rms_norm(last_out, m.w["norm.weight"], m.config.rms_norm_eps)


def replay_logits(m: Gemma4Reference, spec: None, final_norm: torch.Tensor, *, positions: torch.Tensor) -> torch.Tensor:
    return m.lm_head(final_norm)


# --------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------


def _layer(spec: LayerSpec) -> str:
    return f"layers.{spec.index}."


def _attn(spec: LayerSpec) -> str:
    return f"layers.{spec.index}.self_attn."


# A router logit gap within this many times the reference's own movement of that row's router
# logits (both against the truth) is one a second draw of the same noise may close.
GLOBAL_TIE = 3.0


def _router(m: Gemma4Reference, r: torch.Tensor, p: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(the router's scaled input z, its logits) for residual rows r at layer prefix p."""
    z = moe_router_input(r, m.w[p + "router.scale"], m.config.rms_norm_eps)
    return z, F.linear(z, m.w[p + "router.proj.weight"])


def _near_tie(m: Gemma4Reference, r: torch.Tensor, p: str, compared_dtype: torch.dtype | None,
              router: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Rows whose k-th and (k+1)-th router logits are closer than rounding in the compared dtype
    can separate. A logit l_i = sum_j W_ij z_j picks up rounding from z (normed and scaled in
    that dtype) and from its own store: its scale is eps * (||W_i * z||_2 + |l_i|). `router`:
    _router(m, r, p) where the caller has it."""
    cfg = m.config
    if compared_dtype is None or cfg.top_k_experts >= cfg.num_experts:
        return torch.zeros(r.shape[0], dtype=torch.bool, device=r.device)
    z, logits = router if router is not None else _router(m, r, p)
    proj = m.w[p + "router.proj.weight"]
    scale = torch.finfo(compared_dtype).eps * (torch.sqrt((z * z) @ (proj * proj).T) + logits.abs())
    top = logits.topk(cfg.top_k_experts + 1, dim=-1)
    gap = top.values[:, -2] - top.values[:, -1]
    pair = scale.gather(1, top.indices[:, -2:])
    return gap < ROUTER_TIE * pair.pow(2).sum(dim=-1).sqrt()


# --------------------------------------------------------------------------------------
# The table: stage -> input taps
# --------------------------------------------------------------------------------------


def _prev(layer: int) -> str:
    return "embed" if layer == 0 else f"layers.{layer - 1}.out"


def _own(*kinds: str) -> Callable[[Gemma4Config, int | None], tuple[str, ...]]:
    return lambda cfg, layer: tuple(f"layers.{layer}.{k}" for k in kinds)


def _kv_inputs(kind: str) -> Callable[[Gemma4Config, int | None], tuple[str, ...]]:
    def inputs(cfg: Gemma4Config, layer: int | None) -> tuple[str, ...]:
        spec = cfg.layers[layer]
        return (f"layers.{spec.kv_source}.{kind}",) if spec.kv_shared else (_prev(layer),)

    return inputs


STAGES: dict[str, Stage] = {
    "q": Stage(lambda cfg, layer: (_prev(layer),), replay_q),
    "k": Stage(_kv_inputs("k"), replay_k),
    "v": Stage(_kv_inputs("v"), replay_v),
    "o": Stage(_own("q", "k", "v"), replay_o, wants_dtype=True),
    "attn_out": Stage(lambda cfg, layer: (_prev(layer), f"layers.{layer}.o"), replay_attn_out),
    "mlp_gate_up": Stage(_own("attn_out"), replay_mlp_gate_up),
    "mlp_act": Stage(_own("mlp_gate_up"), replay_mlp_act, wants_dtype=True),
    "mlp_out": Stage(_own("attn_out"), replay_mlp_out, wants_dtype=True),
    "out": Stage(lambda cfg, layer: (f"layers.{layer}.attn_out", f"layers.{layer}.mlp_out")
                 + (("ple",) if cfg.has_ple else ()), replay_out),
    "final_norm": Stage(lambda cfg, layer: (f"layers.{cfg.num_hidden_layers - 1}.out",), replay_final_norm),
    "logits": Stage(lambda cfg, layer: ("final_norm",), replay_logits),
}


NO_TIE = 2 ** 40  # Replayer.routing_ties of a row whose expert choices are all clear


class Replayer:
    """Replays taps of captures taken with one model (`config` and its weights)."""

    def routing_ties(self, truth: RequestCapture, ref: RequestCapture | None,
                     compared_dtype: torch.dtype | None) -> torch.Tensor | None:
        """Per truth row, the first layer whose top-k expert choice a correct path in the compared
        dtype may flip (NO_TIE where none), or None on models without experts. Past such a layer
        the row of a correct path may carry a whole other expert's output. Globally (against the
        truth) a choice is close when its k-th/(k+1)-th router logit gap is within rounding of this
        stage (_near_tie) or within GLOBAL_TIE times how far the reference's own input, carrying
        what earlier layers passed on, moves the router logits of that row."""
        cfg = self.config
        if not cfg.enable_moe_block or compared_dtype is None or ref is None or cfg.top_k_experts >= cfg.num_experts:
            return None
        first = torch.full((truth.positions.numel(),), NO_TIE, dtype=torch.long)
        at, absent = rows_at(ref.positions, truth.positions)
        for spec in cfg.layers:
            name = f"layers.{spec.index}.attn_out"
            if name not in truth.taps or name not in ref.taps or absent:
                return None
            p = _layer(spec)
            x = truth.taps[name].to(device=self.model.device, dtype=F64)
            y = ref.taps[name][at].to(device=self.model.device, dtype=F64)
            router = _router(self.model, x, p)
            lt, lr = router[1], _router(self.model, y, p)[1]
            top = lt.topk(cfg.top_k_experts + 1, dim=-1).values
            moved = (lr - lt).abs().max(dim=-1).values
            tie = _near_tie(self.model, x, p, compared_dtype, router) | (top[:, -2] - top[:, -1] < GLOBAL_TIE * moved)
            first = torch.where(tie.cpu() & (first == NO_TIE), spec.index, first)
        return first

    def __init__(self, config: Gemma4Config, weights: Mapping[str, torch.Tensor]):
        # Weights stay on their device and are cast to float64 as each is read (a 31B model's
        # float64 copy would not fit beside it); captures live on the CPU, so inputs go to the
        # weights and results come back.
        self.config = config
        self.model = Gemma4Reference(config, CastOnRead(weights, F64))

    def inputs(self, tap: str) -> tuple[str, ...] | None:
        """The taps `tap` is replayed from, or None when it has no replay."""
        try:
            t = parse_tap(tap)
        except TapNameError:
            return None
        stage = STAGES.get(t.kind)
        if stage is None or (t.layer is not None and t.layer >= self.config.num_hidden_layers):
            return None
        return stage.inputs(self.config, t.layer)

    def replay(self, tap: str, request: RequestCapture,
               compared_dtype: torch.dtype | None = None) -> Replayed | Skipped:
        """Recompute `tap` of one request from that request's own input taps. `compared_dtype`
        (the captures' dtype) sets how close a MoE top-k choice may come to a tie."""
        inputs = self.inputs(tap)
        if inputs is None:
            return Skipped(f"{tap} has no local replay (its inputs are not taps, or it is a pool or experts tap)")
        absent = [name for name in inputs if name not in request.taps]
        if absent:
            return Skipped(f"input {', '.join(absent)} not in the capture")
        positions = request.positions_of(tap)
        for name in inputs:
            if not torch.equal(request.positions_of(name), positions):
                return Skipped(f"input {name} covers other positions than {tap}")
        t = parse_tap(tap)
        spec = None if t.layer is None else self.config.layers[t.layer]
        device = self.model.device
        args = [request.taps[name].detach().to(device, F64) for name in inputs]
        stage = STAGES[t.kind]
        extra = {"compared_dtype": compared_dtype} if stage.wants_dtype else {}
        try:
            with torch.no_grad():
                result = stage.run(self.model, spec, *args, positions=positions.to(device), **extra)
        except (RuntimeError, ValueError, IndexError) as e:  # torch's shape errors: a capture of another shape
            return Skipped(f"its inputs do not fit the model ({str(e).splitlines()[0]})")
        if not isinstance(result, Replayed):
            result = Replayed(result)
        rows = None if result.rows is None else result.rows.cpu()
        return Replayed(result.values.cpu(), rows, result.note, _cpu(result.same_dtype), _cpu(result.documented))


def _cpu(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.cpu()
