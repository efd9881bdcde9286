"""Config parsing and checkpoint I/O: both spellings, derived per-layer facts, and clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import reference
from reference.config import ConfigError, Gemma4Config
from reference.presets import PRESETS
from reference.weights import CheckpointError, expected_shapes, parameter_count, random_weights


def _hf_dict(name="tiny"):
    return PRESETS[name].to_hf_dict()


# -- config -------------------------------------------------------------------------------


def test_round_trip_every_preset():
    for name, cfg in PRESETS.items():
        assert Gemma4Config.from_hf_dict(cfg.to_hf_dict()) == cfg, name


def test_nested_text_config_and_per_layer_config_spelling():
    d = _hf_dict("tiny-kv-eq-v")
    ghd, gkv = d.pop("global_head_dim"), d.pop("num_global_key_value_heads")
    full = [i for i, t in enumerate(d["layer_types"]) if t == "full_attention"]
    d["per_layer_config"] = {str(i): {"head_dim": ghd, "num_key_value_heads": gkv} for i in full}
    cfg = Gemma4Config.from_hf_dict({"model_type": "gemma4", "text_config": d, "vision_config": {}})
    assert cfg == PRESETS["tiny-kv-eq-v"]
    # Keyed by layer type instead of index: the same model.
    d["per_layer_config"] = {"full_attention": {"head_dim": ghd, "num_key_value_heads": gkv}}
    assert Gemma4Config.from_hf_dict(d) == PRESETS["tiny-kv-eq-v"]


def test_derived_layers_match_the_spec():
    e2b = PRESETS["e2b"]
    assert [s.kv_source for s in e2b.layers[15:20]] == [13, 13, 13, 13, 14]
    assert all(s.kv_source == (14 if s.type == "full_attention" else 13) for s in e2b.layers[15:])
    assert e2b.layers[15].mlp_width == 12288 and e2b.layers[14].mlp_width == 6144
    assert (e2b.layers[4].head_dim, e2b.layers[3].head_dim) == (512, 256)
    e4b = PRESETS["e4b"]
    assert {s.kv_source for s in e4b.layers[24:]} == {22, 23}
    b31 = PRESETS["31b"]
    full, sliding = b31.layers[5], b31.layers[0]
    assert (full.num_kv_heads, full.has_v_proj, full.window) == (4, False, None)
    assert (sliding.num_kv_heads, sliding.has_v_proj, sliding.window) == (16, True, 1024)


def test_e2b_parameter_count():
    # 4.63B text-decoder parameters, 2.35B of them in the PLE table (GEMMA4_SPEC.md section 7 shapes).
    n = parameter_count(PRESETS["e2b"])
    assert 4.4e9 < n < 5.2e9, n


def _bad(mutate, name="tiny"):
    d = _hf_dict(name)
    mutate(d)
    return d


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d.pop("hidden_size"), "hidden_size"),
    (lambda d: d.update(hidden_size="64"), "hidden_size"),
    (lambda d: d.update(num_attention_heads=True), "num_attention_heads"),
    (lambda d: d.update(num_key_value_heads=3), "num_key_value_heads"),
    (lambda d: d.update(layer_types=d["layer_types"][:-1]), "layer_types"),
    (lambda d: d.update(layer_types=d["layer_types"][:-1] + ["sliding_attention"]), "layer_types"),
    (lambda d: d.update(layer_types=["banana"] + d["layer_types"][1:]), "layer_types[0]"),
    # Shared block holds a full layer, but no full layer precedes it.
    (lambda d: d.update(layer_types=["sliding_attention"] * 6 + ["sliding_attention"] * 3 + ["full_attention"]),
     "layer_types"),
    (lambda d: d.update(num_kv_shared_layers=10), "num_kv_shared_layers"),
    (lambda d: d.update(rope_parameters={"full_attention": {"rope_type": "yarn", "rope_theta": 1.0}}), "rope_type"),
    (lambda d: d.update(rms_norm_eps="tiny"), "rms_norm_eps"),
    (lambda d: d.update(per_layer_config=[1, 2]), "per_layer_config"),
    (lambda d: d.update(per_layer_config={"99": {"head_dim": 32}}), "per_layer_config"),
    (lambda d: d.update(model_type="llama"), "model_type"),
])
def test_invalid_configs_name_the_field(mutate, field):
    with pytest.raises(ConfigError, match=field.replace("[", r"\[")):
        Gemma4Config.from_hf_dict(_bad(mutate))


def test_invalid_moe_and_kv_eq_v_configs():
    with pytest.raises(ConfigError, match="num_global_key_value_heads"):
        Gemma4Config.from_hf_dict(_bad(lambda d: d.update(num_global_key_value_heads=None), "tiny-kv-eq-v"))
    with pytest.raises(ConfigError, match="num_experts"):
        Gemma4Config.from_hf_dict(_bad(lambda d: d.update(num_experts=None), "tiny-moe"))
    with pytest.raises(ConfigError, match="top_k_experts"):
        Gemma4Config.from_hf_dict(_bad(lambda d: d.update(top_k_experts=9), "tiny-moe"))


def test_config_file_errors(tmp_path):
    with pytest.raises(CheckpointError, match="neither a preset.*nor an existing checkpoint"):
        reference.load_model(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json.*not valid JSON"):
        reference.load_model(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        reference.load_model(tmp_path)


# -- weights ------------------------------------------------------------------------------


def test_random_init_is_seeded_and_not_ones():
    cfg = PRESETS["tiny-moe"]
    a, b, c = random_weights(cfg, 0), random_weights(cfg, 0), random_weights(cfg, 1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["norm.weight"], c["norm.weight"])
    for key in ["norm.weight", "layers.0.layer_scalar", "layers.0.router.scale", "layers.0.router.per_expert_scale",
                "layers.0.self_attn.q_norm.weight"]:
        assert not torch.allclose(a[key], torch.ones_like(a[key])), key


def test_real_shapes_build_on_meta():
    w = random_weights(PRESETS["31b"], device="meta", dtype=torch.bfloat16)
    assert w["layers.5.self_attn.k_proj.weight"].shape == (2048, 5376)
    assert "layers.5.self_attn.v_proj.weight" not in w
    assert all(t.device.type == "meta" for t in w.values())


def _write(tmp_path, cfg, tensors, prefix="model."):
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    save_file({prefix + k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "model.safetensors"))


def test_load_skips_towers_shared_kv_and_tied_head(tmp_path):
    cfg = PRESETS["tiny"]
    w = random_weights(cfg, 3)
    extra = {"lm_head.weight": w["embed_tokens.weight"].clone()}
    extra["model.vision_tower.x.weight"] = torch.ones(2, 2)
    shared = cfg.first_shared_layer
    extra[f"model.language_model.layers.{shared}.self_attn.k_proj.weight"] = torch.ones(4, 4)
    tensors = {"model.language_model." + k: v for k, v in w.items()} | extra
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma4", "text_config": cfg.to_hf_dict()}))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "model.safetensors"))
    loaded = reference.load_weights(tmp_path, cfg)
    assert set(loaded) == set(w) and all(torch.equal(loaded[k], w[k]) for k in w)


def test_sharded_checkpoint(tmp_path):
    cfg = PRESETS["tiny-kv-eq-v"]
    w = random_weights(cfg, 4)
    keys = sorted(w)
    halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    weight_map = {}
    for file, ks in halves.items():
        save_file({"model." + k: w[k] for k in ks}, str(tmp_path / file))
        weight_map.update({"model." + k: file for k in ks})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    model = reference.load_model(tmp_path)
    assert all(torch.equal(model.w[k], w[k]) for k in w)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="00002.*missing"):
        reference.load_model(tmp_path)


def test_missing_unexpected_and_misshaped_tensors(tmp_path):
    cfg = PRESETS["tiny"]
    w = random_weights(cfg, 5)
    missing = dict(w)
    missing.pop("layers.2.mlp.up_proj.weight")
    _write(tmp_path, cfg, missing)
    with pytest.raises(CheckpointError, match="missing tensors.*layers.2.mlp.up_proj.weight"):
        reference.load_model(tmp_path)
    _write(tmp_path, cfg, w | {"layers.0.self_attn.mystery.weight": torch.ones(3)})
    with pytest.raises(CheckpointError, match="unexpected tensor.*mystery"):
        reference.load_model(tmp_path)
    bad = dict(w)
    bad["layers.1.self_attn.q_proj.weight"] = torch.ones(8, 64)
    _write(tmp_path, cfg, bad)
    with pytest.raises(CheckpointError, match=r"q_proj.weight.*\[8, 64\].*\[64, 72\]"):
        reference.load_model(tmp_path)


def test_truncated_and_foreign_files(tmp_path):
    cfg = PRESETS["tiny"]
    _write(tmp_path, cfg, random_weights(cfg, 6))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        reference.load_model(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"PK\x03\x04 this is a zip, not safetensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        reference.load_model(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="neither model.safetensors"):
        reference.load_model(tmp_path)


def test_save_refuses_mismatched_weights_and_keeps_old_files(tmp_path):
    cfg = PRESETS["tiny"]
    w = random_weights(cfg, 7)
    reference.save_checkpoint(tmp_path, cfg, w)
    before = (tmp_path / "model.safetensors").read_bytes()
    broken = dict(w)
    broken.pop("norm.weight")
    with pytest.raises(CheckpointError, match="norm.weight"):
        reference.save_checkpoint(tmp_path, cfg, broken)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_expected_shapes_follow_the_spec():
    s = expected_shapes(PRESETS["tiny-moe"])
    assert s["layers.0.experts.gate_up_proj"] == (4, 64, 64)
    assert s["layers.0.experts.down_proj"] == (4, 64, 32)
    assert s["layers.2.self_attn.k_proj.weight"] == (32, 64)  # K=V full layer: 1 head of 32
    assert "layers.2.self_attn.v_proj.weight" not in s
    tiny = expected_shapes(PRESETS["tiny"])
    assert "layers.6.self_attn.k_proj.weight" not in tiny  # KV-shared
    assert tiny["layers.6.mlp.gate_proj.weight"] == (192, 72)  # double-wide on shared layers
