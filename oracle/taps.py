"""Tap names: what each named tensor is, where it sits in the dataflow, and how its axes read.

A tap name is either model-level (`embed`, `ple`, `final_norm`, `logits`) or per layer
(`layers.{l}.{kind}`); shared/DESIGN.md ("Taps") defines the tensors. Every tap has the token
axis first; the axes after it are named here so that a report can say "position 7, head 2,
dim 13" instead of "index (7, 2, 13)".

The pool taps `layers.{l}.k_cache` / `.v_cache` exist only on the optimized path. They are
ordered right after `layers.{l}.v`: the pool is written before attention reads it, so a bad
write shows there before it shows in `layers.{l}.o`. Each is judged against the truth's
`layers.{l}.k` / `.v` (see `truth_counterpart`).

`layers.{l}.experts` (MoE layers only, not in DESIGN.md's table) holds integers, not activations:
the expert ids each position routes to, int64 [T, top_k] sorted ascending per row. It is not
judged numerically; the comparison counts the rows whose expert set differs from the truth's, and
oracle/run.py forces the float64 truth to each path's choices (docs/design_notes.md note 35).
"""

from __future__ import annotations

import re
from typing import Iterable, NamedTuple

HEAD_KINDS = ("embed", "ple")
# mlp_gate_up / mlp_act (not in DESIGN.md's table, which allows more): the dense MLP's fused
# gate|up projection [T, 2I] and its activation gelu_tanh(gate) * up [T, I], so that the activation
# is judged on its own (docs/design_notes.md, "mlp_act").
# experts: the MoE router's choice (sorted expert ids), between the dense MLP and mlp_out, whose
# expert branch it selects.
LAYER_KINDS = ("q", "k", "v", "k_cache", "v_cache", "o", "attn_out", "mlp_gate_up", "mlp_act", "experts", "mlp_out",
               "out")
MOE_KINDS = ("experts",)  # taps only MoE layers report
INTEGER_KINDS = ("experts",)  # integer taps: compared as choices, never judged numerically
TAIL_KINDS = ("final_norm", "logits")
CACHE_KINDS = {"k_cache": "k", "v_cache": "v"}  # pool tap -> the activation tap it must equal

# Axis names after the token axis (which is "position" for activations, "position" too for
# pool taps: a pool tap's rows are the positions that must be resident).
_AXES = {
    "embed": ("dim",),
    "ple": ("layer", "dim"),
    "q": ("head", "dim"),
    "k": ("head", "dim"),
    "v": ("head", "dim"),
    "k_cache": ("head", "dim"),
    "v_cache": ("head", "dim"),
    "o": ("head", "dim"),
    "attn_out": ("dim",),
    "mlp_gate_up": ("dim",),
    "mlp_act": ("dim",),
    "experts": ("slot",),
    "mlp_out": ("dim",),
    "out": ("dim",),
    "final_norm": ("dim",),
    "logits": ("vocab",),
}

_LAYER_TAP = re.compile(r"layers\.(0|[1-9][0-9]*)\.([a-z_]+)")


class TapNameError(ValueError):
    """A string that is not a tap name of shared/DESIGN.md."""


class Tap(NamedTuple):
    """A parsed tap name, `layer, kind = parse_tap(name)`: `layer` is None for model-level taps."""

    layer: int | None
    kind: str

    @property
    def name(self) -> str:
        return self.kind if self.layer is None else f"layers.{self.layer}.{self.kind}"

    @property
    def is_cache(self) -> bool:
        return self.kind in CACHE_KINDS

    @property
    def axes(self) -> tuple[str, ...]:
        """Names of all axes, the token axis first: e.g. ("position", "head", "dim")."""
        return ("position",) + _AXES[self.kind]

    def __str__(self) -> str:
        return self.name


def parse_tap(name: str) -> Tap:
    """`"layers.3.q"` -> Tap(3, "q"); `"logits"` -> Tap(None, "logits"). Raises TapNameError."""
    if not isinstance(name, str):
        raise TapNameError(f"tap name must be a string, got {type(name).__name__}")
    if name in HEAD_KINDS or name in TAIL_KINDS:
        return Tap(None, name)
    m = _LAYER_TAP.fullmatch(name)
    if m is None or m.group(2) not in LAYER_KINDS:
        raise TapNameError(
            f"{name!r} is not a tap name: expected one of {HEAD_KINDS + TAIL_KINDS} or "
            f"'layers.<l>.<kind>' with kind in {LAYER_KINDS}")
    return Tap(int(m.group(1)), m.group(2))


def tap_name(kind: str, layer: int | None = None) -> str:
    """The inverse of parse_tap, validated."""
    return parse_tap(kind if layer is None else f"layers.{layer}.{kind}").name


def is_cache_tap(name: str) -> bool:
    return parse_tap(name).is_cache


def is_integer_tap(name: str) -> bool:
    """A tap of integers (the MoE expert choice): compared as a choice, never judged numerically."""
    return parse_tap(name).kind in INTEGER_KINDS


def truth_counterpart(name: str) -> str:
    """The tap of the truth a candidate tap is compared with: itself, or k/v for a pool tap."""
    tap = parse_tap(name)
    if tap.is_cache:
        return tap_name(CACHE_KINDS[tap.kind], tap.layer)
    return tap.name


def tap_order(config, include_cache: bool = False) -> list[str]:
    """Canonical dataflow order of the taps a model with this config reports.

    `config` is a reference.config.Gemma4Config (anything with num_hidden_layers and has_ple).
    With include_cache, the optimized path's pool taps are listed after each layer's v; `experts`
    only where the model has a MoE block."""
    moe = getattr(config, "enable_moe_block", False)
    names = ["embed"] + (["ple"] if config.has_ple else [])
    for layer in range(config.num_hidden_layers):
        for kind in LAYER_KINDS:
            if (kind in CACHE_KINDS and not include_cache) or (kind in MOE_KINDS and not moe):
                continue
            names.append(f"layers.{layer}.{kind}")
    return names + list(TAIL_KINDS)


def order_key(name: str) -> tuple[int, int, int]:
    """A sort key that puts any tap names in dataflow order, no config needed."""
    tap = parse_tap(name)
    if tap.layer is None and tap.kind in HEAD_KINDS:
        return (0, 0, HEAD_KINDS.index(tap.kind))
    if tap.layer is None:
        return (2, 0, TAIL_KINDS.index(tap.kind))
    return (1, tap.layer, LAYER_KINDS.index(tap.kind))


def sort_taps(names: Iterable[str]) -> list[str]:
    """Tap names in dataflow order (raises TapNameError on a name that is not a tap)."""
    return sorted(names, key=order_key)


def tap_trailing_shape(config, name: str) -> tuple[int, ...]:
    """The shape after the token axis that shared/DESIGN.md gives this tap for `config`."""
    tap = parse_tap(name)
    H = config.hidden_size
    if tap.kind in ("embed", "final_norm"):
        return (H,)
    if tap.kind == "ple":
        return (config.num_hidden_layers, config.hidden_size_per_layer_input)
    if tap.kind == "logits":
        return (config.vocab_size,)
    if tap.layer >= config.num_hidden_layers:
        raise TapNameError(f"{name!r}: the model has {config.num_hidden_layers} layers")
    spec = config.layers[tap.layer]
    if tap.kind in ("q", "o"):
        return (config.num_attention_heads, spec.head_dim)
    if tap.kind in ("k", "v", "k_cache", "v_cache"):
        return (spec.num_kv_heads, spec.head_dim)
    if tap.kind == "mlp_gate_up":
        return (2 * spec.mlp_width,)
    if tap.kind == "mlp_act":
        return (spec.mlp_width,)
    if tap.kind == "experts":
        if not config.enable_moe_block:
            raise TapNameError(f"{name!r}: the model has no MoE block")
        return (config.top_k_experts,)
    return (H,)  # attn_out, mlp_out, out
