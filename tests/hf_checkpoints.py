"""Tiny Gemma 4 checkpoints written by transformers itself, for testing against it."""

from __future__ import annotations

import math

import torch

from reference.config import Gemma4Config


def _text_kwargs(cfg: Gemma4Config) -> dict:
    d = cfg.to_hf_dict()
    d.pop("model_type")
    d.pop("architectures")
    return d


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """HF initialises every norm weight, layer_scalar and router scale to one and zeroes the pad
    embedding row: randomise all of it, or a `w` vs `1 + w` bug could pass unnoticed."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if "inv_freq" in name or "embed_scale" in name or not t.is_floating_point():
                continue  # derived tables, not checkpoint tensors
            if t.dim() <= 1 or name.endswith("layer_scalar"):
                fresh = 0.5 + torch.rand(t.shape, generator=gen)
            else:
                fresh = torch.randn(t.shape, generator=gen) / math.sqrt(t.shape[-1])
            t.copy_(fresh.to(t.dtype))


def hf_causal_lm(cfg: Gemma4Config, dtype: torch.dtype, seed: int = 0):
    """A transformers Gemma4ForCausalLM in `dtype` (created in it, never cast: GEMMA4_SPEC.md 8.5)."""
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    hf_cfg = Gemma4TextConfig(**_text_kwargs(cfg))
    model = Gemma4ForCausalLM._from_config(hf_cfg, attn_implementation="eager",
                                           experts_implementation="eager", dtype=dtype)
    randomize_(model, seed)
    return model.eval()


def hf_multimodal(cfg: Gemma4Config, dtype: torch.dtype, seed: int = 0):
    """A transformers Gemma4ForConditionalGeneration with a small vision tower: its checkpoint keys
    sit under `model.language_model.` beside `model.vision_tower.` ones the loader must skip."""
    from transformers import Gemma4Config as HFGemma4Config
    from transformers import Gemma4ForConditionalGeneration

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=16)
    hf_cfg = HFGemma4Config(text_config=_text_kwargs(cfg), vision_config=vision, audio_config=None)
    model = Gemma4ForConditionalGeneration._from_config(hf_cfg, attn_implementation="eager",
                                                        experts_implementation="eager", dtype=dtype)
    randomize_(model, seed)
    return model.eval()
