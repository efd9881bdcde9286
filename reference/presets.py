"""Named model shapes: tiny ones for tests (every text feature, small enough for 2 CPU cores)
and the four real Gemma 4 text decoders (GEMMA4_SPEC.md section 7) for performance work."""

from __future__ import annotations

from .config import FULL, SLIDING, Gemma4Config

S, F = SLIDING, FULL


def _pattern(sliding_per_full: int, repeats: int) -> tuple[str, ...]:
    return ((S,) * sliding_per_full + (F,)) * repeats


PRESETS: dict[str, Gemma4Config] = {
    # E2B-like: sliding + full layers (full has twice the head size), PLE, KV sharing with a
    # double-wide MLP on shared layers, final softcap, GQA on sliding layers. Hidden size 72, not 64:
    # like every real model's (1536, 2560, 5376, 2816) its square root, the embedding scale, is
    # inexact and rounds in bf16 (8.485 -> 8.5), and it is not a power of two (masked kernel tiles).
    "tiny": Gemma4Config(
        vocab_size=256, hidden_size=72, intermediate_size=96, num_hidden_layers=10,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
        layer_types=_pattern(4, 2), sliding_window=5,
        hidden_size_per_layer_input=8, vocab_size_per_layer_input=256,
        num_kv_shared_layers=4, use_double_wide_mlp=True, final_logit_softcapping=30.0,
    ),
    # 31B-like: K=V on full layers with their own KV head count, no PLE, no sharing.
    "tiny-kv-eq-v": Gemma4Config(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=8,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
        attention_k_eq_v=True, num_global_key_value_heads=1,
        layer_types=_pattern(3, 2), sliding_window=6, final_logit_softcapping=30.0,
    ),
    # 26B-A4B-like: K=V full layers plus a dense MLP and routed experts on every layer.
    "tiny-moe": Gemma4Config(
        vocab_size=256, hidden_size=64, intermediate_size=48, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
        attention_k_eq_v=True, num_global_key_value_heads=1,
        layer_types=_pattern(2, 2), sliding_window=4, final_logit_softcapping=30.0,
        enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32,
    ),
    "e2b": Gemma4Config(
        vocab_size=262144, hidden_size=1536, intermediate_size=6144, num_hidden_layers=35,
        num_attention_heads=8, num_key_value_heads=1, head_dim=256, global_head_dim=512,
        layer_types=_pattern(4, 7), sliding_window=512,
        hidden_size_per_layer_input=256, vocab_size_per_layer_input=262144,
        num_kv_shared_layers=20, use_double_wide_mlp=True, final_logit_softcapping=30.0,
        eos_token_id=(1, 106, 50),
    ),
    "e4b": Gemma4Config(
        vocab_size=262144, hidden_size=2560, intermediate_size=10240, num_hidden_layers=42,
        num_attention_heads=8, num_key_value_heads=2, head_dim=256, global_head_dim=512,
        layer_types=_pattern(5, 7), sliding_window=512,
        hidden_size_per_layer_input=256, vocab_size_per_layer_input=262144,
        num_kv_shared_layers=18, final_logit_softcapping=30.0, eos_token_id=(1, 106, 50),
    ),
    "31b": Gemma4Config(
        vocab_size=262144, hidden_size=5376, intermediate_size=21504, num_hidden_layers=60,
        num_attention_heads=32, num_key_value_heads=16, head_dim=256, global_head_dim=512,
        attention_k_eq_v=True, num_global_key_value_heads=4,
        layer_types=_pattern(5, 10), sliding_window=1024, final_logit_softcapping=30.0,
        max_position_embeddings=262144, eos_token_id=(1, 106, 50),
    ),
    "26b-a4b": Gemma4Config(
        vocab_size=262144, hidden_size=2816, intermediate_size=2112, num_hidden_layers=30,
        num_attention_heads=16, num_key_value_heads=8, head_dim=256, global_head_dim=512,
        attention_k_eq_v=True, num_global_key_value_heads=2,
        layer_types=_pattern(5, 5), sliding_window=1024, final_logit_softcapping=30.0,
        enable_moe_block=True, num_experts=128, top_k_experts=8, moe_intermediate_size=704,
        max_position_embeddings=262144, eos_token_id=(1, 106, 50),
    ),
}

DEFAULT_PRESET = "tiny"


def get_preset(name: str) -> Gemma4Config:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None
