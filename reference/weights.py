"""Gemma 4 text weights: the expected tensors, seeded random init, and safetensors I/O.

Weights are a flat dict keyed by Hugging Face names without the model prefix
(`embed_tokens.weight`, `layers.3.self_attn.q_proj.weight`, `layers.3.layer_scalar`, ...).
Both paths read this dict; `expected_shapes` is the one list of what a checkpoint must hold.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import ConfigError, Gemma4Config
from .fileio import parse_json, write_atomic
from .presets import PRESETS

Weights = dict[str, torch.Tensor]

TEXT_PREFIXES = ("model.language_model.", "model.")
# Towers and projections of the multimodal checkpoint that the text decoder never reads.
NON_TEXT_PREFIXES = ("model.vision_tower.", "model.embed_vision.", "model.audio_tower.", "model.embed_audio.",
                     "model.multi_modal_projector.")
SHARED_LAYER_UNUSED = ("self_attn.k_proj.weight", "self_attn.v_proj.weight",
                       "self_attn.k_norm.weight", "self_attn.v_norm.weight")


class CastOnRead(Mapping):
    """Weights read in another dtype, one tensor at a time: `w[name]` is `base[name].to(dtype)`.

    The float64 truth of a 31B model would need 248 GB as a copy; cast on each read, it holds
    one weight at a time beside the model's own. Reads cost a cast each (the truth runs once per
    scenario, so this is cheap next to the forward itself)."""

    def __init__(self, base: Mapping[str, torch.Tensor], dtype: torch.dtype):
        self.base, self.dtype = base, dtype

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.base[name].to(self.dtype)

    def __iter__(self):
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)


class CheckpointError(ValueError):
    """A checkpoint is unreadable, incomplete, or does not fit its config."""


@dataclass(frozen=True)
class Part:
    """A part of a tensor: along dimension `dim`, the index ranges `spans`, concatenated in order
    (one range for most tensor-parallel shards, two for a stacked [gate; up] one).

    It says which elements, not why: the rule that gives a rank its Part of each weight lives in
    optimized/parallel.py (`shard_part`). The same Part is cut from a tensor in memory (`take`)
    and read from a checkpoint file (`load_weights(part=...)`), so both give the same elements."""

    dim: int
    spans: tuple[range, ...]

    def shape(self, whole: tuple[int, ...]) -> tuple[int, ...]:
        """The part's shape, for a whole tensor of shape `whole`."""
        if not 0 <= self.dim < len(whole):
            raise ValueError(f"part along dim {self.dim} of a {len(whole)}-d tensor")
        for r in self.spans:
            if r.step != 1 or not 0 <= r.start <= r.stop <= whole[self.dim]:
                raise ValueError(f"part span {r} outside dim {self.dim} of size {whole[self.dim]}")
        return tuple(sum(map(len, self.spans)) if d == self.dim else n for d, n in enumerate(whole))

    def fill(self, whole: tuple[int, ...], read: Callable[[tuple[slice, ...]], torch.Tensor],
             dtype: torch.dtype, device) -> torch.Tensor:
        """A new tensor (dtype, device) holding the part: `read(index)` returns the whole tensor's
        elements at `index` (one span's slices), and each span is copied in (cast and moved) as it
        is read, so beside the result at most one span's elements exist at a time."""
        out = torch.empty(self.shape(tuple(whole)), dtype=dtype, device=device)
        at = 0
        for r in self.spans:
            out.narrow(self.dim, at, len(r)).copy_(read((slice(None),) * self.dim + (slice(r.start, r.stop),)))
            at += len(r)
        return out

    def take(self, t: torch.Tensor) -> torch.Tensor:
        """The part of `t`, copied out (same dtype and device), so `t` can be freed."""
        return self.fill(tuple(t.shape), t.__getitem__, t.dtype, t.device)


# part(name, whole shape) -> the Part of that tensor to keep, or None to keep it whole.
PartOf = Callable[[str, tuple[int, ...]], Part | None]


def expected_shapes(cfg: Gemma4Config) -> dict[str, tuple[int, ...]]:
    """Every tensor the text decoder reads, with its shape (GEMMA4_SPEC.md section 6)."""
    H, L, P = cfg.hidden_size, cfg.num_hidden_layers, cfg.hidden_size_per_layer_input
    Hq = cfg.num_attention_heads
    s: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (cfg.vocab_size, H), "norm.weight": (H,)}
    if P:
        s["embed_tokens_per_layer.weight"] = (cfg.vocab_size_per_layer_input, L * P)
        s["per_layer_model_projection.weight"] = (L * P, H)
        s["per_layer_projection_norm.weight"] = (P,)
    for spec in cfg.layers:
        p = f"layers.{spec.index}."
        hd, nkv, inter = spec.head_dim, spec.num_kv_heads, spec.mlp_width
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            s[p + norm + ".weight"] = (H,)
        s[p + "layer_scalar"] = (1,)
        s[p + "self_attn.q_proj.weight"] = (Hq * hd, H)
        s[p + "self_attn.q_norm.weight"] = (hd,)
        s[p + "self_attn.o_proj.weight"] = (H, Hq * hd)
        if not spec.kv_shared:
            s[p + "self_attn.k_proj.weight"] = (nkv * hd, H)
            s[p + "self_attn.k_norm.weight"] = (hd,)
            if spec.has_v_proj:
                s[p + "self_attn.v_proj.weight"] = (nkv * hd, H)
        s[p + "mlp.gate_proj.weight"] = (inter, H)
        s[p + "mlp.up_proj.weight"] = (inter, H)
        s[p + "mlp.down_proj.weight"] = (H, inter)
        if P:
            s[p + "per_layer_input_gate.weight"] = (P, H)
            s[p + "per_layer_projection.weight"] = (H, P)
            s[p + "post_per_layer_input_norm.weight"] = (H,)
        if cfg.enable_moe_block:
            E, Im = cfg.num_experts, cfg.moe_intermediate_size
            s[p + "router.proj.weight"] = (E, H)
            s[p + "router.scale"] = (H,)
            s[p + "router.per_expert_scale"] = (E,)
            s[p + "experts.gate_up_proj"] = (E, 2 * Im, H)
            s[p + "experts.down_proj"] = (E, H, Im)
            for norm in ("pre_feedforward_layernorm_2", "post_feedforward_layernorm_1",
                         "post_feedforward_layernorm_2"):
                s[p + norm + ".weight"] = (H,)
    return s


def parameter_count(cfg: Gemma4Config) -> int:
    return sum(math.prod(shape) for shape in expected_shapes(cfg).values())


def parameter_bytes(cfg: Gemma4Config, dtype: torch.dtype = torch.bfloat16) -> int:
    return parameter_count(cfg) * torch.empty((), dtype=dtype).element_size()


# --------------------------------------------------------------------------------------
# Seeded random init
# --------------------------------------------------------------------------------------


def _is_scale(name: str) -> bool:
    """Tensors that multiply (norm weights, layer_scalar, router scales). HF initialises them to
    one; we randomise them around one so a `w` vs `1 + w` or a dropped scale cannot hide."""
    return name.endswith("norm.weight") or name.endswith(("layer_scalar", "router.scale", "per_expert_scale")) \
        or "layernorm" in name


def _tensor_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


FINAL_NORM_GAIN = 6.0

# Init styles. "unit": every weight at unit scale (gains U(0.5, 1.5)); the tiny test presets use
# it, and the faults' expected taps and margins were calibrated on it. "checkpoint": the same draws
# with the gains a trained checkpoint's statistics need (docs/design_notes.md notes 10 and 14):
#   - q_norm and k_norm gains scaled so that attention scores (scale 1 on RMS-normed q and k) have
#     a standard deviation of about ATTENTION_SCORE_STD instead of sqrt(head_dim) (22.6 at head
#     size 512: a near one-hot softmax whose winner bf16 rounding flips);
#   - router.scale scaled so that the MoE router's logits have a standard deviation of about
#     ROUTER_LOGIT_STD instead of hidden_size ** -0.5 (0.02 at 26B-A4B: a near-uniform softmax whose
#     top-k is a near tie at every token);
#   - the tied embedding table scaled so that the scaled embedding has an RMS of about
#     EMBEDDING_SELF_LOGIT / sqrt(hidden_size) instead of 1, and the final norm's gain raised by the
#     inverse factor so that logits keep a std of about FINAL_NORM_GAIN. With unit embeddings the
#     residual stream keeps the input token's own embedding, and the tied lm_head turns it into a
#     logit sqrt(hidden_size) / RMS(stream) standard deviations above the rest (8 at E2B's last
#     layer): every position "predicts" its own token, by a margin no rounding can flip, so argmax
#     agreement says nothing. Scaled down, that self-logit is at most about EMBEDDING_SELF_LOGIT
#     standard deviations, below one once the stream has grown past the first layers.
# Both are gains on existing tensors, drawn from the same generators: the "unit" weights times a
# per-tensor constant, so a dropped or misplaced gain still shows.
UNIT, CHECKPOINT = "unit", "checkpoint"
INIT_STYLES = (UNIT, CHECKPOINT)
ATTENTION_SCORE_STD = 2.0
ROUTER_LOGIT_STD = 1.5
EMBEDDING_SELF_LOGIT = 2.0
# Models at least this wide get the "checkpoint" style by default: the real shapes (1536 and up),
# not the tiny test presets (64) nor anything else a test builds at small width.
CHECKPOINT_INIT_MIN_HIDDEN = 512
_UNIFORM_SECOND_MOMENT = 13.0 / 12.0  # E[u^2] for u ~ U(0.5, 1.5)


def default_init(cfg: Gemma4Config) -> str:
    """The init style random_weights uses for a config when none is asked for."""
    return CHECKPOINT if cfg.hidden_size >= CHECKPOINT_INIT_MIN_HIDDEN else UNIT


def init_gain(cfg: Gemma4Config, name: str, init: str) -> float:
    """The constant a "unit" tensor is multiplied by under `init` (1.0 for most tensors).

    q/k norm gains g ~ c * U(0.5, 1.5): the score q.k of unit-RMS q and k over D dims has
    std sqrt(D) * E[u^2] * c^2, so c^2 = ATTENTION_SCORE_STD / (sqrt(D) * E[u^2]).
    embed_tokens e ~ c * N(0, 1/H) and the final norm gain 6/c: logits x.e keep a std of about 6.
    router.scale s ~ c * U(0.5, 1.5): z = rms_norm(r) * s / sqrt(H) against a projection of std
    1/sqrt(H) gives logits of std c * sqrt(E[u^2] / H), so c = ROUTER_LOGIT_STD * sqrt(H / E[u^2])."""
    if init not in INIT_STYLES:
        raise ValueError(f"unknown init style {init!r}; known: {', '.join(INIT_STYLES)}")
    if init == UNIT:
        return FINAL_NORM_GAIN if name == "norm.weight" else 1.0
    embedding = EMBEDDING_SELF_LOGIT / math.sqrt(cfg.hidden_size)  # RMS of the scaled embedding
    if name == "embed_tokens.weight":
        return embedding
    if name == "norm.weight":
        return FINAL_NORM_GAIN / embedding
    if name.endswith(("self_attn.q_norm.weight", "self_attn.k_norm.weight")):
        layer = int(name.split(".")[1])
        head_dim = cfg.layers[layer].head_dim
        return math.sqrt(ATTENTION_SCORE_STD / (math.sqrt(head_dim) * _UNIFORM_SECOND_MOMENT))
    if name.endswith("router.scale"):
        return ROUTER_LOGIT_STD * math.sqrt(cfg.hidden_size / _UNIFORM_SECOND_MOMENT)
    return 1.0


def random_weights(cfg: Gemma4Config, seed: int = 0, dtype: torch.dtype = torch.float32,
                   device: str | torch.device = "cpu", init: str | None = None, part: PartOf | None = None
                   ) -> Weights:
    """Seeded random weights. Each tensor draws from its own generator seeded by (seed, name), so a
    tensor does not change when others are added. The same seed gives the same weights on the same
    device type. On the meta device nothing is allocated (for sizing real shapes).

    `init` ("unit" or "checkpoint", see INIT_STYLES; default: `default_init(cfg)`) picks the
    gains: the two styles draw the same numbers and differ only in a few per-tensor constants.

    `part` (a tensor-parallel rank's, optimized/parallel.py): keep only `part(name, shape)` of
    each tensor (whole where it says None). Each tensor is still drawn whole, on `device`, with
    the generator the unsharded draw uses (a CPU and a CUDA generator draw different numbers, so
    drawing elsewhere would change the model), and its part is cut out before the next tensor is
    drawn: beside the parts, one whole tensor (float32) exists at a time."""
    device = torch.device(device)
    init = default_init(cfg) if init is None else init
    out: Weights = {}
    for name, shape in expected_shapes(cfg).items():
        gain = init_gain(cfg, name, init)
        keep = None if part is None else part(name, tuple(shape))
        if device.type == "meta":
            out[name] = torch.empty(shape if keep is None else keep.shape(shape), dtype=dtype, device=device)
            continue
        gen = torch.Generator(device=device).manual_seed(_tensor_seed(seed, name))
        t = torch.empty(shape, dtype=torch.float32, device=device)
        if _is_scale(name):
            t.uniform_(0.5, 1.5, generator=gen)
            # The final norm's gain (FINAL_NORM_GAIN, both styles): with unit-scale logits the final
            # softcap (30 tanh(x / 30)) is all but linear, and a missing or wrong softcap would move
            # them less than one bf16 ULP (docs/design_notes.md note 13). A trained model's logits
            # reach past the cap; this gain puts ours there.
            if gain != 1.0:
                t *= gain
        elif name.startswith("embed_tokens"):
            t.normal_(0.0, 1.0, generator=gen)
            t /= math.sqrt(shape[-1]) / gain  # scaled back up by sqrt(width) in the forward
        else:
            fan_in = shape[-1]
            t.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=gen)
        if keep is not None:
            t = keep.take(t)
        out[name] = t.to(dtype)
    return out


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def _checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index.exists():
        try:
            weight_map = parse_json(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
        for f in files:
            if not isinstance(f, str) or "/" in f or f.startswith("."):
                raise CheckpointError(f"{index}: bad shard name {f!r}")
        return [path / f for f in files]
    if single.exists():
        return [single]
    raise CheckpointError(f"{path}: neither model.safetensors nor model.safetensors.index.json")


def _text_key(key: str) -> str | None:
    """The canonical name of a checkpoint key, or None for a tensor the text decoder skips."""
    if key.startswith(NON_TEXT_PREFIXES) or key == "lm_head.weight":
        return None
    for prefix in TEXT_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key  # unprefixed: reported as unexpected unless it is a known name


def load_weights(path: str | Path, cfg: Gemma4Config, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", part: PartOf | None = None) -> Weights:
    """Read the text decoder's tensors from a checkpoint directory.

    Tensors are memory-mapped and moved (or cast) once: no second copy is held. Vision/audio
    towers, a tied `lm_head.weight` and the unused K/V tensors of KV-shared layers are skipped.
    A missing, unexpected or mis-shaped tensor raises CheckpointError naming it.

    `part` (a tensor-parallel rank's, optimized/parallel.py): read only `part(name, shape)` of
    each tensor (whole, as without `part`, where it says None). A part is read span by span
    through safetensors' `get_slice` (a view of the memory-mapped file: only the span's bytes
    are read), cast and copied into a fresh tensor on `device`, so neither the host nor the
    device ever holds the whole of a tensor that is cut."""
    path = Path(path)
    want = expected_shapes(cfg)
    shared_unused = {f"layers.{s.index}.{n}" for s in cfg.layers if s.kv_shared for n in SHARED_LAYER_UNUSED}
    out: Weights = {}
    for file in _checkpoint_files(path):
        if not file.exists():
            raise CheckpointError(f"{file}: shard listed in the index is missing")
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for key in f.keys():
                    name = _text_key(key)
                    if name is None or name in shared_unused:
                        continue
                    if name not in want:
                        raise CheckpointError(f"{file.name}: unexpected tensor {key!r} (not part of this config)")
                    if name in out:
                        raise CheckpointError(f"{file.name}: tensor {key!r} appears twice")
                    shape = tuple(f.get_slice(key).get_shape())
                    if shape != want[name]:
                        raise CheckpointError(
                            f"{file.name}: tensor {key!r} has shape {list(shape)}, config expects {list(want[name])}")
                    keep = None if part is None else part(name, shape)
                    if keep is not None:
                        out[name] = keep.fill(shape, f.get_slice(key).__getitem__, dtype, device)
                    else:
                        out[name] = f.get_tensor(key).to(device=device, dtype=dtype)
        except SafetensorError as e:
            raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
        except OSError as e:
            raise CheckpointError(f"{file}: cannot read ({e})") from None
    missing = [k for k in want if k not in out]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"{path}: missing tensors {missing[:5]}{more}")
    return out


def load_config(path: str | Path) -> Gemma4Config:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    try:
        return Gemma4Config.from_json_file(path / "config.json")
    except ConfigError as e:
        raise ConfigError(f"{path / 'config.json'}: {e}") from None


# --------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------


def save_checkpoint(path: str | Path, cfg: Gemma4Config, weights: Weights) -> None:
    """Write config.json and model.safetensors in the layout transformers' Gemma4ForCausalLM
    reads (`model.` prefix). Each file is written atomically (reference/fileio.py)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    want = expected_shapes(cfg)
    if set(weights) != set(want):
        raise CheckpointError(f"weights do not match the config: missing {sorted(set(want) - set(weights))[:5]}, "
                              f"unexpected {sorted(set(weights) - set(want))[:5]}")
    tensors = {"model." + k: v.detach().contiguous().cpu() for k, v in weights.items()}
    write_atomic(path / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    cfg_dict = cfg.to_hf_dict()
    cfg_dict["dtype"] = str(next(iter(weights.values())).dtype).removeprefix("torch.")
    write_atomic(path / "config.json", json.dumps(cfg_dict, indent=2))


def resolve_config(path_or_preset) -> Gemma4Config:
    """The config `resolve` would return, without touching any weights."""
    if isinstance(path_or_preset, Gemma4Config):
        return path_or_preset
    name = str(path_or_preset)
    if name in PRESETS:
        return PRESETS[name]
    if not name:  # Path("") is the current directory: the error was "config.json: no config.json"
        raise CheckpointError(f"expected a preset name ({', '.join(PRESETS)}) or a checkpoint directory, "
                              "got an empty string")
    path = Path(name)
    if not path.exists():
        raise CheckpointError(f"{name!r} is neither a preset ({', '.join(PRESETS)}) nor an existing checkpoint directory")
    return load_config(path)


def resolve(path_or_preset, dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0,
            part: Callable[[Gemma4Config], PartOf] | None = None):
    """(config, weights) from a preset name (seeded random weights), a checkpoint directory, or a
    Gemma4Config (seeded random weights). `part(config)`: the PartOf that says which part of each
    tensor to keep (random_weights, load_weights); None keeps every tensor whole."""
    cfg = resolve_config(path_or_preset)
    keep = None if part is None else part(cfg)
    if isinstance(path_or_preset, Gemma4Config) or str(path_or_preset) in PRESETS:
        return cfg, random_weights(cfg, seed, dtype, device, part=keep)
    return cfg, load_weights(Path(str(path_or_preset)), cfg, dtype, device, part=keep)
