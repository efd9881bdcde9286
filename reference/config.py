"""Gemma4Config: the one model description both paths use.

Read from a Hugging Face config.json (text config at top level, or nested under `text_config`),
in either spelling of the full-layer head size and KV heads (`global_head_dim` /
`num_global_key_value_heads` up to transformers 5.14, `per_layer_config` from 5.15 on).
Everything a forward needs per layer is derived once, in `LayerSpec`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .fileio import parse_json

SLIDING = "sliding_attention"
FULL = "full_attention"
LAYER_TYPES = (SLIDING, FULL)


class ConfigError(ValueError):
    """A config is missing a field, has a wrong-typed one, or describes an impossible model."""


@dataclass(frozen=True)
class RopeSpec:
    """RoPE of one layer type. `rotary_pairs` pairs (d, d + head_dim/2) rotate; the rest pass through."""

    kind: str  # "default" or "proportional"
    theta: float
    partial_rotary_factor: float = 1.0
    factor: float = 1.0  # proportional only: inv_freq /= factor


@dataclass(frozen=True)
class LayerSpec:
    index: int
    type: str  # SLIDING or FULL
    head_dim: int
    num_kv_heads: int
    kv_shared: bool  # reads K/V of `kv_source`, owns no K/V projection
    kv_source: int  # the layer whose K/V this layer attends with (itself when not shared)
    has_v_proj: bool  # False on K=V full layers: V comes from the raw K projection
    mlp_width: int
    window: int | None  # sliding window W, None on full layers

    @property
    def is_sliding(self) -> bool:
        return self.type == SLIDING


@dataclass(frozen=True)
class Gemma4Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    global_head_dim: int
    layer_types: tuple[str, ...]
    sliding_window: int
    num_global_key_value_heads: int | None = None
    attention_k_eq_v: bool = False
    final_logit_softcapping: float | None = None
    rms_norm_eps: float = 1e-6
    rope: dict[str, RopeSpec] = field(default_factory=lambda: dict(DEFAULT_ROPE))
    hidden_size_per_layer_input: int = 0
    vocab_size_per_layer_input: int = 0
    num_kv_shared_layers: int = 0
    use_double_wide_mlp: bool = False
    enable_moe_block: bool = False
    num_experts: int | None = None
    top_k_experts: int | None = None
    moe_intermediate_size: int | None = None
    hidden_activation: str = "gelu_pytorch_tanh"
    pad_token_id: int = 0
    eos_token_id: tuple[int, ...] = (1,)
    bos_token_id: int = 2
    max_position_embeddings: int = 131072

    def __post_init__(self):
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        _validate(self)
        object.__setattr__(self, "layers", tuple(_derive_layer(self, i) for i in range(self.num_hidden_layers)))

    # -- derived quantities -------------------------------------------------------------
    layers: tuple[LayerSpec, ...] = field(init=False, repr=False, compare=False)

    @property
    def first_shared_layer(self) -> int:
        return self.num_hidden_layers - self.num_kv_shared_layers

    @property
    def has_ple(self) -> bool:
        return self.hidden_size_per_layer_input > 0

    def replace(self, **changes) -> Gemma4Config:
        return dataclasses.replace(self, **changes)

    # -- Hugging Face config.json ---------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> Gemma4Config:
        return _from_hf_dict(raw)

    @classmethod
    def from_json_file(cls, path: str | Path) -> Gemma4Config:
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise ConfigError(f"{path}: no config.json") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text ({e})") from None
        try:
            raw = parse_json(text)
        except ValueError as e:
            raise ConfigError(f"{path}: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object, got {type(raw).__name__}")
        return _from_hf_dict(raw)

    def to_hf_dict(self) -> dict[str, Any]:
        """A `gemma4_text` config.json that transformers loads (any version >= 5.5.2)."""
        d = {
            "model_type": "gemma4_text",
            "architectures": ["Gemma4ForCausalLM"],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "global_head_dim": self.global_head_dim,
            "num_global_key_value_heads": self.num_global_key_value_heads,
            "attention_k_eq_v": self.attention_k_eq_v,
            "layer_types": list(self.layer_types),
            "sliding_window": self.sliding_window,
            "final_logit_softcapping": self.final_logit_softcapping,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": {t: _rope_to_hf(r) for t, r in self.rope.items()},
            "hidden_size_per_layer_input": self.hidden_size_per_layer_input,
            "vocab_size_per_layer_input": self.vocab_size_per_layer_input,
            "num_kv_shared_layers": self.num_kv_shared_layers,
            "use_double_wide_mlp": self.use_double_wide_mlp,
            "enable_moe_block": self.enable_moe_block,
            "num_experts": self.num_experts,
            "top_k_experts": self.top_k_experts,
            "moe_intermediate_size": self.moe_intermediate_size,
            "hidden_activation": self.hidden_activation,
            "pad_token_id": self.pad_token_id,
            "eos_token_id": list(self.eos_token_id),
            "bos_token_id": self.bos_token_id,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": True,
            "attention_bias": False,
        }
        return d


DEFAULT_ROPE = {
    SLIDING: RopeSpec("default", 10_000.0),
    FULL: RopeSpec("proportional", 1_000_000.0, partial_rotary_factor=0.25),
}


def _rope_to_hf(r: RopeSpec) -> dict[str, Any]:
    d: dict[str, Any] = {"rope_type": r.kind, "rope_theta": r.theta}
    if r.partial_rotary_factor != 1.0:
        d["partial_rotary_factor"] = r.partial_rotary_factor
    if r.factor != 1.0:
        d["factor"] = r.factor
    return d


# --------------------------------------------------------------------------------------
# Validation and per-layer derivation
# --------------------------------------------------------------------------------------


def _validate(c: Gemma4Config) -> None:
    positive = [
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "global_head_dim", "sliding_window",
    ]
    for name in positive:
        _check_int(name, getattr(c, name), minimum=1)
    for name in ["hidden_size_per_layer_input", "vocab_size_per_layer_input", "num_kv_shared_layers"]:
        _check_int(name, getattr(c, name), minimum=0)
    if len(c.layer_types) != c.num_hidden_layers:
        raise ConfigError(
            f"layer_types: has {len(c.layer_types)} entries but num_hidden_layers is {c.num_hidden_layers}")
    for i, t in enumerate(c.layer_types):
        if t not in LAYER_TYPES:
            raise ConfigError(f"layer_types[{i}]: {t!r} is not one of {LAYER_TYPES}")
    if c.layer_types[-1] != FULL:
        raise ConfigError(f"layer_types[{c.num_hidden_layers - 1}]: the last layer must be {FULL!r}, got {c.layer_types[-1]!r}")
    if c.head_dim % 2 or c.global_head_dim % 2:
        raise ConfigError("head_dim/global_head_dim: RoPE needs even head sizes")
    if c.num_attention_heads % c.num_key_value_heads:
        raise ConfigError(
            f"num_key_value_heads: {c.num_key_value_heads} does not divide num_attention_heads {c.num_attention_heads}")
    if c.attention_k_eq_v:
        if c.num_global_key_value_heads is None:
            raise ConfigError("num_global_key_value_heads: required when attention_k_eq_v is true")
        _check_int("num_global_key_value_heads", c.num_global_key_value_heads, minimum=1)
        if c.num_attention_heads % c.num_global_key_value_heads:
            raise ConfigError(
                f"num_global_key_value_heads: {c.num_global_key_value_heads} does not divide "
                f"num_attention_heads {c.num_attention_heads}")
    if c.num_kv_shared_layers >= c.num_hidden_layers:
        raise ConfigError(
            f"num_kv_shared_layers: {c.num_kv_shared_layers} leaves no layer to produce K/V "
            f"(num_hidden_layers {c.num_hidden_layers})")
    if c.num_kv_shared_layers:
        producers = set(c.layer_types[: c.num_hidden_layers - c.num_kv_shared_layers])
        for t in set(c.layer_types[c.num_hidden_layers - c.num_kv_shared_layers:]) - producers:
            raise ConfigError(
                f"layer_types: no {t!r} layer before the first KV-shared layer "
                f"{c.num_hidden_layers - c.num_kv_shared_layers} to share K/V from (num_kv_shared_layers)")
    if c.hidden_size_per_layer_input and c.vocab_size_per_layer_input < 1:
        raise ConfigError("vocab_size_per_layer_input: must be >= 1 when hidden_size_per_layer_input > 0")
    if c.enable_moe_block:
        for name in ["num_experts", "top_k_experts", "moe_intermediate_size"]:
            if getattr(c, name) is None:
                raise ConfigError(f"{name}: required when enable_moe_block is true")
            _check_int(name, getattr(c, name), minimum=1)
        if c.top_k_experts > c.num_experts:
            raise ConfigError(f"top_k_experts: {c.top_k_experts} exceeds num_experts {c.num_experts}")
    if c.hidden_activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ConfigError(f"hidden_activation: {c.hidden_activation!r} is not supported (Gemma 4 uses gelu_pytorch_tanh)")
    if c.final_logit_softcapping is not None and not c.final_logit_softcapping > 0:
        raise ConfigError(f"final_logit_softcapping: must be positive or null, got {c.final_logit_softcapping}")
    if not (isinstance(c.rms_norm_eps, (int, float)) and c.rms_norm_eps > 0):
        raise ConfigError(f"rms_norm_eps: must be a positive number, got {c.rms_norm_eps!r}")
    for t in set(c.layer_types):
        if t not in c.rope:
            raise ConfigError(f"rope_parameters: no entry for layer type {t!r}")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name}: expected an integer, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ConfigError(f"{name}: must be >= {minimum}, got {value}")


def _derive_layer(c: Gemma4Config, i: int) -> LayerSpec:
    t = c.layer_types[i]
    full = t == FULL
    shared = c.num_kv_shared_layers > 0 and i >= c.first_shared_layer
    if shared:
        # The last non-shared layer of the same type (GEMMA4_SPEC.md section 4), not an offset.
        source = max(j for j in range(c.first_shared_layer) if c.layer_types[j] == t)
    else:
        source = i
    k_eq_v = full and c.attention_k_eq_v
    return LayerSpec(
        index=i,
        type=t,
        head_dim=c.global_head_dim if full else c.head_dim,
        num_kv_heads=c.num_global_key_value_heads if k_eq_v else c.num_key_value_heads,
        kv_shared=shared,
        kv_source=source,
        has_v_proj=not k_eq_v,
        mlp_width=c.intermediate_size * (2 if c.use_double_wide_mlp and shared else 1),
        window=None if full else c.sliding_window,
    )


# --------------------------------------------------------------------------------------
# Parsing config.json
# --------------------------------------------------------------------------------------

_REQUIRED = {
    "vocab_size": int, "hidden_size": int, "intermediate_size": int, "num_hidden_layers": int,
    "num_attention_heads": int, "num_key_value_heads": int, "head_dim": int,
}
_OPTIONAL = {
    "sliding_window": (int, 512),
    "attention_k_eq_v": (bool, False),
    "final_logit_softcapping": ((int, float, type(None)), None),
    "rms_norm_eps": ((int, float), 1e-6),
    "hidden_size_per_layer_input": (int, 256),
    "vocab_size_per_layer_input": (int, 262144),
    "num_kv_shared_layers": (int, 0),
    "use_double_wide_mlp": (bool, False),
    "enable_moe_block": (bool, False),
    "num_experts": ((int, type(None)), None),
    "top_k_experts": ((int, type(None)), None),
    "moe_intermediate_size": ((int, type(None)), None),
    "hidden_activation": (str, "gelu_pytorch_tanh"),
    "pad_token_id": ((int, type(None)), 0),
    "bos_token_id": ((int, type(None)), 2),
    "max_position_embeddings": (int, 131072),
}


def _typed(raw: dict, name: str, types, default=None, required=False):
    if name not in raw:
        if required:
            raise ConfigError(f"{name}: missing")
        return default
    value = raw[name]
    bad_bool = isinstance(value, bool) and types in (int, (int, float), (int, type(None)), (int, float, type(None)))
    if bad_bool or not isinstance(value, types):
        want = types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types)
        raise ConfigError(f"{name}: expected {want}, got {type(value).__name__} {value!r}")
    return value


def _from_hf_dict(raw: dict[str, Any]) -> Gemma4Config:
    if "text_config" in raw:  # multimodal `gemma4` wrapper
        raw = raw["text_config"]
        if not isinstance(raw, dict):
            raise ConfigError("text_config: expected an object")
    model_type = raw.get("model_type", "gemma4_text")
    if model_type not in ("gemma4_text", "gemma4"):
        raise ConfigError(f"model_type: {model_type!r} is not a Gemma 4 text config")
    if raw.get("use_bidirectional_attention") == "all":
        raise ConfigError("use_bidirectional_attention: 'all' (non-causal) is not supported; no released checkpoint uses it")

    kw: dict[str, Any] = {n: _typed(raw, n, t, required=True) for n, t in _REQUIRED.items()}
    for n, (t, default) in _OPTIONAL.items():
        kw[n] = _typed(raw, n, t, default)
    if kw["pad_token_id"] is None:
        kw["pad_token_id"] = 0
    if kw["bos_token_id"] is None:
        kw["bos_token_id"] = 2
    eos = raw.get("eos_token_id", 1)
    kw["eos_token_id"] = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())

    n_layers = kw["num_hidden_layers"]
    layer_types = raw.get("layer_types")
    if layer_types is None:  # transformers' default pattern: every sixth layer is full
        layer_types = [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(n_layers)]
    if not isinstance(layer_types, list) or not all(isinstance(t, str) for t in layer_types):
        raise ConfigError(f"layer_types: expected a list of strings, got {layer_types!r}")
    kw["layer_types"] = tuple(layer_types)

    global_head_dim, global_kv = _full_layer_shape(raw, kw)
    kw["global_head_dim"] = global_head_dim
    kw["num_global_key_value_heads"] = global_kv
    kw["rope"] = _parse_rope(raw.get("rope_parameters"))
    return Gemma4Config(**kw)


def _full_layer_shape(raw: dict, kw: dict) -> tuple[int, int | None]:
    """Full-layer head size and K=V head count from either spelling of the config."""
    plc = raw.get("per_layer_config")
    if plc is None:
        ghd = _typed(raw, "global_head_dim", int, 512)
        gkv = _typed(raw, "num_global_key_value_heads", (int, type(None)), None)
        return ghd, gkv
    if not isinstance(plc, dict):
        raise ConfigError(f"per_layer_config: expected an object keyed by layer index or type, got {type(plc).__name__}")
    layer_types = kw["layer_types"]
    per_layer: list[dict] = [{} for _ in layer_types]
    for key, entry in plc.items():
        if not isinstance(entry, dict):
            raise ConfigError(f"per_layer_config[{key!r}]: expected an object, got {type(entry).__name__}")
        if key in LAYER_TYPES:
            targets = [i for i, t in enumerate(layer_types) if t == key]
        elif str(key).isdigit() and int(key) < len(layer_types):
            targets = [int(key)]
        else:
            raise ConfigError(f"per_layer_config: key {key!r} is neither a layer index below "
                              f"{len(layer_types)} nor a layer type")
        for i in targets:
            per_layer[i].update(entry)
    head_dims = {}
    kv_heads = {}
    for i, (t, entry) in enumerate(zip(layer_types, per_layer)):
        hd = entry.get("head_dim", kw["head_dim"])
        nkv = entry.get("num_key_value_heads", kw["num_key_value_heads"])
        _check_int(f"per_layer_config[{i}].head_dim", hd, 1)
        _check_int(f"per_layer_config[{i}].num_key_value_heads", nkv, 1)
        head_dims.setdefault(t, set()).add(hd)
        kv_heads.setdefault(t, set()).add(nkv)
    if head_dims.get(SLIDING, {kw["head_dim"]}) != {kw["head_dim"]}:
        raise ConfigError(f"per_layer_config: sliding layers must use head_dim {kw['head_dim']}, "
                          f"got {sorted(head_dims[SLIDING])}")
    if kv_heads.get(SLIDING, {kw["num_key_value_heads"]}) != {kw["num_key_value_heads"]}:
        raise ConfigError("per_layer_config: sliding layers must use num_key_value_heads "
                          f"{kw['num_key_value_heads']}, got {sorted(kv_heads[SLIDING])}")
    if len(head_dims.get(FULL, ())) > 1 or len(kv_heads.get(FULL, ())) > 1:
        raise ConfigError("per_layer_config: full-attention layers disagree on head_dim or num_key_value_heads")
    ghd = next(iter(head_dims.get(FULL, {512})))
    full_kv = next(iter(kv_heads.get(FULL, {kw["num_key_value_heads"]})))
    if full_kv != kw["num_key_value_heads"] and not kw["attention_k_eq_v"]:
        raise ConfigError("per_layer_config: full layers have their own num_key_value_heads, "
                          "which Gemma 4 allows only with attention_k_eq_v")
    return ghd, (full_kv if kw["attention_k_eq_v"] else None)


def _parse_rope(rp: Any) -> dict[str, RopeSpec]:
    if rp is None:
        return dict(DEFAULT_ROPE)
    if not isinstance(rp, dict):
        raise ConfigError(f"rope_parameters: expected an object keyed by layer type, got {type(rp).__name__}")
    out = dict(DEFAULT_ROPE)
    for t, p in rp.items():
        if t not in LAYER_TYPES:
            raise ConfigError(f"rope_parameters: unknown layer type {t!r}")
        if not isinstance(p, dict):
            raise ConfigError(f"rope_parameters[{t!r}]: expected an object")
        kind = p.get("rope_type", "default")
        if kind not in ("default", "proportional"):
            raise ConfigError(f"rope_parameters[{t!r}].rope_type: {kind!r} is not supported (default, proportional)")
        theta = p.get("rope_theta")
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
            raise ConfigError(f"rope_parameters[{t!r}].rope_theta: expected a positive number, got {theta!r}")
        prf = p.get("partial_rotary_factor", 1.0)
        factor = p.get("factor", 1.0)
        for name, v in (("partial_rotary_factor", prf), ("factor", factor)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise ConfigError(f"rope_parameters[{t!r}].{name}: expected a positive number, got {v!r}")
        out[t] = RopeSpec(kind, float(theta), float(prf), float(factor))
    return out

