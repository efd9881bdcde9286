"""The reference against transformers' Gemma 4 on checkpoints transformers writes itself.

Bound: bit-for-bit, in fp32 and bf16. Both run the same ops in the same dtype and order on the
same CPU kernels (GEMMA4_SPEC.md sections 8-9 list what that takes: eager attention and experts,
models created in the target dtype, fp32 router softmax, pow(., -0.5) in RMSNorm), so any
difference at all is a real disagreement about the model, not noise.
"""

from __future__ import annotations

import json

import pytest
import torch

import reference
from reference.presets import PRESETS
from tests.hf_checkpoints import hf_causal_lm, hf_multimodal

pytest.importorskip("transformers")

FAMILIES = ["tiny", "tiny-kv-eq-v", "tiny-moe"]
DTYPES = [torch.float32, torch.bfloat16]


def _ids(cfg, batch, length, seed=0):
    return torch.randint(0, cfg.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def _hf_outputs(model, ids):
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    return out.logits, out.hidden_states


def _assert_same(ours: torch.Tensor, theirs: torch.Tensor, what: str):
    assert ours.shape == theirs.shape, f"{what}: shape {list(ours.shape)} vs {list(theirs.shape)}"
    if not torch.equal(ours, theirs):
        diff = (ours.float() - theirs.float()).abs()
        raise AssertionError(f"{what}: differs from transformers, max |diff| {diff.max().item():.3g} "
                             f"at {tuple(int(i) for i in torch.nonzero(diff == diff.max())[0])}")


def _check(ours_model, hf_model, ids):
    taps: dict = {}
    logits = ours_model(ids, taps=taps)
    hf_logits, hf_hidden = _hf_outputs(hf_model, ids)
    cfg = ours_model.config
    # hidden_states[0] is the scaled embedding, hidden_states[l + 1] the stream leaving layer l.
    _assert_same(taps["embed"], hf_hidden[0], "embed")
    for layer in range(cfg.num_hidden_layers - 1):
        _assert_same(taps[f"layers.{layer}.out"], hf_hidden[layer + 1], f"layers.{layer}.out")
    _assert_same(logits, hf_logits, "logits")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("family", FAMILIES)
def test_causal_lm_checkpoint(tmp_path, family, dtype):
    """transformers writes a Gemma4ForCausalLM checkpoint (`model.` keys, `per_layer_config`
    spelling); the reference loads it and agrees on a batch longer than the sliding window."""
    cfg = PRESETS[family]
    hf = hf_causal_lm(cfg, dtype, seed=1)
    hf.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "per_layer_config" in saved  # the >= 5.15 spelling is what this test reads
    ours = reference.load_model(tmp_path, dtype=dtype)
    assert ours.config.global_head_dim == cfg.global_head_dim
    assert ours.config.num_global_key_value_heads == cfg.num_global_key_value_heads
    _check(ours, hf, _ids(cfg, batch=2, length=3 * cfg.sliding_window + 2))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("family", ["tiny", "tiny-moe"])
def test_multimodal_checkpoint(tmp_path, family, dtype):
    """Gemma4ForConditionalGeneration writes `model.language_model.` keys, a nested text_config
    and a vision tower the loader must skip."""
    cfg = PRESETS[family]
    hf = hf_multimodal(cfg, dtype, seed=2)
    hf.save_pretrained(tmp_path)
    assert "text_config" in json.loads((tmp_path / "config.json").read_text())
    ours = reference.load_model(tmp_path, dtype=dtype)
    ids = _ids(cfg, batch=1, length=2 * cfg.sliding_window + 1, seed=3)
    with torch.no_grad():
        hf_logits = hf(ids).logits
    _assert_same(ours(ids), hf_logits, "logits")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("family", FAMILIES)
def test_our_checkpoint_loads_in_transformers(tmp_path, family, dtype):
    """We write (the `global_head_dim` spelling); transformers reads it and agrees."""
    from transformers import Gemma4ForCausalLM

    ours = reference.load_model(family, dtype=dtype, seed=4)
    reference.save_checkpoint(tmp_path, ours.config, ours.w)
    hf = Gemma4ForCausalLM.from_pretrained(tmp_path, dtype=dtype, attn_implementation="eager",
                                           experts_implementation="eager").eval()
    _check(ours, hf, _ids(ours.config, batch=1, length=17, seed=5))


@pytest.mark.parametrize("window", [1, 2])
def test_tiny_windows(tmp_path, window):
    """Window 1 (each sliding query sees only itself) and 2, far shorter than the sequence."""
    cfg = PRESETS["tiny"].replace(sliding_window=window)
    hf = hf_causal_lm(cfg, torch.float32, seed=6)
    hf.save_pretrained(tmp_path)
    ours = reference.load_model(tmp_path, dtype=torch.float32)
    assert ours.config.sliding_window == window
    _check(ours, hf, _ids(cfg, batch=1, length=11, seed=7))


def test_one_dim_ids_and_taps(tmp_path):
    """[T] ids give [T, V] logits and taps without a batch axis, identical to the [1, T] call."""
    model = reference.load_model("tiny", seed=8)
    ids = _ids(model.config, batch=1, length=9)[0]
    taps1, taps2 = {}, {}
    logits = model(ids, taps=taps1)
    batched = model(ids[None], taps=taps2)
    assert logits.shape == (9, model.config.vocab_size)
    assert torch.equal(logits, batched[0])
    cfg = model.config
    assert taps1["layers.4.q"].shape == (9, cfg.num_attention_heads, cfg.global_head_dim)
    assert taps1["ple"].shape == (9, cfg.num_hidden_layers, cfg.hidden_size_per_layer_input)
    # A KV-shared layer reports the keys it attends with: its source layer's.
    assert torch.equal(taps1["layers.9.k"], taps1[f"layers.{cfg.layers[9].kv_source}.k"])
    for name in ["embed", "final_norm", "logits", "layers.0.v", "layers.0.o", "layers.0.attn_out",
                 "layers.0.mlp_out", "layers.0.out"]:
        assert torch.equal(taps1[name], taps2[name][0]), name


def test_float64_reference_is_close_to_float32():
    """float64 is the truth the tolerance is measured against: it must run and agree with fp32."""
    cfg, w64 = reference.resolve("tiny-moe", dtype=torch.float64, seed=9)
    w32 = {k: v.float() for k, v in w64.items()}
    ids = _ids(cfg, 1, 12)[0]
    l64 = reference.Gemma4Reference(cfg, w64)(ids)
    l32 = reference.Gemma4Reference(cfg, w32)(ids)
    assert l64.dtype == torch.float64
    rel = (l64 - l32.double()).norm() / l64.norm()
    assert rel < 1e-5, rel
